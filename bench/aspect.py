"""Does the CLIP filter judge the picture or its padding? Recall of right pairs per aspect band.

    python -m bench.aspect --dir /tmp/aspect [--samples 2000] [--resize-mode border]

Builds (or reuses) a sandbox world in DIR/world with aspect ratios from 1:2 to 2.5:1 and 30% wrong
captions, runs `clipfleet run --wat ... --until clip` on it with the shipped `shapes` model through
an embedded fleet (the download stored as --resize-mode says; img2dataset's default is border),
then prints precision, recall and recall per width/height band (sandbox/filter_recall.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipfleet.sandbox.filter_recall import measure, report, worst_band_gap

ASPECTS = (0.5, 2.5)
WRONG_CAPTIONS = 0.3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="folder for the world and the stores")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--resize-mode", default="border")
    parser.add_argument("--model", default="shapes")
    args = parser.parse_args(argv)

    from clipfleet.producer.cli import main as cli_main
    from clipfleet.producer.fleet import free_port
    from clipfleet.sandbox.server import SandboxServer
    from clipfleet.sandbox.web import make_sandbox

    root = Path(args.dir).resolve()
    world = root / "world"
    if not (world / "sandbox.json").is_file():
        make_sandbox(world, samples=args.samples, port=free_port(), seed=args.seed,
                     wrong_caption_share=WRONG_CAPTIONS, aspects=ASPECTS)
    settings = json.loads((world / "sandbox.json").read_text())
    store = str(root / f"store-{args.resize_mode}")
    wats = [str(world / "wat" / name) for name in settings["wat_files"]]
    with SandboxServer(world):
        code = cli_main(["run", "--wat", *wats, "--store", store, "--until", "clip", "--allow-private-addresses",
                         "--shard-size", "500", "--resize-mode", args.resize_mode,
                         "--filter-model", args.model, "--multilingual-filter-model", args.model])
    if code != 0:
        return code
    result = measure(world, store)
    print(f"world: {settings['samples']} images, aspect ratios {ASPECTS[0]}-{ASPECTS[1]}, "
          f"{WRONG_CAPTIONS:.0%} wrong captions; stored as {args.resize_mode}; model {args.model}")
    print(report(result))
    ok = result["precision"] >= 0.95 and result["recall"] >= 0.9 and worst_band_gap(result) <= 0.10
    print("bar (recall >= 0.9 at precision >= 0.95, every band within 10 points of square):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
