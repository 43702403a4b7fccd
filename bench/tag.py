"""Tag benchmark: tags per second per core of the tagging stage, beside the script a user would
write with the usual tools for the same job, and a bare loop of the same heads (the floor).

The stage's side is `TagStage.run` as a worker runs it: read the shard's metadata, embeddings
and images tar from the store, score every head, write tags/ and publish dataset/ (parquet and
webdataset tar, with LAION's hash). The script does the same with pandas (read, add columns,
`to_parquet`), mmh3 per row, and webdataset (`WebDataset` to read the images, `TarWriter` to
write the published tar). The floor is `np.load` plus the heads' forward passes alone.
One torch thread, CPU time (a tagging worker is one process per core).

Two head sets: the shipped `shapes` heads on 128-d embeddings (real weights), and LAION's
L/14 architectures (NSFW 768->64->512->256->1 and the aesthetic MLP 768->1024->...->1) on 768-d
embeddings, whose weights here are random: that run measures speed only.
"""
from __future__ import annotations

import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.sizes import repeats, size

SAMPLES = size("TAG_SAMPLES")
REPEATS = repeats(3)


def make_shard(root: Path, dim: int, samples: int = SAMPLES, seed: int = 0) -> None:
    """An embedded shard as the embed stage leaves it: metadata, float16 unit embeddings, a tar."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from clipfleet.shared import layout
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for rel in (layout.image_embeddings(0), layout.text_embeddings(0), layout.embedding_metadata(0),
                layout.image_shard(0)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / layout.image_embeddings(0), x.astype(np.float16))
    np.save(root / layout.text_embeddings(0), x.astype(np.float16))
    keys = [f"{i:09d}" for i in range(samples)]
    pq.write_table(pa.table({
        "key": keys, "url": [f"http://127.0.0.1/img/{i:06d}.jpg" for i in range(samples)],
        "caption": [f"a red circle on a plain background {i}" for i in range(samples)],
        "similarity": pa.array(rng.uniform(0.7, 1, samples), pa.float32()), "language": ["en"] * samples,
        "width": pa.array([256] * samples, pa.int32()), "height": pa.array([256] * samples, pa.int32())}),
        root / layout.embedding_metadata(0))
    jpeg = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(jpeg, "JPEG", quality=90)
    with tarfile.open(root / layout.image_shard(0), "w") as tar:
        for key in keys:
            for ext, data in (("jpg", jpeg.getvalue()), ("txt", b"a red circle")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _stage_rate(root: Path, cfg) -> tuple[float, dict]:
    from clipfleet.shared.pipeline import Stats
    from clipfleet.shared.storage import Store
    from clipfleet.workers.tag.stage import TagStage
    stage, store = TagStage(cfg), Store(str(root))
    best, stats = 0.0, {}
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as out:
            s = Stats()
            started = time.process_time()
            stage.run(store, 0, Path(out), s)
            best = max(best, SAMPLES / (time.process_time() - started))
            stats = s.as_dict()
    return best, stats


def _floor_rate(root: Path, heads) -> float:
    from clipfleet.shared import layout
    best = 0.0
    for _ in range(REPEATS):
        started = time.process_time()
        x = np.load(root / layout.image_embeddings(0)).astype(np.float32)
        for head in heads:
            head.score_embeddings(x)
        best = max(best, SAMPLES / (time.process_time() - started))
    return best


def _script_rate(root: Path, heads: dict) -> float:
    """The same job as a user's script: pandas, mmh3 and webdataset."""
    import json

    import mmh3
    import pandas as pd
    import webdataset as wds

    from clipfleet.shared import layout
    best = 0.0
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as out:
            started = time.process_time()
            meta = pd.read_parquet(root / layout.embedding_metadata(0))
            x = np.load(root / layout.image_embeddings(0)).astype(np.float32)
            for column, head in heads.items():
                meta[column] = head.score_embeddings(x)
            meta["hash"] = [mmh3.hash64(u + t)[0] for u, t in zip(meta["url"], meta["caption"])]
            meta = meta.rename(columns={"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT",
                                        "language": "LANGUAGE"})
            meta.to_parquet(Path(out) / "dataset.parquet")
            rows = {r["key"]: r for r in meta.to_dict("records")}
            with wds.TarWriter(str(Path(out) / "dataset.tar")) as sink:
                for sample in wds.WebDataset(str(root / layout.image_shard(0)), shardshuffle=False):
                    row = rows.get(sample["__key__"])
                    if row is not None:
                        sink.write({"__key__": row["key"], "jpg": sample["jpg"], "txt": row["TEXT"],
                                    "json": json.dumps({k: (v.item() if hasattr(v, "item") else v)
                                                        for k, v in row.items()})})
            best = max(best, SAMPLES / (time.process_time() - started))
    return best


def _l14_heads(folder: Path) -> dict:
    """LAION's L/14 architectures with random weights (speed only), saved as state dicts."""
    import torch

    from clipfleet.shared.models.heads import build_architecture
    torch.manual_seed(0)
    specs = {}
    for column, arch in (("punsafe", "nsfw-l14"), ("aesthetic", "aesthetic-l14")):
        torch.save(build_architecture(arch).state_dict(), folder / f"{arch}.pth")
        specs[column] = f"{arch}:{folder / f'{arch}.pth'}"
    return specs


def main() -> dict:
    import torch

    from clipfleet.shared.runconfig import RunConfig
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, dim in (("shapes", 128), ("l14", 768)):
            root = tmp / name
            make_shard(root, dim)
            if name == "shapes":
                cfg = RunConfig.make(store=str(root), embed_model="shapes")
            else:
                specs = _l14_heads(tmp)
                cfg = RunConfig.make(store=str(root), embed_model="ViT-L-14/openai", pwatermark_head="none",
                                     punsafe_head=specs["punsafe"], aesthetic_head=specs["aesthetic"])
            from clipfleet.workers.tag.plan import plan_run
            heads = plan_run(cfg).heads
            stage, stats = _stage_rate(root, cfg)
            script = _script_rate(root, heads)
            floor = _floor_rate(root, list(heads.values()))
            results[f"{name}_stage_tags_per_s_per_core"] = round(stage)
            results[f"{name}_script_tags_per_s_per_core"] = round(script)
            results[f"{name}_floor_tags_per_s_per_core"] = round(floor)
            results[f"{name}_stage_over_script_ratio"] = round(stage / script, 2)
            results[f"{name}_floor_over_stage_ratio"] = round(floor / stage, 2)
            print(f"{name:>6} ({len(heads)} heads, {dim}-d{', random weights: speed only' if name == 'l14' else ''}): "
                  f"stage {stage:,.0f} tags/s/core (tag + publish; scoring alone, as the marker has it: "
                  f"{stats.get('tags_per_s_per_core', 0):,.0f}); pandas + webdataset script {script:,.0f}: "
                  f"stage/script {stage / script:.2f}x; bare head loop {floor:,.0f}", flush=True)
    return results


if __name__ == "__main__":
    main()
