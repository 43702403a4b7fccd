"""GPU benchmark, one script for a machine with one GPU (under 8 minutes): CLIP ViT-B/32 and
ViT-L/14 image+text samples/s through the gpu-clip stage's own path (tar streamed, JPEGs
decoded, resized and normalised on the GPU with nvjpeg, fp16 forward, parquet written).

    .venv/bin/python -m bench.gpu            # on the GPU machine
    .venv/bin/python -m bench.gpu --cpu      # the same path on CPU, tiny, to check it runs

Weights are RANDOM (speed only): both architectures are built by open_clip and saved to a
local checkpoint, as bench/clip.py does. Input: sandbox images resized to 256 px as the
download stage stores them, UNIQUE distinct samples copied into as many shards as it takes to
reach the sample count. Also printed: the largest similarity difference between the GPU
decode path and the CPU (PIL) path on the same shard, so the speed is not bought with wrong
pixels. Goal: >= 2000 samples/s for ViT-L/14 on one H100-class GPU (LAION: 312 per A100 with
clip-retrieval).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.clip import REPO, build_shards, random_checkpoint, stage_seconds

UNIQUE = 1024
SHARD_SIZE = 1024


def replicate(source: Path, copies: int) -> list[int]:
    """Shards 1..copies-1 as byte copies of shard 0 (keys are read from each shard's parquet)."""
    for shard in range(1, copies):
        for ext in ("tar", "parquet"):
            shutil.copyfile(source / f"images/00000.{ext}", source / f"images/{shard:05d}.{ext}")
    return list(range(copies))


def decode_agreement(source: Path, model: str, batch: int) -> float:
    """max |similarity(GPU decode) - similarity(PIL decode)| over shard 0, fp16 both."""
    import pyarrow.parquet as pq

    from clipfleet.shared.pipeline import execute
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    from clipfleet.workers.clip.stage import ClipStage

    class PilDecode(ClipStage):
        gpu_decode = False

    sims = []
    for stage_cls in (ClipStage, PilDecode):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(str(Path(tmp) / "store"))
            for ext in ("tar", "parquet"):
                store.write_bytes(f"images/00000.{ext}", (source / f"images/00000.{ext}").read_bytes())
            cfg = RunConfig.make(store=store.uri, until="clip", input_kind="urls", filter_model=model,
                                 multilingual_filter_model=model, clip_batch_size=batch, clip_device="cuda",
                                 clip_precision="fp16")
            execute(stage_cls(cfg), store, 0)
            table = pq.read_table(io.BytesIO(store.read_bytes("clip/00000.parquet")))
            sims.append(table.column("similarity").to_numpy())
    return float(abs(sims[0] - sims[1]).max())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same path on CPU with a tiny input")
    parser.add_argument("--samples", type=int, default=None, help="samples per model (default 16384 on GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per forward pass (default 512 on GPU)")
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14", help="open_clip architectures, comma list")
    args = parser.parse_args(argv)

    import torch
    gpu = torch.cuda.is_available() and not args.cpu
    device, precision = ("cuda", "fp16") if gpu else ("cpu", "fp32")
    samples = args.samples or (16384 if gpu else 16)
    batch = args.batch_size or (512 if gpu else 8)
    unique = min(UNIQUE, samples)
    name = torch.cuda.get_device_name(0) if gpu else "CPU (fallback check, not a GPU number)"
    print(f"{name}: {samples} samples per model, batch {batch}, {precision}, random weights (speed only)", flush=True)

    work = Path(tempfile.mkdtemp(prefix="clipfleet-gpu-bench-"))
    results = {"device": name, "samples": samples, "batch_size": batch, "precision": precision}
    try:
        build_shards(work / "data", unique, min(SHARD_SIZE, unique))
        source = work / "data" / "store"
        shards = replicate(source, max(1, samples // unique))
        total = len(shards) * unique
        for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
            model = f"{arch}/{random_checkpoint(work / f'{arch}.pt', arch)}"
            stage_seconds(source, shards[:1], model, precision, device=device, batch=batch)  # warm up
            seconds = stage_seconds(source, shards, model, precision, device=device, batch=batch)
            rate = total / seconds
            results[f"{arch}_samples_per_s"] = round(rate, 1)
            line = f"{arch:<10} {rate:10.1f} samples/s (image+text, {total} samples in {seconds:.1f} s)"
            if gpu:
                results[f"{arch}_gpu_vs_pil_decode_max_similarity_diff"] = diff = decode_agreement(source, model, batch)
                line += f"; GPU vs PIL decode: max similarity difference {diff:.4f}"
            print(line, flush=True)
        if gpu and "ViT-L-14_samples_per_s" in results:
            print(f"goal: >= 2000 samples/s for ViT-L-14 -> {'met' if results['ViT-L-14_samples_per_s'] >= 2000 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = REPO / ".bench"
    out.mkdir(exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
