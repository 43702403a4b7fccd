"""A run store built the way a run builds it, for the report, plan and dataset-use tests.

extract and download are the real stages, run through the framework (`execute`, so markers are
real) on a sandbox web served on loopback. clip, embed and tag are the real stages once they are
registered in TASK_MODULES (they are "built" then); until that lands, the small stand-ins below
write their documented outputs (shared/layout.py, shared/DESIGN.md "Storage layout") with the
shipped `shapes` CLIP and its watermark / unsafe heads, through the same framework.

The aesthetic column comes from no model in the stand-in (shapes has none): it is the sandbox's
own 1-10 stand-in rating of each image, so the report's aesthetic histogram has data.
"""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.pipeline import TASK_MODULES, Stage, StageOutput, Stats, execute
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, shard_name

SHARD_SIZE = 60
THRESHOLD = 0.7  # what the shapes CLIP's metrics.json suggests; the real clip stage reads it there


@contextmanager
def redis_server(workdir: Path):
    from clipfleet.producer.fleet import _wait_for, check_broker, find_redis_server, free_port
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(lambda: check_broker(url, 0.5) is None, "redis-server", 20, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run_config(store_uri: str, wat: str, **options) -> RunConfig:
    settings = {"inputs": [wat], "input_kind": "wat", "until": "index", "shard_size": SHARD_SIZE,
                "allow_private_addresses": True, "download_timeout": 4.0, "download_retries": 0,
                "domain_max_concurrency": 64, "domain_max_rate": 0.0,
                "filter_model": "shapes", "multilingual_filter_model": "shapes", "embed_model": "shapes",
                "index_text": True, **options}
    return RunConfig.make(store=store_uri, **settings)


def build_run_store(store_uri: str, world: Path, workdir: Path, stop_after: str = "index") -> dict:
    """Run extract -> download -> clip -> embed -> tag -> index over the world's first WAT into `store_uri`.
    Returns {"shards": url shard ids, "real": stage names that ran their real implementation}."""
    import redis

    from clipfleet.sandbox.server import SandboxServer
    from clipfleet.workers.download.politeness import DomainLimiter
    from clipfleet.workers.download.stage import DownloadStage, domain_limits
    from clipfleet.workers.extract.stage import ExtractStage

    settings = json.loads((world / "sandbox.json").read_text())
    wat = str(world / "wat" / sorted(settings["wat_files"])[0])
    store = Store(store_uri)
    cfg = run_config(store.uri, wat)
    cfg.save(store)
    real = ["extract", "download"]
    with redis_server(workdir) as url:
        client = redis.Redis.from_url(url)
        shards = execute(ExtractStage(cfg, redis_client=client), store, 0, wat=wat)["next_shards"]
        download = DownloadStage(cfg, limiter=DomainLimiter(client, domain_limits(cfg.download)))
        with SandboxServer(world):
            for shard in shards:
                execute(download, store, shard)
    if stop_after == "download":
        return {"shards": shards, "real": real}
    truth = pq.read_table(world / "ground_truth" / "images.parquet").to_pylist()
    ratings = {row["url"]: row["aesthetic"] for row in truth}
    for name, stand_in in (("clip", StandInClip), ("embed", StandInEmbed), ("tag", StandInTag)):
        stage = _real_stage(name, cfg)
        if stage is None:
            stage = stand_in(cfg, ratings)
        else:
            real.append(name)
        for shard in shards:
            execute(stage, store, shard)
        if name == stop_after:
            return {"shards": shards, "real": real}
    write_index(store, shards)
    real.append("index")
    return {"shards": shards, "real": real}


def write_index(store: Store, shards: list[int]) -> list[str]:
    """index/ through the real index stage, as the fleet drives it: each shard's partial, the
    run-once train and merge tasks whenever they are due. Returns what ran, in order."""
    from clipfleet.workers.index.stage import IndexStage, MergeIndex, TrainIndex
    cfg = RunConfig.load(store)
    stage, train, merge = IndexStage(cfg), TrainIndex(cfg), MergeIndex(cfg)
    ran = []

    def once(task) -> bool:
        key = task.due(store)
        if key is None or store.marker(task.name, key) is not None:
            return False
        execute(task, store, key)
        task.after(store.uri, key)
        ran.append(f"{task.name} {key}")
        return True

    for shard in shards:
        execute(stage, store, shard)
        ran.append(f"index {shard}")
        if once(train):
            once(merge)
        once(merge)
    return ran


def _real_stage(name: str, cfg: RunConfig) -> Stage | None:
    if name not in TASK_MODULES:
        return None
    import importlib
    module = importlib.import_module(f"clipfleet.workers.{name}.stage")
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, Stage) and v is not Stage and v.name == name)
    return cls(cfg)


# -- stand-ins, until the real stages are registered ----------------------------------------------
_shapes = None


def _model():
    global _shapes
    if _shapes is None:
        from clipfleet.shared.models import load_clip
        _shapes = load_clip("shapes")
    return _shapes


def _read_parquet(store: Store, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def _images(store: Store, shard: int) -> dict[str, bytes]:
    found = {}
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(layout.image_shard(shard)))) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if ext in ("jpg", "png", "webp"):
                found[key] = tar.extractfile(member).read()
    return found


def _encode(images: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from PIL import Image
    model, preprocess, tokenizer = _model()
    with torch.inference_mode():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
    return img.numpy(), txt.numpy()


def _save(out: Path, name: str, writer) -> Path:
    path = out / name
    writer(path)
    return path


class StandInClip(Stage):
    name = "clip"

    def __init__(self, run, ratings=None):
        super().__init__(run)

    def run(self, store, shard, out, stats: Stats, **inputs) -> StageOutput:
        rows = [r for r in _read_parquet(store, layout.image_shard(shard, "parquet")).to_pylist()
                if r["status"] == "success"]
        images = _images(store, shard)
        rows = [r for r in rows if r["key"] in images]
        img, txt = _encode([images[r["key"]] for r in rows], [r["caption"] for r in rows])
        similarity = (img * txt).sum(1)
        kept = similarity >= THRESHOLD
        table = pa.table({"key": [r["key"] for r in rows], "similarity": pa.array(similarity, pa.float32()),
                          "kept": pa.array(kept), "model": ["shapes"] * len(rows)}, schema=layout.CLIP_SCHEMA)
        stats.add("samples", len(rows))
        stats.add("kept", int(kept.sum()))
        stats.add("below threshold", int((~kept).sum()), under="dropped")
        stats.put("min_similarity_en", THRESHOLD)
        stats.put("min_similarity_other", THRESHOLD)
        return StageOutput(files={layout.clip_shard(shard): _save(out, "clip.parquet",
                                                                  lambda p: pq.write_table(table, p))})


class StandInEmbed(Stage):
    name = "embed"

    def __init__(self, run, ratings=None):
        super().__init__(run)

    def run(self, store, shard, out, stats: Stats, **inputs) -> StageOutput:
        judged = {r["key"]: r for r in _read_parquet(store, layout.clip_shard(shard)).to_pylist()}
        rows = sorted((r for r in _read_parquet(store, layout.image_shard(shard, "parquet")).to_pylist()
                       if judged.get(r["key"], {}).get("kept")), key=lambda r: r["key"])
        images = _images(store, shard)
        img, txt = _encode([images[r["key"]] for r in rows], [r["caption"] for r in rows])
        meta = pa.table({"key": [r["key"] for r in rows], "url": [r["url"] for r in rows],
                         "caption": [r["caption"] for r in rows],
                         "similarity": pa.array([judged[r["key"]]["similarity"] for r in rows], pa.float32()),
                         "language": [r["language"] or "" for r in rows],
                         "width": pa.array([r["original_width"] for r in rows], pa.int32()),
                         "height": pa.array([r["original_height"] for r in rows], pa.int32())})
        stats.add("vectors", len(rows))
        stats.put("dim", int(img.shape[1]))
        return StageOutput(files={
            layout.image_embeddings(shard): _save(out, "img.npy", lambda p: np.save(p, img.astype(np.float16))),
            layout.text_embeddings(shard): _save(out, "txt.npy", lambda p: np.save(p, txt.astype(np.float16))),
            layout.embedding_metadata(shard): _save(out, "meta.parquet", lambda p: pq.write_table(meta, p)),
        })


class StandInTag(Stage):
    name = "tag"

    def __init__(self, run, ratings=None):
        super().__init__(run)
        self.ratings = ratings or {}

    def run(self, store, shard, out, stats: Stats, **inputs) -> StageOutput:
        import mmh3

        from clipfleet.shared.models import load_tag_heads, score_tags
        meta = _read_parquet(store, layout.embedding_metadata(shard))
        vectors = np.load(io.BytesIO(store.read_bytes(layout.image_embeddings(shard)))).astype(np.float32)
        scores = score_tags(load_tag_heads("shapes"), vectors)
        urls, texts = meta["url"].to_pylist(), meta["caption"].to_pylist()
        tags = pa.table({"key": meta["key"], "punsafe": pa.array(scores["unsafe"], pa.float32()),
                         "pwatermark": pa.array(scores["watermark"], pa.float32()),
                         "aesthetic": pa.array([self.ratings.get(u) for u in urls], pa.float32())})
        dataset = pa.table({
            "key": meta["key"], "URL": meta["url"], "TEXT": meta["caption"], "WIDTH": meta["width"],
            "HEIGHT": meta["height"], "LANGUAGE": meta["language"], "similarity": meta["similarity"],
            "punsafe": tags["punsafe"], "pwatermark": tags["pwatermark"], "aesthetic": tags["aesthetic"],
            "hash": pa.array([mmh3.hash64((u or "") + (t or ""))[0] for u, t in zip(urls, texts)], pa.int64())})
        images = _images(store, shard)
        tar_path = out / "dataset.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in dataset.to_pylist():
                members = {"jpg": images[row["key"]], "txt": row["TEXT"].encode(),
                           "json": json.dumps(row, ensure_ascii=False).encode()}
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size = len(members[ext])
                    tar.addfile(info, io.BytesIO(members[ext]))
        stats.add("tagged", meta.num_rows)
        stats.add("published", meta.num_rows)
        name = shard_name(shard)
        return StageOutput(files={
            layout.tag_shard(shard): _save(out, f"tags_{name}.parquet", lambda p: pq.write_table(tags, p)),
            layout.dataset_shard(shard, "parquet"): _save(out, f"dataset_{name}.parquet",
                                                          lambda p: pq.write_table(dataset, p)),
            layout.dataset_shard(shard, "tar"): tar_path,
        })


# -- fixtures (tests/producer/conftest.py and tests/e2e import these) -----------------------------
import pytest  # noqa: E402

WORLD_SAMPLES = 200


@pytest.fixture(scope="session")
def report_world(tmp_path_factory):
    from clipfleet.producer.fleet import free_port
    from clipfleet.sandbox.web import make_sandbox
    directory = tmp_path_factory.mktemp("report-world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=free_port(), seed=5, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def built_run(tmp_path_factory, report_world):
    """(store directory, {"shards", "real"}) of a run taken through index."""
    work = tmp_path_factory.mktemp("report-run")
    info = build_run_store(str(work / "store"), report_world, work)
    return work / "store", info


@pytest.fixture
def run_copy(built_run, tmp_path):
    """A copy of the built run for one test to change."""
    import shutil
    target = tmp_path / "store"
    shutil.copytree(built_run[0], target)
    return target
