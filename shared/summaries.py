"""Per-stage summaries of the markers (`_state/{stage}.json`), so the run state read from the store
reads each marker once, not on every look: a later `status` or report lists the marker names
and reads only the markers committed since the summary was written.

A summary holds, per shard, what the run state needs (samples in and out, next shards, times),
and the stats of all its shards summed. It only ever grows by markers, which never change once
written, so it is exact; it is written whole and atomically (a crash leaves the old one), and two
writers at once lose nothing but work (the next look reads again what the loser had added). It
is a cache: delete it and the next look rebuilds it from the markers.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipfleet.shared.layout import stage_summary

log = logging.getLogger("clipfleet.summaries")
VERSION = 1
READERS = 16  # markers read at once: on S3 each is a round trip


@dataclass
class Row:
    samples_in: int | None
    samples_out: int | None
    next: list[str] | None          # None: handed on as itself
    started_at: float | None
    finished_at: float | None
    duration_s: float

    def next_shards(self, name: str) -> list[str]:
        return [name] if self.next is None else self.next

    def pack(self) -> list:
        return [self.samples_in, self.samples_out, self.next, self.started_at, self.finished_at, self.duration_s]

    @classmethod
    def of(cls, name: str, marker: dict) -> "Row":
        nxt = [_name(s) for s in marker.get("next_shards", [name])]
        return cls(marker.get("samples_in"), marker.get("samples_out"), None if nxt == [name] else nxt,
                   marker.get("started_at"), marker.get("finished_at"), marker.get("duration_s") or 0.0)


@dataclass
class Summary:
    shards: dict[str, Row] = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    read_marker: object = field(default=None, repr=False)
    stage: str = ""

    def add(self, name: str, marker: dict) -> None:
        self.shards[name] = Row.of(name, marker)
        _add_stats(self.totals, marker.get("stats") or {})
        self.dropped = sorted(set(self.dropped) | set(marker.get("dropped") or ()))

    def totals_of(self, names: set[str]) -> dict:
        """The summed stats of `names` (all of the summary's shards: read from it)."""
        if names == self.shards.keys():
            return self.totals
        out: dict = {}
        for name in sorted(names):
            _add_stats(out, (self.read_marker(self.stage, name) or {}).get("stats") or {})
        return out


def compacted(store, stage: str, names: set[str], read_marker) -> Summary:
    """The summary of `stage` holding at least `names` (done shards): the stored one, plus the
    markers it lacks (read in parallel), written back when it grew."""
    summary = load(store, stage)
    summary.read_marker, summary.stage = read_marker, stage
    missing = sorted(names - summary.shards.keys())
    if not missing:
        return summary
    with ThreadPoolExecutor(READERS) as pool:
        markers = list(pool.map(lambda n: read_marker(stage, n), missing))
    for name, marker in zip(missing, markers):
        if marker is not None:
            summary.add(name, marker)
    try:
        store.write_bytes(stage_summary(stage), json.dumps({
            "version": VERSION, "totals": summary.totals, "dropped": summary.dropped,
            "shards": {n: r.pack() for n, r in summary.shards.items()}}, separators=(",", ":")).encode())
    except Exception as exc:  # a read-only store still answers; the next look reads them again
        log.warning("could not write the %s summary: %s", stage, exc)
    return summary


def load(store, stage: str) -> Summary:
    try:
        raw = store.read_json(stage_summary(stage))
    except (FileNotFoundError, ValueError):
        return Summary()
    if raw.get("version") != VERSION:
        return Summary()
    return Summary({n: Row(*r) for n, r in raw["shards"].items()}, raw.get("totals") or {},
                   list(raw.get("dropped") or ()))


def _add_stats(total: dict, stats: dict) -> None:
    for key, value in stats.items():
        if isinstance(value, dict):
            group = total.setdefault(key, {})
            if isinstance(group, dict):
                for k, v in value.items():
                    if _count(v):
                        group[k] = group.get(k, 0) + v
        elif _count(value) and not isinstance(total.get(key), dict):
            total[key] = total.get(key, 0) + value


def _count(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _name(shard) -> str:
    return f"{shard:05d}" if isinstance(shard, int) else str(shard)


URL_ROWS = "_state/urls.json"


def url_rows(store, names: set[str], read_rows) -> dict[str, int | None]:
    """Rows of URL shards, read once (`read_rows(name)`, a parquet footer each) and kept in
    _state/urls.json: URL shards never change once written."""
    try:
        known = store.read_json(URL_ROWS)
    except (FileNotFoundError, ValueError):
        known = {}
    missing = sorted(n for n in names if n not in known)
    if missing:
        with ThreadPoolExecutor(READERS) as pool:
            rows = list(pool.map(read_rows, missing))
        known.update({n: r for n, r in zip(missing, rows) if r is not None})
        try:
            store.write_bytes(URL_ROWS, json.dumps(known, separators=(",", ":")).encode())
        except Exception as exc:
            log.warning("could not write %s: %s", URL_ROWS, exc)
    return {n: known.get(n) for n in names}
