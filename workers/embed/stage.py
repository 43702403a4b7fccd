"""gpu-embed: image and text embeddings of the kept samples, in clip-retrieval's layout.

Writes, for the samples clip/{shard}.parquet marks kept, in key order:
  embeddings/img_emb/img_emb_{shard}.npy     float16, L2-normalised, (n, dim)
  embeddings/text_emb/text_emb_{shard}.npy   float16, L2-normalised, (n, dim)
  embeddings/metadata/metadata_{shard}.parquet  key, url, caption, similarity, language, width,
                                                height (the image's original size, as LAION's
                                                WIDTH/HEIGHT), rows aligned with the .npy
so autofaiss, embedding-reader and clip-retrieval's tools read the folder as it is. The global
id of a row is layout.global_id(shard, row).

Rows the filter already embedded with this model and these settings come from
clip/{shard}_emb.npz; only the rest are decoded and encoded. The .npy files are written in
place (memory-mapped) as batches finish, so writing overlaps compute.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.models.cache import copy_to_machine
from clipfleet.shared.models.runtime import choose_device, encoder, split_threads
from clipfleet.shared.pipeline import Stage, StageOutput, Stats
from clipfleet.shared.storage import Store
from clipfleet.workers.embed import calibrate
from clipfleet.workers.image_batches import decode_pool, prepared_batches, preprocessor
from clipfleet.workers.image_reader import downloaded_samples, read_rows

METADATA_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("similarity", pa.float32()),
    ("language", pa.string()), ("width", pa.int32()), ("height", pa.int32())])
assert tuple(METADATA_SCHEMA.names) == layout.EMBEDDING_METADATA_COLUMNS


class EmbedStage(Stage):
    name = "embed"

    def __init__(self, run):
        super().__init__(run)
        self._pool: ThreadPoolExecutor | None = None

    def encoder(self):
        o = self.options
        copy_to_machine([o.embed_model], self.run_config.store)  # from the run's model cache, once per machine
        return encoder(o.embed_model, o.embed_device, o.embed_precision, o.embed_threads)

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # created in the worker process, on first use
            _, decode = split_threads(choose_device(self.options.embed_device), self.options.embed_threads)
            self._pool = decode_pool(decode, "embed-decode")
        return self._pool

    def run(self, store: Store, shard: int, out: Path, stats: Stats) -> StageOutput:
        enc = self.encoder()
        started = time.perf_counter()
        judged = pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist()
        kept = sorted(r["key"] for r in judged if r["kept"])
        similarity = {r["key"]: r["similarity"] for r in judged}
        position = {key: i for i, key in enumerate(kept)}
        rows = {r["key"]: r for r in read_rows(store, shard)}

        img = np.lib.format.open_memmap(out / "img_emb.npy", mode="w+", dtype=np.float16, shape=(len(kept), enc.dim))
        text = np.lib.format.open_memmap(out / "text_emb.npy", mode="w+", dtype=np.float16, shape=(len(kept), enc.dim))
        done = np.zeros(len(kept), bool)
        reused = self._reuse(store, shard, position, img, text, done)

        todo = {kept[i] for i in np.flatnonzero(~done)}
        picked, pictures = set(calibrate.chosen(kept)), {}
        encoded = 0
        if todo:
            samples = (pictures.setdefault(s.key, s) if s.key in picked else s
                       for s in downloaded_samples(store, shard, list(rows.values())) if s.key in todo)
            prep = preprocessor(enc, self.pool(), resize_mode=self.run_config.download.resize_mode)
            for batch in prepared_batches(samples, lambda s: enc.name, {enc.name: prep},
                                          self.options.embed_batch_size):
                if batch.failed:  # the filter decoded these same bytes; failing now is not data
                    raise RuntimeError(f"embed {shard}: {len(batch.failed)} kept images no longer decode, "
                                       f"e.g. {batch.failed[0][0].key}: {batch.failed[0][1]}")
                if not batch.samples:
                    continue
                image_emb, text_emb = enc.pairs(batch.pixels, batch.tokens)
                index = np.array([position[s.key] for s in batch.samples])
                img[index] = image_emb.cpu().numpy().astype(np.float16)
                text[index] = text_emb.cpu().numpy().astype(np.float16)
                done[index] = True
                encoded += len(batch.samples)
        if not done.all():
            missing = [kept[i] for i in np.flatnonzero(~done)]
            raise RuntimeError(f"embed {shard}: {len(missing)} kept samples are not in the image shard, "
                               f"e.g. {missing[0]}")
        img.flush()
        text.flush()
        del img, text
        if picked - pictures.keys():  # embedded by the filter: read from the tar for calibration only
            pictures.update((s.key, s) for s in downloaded_samples(store, shard, [rows[k] for k in picked])
                            if s.data is not None)
        calibrate.measure(enc, [pictures[k] for k in sorted(pictures)], self.run_config.download.resize_mode, stats)

        metadata = out / "metadata.parquet"
        pq.write_table(pa.table({
            "key": kept,
            "url": [rows[k].get("url") for k in kept],
            "caption": [rows[k].get("caption") for k in kept],
            "similarity": pa.array([similarity[k] for k in kept], pa.float32()),
            "language": [rows[k].get("language") for k in kept],
            "width": pa.array([rows[k].get("original_width") for k in kept], pa.int32()),
            "height": pa.array([rows[k].get("original_height") for k in kept], pa.int32()),
        }, schema=METADATA_SCHEMA), metadata)

        elapsed = time.perf_counter() - started
        stats.add("vectors", len(kept))
        stats.samples_in(len(kept))
        stats.kept(len(kept))
        stats.add("encoded", encoded)
        stats.add("reused_from_clip", reused)
        stats.put("dim", enc.dim)
        stats.put("model", enc.name)
        stats.put("precision", enc.precision or "fp32")
        stats.put("device", enc.device)
        stats.put("samples_per_s", round(len(kept) / elapsed, 1) if elapsed > 0 else 0.0)
        return StageOutput(files={layout.image_embeddings(shard): out / "img_emb.npy",
                                  layout.text_embeddings(shard): out / "text_emb.npy",
                                  layout.embedding_metadata(shard): metadata})

    def _reuse(self, store: Store, shard: int, position: dict, img, text, done) -> int:
        """Copy in what the filter embedded with this same model; returns how many rows."""
        rel = layout.clip_embeddings(shard)
        if not store.exists(rel):
            return 0
        with np.load(io.BytesIO(store.read_bytes(rel))) as cached:
            if str(cached["model"]) != self.options.embed_model or cached["img"].shape[1] != img.shape[1]:
                return 0
            rows = [(i, position[str(k)]) for i, k in enumerate(cached["keys"]) if str(k) in position]
            if not rows:
                return 0
            source, target = (np.array(side) for side in zip(*rows))
            img[target] = cached["img"][source]
            text[target] = cached["text"][source]
            done[target] = True
        return len(rows)
