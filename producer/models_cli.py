"""`clipfleet models fetch` and `clipfleet models import-head`: models fetched once for a fleet.

  models fetch NAME... [--to URI]       open_clip names and hf-hub: repos through huggingface_hub
                                        (HF_ENDPOINT, HF_TOKEN, proxies, resume, the usual cache);
                                        laion:KIND heads over HTTPS with their sha256 checked
  models fetch --for-run --store S      every model and LAION head the run's run.json names
  models import-head KIND FILE          a LAION head file as it ships -> the head format
"""
from __future__ import annotations

import argparse
import sys

LAION_PREFIX = "laion:"


def register(actions: argparse._SubParsersAction) -> None:
    fetch = actions.add_parser("fetch", help="fetch models (and laion:KIND heads) once into a model cache")
    fetch.add_argument("names", nargs="*", metavar="NAME",
                       help="open_clip ARCH/TAG, hf-hub:ORG/REPO, or laion:KIND (nsfw-l14, nsfw-b32, "
                            "aesthetic-l14, watermark-effnet)")
    fetch.add_argument("--for-run", action="store_true", help="every model the run in --store names")
    fetch.add_argument("--store", help="a run's store: its model cache is STORE/models")
    fetch.add_argument("--to", metavar="URI", help="the model cache (default: STORE/models)")
    fetch.add_argument("--offline", action="store_true",
                       help="use only this machine's Hugging Face cache (as HF_HUB_OFFLINE=1)")
    fetch.add_argument("--url", help="with one laion:KIND: fetch from this URL instead of LAION's")
    fetch.add_argument("--sha256", help="with one laion:KIND: the digest the file must have")
    fetch.set_defaults(func=cmd_fetch)

    imp = actions.add_parser("import-head", help="turn a LAION head file as it ships into the head format")
    imp.add_argument("kind", metavar="KIND", help="nsfw-l14, nsfw-b32 (autokeras zips), aesthetic-l14 (.pth), "
                                                  "watermark-effnet (.pt)")
    imp.add_argument("file", metavar="FILE", help="the released file (or an unzipped SavedModel folder)")
    imp.add_argument("--out", help="where to write the head: a path or URI (default: KIND.pt here, or "
                                   "TO/heads/KIND.pt with --to)")
    imp.add_argument("--to", metavar="URI", help="a model cache to write the head into")
    imp.set_defaults(func=cmd_import_head)


def _fail(message: str) -> int:
    print(f"clipfleet: error: {message}", file=sys.stderr)
    return 2


def cmd_fetch(args) -> int:
    from clipfleet.shared.models import ModelNotAvailable
    from clipfleet.shared.models.cache import cache_uri_of
    from clipfleet.shared.models.fetch import fetch
    from clipfleet.shared.models.heads import HeadError
    from clipfleet.shared.models.laion_heads import download

    cache = args.to or (cache_uri_of(args.store) if args.store else None)
    if not cache:
        return _fail("say where the model cache is: --to URI, or --store STORE for STORE/models")
    names = list(args.names)
    if args.for_run:
        if not args.store:
            return _fail("--for-run needs --store, the run whose models to fetch")
        names += run_names(args.store)
    if not names:
        return _fail("name at least one model, or --for-run --store STORE")
    heads = [n for n in names if n.startswith(LAION_PREFIX)]
    if (args.url or args.sha256) and len(heads) != 1:
        return _fail("--url and --sha256 go with exactly one laion:KIND")
    failed = 0
    for name in dict.fromkeys(names):
        try:
            if name.startswith(LAION_PREFIX):
                spec = download(name[len(LAION_PREFIX):], cache, url=args.url, sha256=args.sha256)
                print(f"{name}: in {cache}; use it as {spec}")
            elif fetch(name, cache, offline=args.offline or None) is None:
                print(f"{name}: local, nothing to fetch")
            else:
                print(f"{name}: in {cache}")
        except (ModelNotAvailable, HeadError, OSError) as exc:
            print(f"clipfleet: error: {name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def run_names(store_uri: str) -> list[str]:
    """The models and LAION heads of the run in `store_uri` (its run.json)."""
    from clipfleet.producer.preflight import run_models
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    cfg = RunConfig.load(Store(store_uri))
    return run_models(cfg, cfg.stages)


def cmd_import_head(args) -> int:
    from clipfleet.shared.models.heads import HeadError
    from clipfleet.shared.models.laion_heads import import_head, save_head
    out = args.out or (f"{args.to.rstrip('/')}/heads/{args.kind}.pt" if args.to else f"{args.kind}.pt")
    try:
        state = import_head(args.kind, args.file)
        written = save_head(state, out)
    except (HeadError, OSError) as exc:
        return _fail(str(exc))
    flag = {"nsfw": "--punsafe-head", "aesthetic": "--aesthetic-head", "watermark": "--pwatermark-head"}
    print(f"wrote {written}; use it with {flag[args.kind.split('-')[0]]} {args.kind}:{written}")
    return 0
