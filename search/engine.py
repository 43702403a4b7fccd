"""One search, as clip back does it, but with filters that keep the count.

A query embedding (text, image, image URL or a raw embedding; optionally moved towards the
mean embedding of the run's samples at an aesthetic rating, as clip back does) is searched in
the run's index; the candidates go through the filters (safety, watermark, aesthetic, language,
then near-duplicates: cosine >= 0.94, connected components, the first of each kept); when fewer
than asked pass, the same query is searched deeper, as far as the index holds candidates, the
depth cap and the deadline allow. Outcome.notes say what could not be honoured and why.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipfleet.search.catalog import Catalog, cache_dir_for, ensure_catalog
from clipfleet.search.encoder import Encoder, QueryError, normalized
from clipfleet.search.index import IndexMissing, infos_model, open_index
from clipfleet.search.settings import ServeSettings
from clipfleet.shared import layout
from clipfleet.shared.serving import read_hidden
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.search")

DEDUP_THRESHOLD = 0.94  # clip back's
SAFETY_THRESHOLD = 0.5  # clip back's punsafe cut for use_safety_model
TAKEDOWN_REFRESH_S = 2.0  # as the serving index follows the list


@dataclass
class Filters:
    deduplicate: bool = False
    max_punsafe: float | None = None
    max_pwatermark: float | None = None
    min_aesthetic: float | None = None
    languages: tuple[str, ...] | None = None
    violence: bool = False  # asked for; the run has no violence model

    def active(self) -> bool:
        return bool(self.deduplicate or self.languages or any(
            v is not None for v in (self.max_punsafe, self.max_pwatermark, self.min_aesthetic)))


@dataclass
class Outcome:
    ids: np.ndarray
    sims: np.ndarray
    depth: int = 0           # candidates searched in the last round
    rounds: int = 0
    complete: bool = True    # False when the deadline or the depth cap stopped it short
    notes: dict = field(default_factory=dict)  # field -> why it was not honoured


def keep_first_of_components(embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Indices (ascending) of the first member of each near-duplicate component: clip back's
    rule (cosine >= threshold links two results; a component keeps its best-ranked one)."""
    import faiss

    n = len(embeddings)
    if n < 2:
        return np.arange(n)
    vectors = np.ascontiguousarray(normalized(embeddings))
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    lims, _, neighbours = flat.range_search(vectors, threshold)
    rows = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
    linked = neighbours > rows  # each pair once; most results link only to themselves
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    # Union by the smaller root, so a component's root is its first (best-ranked) member.
    for a, b in zip(rows[linked].tolist(), neighbours[linked].tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.asarray([i for i in range(n) if root(i) == i], np.int64)


class Engine:
    """What one server process holds: the index (memory-mapped), the catalog, the model."""

    def __init__(self, store: Store, settings: ServeSettings, *, load_model: bool = True,
                 threads: int | None = None, cache: Path | None = None):
        self.store, self.settings = store, settings
        self.cache = cache or ensure_catalog(store, cache_dir_for(store, settings.cache_dir))
        self.catalog = Catalog(store, self.cache)
        self.indices = {"image": open_index(store, "image")}
        try:
            self.indices["text"] = open_index(store, "text")
        except IndexMissing as exc:
            self.text_missing = str(exc)
        self.dim = self.indices["image"].dim
        self._hidden, self._hidden_checked = (None, np.zeros(0, np.int64)), 0.0
        self._groups, self._groups_checked = (None, np.zeros(0, np.int64), np.zeros(0, np.int64)), 0.0
        threads = threads or max(1, (os.cpu_count() or 1))
        import faiss
        # One query per search call: OpenMP threads would spin on each other (and on the other
        # workers) for no gain; concurrency comes from requests and worker processes.
        faiss.omp_set_num_threads(1)
        self.model_name = infos_model(self.indices["image"]) or self._run_model()
        self.encoder = Encoder(self.model_name, settings, threads) if load_model else None
        if self.encoder is not None:
            got = self.encoder.text("a photo").shape[1]
            if self.dim and got != self.dim:
                raise QueryError(f"model {self.model_name} embeds in {got} dimensions but the index holds "
                                 f"{self.dim}: the index was built with another model")

    def _run_model(self) -> str:
        from clipfleet.shared.runconfig import RunConfig
        return RunConfig.load(self.store).embed.embed_model

    @property
    def ntotal(self) -> int:
        return self.indices["image"].ntotal

    def index(self, modality: str):
        if modality not in ("image", "text"):
            raise QueryError(f"modality must be image or text, got {modality!r}")
        if modality not in self.indices:
            raise QueryError(f"modality text: {self.text_missing}; search the image index (modality image)")
        return self.indices[modality]

    # -- the query vector -----------------------------------------------------------------------
    def embed(self, text: str | None = None, image: str | None = None, image_url: str | None = None,
              embedding: list | None = None, similar_to: int | None = None) -> np.ndarray:
        """(1, dim) float32, L2-normalised; the first given of text, image, image_url, embedding
        (clip back's order), then a result id whose stored image embedding is the query."""
        if text:
            return self._model().text(text)
        if image:
            return self._model().image_base64(image)
        if image_url:
            return self._model().image_url(image_url)
        if embedding is not None:
            vector = np.asarray(embedding, np.float64)
            if vector.ndim != 1 or len(vector) != self.dim:
                raise QueryError(f"embedding_input must be a list of {self.dim} numbers, got "
                                 f"{len(vector) if vector.ndim == 1 else 'a nested list'}")
            if not np.isfinite(vector).all() or not np.any(vector):
                raise QueryError("embedding_input must be finite and not all zero")
            return normalized(vector[None, :])
        if similar_to is not None:
            vectors = None if np.isin(similar_to, self.taken_down()) else self.catalog.embeddings([similar_to])
            if vectors is None or vectors.shape[1] != self.dim:
                raise QueryError(f"similar_to: this run has no sample {similar_to} (or no embedding for it)")
            return normalized(vectors)
        raise QueryError("give one of text, image, image_url or embedding_input (or similar_to)")

    def _model(self) -> Encoder:
        if self.encoder is None:
            self.encoder = Encoder(self.model_name, self.settings)
        return self.encoder

    def reweight(self, query: np.ndarray, score: int | None, weight: float | None, notes: dict) -> np.ndarray:
        """clip back's aesthetic re-weighting: query + weight * mean embedding at that rating."""
        if score is None:
            return query
        counts, means = self.catalog.aesthetic_counts, self.catalog.aesthetic_means
        if not counts.any() or means.shape[1] != query.shape[1]:
            notes["aesthetic_score"] = "this run has no aesthetic scores"
            return query
        rating = int(score)
        if counts[rating] == 0:
            rated = np.nonzero(counts)[0]
            rating = int(rated[np.argmin(np.abs(rated - rating))])
            notes["aesthetic_score"] = f"no sample is rated {score}; used the nearest rating, {rating}"
        moved = query + means[rating][None, :] * (0.5 if weight is None else float(weight))
        return normalized(moved) if np.any(moved) else query

    # -- the search -------------------------------------------------------------------------------
    def search(self, query: np.ndarray, want: int, modality: str = "image", filters: Filters | None = None,
               deadline: float | None = None) -> Outcome:
        filters = filters or Filters()
        index = self.index(modality)
        if index.dim and query.shape[1] != index.dim:
            raise QueryError(f"the query has {query.shape[1]} dimensions, the {modality} index {index.dim}")
        notes: dict = {}
        self._check_filters(filters, notes)
        active = filters.active()
        limit = min(index.ntotal, max(self.settings.max_search_depth, want))
        k = min(limit, max(2 * want, want + 16) if active else want)
        rounds = 0
        while True:
            rounds += 1
            sims, ids = index.search(query, max(k, 1))
            sims, ids = sims[0], ids[0]
            end = np.nonzero(ids < 0)[0]
            exhausted = len(end) > 0 or k >= index.ntotal
            if len(end):
                sims, ids = sims[:end[0]], ids[:end[0]]
            _, first = np.unique(ids, return_index=True)  # an id once, at its best rank
            first.sort()
            sims, ids = sims[first], ids[first]
            keep = self._passing(ids, filters, notes) if active else np.arange(len(ids))
            if len(keep) >= want or exhausted or k >= limit or (deadline and time.monotonic() > deadline):
                break
            rate = max(len(keep), 1) / max(len(ids), 1)
            k = min(limit, max(2 * k, math.ceil(want / rate * 1.2)))
        complete = len(keep) >= want or exhausted
        if not complete:
            why = "the query deadline" if deadline and time.monotonic() > deadline else "--max-search-depth"
            notes["num_result_ids"] = f"{len(keep)} of {want} passed the filters within {why} ({k} searched)"
        keep = keep[:want]
        return Outcome(ids=ids[keep], sims=sims[keep], depth=k, rounds=rounds, complete=complete, notes=notes)

    def _check_filters(self, filters: Filters, notes: dict) -> None:
        has = self.catalog.has
        for name, value, tag in (("use_safety_model", filters.max_punsafe, "punsafe"),
                                 ("max_pwatermark", filters.max_pwatermark, "pwatermark"),
                                 ("min_aesthetic", filters.min_aesthetic, "aesthetic")):
            if value is not None and not has.get(tag):
                notes[name] = f"this run has no {tag} scores"
        if filters.violence:
            notes["use_violence_detector"] = "this run has no violence model"

    def _passing(self, ids: np.ndarray, filters: Filters, notes: dict) -> np.ndarray:
        """Positions in `ids` (ascending) that pass every filter the run can honour."""
        cat = self.catalog
        ok = np.ones(len(ids), bool)
        if filters.max_punsafe is not None and cat.has.get("punsafe"):
            ok &= ~(cat.column(ids, "punsafe") > filters.max_punsafe)
        if filters.max_pwatermark is not None and cat.has.get("pwatermark"):
            ok &= ~(cat.column(ids, "pwatermark") > filters.max_pwatermark)
        if filters.min_aesthetic is not None and cat.has.get("aesthetic"):
            ok &= cat.column(ids, "aesthetic") >= filters.min_aesthetic
        if filters.languages:
            languages = cat.take(ids, ["language"]).column(0).to_pylist()
            ok &= np.array([lang in filters.languages for lang in languages], bool)
        keep = np.nonzero(ok)[0]
        if filters.deduplicate and len(keep) > 1:
            _, first = np.unique(self.near_duplicate_groups(ids[keep]), return_index=True)
            keep = keep[np.sort(first)]  # one per near-duplicate group of the run (index-dedup's)
        if filters.deduplicate and len(keep) > 1:
            vectors = cat.embeddings(ids[keep])
            if vectors is None:
                notes["deduplicate"] = "this run's image embeddings are not all readable"
            else:
                keep = keep[keep_first_of_components(vectors)]
        return keep

    def near_duplicate_groups(self, ids: np.ndarray) -> np.ndarray:
        """Each id's near-duplicate group (dedup/groups.parquet), the id itself when in none; the
        groups are read again when dedup/info.json names another generation."""
        now = time.monotonic()
        if now - self._groups_checked >= TAKEDOWN_REFRESH_S:
            self._groups_checked = now
            try:
                key = self.store.read_json(layout.DEDUP_INFO).get("key")
                if key != self._groups[0]:
                    import pyarrow.parquet as pq
                    table = pq.read_table(io.BytesIO(self.store.read_bytes(layout.DEDUP_GROUPS)),
                                          columns=["id", "group"]).sort_by("id")
                    self._groups = (key, table.column("id").to_numpy(), table.column("group").to_numpy())
            except FileNotFoundError:  # no groups (yet)
                self._groups = (None, np.zeros(0, np.int64), np.zeros(0, np.int64))
            except OSError as exc:  # the store is away for a moment: keep what we have
                log.warning("near-duplicate groups unreadable: %s", exc)
        _, members, group = self._groups
        pos = np.searchsorted(members, ids).clip(0, max(len(members) - 1, 0))
        hit = (members[pos] == ids) if len(members) else np.zeros(len(ids), bool)
        return np.where(hit, group[pos] if len(members) else ids, ids)

    # -- metadata ---------------------------------------------------------------------------------
    def metadata(self, ids) -> list[dict | None]:
        """Each id's metadata as JSON-ready dicts (None for an id the run does not have, or has
        taken down: search never returns those, and asking by id shows nothing either)."""
        ids = np.asarray(ids, np.int64)
        rows = self.catalog.rows(ids)
        hidden = self.taken_down()
        if len(hidden):
            for pos in np.nonzero(np.isin(ids, hidden))[0].tolist():
                rows[pos] = None
        return rows

    def taken_down(self) -> np.ndarray:
        """Ids never served (sorted): taken down or left out by refilter, looked at again every few seconds."""
        now = time.monotonic()
        if now - self._hidden_checked >= TAKEDOWN_REFRESH_S:
            self._hidden_checked = now
            try:
                stamp, ids = read_hidden(self.store, self._hidden[0])
                if ids is not None:
                    self._hidden = (stamp, ids)
            except OSError as exc:  # the store is away for a moment: keep the list we have
                log.warning("takedown list unreadable: %s", exc)
        return self._hidden[1]

