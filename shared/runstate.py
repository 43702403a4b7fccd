"""The one run state: which shards each stage expects, which are done or failed, and how many
samples went through, for `run`, `status`, the sweeper, the report and the run-once due checks.

The markers are the truth. A stage's expected shards are the run's inputs for its first stage,
then the `next_shards` of the done shards of the stage before. Markers never change once
written, so each is read at most once per process (a compact record of it is kept, keyed by the
run's identity); a shard's samples come from the marker's typed fields (layout.MARKER_FIELDS).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from clipfleet.shared import layout
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.stages import REGISTRY, load
from clipfleet.shared.storage import DEADLETTER, MARKERS, Store, shard_name


@dataclass(frozen=True)
class ShardRecord:
    """What the run state keeps of one marker."""
    samples_in: int | None
    samples_out: int | None
    next_shards: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float = 0.0
    stats: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def of(cls, marker: dict, name: str) -> "ShardRecord":
        return cls(marker.get("samples_in"), marker.get("samples_out"),
                   tuple(shard_name(s) for s in marker.get("next_shards", [name])),
                   tuple(marker.get("dropped") or ()), marker.get("started_at"), marker.get("finished_at"),
                   marker.get("duration_s") or 0.0, marker.get("stats") or {})


@dataclass
class StageState:
    stage: str
    expected: set[str]          # shard names known so far; grows while the stage before runs
    done: set[str]
    failed: set[str]            # dead-lettered and not done since
    upstream_complete: bool     # every stage before this one has done or dead-lettered all its shards
    records: dict[str, ShardRecord] = field(default_factory=dict, repr=False)  # done shard -> record
    sizes: dict[str, int | None] = field(default_factory=dict, repr=False)     # expected shard -> samples

    @property
    def samples_expected(self) -> int | None:
        """Samples in the expected shards, when every one's size is known."""
        if not self.sizes or None in self.sizes.values():
            return None
        return sum(self.sizes.values())

    @property
    def complete(self) -> bool:
        """Every shard this stage will ever get is done or dead-lettered."""
        return self.upstream_complete and self.expected <= (self.done | self.failed)

    @property
    def pending(self) -> set[str]:
        return self.expected - self.done - self.failed

    @property
    def samples_done(self) -> int:
        """Samples that went into done shards (a shard that does not count them: its size)."""
        return sum(r.samples_in if r.samples_in is not None else (self.sizes.get(n) or 0)
                   for n, r in self.records.items())

    @property
    def samples_out(self) -> int | None:
        outs = [r.samples_out for r in self.records.values()]
        return None if None in outs else sum(outs)

    @property
    def samples_in(self) -> int | None:
        ins = [r.samples_in for r in self.records.values()]
        return None if None in ins else sum(ins)

    def totals(self) -> dict:
        """Every count of the done shards' stats summed; groups summed inside."""
        return totals(r.stats for r in self.records.values())

    def drop_reasons(self, top: int = 5) -> list[tuple[str, int]]:
        """The largest reasons samples were dropped, as (name, count); grouped ones as group: reason."""
        dropped = {name for r in self.records.values() for name in r.dropped}
        reasons = []
        for key, value in self.totals().items():
            if key not in dropped:
                continue
            if isinstance(value, dict):
                # a group named "dropped" says nothing its reasons do not (clip: "below threshold")
                reasons += [(k if key == "dropped" else f"{key}: {k}", v) for k, v in value.items() if v]
            elif value:
                reasons.append((key, value))
        return sorted(reasons, key=lambda r: (-r[1], r[0]))[:top]

    def wall_s(self) -> float:
        spans = [(r.started_at, r.finished_at) for r in self.records.values() if r.started_at and r.finished_at]
        return max(f for _, f in spans) - min(s for s, _ in spans) if spans else 0.0


def totals(stats_dicts) -> dict:
    flat, nested = Counter(), {}
    for stats in stats_dicts:
        for key, value in stats.items():
            if isinstance(value, dict):
                nested.setdefault(key, Counter()).update({k: v for k, v in value.items() if _is_count(v)})
            elif _is_count(value):
                flat[key] += value
    out = dict(sorted(flat.items()))
    for key, group in sorted(nested.items()):
        out[key] = dict(sorted(group.items()))
    return out


def _is_count(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# (store uri, run created_at) -> {(stage, shard): marker}: markers never change once written.
_MARKERS: dict = {}
# (store uri, run created_at) -> {url shard name: rows}
_URL_ROWS: dict = {}


class RunState:
    """Expected / done / failed / samples per stage of one run, read from its store."""

    def __init__(self, store: Store, cfg: RunConfig | None = None, first: set[str] | None = None):
        """`first`: the first stage's shards, when the caller knows them (the producer that
        wrote the URL shards), so they are not listed again on every look."""
        self.store = store
        self.cfg = cfg or RunConfig.load(store)
        self._first = first
        run = (store.uri, self.cfg.created_at)
        self._markers = _MARKERS.setdefault(run, {})
        self._rows = _URL_ROWS.setdefault(run, {})

    @property
    def stages(self) -> list[str]:
        return self.cfg.stages

    def first_stage(self) -> str:
        return REGISTRY.first(self.cfg.input_kind)

    def first_shards(self) -> set[str]:
        """The first stage's shards: one extract shard per WAT, or the URL shards under urls/."""
        if self._first is not None:
            return set(self._first)
        if self.cfg.input_kind == "wat":
            return {shard_name(i) for i in range(len(self.cfg.inputs))}
        return {n[:-len(".parquet")] for n in self.store.list("urls") if n.endswith(".parquet")}

    def marker(self, stage: str, name: str) -> dict | None:
        """A marker of this run, read once per process (a missing one is read again next time)."""
        if (stage, name) not in self._markers:
            marker = self.store.marker(stage, name)
            if marker is None:
                return None
            self._markers[stage, name] = marker
        return self._markers[stage, name]

    def task_kwargs(self, stage: str, shard: int) -> dict:
        """What a task of the run's first stage needs besides its shard (an extract's WAT)."""
        if stage == self.first_stage() and self.cfg.input_kind == "wat":
            return {"wat": self.cfg.inputs[int(shard)]}
        return {}

    def record(self, stage: str, name: str) -> ShardRecord:
        return ShardRecord.of(self.marker(stage, name) or {}, name)

    def failed(self, stage: str) -> set[str]:
        return {n[:-5] for n in self.store.list(f"{DEADLETTER}/{stage}") if n.endswith(".json")}

    def done(self, stage: str) -> set[str]:
        return self.store.done(stage)

    def all(self, until: str | None = None) -> list[StageState]:
        """Every stage of the run, in order, up to `until` (included)."""
        out: list[StageState] = []
        expected, sizes, upstream = self.first_shards(), {}, True
        url_reader = REGISTRY.first("urls")  # the stage that reads URL shards: their rows are its samples
        for stage in self.stages:
            done = self.done(stage) & expected
            failed = self.failed(stage) - done
            if stage == url_reader:
                sizes = {n: self._url_rows(n) for n in expected}
            state = StageState(stage, expected, done, failed, upstream,
                               records={n: self.record(stage, n) for n in sorted(done)},
                               sizes={n: sizes.get(n) for n in expected})
            out.append(state)
            if stage == until:
                break
            upstream = upstream and state.complete
            expected, sizes = set(), {}
            for name, rec in state.records.items():
                expected.update(rec.next_shards)
                # a shard handed on as it is carries its kept samples to the next stage
                for nxt in rec.next_shards:
                    sizes[nxt] = rec.samples_out if rec.next_shards == (name,) else None
        return out

    def stage(self, name: str) -> StageState:
        if name not in self.stages:
            return StageState(name, set(), set(), set(), True)
        return self.all(until=name)[-1]

    def settled(self) -> bool:
        """Every stage complete and every stage's run-once work (the index's merge) done."""
        states = self.all()
        if not all(s.complete for s in states):
            return False
        for s in states:
            check = REGISTRY[s.stage].settled
            if check is not None and not load(check)(self.store, self):
                return False
        return True

    def stages_run(self) -> list[str]:
        """Stages that have done (or failed) any shard in this store."""
        return [s for s in REGISTRY.names()
                if self.store.list(f"{MARKERS}/{s}") or self.store.list(f"{DEADLETTER}/{s}")]

    def _url_rows(self, name: str) -> int | None:
        if name not in self._rows:
            import pyarrow.parquet as pq
            try:
                with self.store.open(layout.url_shard(name)) as f:
                    self._rows[name] = pq.ParquetFile(f).metadata.num_rows
            except (FileNotFoundError, OSError, ValueError):
                return None
        return self._rows[name]
