"""`make bench`: run every stage benchmark and print the ratios side by side.

Each bench module has `main() -> dict` that prints its own table and returns its numbers,
including at least one `*ratio*` key. Results are also written to .bench/results.json.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

BENCHES = ["bench.extract", "bench.download", "bench.polite", "bench.clip", "bench.tag", "bench.index", "bench.search"]


def main(names: list[str]) -> int:
    results, failed = {}, []
    for module_name in names or BENCHES:
        print(f"\n=== {module_name} ===", flush=True)
        started = time.time()
        try:
            results[module_name] = importlib.import_module(module_name).main()
        except Exception as exc:  # report every bench, then fail at the end
            print(f"{module_name} failed: {exc.__class__.__name__}: {exc}", flush=True)
            failed.append(module_name)
            continue
        print(f"({time.time() - started:.0f}s)", flush=True)
    print("\n=== ratios ===")
    for module_name, numbers in results.items():
        for key, value in numbers.items():
            if "ratio" in key:
                print(f"{module_name:>16} {key:<40} {value:6.2f}")
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
