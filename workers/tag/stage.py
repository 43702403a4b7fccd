"""The tagging stage: score one embedded shard with every configured head, then publish it.

In:  embeddings/img_emb/img_emb_{shard}.npy + embeddings/metadata/metadata_{shard}.parquet
     (the embed stage's kept samples, rows aligned), images/{shard}.tar (the download stage's
     webdataset shard: the image-based watermark model and the published tar read it).
Out: tags/{shard}.parquet (key + one float32 column per head, rows aligned with the metadata;
     a column with no head is all null and the marker and run.json say why), then
     dataset/{shard}.parquet|.tar, the published shard in LAION's columns.
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.pipeline import Stage, StageOutput, Stats
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, shard_name
from clipfleet.workers.tag.plan import plan_run
from clipfleet.workers.tag.publish import image_marks, read_images, write_dataset


@contextmanager
def torch_threads(n: int):
    """torch with `n` threads for a while (0: as it is), then as it was."""
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TagStage(Stage):
    name = "tag"

    def __init__(self, run: RunConfig):
        super().__init__(run)
        # Heads load once per worker process; one that cannot be used fails here, before a shard.
        self.plan = plan_run(run)

    def run(self, store: Store, shard: int, out: Path, stats: Stats, **inputs) -> StageOutput:
        meta = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(shard))))
        embeddings = np.load(io.BytesIO(store.read_bytes(layout.image_embeddings(shard))))
        n = meta.num_rows
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise ValueError(f"shard {shard}: {layout.image_embeddings(shard)} has shape {embeddings.shape} "
                             f"but {layout.embedding_metadata(shard)} has {n} rows")
        keys = [str(k) for k in meta.column("key").to_pylist()]
        images = read_images(store, shard, set(keys)) if store.exists(layout.image_shard(shard)) else {}
        if len(images) < n:
            stats.add("no image in images tar", n - len(images), under="unpublished_images")

        started_cpu, started = time.process_time(), time.perf_counter()
        vectors = embeddings.astype(np.float32)
        columns = {}
        with torch_threads(self.options.tag_threads):
            for column in self.plan.specs:
                head = self.plan.heads.get(column)
                if head is None:
                    columns[column] = pa.nulls(n, pa.float32())
                elif head.input == "image_embedding":
                    self._check_width(head, column, vectors, shard)
                    columns[column] = pa.array(head.score_embeddings(vectors), pa.float32())
                else:
                    columns[column] = self._score_images(head, column, keys, images, stats)
        cpu_s, wall_s = time.process_time() - started_cpu, time.perf_counter() - started
        stats.add("tagged", n)
        stats.samples_in(n)
        stats.put("tags_per_s_per_core", round(n / max(cpu_s, 1e-6), 1))
        stats.put("tag_seconds", round(wall_s, 4))
        if self.plan.null_columns:
            stats.put("null_columns", dict(self.plan.null_columns))

        tags = pa.table({"key": pa.array(keys, pa.string()), **columns})
        tags_path = out / f"tags_{shard_name(shard)}.parquet"
        pq.write_table(tags, tags_path)
        files = {layout.tag_shard(shard): tags_path}
        files.update(write_dataset(meta, tags, images, out, shard, stats, image_marks(store, shard)))
        return StageOutput(files=files)

    @staticmethod
    def _check_width(head, column: str, vectors: np.ndarray, shard: int) -> None:
        if head.dim != vectors.shape[1]:
            raise ValueError(f"shard {shard}: the {column} head {head.spec} takes {head.dim}-d "
                             f"embeddings but the shard's are {vectors.shape[1]}-d")

    def _score_images(self, head, column: str, keys, images, stats: Stats) -> pa.Array:
        """An image model's probabilities; a sample whose image is missing or does not decode
        gets a null and a count, never a made-up score."""
        from PIL import Image

        pictures, rows = [], []
        for row, key in enumerate(keys):
            found = images.get(key)
            if found is None:
                stats.add("no image", under=f"{column}_null")
                continue
            try:
                picture = Image.open(io.BytesIO(found[1]))
                picture.load()
            except Exception:  # a corrupt image is the sample's problem, not the shard's
                stats.add("undecodable image", under=f"{column}_null")
                continue
            pictures.append(picture)
            rows.append(row)
        values = np.full(len(keys), np.nan, np.float32)
        if pictures:
            values[rows] = head.score_images(pictures, batch_size=self.options.watermark_batch_size)
        return pa.array(values, pa.float32(), mask=np.isnan(values))
