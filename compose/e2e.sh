#!/usr/bin/env bash
# `make compose-e2e`: push a small sandbox run through the containerised stack, where a Docker engine
# exists (not part of `make test`; the same topology runs as local processes in tests/e2e).
#   1. build the image and start the stack (compose/.env must hold every credential),
#   2. make a sandbox world on a volume; serve it inside the download worker's network namespace,
#      where its 127.0.0.1 URLs resolve; upload its WATs to MinIO,
#   3. run the pipeline on the fleet and wait for it; check the published dataset and search.
set -euo pipefail
cd "$(dirname "$0")"
[ -f .env ] || { echo "compose/.env is missing: copy .env.example and fill it in" >&2; exit 2; }
compose() { docker compose --env-file .env -f docker-compose.yml -f e2e.override.yml "$@"; }
compose up -d --build --wait
trap 'compose --profile e2e down' EXIT
compose --profile e2e run --rm producer clipfleet sandbox make /world --samples 400
compose --profile e2e up -d --wait sandbox
compose --profile e2e run --rm producer sh -c '
  python - <<PY
import fsspec, glob, os
fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["CLIPFLEET_S3_ENDPOINT"]})
for path in glob.glob("/world/wat/*"):
    fs.put_file(path, "clipfleet/world/wat/" + os.path.basename(path))
PY
  clipfleet run --wat $(python -c "import glob, os; print(\" \".join(\"s3://clipfleet/world/wat/\" + os.path.basename(p) for p in sorted(glob.glob(\"/world/wat/*\"))))") \
    --store s3://clipfleet/run --broker "$CLIPFLEET_BROKER" --allow-private-addresses --filter-model shapes \
    --multilingual-filter-model shapes --embed-model shapes
  clipfleet status --store s3://clipfleet/run'
curl -fsS "http://127.0.0.1:1234/health"
echo "compose e2e: the run finished and search answers on http://127.0.0.1:1234"
