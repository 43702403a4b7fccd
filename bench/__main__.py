"""`make bench`: run every stage benchmark and print the ratios side by side.

Each bench module has `main() -> dict` that prints its own table and returns its numbers,
including at least one `*ratio*` key; each runs in a process of its own. Results go to
.bench/results.json, one entry per bench with the machine, date and scale it ran at; running
some benches updates their entries and keeps the others (`python -m bench.readme` turns the
file into the README's table).

    python -m bench [--scale F] [--repeats N] [bench.extract bench.index ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHES = ["bench.extract", "bench.download", "bench.phash", "bench.polite", "bench.clip", "bench.tag", "bench.index", "bench.search",
           "bench.scale"]
RESULTS = Path(".bench") / "results.json"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 1)}


def parse(argv: list[str]) -> argparse.Namespace:
    from bench.sizes import describe
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the stage benchmarks beside the tools a user would pick instead.",
        epilog="sizes (environment variables, each overrides --scale):\n" + describe())
    parser.add_argument("benches", nargs="*", metavar="bench.NAME", help=f"default: all of {', '.join(BENCHES)}")
    parser.add_argument("--scale", type=float, help="multiply every default size (0.05: a quick end-to-end check)")
    parser.add_argument("--repeats", type=int, help="at most this many best-of repeats per measurement")
    args = parser.parse_args(argv)
    unknown = [b for b in args.benches if b not in BENCHES and b != "bench.recovery"]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    return args


def save(results: dict) -> None:
    """Into RESULTS; benches not run this time keep their last entry (with its own date)."""
    RESULTS.parent.mkdir(exist_ok=True)
    kept = {}
    if RESULTS.exists():
        try:
            kept = json.loads(RESULTS.read_text())
        except ValueError:
            kept = {}
    RESULTS.write_text(json.dumps({**kept, **results}, indent=1, default=str))


ONE_BENCH = """
import json, importlib, sys
import clipfleet.workers  # fills the stage registry RunConfig reads
numbers = importlib.import_module(sys.argv[1]).main()
with open(sys.argv[2], "w") as f:
    json.dump(numbers, f, default=lambda o: o.item() if hasattr(o, "item") else str(o))
"""


def run_alone(module_name: str) -> dict | None:
    """One bench in a process of its own, its numbers back through a file (None: it failed).

    Alone, so what one bench leaves behind does not slow the next: after the 200 000 x 768
    index bench the search bench's service ran at 40% of its own rate in the same process.
    Its temporary directory is the bench's TMPDIR, so what the bench and the tools it runs leave
    there (img2dataset's and clip-retrieval's wandb folders, multiprocessing's) goes with it."""
    with tempfile.TemporaryDirectory(prefix="clipfleet-bench-") as tmp:
        out = Path(tmp) / "numbers.json"
        code = subprocess.run([sys.executable, "-c", ONE_BENCH, module_name, str(out)],
                              env={**os.environ, "TMPDIR": tmp}).returncode
        if code != 0 or not out.exists():
            return None
        return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    args = parse(argv)
    # Sizes are read when a bench module is imported, so these are set before any import.
    if args.scale is not None:
        os.environ["CLIPFLEET_BENCH_SCALE"] = str(args.scale)
    if args.repeats is not None:
        os.environ["CLIPFLEET_BENCH_REPEATS"] = str(args.repeats)
    from bench.sizes import scale
    results, failed = {}, []
    for module_name in args.benches or BENCHES:
        print(f"\n=== {module_name} ===", flush=True)
        started = time.time()
        numbers = run_alone(module_name)
        if numbers is None:  # report every bench, then fail at the end
            print(f"{module_name} failed", flush=True)
            failed.append(module_name)
            continue
        results[module_name] = {**numbers, "_run": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(time.time() - started),
            "scale": scale(), "command": "python -m bench " + " ".join(argv), **machine()}}
        print(f"({time.time() - started:.0f}s)", flush=True)
        save(results)  # after every bench: a run cut short keeps what it measured
    print("\n=== ratios ===")
    for module_name, numbers in results.items():
        for key, value in numbers.items():
            if "ratio" in key and isinstance(value, (int, float)):
                print(f"{module_name:>16} {key:<44} {value:6.2f}")
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
