"""`clipfleet run` enqueues the stages of a run without importing any of them (nor torch):
the producer knows stages by name, from shared.pipeline's registry."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from tests.workers.extract.watfile import good_page, write_wat

REPO = Path(__file__).resolve().parents[2]
# Runs the CLI, then prints the stage modules and heavy libraries the process imported.
PROBE = """
import json, re, sys
from clipfleet.producer.cli import main
code = main(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules
                        if m in ("torch", "open_clip", "faiss", "cv2") or re.fullmatch(r"clipfleet\\.workers\\.\\w+\\.(stage|task)", m))))
sys.exit(code)
"""


def test_a_detached_run_imports_no_stage(tmp_path, redis_url):
    wats = []
    for i in range(2):
        wats.append(tmp_path / f"{i}.warc.wat.gz")
        write_wat(wats[-1], [good_page(i)])
    result = subprocess.run([sys.executable, "-c", PROBE, "run", "--wat", *map(str, wats), "--store",
                             str(tmp_path / "store"), "--broker", redis_url, "--detach", "--until", "download"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "enqueued 2 extract tasks" in result.stdout
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert redis.Redis.from_url(redis_url).llen("cpu-extract") == 2  # really sent, by name
