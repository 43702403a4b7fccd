"""Takedown: remove samples after publication, without rebuilding anything (as Re-LAION removed
links by lists of URLs and image hashes).

A list of URLs, md5/sha256 hashes or perceptual hashes (download's --blocklist format) is matched
against every embedded shard: URLs against embeddings/metadata, hashes against the downloaded
images' sha256 (images/{shard}.parquet) and the published `hash` column, perceptual hashes against
images' `phash` within each entry's distance, so the copies already in the run go too. For what
matched, in this order, so a takedown stopped half-way and run again finds the same samples and
finishes:

1. the global ids join `takedowns/ids.npy`: search never returns them from then on (the serving
   index filters them; a running server picks the list up within seconds), merges included;
2. the published dataset loses them: their rows leave dataset/{shard}.parquet, their members leave
   dataset/{shard}.tar and images/{shard}.tar;
3. their url and caption are blanked in embeddings/metadata (rows stay, so every other id still
   points at its own row);
4. a record of what was removed, why and from which list goes to takedowns/{stamp}.json, and the
   URLs and sha256 hashes of the removed samples (and every entry of the given list) are added to
   takedowns/blocklist.txt and to the run's own --blocklist file when it has one, so a later run
   never stores them again.
"""
from __future__ import annotations

import io
import re
import tarfile
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store, shard_name
from clipfleet.workers.download.blocklist import Blocklist

_HEX = re.compile(r"^[0-9a-f]{32}$|^[0-9a-f]{64}$")


@dataclass
class Match:
    id: int
    shard: int
    row: int
    key: str
    url: str | None
    by: str          # "url", "sha256", "md5" or "phash"
    sha256: str | None = None


@dataclass
class TakedownResult:
    removed: list[Match] = field(default_factory=list)
    already: int = 0                      # matched samples removed by an earlier takedown
    not_found: dict = field(default_factory=dict)
    record: str = ""
    blocklists: list[str] = field(default_factory=list)


def _read_parquet(store: Store, rel: str, columns=None) -> pa.Table | None:
    if not store.exists(rel):
        return None
    with store.open(rel) as f:
        table = pq.read_table(f)
    return table.select([c for c in columns if c in table.column_names]) if columns else table


def _write_parquet(store: Store, rel: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())


def embedded_shards(store: Store) -> list[int]:
    prefix, suffix = "metadata_", ".parquet"
    return sorted(int(n[len(prefix):-len(suffix)]) for n in store.list(f"{layout.EMBEDDINGS}/metadata")
                  if n.startswith(prefix) and n.endswith(suffix))


def find(store: Store, wanted: Blocklist, progress=None) -> tuple[list[Match], dict]:
    """Samples of the run that `wanted` lists, and the entries that matched nothing."""
    matches: list[Match] = []
    seen_urls, seen_hashes, seen_phashes = set(), set(), set()
    shards = embedded_shards(store)
    for shard in (progress(shards) if progress else shards):
        meta = _read_parquet(store, layout.embedding_metadata(shard), ["key", "url"])
        if meta is None:
            continue
        keys = meta.column("key").to_pylist()
        urls = meta.column("url").to_pylist()
        hashes = {}  # key -> {kind: digest}
        phashes = {}  # key -> the picture's perceptual hash
        for rel, columns in ((layout.image_shard(shard, "parquet"), ["key", "sha256", "md5", "phash"]),
                             (layout.dataset_shard(shard, "parquet"), ["key", "hash", "md5", "sha256"])):
            table = _read_parquet(store, rel, columns)
            if table is None:
                continue
            for row in table.to_pylist():
                phashes.setdefault(row["key"], row.get("phash"))
                for col in columns[1:]:  # a phash is 16 hex digits: never taken for md5/sha256
                    digest = str(row.get(col) or "").lower()
                    if _HEX.match(digest):
                        hashes.setdefault(row["key"], {})["md5" if len(digest) == 32 else "sha256"] = digest
        for row, (key, url) in enumerate(zip(keys, urls)):
            digests = hashes.get(key, {})
            by = None
            if url and wanted.url_blocked(url):
                by = "url"
                seen_urls.add(url.split("#", 1)[0])
            for kind in ("sha256", "md5"):
                if digests.get(kind) in (wanted.sha256 if kind == "sha256" else wanted.md5):
                    by = by or kind
                    seen_hashes.add(digests[kind])
            listed = wanted.phash.match(phashes.get(key))
            if listed:
                by = by or "phash"
                seen_phashes.add(listed)
            if by:
                matches.append(Match(layout.global_id(shard, row), shard, row, key, url, by, digests.get("sha256")))
    not_found = {"urls": sorted(wanted.urls - seen_urls),
                 "hashes": sorted((wanted.md5 | wanted.sha256) - seen_hashes)
                 + [f"phash:{h}" for h in sorted(set(wanted.phash.entries) - seen_phashes)]}
    return matches, not_found


def taken_down(store: Store) -> np.ndarray:
    return read_ids(store, layout.TAKEDOWN_IDS)


def read_ids(store: Store, rel: str) -> np.ndarray:
    """A sorted list of global ids (takedowns/ids.npy, filtered/ids.npy); empty when there is none."""
    if not store.exists(rel):
        return np.zeros(0, np.int64)
    return np.load(io.BytesIO(store.read_bytes(rel))).astype(np.int64)


def write_ids(store: Store, ids: np.ndarray, rel: str = layout.TAKEDOWN_IDS) -> None:
    buf = io.BytesIO()
    np.save(buf, np.unique(ids.astype(np.int64)))
    store.write_bytes(rel, buf.getvalue())


def _without_members(data: bytes, keys: set[str]) -> tuple[bytes, int]:
    """A tar without the members of `keys` (webdataset: a sample's files share the key before the first dot)."""
    out, dropped = io.BytesIO(), 0
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            if member.name.rsplit("/", 1)[-1].split(".", 1)[0] in keys:
                dropped += 1
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue(), dropped


def _unpublish(store: Store, shard: int, keys: set[str]) -> None:
    dataset = _read_parquet(store, layout.dataset_shard(shard, "parquet"))
    if dataset is not None and "key" in dataset.column_names:
        kept = dataset.filter(pc.invert(pc.is_in(dataset.column("key"), pa.array(sorted(keys)))))
        if len(kept) != len(dataset):
            _write_parquet(store, layout.dataset_shard(shard, "parquet"), kept)
    for rel in (layout.dataset_shard(shard, "tar"), layout.image_shard(shard, "tar")):
        if store.exists(rel):
            data, dropped = _without_members(store.read_bytes(rel), keys)
            if dropped:
                store.write_bytes(rel, data)


def _redact_metadata(store: Store, shard: int, rows: list[int]) -> None:
    rel = layout.embedding_metadata(shard)
    table = _read_parquet(store, rel)
    mask = np.zeros(len(table), bool)
    mask[rows] = True
    for name in ("url", "caption"):
        if name in table.column_names:
            column = table.column(name)
            blank = pa.nulls(len(table), column.type)
            table = table.set_column(table.column_names.index(name), name,
                                     pc.if_else(pa.array(mask), blank, column))
    _write_parquet(store, rel, table)


def blocklist_lines(wanted: Blocklist, removed: list[Match]) -> list[str]:
    lines = sorted(wanted.urls) + [f"md5:{h}" for h in sorted(wanted.md5)] + [f"sha256:{h}" for h in sorted(wanted.sha256)]
    lines += [f"phash:{h}/{d}" for h, d in sorted(wanted.phash.entries.items())]
    lines += [m.url for m in removed if m.url] + [f"sha256:{m.sha256}" for m in removed if m.sha256]
    return list(dict.fromkeys(lines))


def _append_lines(uri: str, lines: list[str], store: Store | None = None) -> int:
    """Add the lines `uri` lacks; returns how many. Written whole, so a reader never sees half a line."""
    import fsspec
    existing = ""
    if store is not None:
        existing = store.read_bytes(uri).decode() if store.exists(uri) else ""
    else:
        try:
            with fsspec.open(uri, "rt", encoding="utf-8") as f:
                existing = f.read()
        except FileNotFoundError:
            pass
    have = {line.strip() for line in existing.splitlines()}
    new = [line for line in lines if line not in have]
    if not new:
        return 0
    text = existing + ("" if not existing or existing.endswith("\n") else "\n") + "\n".join(new) + "\n"
    if store is not None:
        store.write_bytes(uri, text.encode())
    else:
        import os
        if "://" not in uri:
            tmp = f"{uri}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, uri)
        else:
            with fsspec.open(uri, "wt", encoding="utf-8") as f:
                f.write(text)
    return len(new)


def takedown(store: Store, wanted: Blocklist, reason: str, source: str, progress=None) -> TakedownResult:
    if not wanted:
        raise ValueError(f"{source} lists no URL or hash")
    matches, not_found = find(store, wanted, progress)
    before = set(taken_down(store).tolist())
    result = TakedownResult(not_found=not_found)
    result.removed = [m for m in matches if m.id not in before]
    result.already = len(matches) - len(result.removed)
    write_ids(store, np.array(sorted(before | {m.id for m in matches}), np.int64))   # 1. never served
    by_shard: dict[int, list[Match]] = {}
    for m in matches:
        by_shard.setdefault(m.shard, []).append(m)
    for shard, items in sorted(by_shard.items()):
        _unpublish(store, shard, {m.key for m in items})                                 # 2. unpublished
    for shard, items in sorted(by_shard.items()):
        if any(m.url is not None for m in items):
            _redact_metadata(store, shard, [m.row for m in items])                       # 3. redacted
    lines = blocklist_lines(wanted, matches)                                              # 4. recorded
    _append_lines(layout.TAKEDOWN_BLOCKLIST, lines, store)
    result.blocklists.append(store.url(layout.TAKEDOWN_BLOCKLIST))
    try:
        run_blocklist = store.read_json(layout.RUN_FILE).get("download", {}).get("blocklist")
    except FileNotFoundError:
        run_blocklist = None
    if run_blocklist:
        _append_lines(run_blocklist, lines)
        result.blocklists.append(run_blocklist)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    result.record = layout.takedown_record(stamp)
    store.write_json(result.record, {
        "at": time.time(), "reason": reason, "list": source,
        "removed": [{"id": m.id, "shard": m.shard, "row": m.row, "key": m.key, "url": m.url, "matched_by": m.by}
                    for m in matches],
        "already_removed": result.already, "not_found": not_found, "blocklists": result.blocklists})
    return result


def load_list(uri: str) -> Blocklist:
    try:
        return Blocklist.load(uri)
    except OSError as exc:
        raise ValueError(f"{uri} cannot be read: {exc}") from exc
