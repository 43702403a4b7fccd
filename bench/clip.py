"""CLIP filter benchmark: samples per second (image + text encoded) on this machine, side by side.

The same image shards (a sandbox world downloaded into img2dataset's layout at 256 px) go to:
- clip-retrieval 2.45's `inference` (webdataset input, image and text enabled), in a venv of
  its own under .bench/clip-retrieval (it pins pyarrow<16 and open_clip<3; torch 2.14.1 is the
  project's, shared through a .pth file, with setuptools<70 as clip-retrieval needs). Timed as
  the marginal rate between a large and a small input, so its process start and model load
  are not counted against it; on CPU it runs fp32 (all_clip's wrapper autocasts on CUDA only);
- this project's gpu-clip stage (shared.pipeline.execute on each shard: stream the tar, decode
  beside the model, encode, write the parquet), model already loaded, in bf16 and in fp32;
- the floor: the bare model forward (image and text towers) on pre-decoded tensors and
  pre-tokenized captions, at the same batch size, in the same precision, with all cores or
  all but one for torch, whichever is faster (the stage's default gives torch every core).
Every model is ViT-B/32 with the SAME RANDOM WEIGHTS, saved once to a local checkpoint
(open_clip:ViT-B-32//path.pt for clip-retrieval): this measures speed only, never quality.
Random weights also make the stage's "auto" precision probe meaningless, so the stage's
precision is set explicitly here. The stage and the floor run REPEATS times (bf16 and fp32 in
the first pass, the headline precision after it) and the best is kept; clip-retrieval's two
runs (large and small input) run twice, and each size's fastest run is kept.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".bench" / "clip-retrieval"
from bench.sizes import repeats, size

SAMPLES = size("CLIP_SAMPLES")
SMALL = 64  # clip-retrieval's reference run, for its startup cost
SHARD_SIZE = 192
BATCH = int(os.environ.get("CLIPFLEET_BENCH_CLIP_BATCH", 64))
REPEATS = repeats(3)
CLIP_RETRIEVAL_PASSES = min(2, REPEATS)
ARCH = "ViT-B-32"


# ----------------------------------------------------------------------------- inputs

def build_shards(directory: Path, samples: int, shard_size: int, seed: int = 5) -> list[int]:
    """A sandbox world's images resized as the download stage does, in its img2dataset layout."""
    from clipfleet.sandbox.web import make_sandbox
    from clipfleet.shared.storage import Store
    from clipfleet.workers.download.options import DownloadOptions
    from clipfleet.workers.download.resize import resize_image
    from clipfleet.workers.download.writer import ShardWriter, sample_key
    from clipfleet.shared.layout import URL_SHARD_SCHEMA
    import pyarrow.parquet as pq

    world = directory / "world"
    make_sandbox(world, samples=samples, port=8471, seed=seed, wat_files=1)
    truth = pq.read_table(world / "ground_truth" / "images.parquet").to_pylist()
    store, opts, shards = Store(str(directory / "store")), DownloadOptions(), []
    for shard in range((samples + shard_size - 1) // shard_size):
        out = directory / f"shard-{shard}"
        out.mkdir()
        writer = ShardWriter(out, shard, URL_SHARD_SCHEMA, "jpg")
        part = truth[shard * shard_size:(shard + 1) * shard_size]
        for index, row in enumerate(part):
            fmt = {"jpeg": "jpg"}.get(row["format"], row["format"])
            resized = resize_image((world / "web" / "img" / f"{row['id']:06d}.{fmt}").read_bytes(), opts)
            meta = {"url": row["url"], "caption": row["caption"], "page_url": None, "language": row["language"],
                    "language_score": 1.0, "uid": str(row["id"]), "key": sample_key(index, shard, shard_size),
                    "status": "success", "error_message": None, "width": resized.width, "height": resized.height,
                    "original_width": resized.original_width, "original_height": resized.original_height,
                    "sha256": None}
            writer.add(index, meta, resized.data)
        for rel, path in writer.close({"count": len(part)}).items():
            store.write_bytes(rel, path.read_bytes())
        shards.append(shard)
    return shards


def random_checkpoint(path: Path, arch: str = ARCH) -> str:
    import open_clip
    import torch
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save(model.state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------- clip-retrieval

def ensure_clip_retrieval() -> Path:
    """clip-retrieval 2.45 in its own venv, sharing this venv's torch through a .pth file."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    # A stamp written last, not `import clip_retrieval`: the .pth below makes this venv's
    # --no-deps copy importable there too, so a half-made venv (an install cut short) passed
    # that check and the run then stopped on a missing bin/clip-retrieval.
    if stamp.exists() and (VENV / "bin" / "clip-retrieval").exists():
        return VENV
    print("installing clip-retrieval 2.45 into .bench/clip-retrieval (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    ours = next(p for p in sys.path if p.endswith("site-packages"))
    theirs = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # Appended after its own site-packages: its pins win, torch comes from here.
    Path(theirs, "clipfleet-shared-torch.pth").write_text(ours + "\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["clip-retrieval==2.45.0"], check=True)
    # torch 2.14.1 asks for setuptools>=77 in its metadata; clip-retrieval needs <70 at run time.
    subprocess.run(pip + ["--no-deps", "setuptools<70"], check=True)
    # The project's venv has clip-retrieval too (--no-deps, for ClipClient), which the .pth shows
    # to pip here: it took the package as installed and left out its own copy and its
    # bin/clip-retrieval script. Installed again here, into this venv, without its dependencies.
    subprocess.run(pip + ["--no-deps", "--force-reinstall", "--ignore-installed", "clip-retrieval==2.45.0"], check=True)
    if not (VENV / "bin" / "clip-retrieval").exists():
        raise RuntimeError(f"clip-retrieval installed without its script {VENV / 'bin' / 'clip-retrieval'}")
    subprocess.run([str(python), "-c", "import clip_retrieval.clip_inference.main"], check=True)
    stamp.touch()
    return VENV


def clip_retrieval_seconds(tars: list[str], out: Path, checkpoint: str) -> float:
    spec = tars[0] if len(tars) == 1 else "{" + ",".join(tars) + "}"
    argv = [str(VENV / "bin" / "clip-retrieval"), "inference", "--input_dataset", spec,
            "--input_format", "webdataset", "--output_folder", str(out), "--enable_text", "True",
            "--enable_image", "True", "--enable_metadata", "False", "--clip_model",
            f"open_clip:{ARCH}/{checkpoint}", "--batch_size", str(BATCH), "--num_prepro_workers", "1"]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"clip-retrieval failed: {proc.stderr[-2000:]}")
    return elapsed


def count_rows(folder: Path) -> int:
    import numpy as np
    return sum(np.load(p, mmap_mode="r").shape[0] for p in folder.glob("img_emb/*.npy"))


# ----------------------------------------------------------------------------- ours

def stage_seconds(source: Path, shards: list[int], model: str, precision: str, threads: int = 0,
                  device: str = "cpu", batch: int | None = None) -> float:
    """The gpu-clip stage over every shard, into a fresh store (model loaded beforehand)."""
    from clipfleet.shared.pipeline import execute
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    from clipfleet.workers.clip.stage import ClipStage

    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        store = Store(str(Path(tmp) / "store"))
        for shard in shards:
            for ext in ("tar", "parquet"):
                rel = f"images/{shard:05d}.{ext}"
                store.write_bytes(rel, (source / rel).read_bytes())
        cfg = RunConfig.make(store=store.uri, until="clip", input_kind="urls", filter_model=model,
                             multilingual_filter_model=model, clip_batch_size=batch or BATCH,
                             clip_device=device, clip_precision=precision, clip_threads=threads,
                             min_similarity_en=0.0,
                             min_similarity_other=0.0)
        stage = ClipStage(cfg)
        stage.encoders()  # the model loads once per worker process; not part of a shard's time
        started = time.perf_counter()
        for shard in shards:
            marker = execute(stage, store, shard)
        elapsed = time.perf_counter() - started
        assert marker["stats"]["samples"] > 0
    return elapsed


def floor_seconds(source: Path, shards: list[int], model: str, precision: str, threads: int) -> tuple[float, int]:
    """Bare image+text forward at BATCH on pre-decoded tensors, with `threads` torch threads."""
    import tarfile

    import torch
    from PIL import Image

    from clipfleet.shared.models.runtime import encoder
    enc = encoder(model, "cpu", precision, threads)
    pixels, captions = [], []
    for shard in shards:
        with tarfile.open(source / f"images/{shard:05d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in sorted(members.items()):
            if name.endswith(".jpg"):
                pixels.append(enc.preprocess(Image.open(io.BytesIO(data))))
                captions.append(members[name[:-4] + ".txt"].decode())
    pixels, tokens = torch.stack(pixels), enc.tokens(captions)
    enc.images(pixels[:BATCH], precision), enc.texts(tokens[:BATCH], precision)  # warm up
    started = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        enc.images(pixels[i:i + BATCH], precision)
        enc.texts(tokens[i:i + BATCH], precision)
    return time.perf_counter() - started, len(pixels)


# ----------------------------------------------------------------------------- main

def main() -> dict:
    from clipfleet.shared.models.runtime import available_cores, cpu_has_bf16
    ensure_clip_retrieval()
    work = REPO / ".bench" / "clip"
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    print(f"building {SAMPLES} + {SMALL} samples of sandbox shards at 256 px ...", flush=True)
    big = build_shards(work / "big", SAMPLES, SHARD_SIZE)
    small = build_shards(work / "small", SMALL, SMALL, seed=6)
    checkpoint = random_checkpoint(work / f"{ARCH}-random.pt")
    model = f"{ARCH}/{checkpoint}"
    precisions = ["bf16", "fp32"] if cpu_has_bf16() else ["fp32"]
    print(f"{ARCH} with random weights (speed only), batch {BATCH}, {available_cores()} cores; "
          f"precisions: {', '.join(precisions)}", flush=True)

    best: dict[str, float] = {}
    cr_seconds: dict[str, float] = {}  # clip-retrieval's fastest whole run of each size

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    tars = lambda root, ids: [str(root / "store" / f"images/{s:05d}.tar") for s in ids]  # noqa: E731
    for attempt in range(REPEATS):
        # fp32 (and clip-retrieval, fp32 on CPU) is several times slower and steadier: one pass.
        for precision in (precisions if attempt == 0 else precisions[:1]):
            keep(f"stage_{precision}", SAMPLES / stage_seconds(work / "big" / "store", big, model, precision))
            # The floor is the best the bare model does here, with all cores or all but one.
            for threads in sorted({available_cores(), max(1, available_cores() - 1)}):
                seconds, n = floor_seconds(work / "big" / "store", big, model, precision, threads)
                keep(f"floor_{precision}", n / seconds)
        if attempt < CLIP_RETRIEVAL_PASSES:
            # Its start (imports, model load: ~45 s of a ~70 s run here) varies by several seconds
            # between runs, and the marginal rate is a difference of two such runs: each size's
            # fastest run is kept, so one slow start cannot halve or double the rate.
            for name, root, ids in (("big", work / "big", big), ("small", work / "small", small)):
                seconds = clip_retrieval_seconds(tars(root, ids), work / f"cr-{name}-{attempt}", checkpoint)
                cr_seconds[name] = min(cr_seconds.get(name, float("inf")), seconds)
            assert count_rows(work / f"cr-big-{attempt}") == SAMPLES
            best["clip_retrieval"] = (SAMPLES - SMALL) / max(cr_seconds["big"] - cr_seconds["small"], 1e-6)
            best["clip_retrieval_whole_process"] = SAMPLES / cr_seconds["big"]
        print("  pass", attempt + 1, {k: round(v, 1) for k, v in best.items()}, flush=True)

    headline = "bf16" if "stage_bf16" in best else "fp32"
    results = {"samples": SAMPLES, "batch_size": BATCH, "cores": available_cores(), "model": f"{ARCH} random weights",
               **{f"{k}_samples_per_s": round(v, 1) for k, v in best.items()},
               "stage_vs_clip_retrieval_ratio": best[f"stage_{headline}"] / best["clip_retrieval"],
               "stage_fp32_vs_clip_retrieval_ratio": best["stage_fp32"] / best["clip_retrieval"],
               f"floor_over_stage_{headline}_ratio": best[f"floor_{headline}"] / best[f"stage_{headline}"]}
    if headline == "bf16":
        results["floor_over_stage_fp32_ratio"] = best["floor_fp32"] / best["stage_fp32"]
    print(f"\n{'samples/s (image+text)':<34}" + "".join(f"{p:>10}" for p in precisions))
    for name in ("stage", "floor"):
        print(f"{'clipfleet ' + name if name == 'stage' else 'floor (bare forward)':<34}"
              + "".join(f"{best[f'{name}_{p}']:>10.1f}" for p in precisions))
    print(f"{'clip-retrieval inference (fp32)':<34}{best['clip_retrieval']:>10.1f}   "
          f"(whole process: {best['clip_retrieval_whole_process']:.1f})")
    print(f"stage / clip-retrieval: {results['stage_vs_clip_retrieval_ratio']:.2f}x ({headline}), "
          f"{results['stage_fp32_vs_clip_retrieval_ratio']:.2f}x (fp32 both)")
    print(f"floor / stage: {results[f'floor_over_stage_{headline}_ratio']:.2f} ({headline})")
    (REPO / ".bench" / "clip.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
