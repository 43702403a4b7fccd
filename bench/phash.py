"""Perceptual hash benchmark: what the pHash costs download, on one core.

The sandbox world's SAMPLES images are held in memory; download's CPU side of each (decode,
resize, encode and the hash: resize_image, as the stage runs it) is timed, and so is the hash
alone (phash_bgr) on the same decoded, resized pictures. The share is hash / CPU side: an upper
bound on its share of download's per-core rate, which also pays for fetching and writing; when
bench.download has a result in .bench/results.json, the share of the stage's own per-core rate too.
Best of REPEATS, one process, so a busy spell on the shared machine hits both alike.

    python -m bench bench.phash
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.__main__ import RESULTS
from bench.sizes import repeats, size

SAMPLES = size("PHASH_SAMPLES")
REPEATS = repeats(3)


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def main() -> dict:
    from clipfleet.sandbox.web import make_sandbox
    from clipfleet.workers.download.options import DownloadOptions
    from clipfleet.workers.download.phash import phash_bgr
    from clipfleet.workers.download.resize import decode_bgr, scale_to, sniff, target_size, resize_image

    opts = DownloadOptions(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)
    with tempfile.TemporaryDirectory() as tmp:
        make_sandbox(Path(tmp), samples=SAMPLES, port=1, wat_files=1)
        datas = [p.read_bytes() for p in sorted((Path(tmp) / "web/img").iterdir())]
    pictures = []
    for data in datas:  # what the stage hashes: the decoded picture fitted to --image-size
        header = sniff(data)
        target = target_size(*header.size, opts)
        pictures.append(scale_to(decode_bgr(data, header.format, *header.size, target), target))

    cpu_side_s = best(lambda: [resize_image(data, opts) for data in datas])
    hash_s = best(lambda: [phash_bgr(picture) for picture in pictures])
    result = {"samples": len(datas), "download_cpu_side_per_s": round(len(datas) / cpu_side_s, 1),
              "phash_per_s": round(len(datas) / hash_s, 1), "phash_us": round(1e6 * hash_s / len(datas), 1),
              "phash_share_of_download_cpu_ratio": round(hash_s / cpu_side_s, 3)}
    try:  # the whole stage's rate per core, as bench.download measured it through the fleet
        stage = json.loads(RESULTS.read_text())["bench.download"]
        per_core = stage["clipfleet_samples_per_s"] / stage["processes"]
        result["phash_share_of_stage_per_core_ratio"] = round(hash_s / len(datas) * per_core, 3)
    except (OSError, KeyError, ValueError):
        pass
    print(f"  download's CPU side (with the hash) {result['download_cpu_side_per_s']:>8.0f} samples/s per core")
    print(f"  the pHash alone                     {result['phash_per_s']:>8.0f} samples/s ({result['phash_us']} us)")
    print(f"  share of download's CPU             {100 * result['phash_share_of_download_cpu_ratio']:.1f}% "
          "(goal <= 10%)")
    if "phash_share_of_stage_per_core_ratio" in result:
        print(f"  share of the stage's per-core rate  {100 * result['phash_share_of_stage_per_core_ratio']:.1f}%")
    return result


if __name__ == "__main__":
    main()
