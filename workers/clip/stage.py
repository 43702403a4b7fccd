"""gpu-clip: the image-text similarity of every downloaded sample, and which ones are kept.

English pairs are judged by `--filter-model` against `--min-similarity-en`, every other pair
(other languages and no language) by `--multilingual-filter-model` against
`--min-similarity-other`, as LAION-5B did. Thresholds left unset take the model's calibrated
value, else LAION's (workers/clip/options.py); both are resolved into run.json and repeated
in the marker.

Output: clip/{shard}.parquet with one row per downloaded sample (key, similarity, kept,
model), key order; similarity and model are null for a sample no model could judge (no
caption, undecodable, missing from the tar), and each such drop is counted by reason. When a
bucket's model is also the embed model, the kept samples' embeddings go to
clip/{shard}_emb.npz so the embed stage does not decode and encode them again.
"""
from __future__ import annotations

import logging
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
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store
from clipfleet.workers.image_batches import decode_pool, prepared_batches, preprocessor
from clipfleet.workers.image_reader import Sample, downloaded_samples, read_rows

log = logging.getLogger("clipfleet.clip")

NO_CAPTION, UNDECODABLE, MISSING, BELOW = "no caption", "undecodable", "missing image", "below threshold"


def bucket(language: str | None) -> str:
    """LAION's two buckets: English, and everything else (other languages, no language)."""
    return "en" if language == "en" else "other"


class ClipStage(Stage):
    name = "clip"
    gpu_decode = True  # on CUDA, JPEGs are decoded on the GPU (bench/gpu.py compares with PIL)

    def __init__(self, run):
        super().__init__(run)
        opts = self.options
        self.models = {"en": opts.filter_model, "other": opts.multilingual_filter_model}
        self.thresholds = {"en": opts.min_similarity_en, "other": opts.min_similarity_other}
        self._pool: ThreadPoolExecutor | None = None

    def encoders(self) -> dict:
        """model name -> Encoder, each loaded once per process (shared with the embed stage)."""
        o = self.options
        names = list(dict.fromkeys(self.models.values()))
        copy_to_machine(names, self.run_config.store)  # from the run's model cache, once per machine
        return {name: encoder(name, o.clip_device, o.clip_precision, o.clip_threads) for name in names}

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # created in the worker process, on first use
            _, decode = split_threads(choose_device(self.options.clip_device), self.options.clip_threads)
            self._pool = decode_pool(decode, "clip-decode")
        return self._pool

    def reuse_for_embed(self) -> bool:
        """Whether the embed stage will run with a model and settings this stage already ran."""
        if "embed" not in self.run_config.stages:
            return False
        e, c = self.run_config.embed, self.options
        return (e.embed_device, e.embed_precision, e.embed_threads) == (c.clip_device, c.clip_precision,
                                                                           c.clip_threads)

    def run(self, store: Store, shard: int, out: Path, stats: Stats) -> StageOutput:
        encoders = self.encoders()  # loads on a process's first shard; not counted in samples/s
        started = time.perf_counter()
        rows = read_rows(store, shard)
        judged: dict[str, tuple[float | None, bool, str | None]] = {}  # key -> (similarity, kept, model)
        dropped: list[tuple[str, str]] = []  # (key, reason), appended by the reader thread
        embed_model = self.run_config.embed.embed_model if self.reuse_for_embed() else None
        cache = {"keys": [], "img": [], "text": []}

        def encodable(samples):
            for sample in samples:
                if not (sample.caption or "").strip():
                    dropped.append((sample.key, NO_CAPTION))
                elif sample.data is None:
                    dropped.append((sample.key, MISSING))
                else:
                    yield sample

        def route(sample: Sample) -> str:
            return self.models[bucket(sample.language)]

        stored_as = self.run_config.download.resize_mode  # the model sees the picture, not the padding
        preprocessors = {name: preprocessor(enc, self.pool(), self.gpu_decode, stored_as)
                         for name, enc in encoders.items()}
        encoded = 0
        for batch in prepared_batches(encodable(downloaded_samples(store, shard, rows)), route, preprocessors,
                                      self.options.clip_batch_size):
            for sample, reason in batch.failed:
                log.info("clip %s: %s undecodable: %s", shard, sample.key, reason)
                dropped.append((sample.key, UNDECODABLE))
            if not batch.samples:
                continue
            enc = encoders[batch.model]
            img, text = enc.pairs(batch.pixels, batch.tokens)
            similarity = (img * text).sum(dim=-1).cpu().numpy()
            kept_rows = []
            for i, (sample, value) in enumerate(zip(batch.samples, similarity)):
                kept = bool(value >= self.thresholds[bucket(sample.language)])
                judged[sample.key] = (float(value), kept, batch.model)
                if kept:
                    kept_rows.append(i)
            encoded += len(batch.samples)
            if batch.model == embed_model and kept_rows:
                index = np.array(kept_rows)
                cache["keys"] += [batch.samples[i].key for i in kept_rows]
                cache["img"].append(img.cpu().numpy()[index].astype(np.float16))
                cache["text"].append(text.cpu().numpy()[index].astype(np.float16))

        for key, reason in dropped:
            judged[key] = (None, False, None)
            stats.drop(reason, under="dropped")
        files = {layout.clip_shard(shard): self._write_table(out, judged)}
        if embed_model is not None and cache["keys"]:
            files[layout.clip_embeddings(shard)] = self._write_cache(out, cache, embed_model)

        kept = sum(1 for _, k, _ in judged.values() if k)
        stats.add("samples", len(judged))
        stats.add("kept", kept)
        stats.samples_in(len(judged))
        stats.kept(kept)
        below = sum(1 for s, k, _ in judged.values() if s is not None and not k)
        if below:
            stats.drop(BELOW, below, under="dropped")
        for _, _, model in judged.values():
            if model is not None:
                stats.add(model, under="judged_by")
        elapsed = time.perf_counter() - started
        stats.put("samples_per_s", round(encoded / elapsed, 1) if elapsed > 0 else 0.0)
        stats.put("min_similarity_en", self.thresholds["en"])
        stats.put("min_similarity_other", self.thresholds["other"])
        stats.put("precision", ", ".join(f"{name} {enc.precision or 'fp32'}" for name, enc in encoders.items()))
        stats.put("device", next(iter(encoders.values())).device)
        return StageOutput(files=files)

    @staticmethod
    def _write_table(out: Path, judged: dict) -> Path:
        keys = sorted(judged)
        table = pa.table({
            "key": keys,
            "similarity": pa.array([judged[k][0] for k in keys], pa.float32()),
            "kept": pa.array([judged[k][1] for k in keys], pa.bool_()),
            "model": pa.array([judged[k][2] for k in keys], pa.string()),
        }, schema=layout.CLIP_SCHEMA)
        path = out / "clip.parquet"
        pq.write_table(table, path)
        return path

    @staticmethod
    def _write_cache(out: Path, cache: dict, model: str) -> Path:
        order = np.argsort(np.array(cache["keys"]))
        path = out / "clip_emb.npz"
        np.savez(path, keys=np.array(cache["keys"])[order], img=np.concatenate(cache["img"])[order],
                 text=np.concatenate(cache["text"])[order], model=np.array(model))
        return path
