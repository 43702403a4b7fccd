"""The one run state: which shards each stage expects, which are done or failed, and how many
samples went through, for `run`, `status`, the sweeper, the report and the run-once due checks.

The markers are the truth. A stage's expected shards are the run's inputs for its first stage,
then the `next_shards` of the done shards of the stage before; its samples come from the
markers' typed fields (layout.MARKER_FIELDS). Two ways to read it, with the same answers:
  - with a `RunIndex` (shared/runindex.py: sets and counts in Redis, recorded as markers are
    committed): O(stages) calls, whatever the size of the run; the shard sets load only when a
    caller asks for them. A missing index is rebuilt from the markers first.
  - from the store alone: the marker names are listed, and each marker is read once: per-stage
    summaries under _state/ (shared/summaries.py) keep what was read, so a later look (another
    `status`, the report) reads only the markers committed since.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from clipfleet.shared import layout
from clipfleet.shared.retries import retry_shard_names
from clipfleet.shared.runconfig import RunConfig, revision
from clipfleet.shared.stages import REGISTRY, load
from clipfleet.shared.storage import DEADLETTER, MARKERS, Store, shard_name
from clipfleet.shared.summaries import Summary, compacted, url_rows
from clipfleet.shared.summaries import load as load_summary

log = logging.getLogger("clipfleet.runstate")


@dataclass
class StageState:
    stage: str
    n_expected: int
    n_done: int
    n_failed: int               # dead-lettered and not done since
    upstream_complete: bool     # every stage before this one has done or dead-lettered all its shards
    samples_expected: int | None = None   # samples in the expected shards, when known
    samples_done: int = 0                 # samples that went into done shards
    samples_in: int | None = None
    samples_out: int | None = None
    totals: dict = field(default_factory=dict)     # every count of the done shards summed, groups nested
    dropped: set = field(default_factory=set)      # names in totals that count dropped samples
    work_s: float = 0.0                            # summed shard durations
    wall_s: float = 0.0                            # first start to last finish
    sets: object = field(default=None, repr=False)  # kind -> set of shard names ("expected", "done", "failed", "pending")
    member: object = field(default=None, repr=False)  # (kind, name) -> bool, without loading the set
    rows: dict = field(default_factory=dict, repr=False)  # done shard -> summaries.Row (read from the store)
    _loaded: dict = field(default_factory=dict, repr=False)

    def has_done(self, name: str) -> bool:
        if self.member is not None and "done" not in self._loaded:
            return self.member("done", name)
        return name in self.done

    def _set(self, kind: str) -> set[str]:
        if kind not in self._loaded:
            self._loaded[kind] = self.sets(kind) if self.sets is not None else set()
        return self._loaded[kind]

    # shard name sets, loaded on first use; pending: expected, neither done nor failed
    expected = property(lambda self: self._set("expected"))
    done = property(lambda self: self._set("done"))
    failed = property(lambda self: self._set("failed"))
    pending = property(lambda self: self._set("pending"))

    @property
    def complete(self) -> bool:
        """Every shard this stage will ever get is done or dead-lettered."""
        return self.upstream_complete and self.n_done + self.n_failed >= self.n_expected

    def drop_reasons(self, top: int | None = 5) -> list[tuple[str, int]]:
        """The largest reasons samples were dropped (every one with top=None), as (name, count);
        grouped ones as group: reason."""
        reasons = []
        for key, value in self.totals.items():
            if key not in self.dropped:
                continue
            if isinstance(value, dict):
                # a group named "dropped" says nothing its reasons do not (clip: "below threshold")
                reasons += [(k if key == "dropped" else f"{key}: {k}", v) for k, v in value.items() if v]
            elif value:
                reasons.append((key, value))
        return sorted(reasons, key=lambda r: (-r[1], r[0]))[:top]


def totals(stats_dicts) -> dict:
    """Every count of the stats dicts summed; groups summed inside."""
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


class RunState:
    """Expected / done / failed / samples per stage of one run."""

    def __init__(self, store: Store, cfg: RunConfig | None = None, first: set[str] | None = None, index=None):
        """`first`: the first stage's shards, when the caller knows them (the producer that wrote
        the URL shards). `index`: a RunIndex to read from (rebuilt from the markers when missing)."""
        self.store = store
        self.cfg = cfg or RunConfig.load(store)
        self._seal, self._seal_read = None, False
        self._first = first
        self.index = index
        run = (store.uri, self.cfg.created_at)
        self._markers = _MARKERS.setdefault(run, {})

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

    def task_kwargs(self, stage: str, shard: int) -> dict:
        """What a task of the run's first stage needs besides its shard (an extract's WAT)."""
        if stage == self.first_stage() and self.cfg.input_kind == "wat":
            return {"wat": self.cfg.inputs[int(shard)]}
        return {}

    # -- markers, read once per process ---------------------------------------------------------
    def marker(self, stage: str, name: str) -> dict | None:
        """A marker of this run, read once per process (a missing one is read again next time)."""
        if (stage, name) not in self._markers:
            marker = self.store.marker(stage, name)
            if marker is None:
                return None
            self._markers[stage, name] = marker
        return self._markers[stage, name]

    def failed(self, stage: str) -> set[str]:
        return {n[:-5] for n in self.store.list(f"{DEADLETTER}/{stage}") if n.endswith(".json")}

    def done(self, stage: str) -> set[str]:
        if self.index is not None and self._index_ready():
            return self.index.members("done", stage)
        return self.store.done(stage)

    def stages_run(self) -> list[str]:
        """Stages that have done (or failed) any shard in this store."""
        return [s for s in REGISTRY.names()
                if self.store.list(f"{MARKERS}/{s}") or self.store.list(f"{DEADLETTER}/{s}")]

    # -- the state of every stage ---------------------------------------------------------------
    # -- a finished run, sealed: its summaries hold every marker -----------------------------------
    def seal(self, states: list[StageState] | None = None) -> bool:
        """Seal the summaries when every stage is complete (True when sealed)."""
        if self._sealed() is not None:
            return True
        states = states or self._from_store(self.stages)
        if not all(s.complete for s in states):
            return False
        try:
            self.store.write_bytes(layout.SEALED, json.dumps({
                "revision": self._revision(), "stages": self.stages,
                "expected": {s.stage: sorted(s.expected) for s in states},
                "failed": {s.stage: sorted(s.failed) for s in states},
                "recovered": {s.stage: self._recovered(s.stage) for s in states}}, separators=(",", ":")).encode())
        except Exception as exc:  # a read-only store: the next look lists again
            log.warning("could not seal the run's summaries: %s", exc)
            return False
        self._seal_read = False
        return True

    def _recovered(self, stage: str) -> int:
        from clipfleet.shared.recovery import recovered_counts
        return sum(recovered_counts(self.store, stage).values())

    def sealed_counts(self) -> dict | None:
        """Recoveries per stage of a sealed run (None when it is not sealed)."""
        sealed = self._sealed()
        return None if sealed is None else sealed.get("recovered", {})

    def unseal(self) -> None:
        self._seal_read = False
        if self.store.exists(layout.SEALED):
            self.store.fs.rm(self.store.path(layout.SEALED))

    def _sealed(self) -> dict | None:
        """The seal, when it holds for this revision of the run (read once per RunState)."""
        if not self._seal_read:
            try:
                seal = self.store.read_json(layout.SEALED)
            except (FileNotFoundError, ValueError):
                seal = None
            valid = seal is not None and seal.get("revision") == self._revision() and seal.get("stages") == self.stages
            self._seal, self._seal_read = (seal if valid else None), True
        return self._seal

    def _revision(self) -> float:
        """run.json's revision: a seal from before the run was taken further does not hold."""
        return revision(self.store.read_json(layout.RUN_FILE))

    def compact(self) -> None:
        """Bring the per-stage summaries up to date with the markers (the producer does this now
        and then while it follows a run, so a later `status` or report reads few markers)."""
        self._from_store(self.stages)

    def all(self, until: str | None = None) -> list[StageState]:
        """Every stage of the run, in order, up to `until` (included)."""
        stages = self.stages[:self.stages.index(until) + 1] if until else self.stages
        if self.index is not None and self._index_ready():
            return self._from_index(stages)
        return self._from_store(stages)

    def stage(self, name: str) -> StageState:
        if name not in self.stages:
            return StageState(name, 0, 0, 0, True)
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

    def _from_store(self, stages: list[str]) -> list[StageState]:
        sealed = self._sealed()
        if sealed is not None and all(stage in sealed["expected"] for stage in stages):
            return self._from_seal(stages, sealed)
        out: list[StageState] = []
        expected, sizes, upstream = self.first_shards(), {}, True
        url_reader = REGISTRY.first("urls")  # the stage that reads URL shards: their rows are its samples
        handed: int | None = None            # samples the stage before kept: this one's to expect
        for i, stage in enumerate(stages):
            if stage == url_reader and i > 0:  # retry-failed's shards (shared/retries.py) join the extracted ones
                expected |= retry_shard_names(self.store)
            if stage == url_reader and i == 0:
                sizes = url_rows(self.store, expected, self._url_rows)
                handed = None if None in sizes.values() else sum(sizes.values())
            done = self.store.done(stage) & expected
            failed = self.failed(stage) - done
            summary = compacted(self.store, stage, done, self.marker)
            done &= summary.shards.keys()  # a marker that vanished while we looked is not done
            state = StageState(stage, len(expected), len(done), len(failed), upstream, samples_expected=handed,
                               sets=_fixed(expected, done, failed))
            _fill(state, summary, done, sizes)
            out.append(state)
            upstream = upstream and state.complete
            handed, expected, sizes = state.samples_out if done else None, set(), {}
            for name in done:
                row = summary.shards[name]
                nxt = row.next_shards(name)
                expected.update(nxt)
                if nxt == [name]:  # handed on as it is: its kept samples are the next stage's for it
                    sizes[name] = row.samples_out
        return out

    def _from_seal(self, stages: list[str], sealed: dict) -> list[StageState]:
        """A sealed run: nothing listed, every shard's record read from the summaries."""
        out, upstream = [], True
        handed = None
        for stage in stages:
            expected, failed = set(sealed["expected"][stage]), set(sealed["failed"][stage])
            summary = load_summary(self.store, stage)
            summary.read_marker, summary.stage = self.marker, stage
            done = (expected & summary.shards.keys()) - failed
            if stage == stages[0] and stage == REGISTRY.first("urls"):
                rows = url_rows(self.store, expected, self._url_rows)
                handed = None if None in rows.values() else sum(rows.values())
            state = StageState(stage, len(expected), len(done), len(failed), upstream, samples_expected=handed,
                               sets=_fixed(expected, done, failed))
            _fill(state, summary, done, {})
            out.append(state)
            upstream = upstream and state.complete
            handed = state.samples_out if done else None
        return out

    def _from_index(self, stages: list[str]) -> list[StageState]:
        counts = self.index.counts(stages)
        out, upstream = [], True
        for stage in stages:
            c = counts[stage]
            f = c.fields
            state = StageState(stage, c.expected, c.done, c.failed, upstream,
                               samples_expected=_int(f.get("samples_expected")),
                               samples_done=int(f.get("samples_in", 0)),
                               samples_in=_int(f.get("samples_in")), samples_out=_int(f.get("samples_out")),
                               totals=_nested({k[5:]: v for k, v in f.items() if k.startswith("stat:")}),
                               dropped={k[5:] for k in f if k.startswith("drop:")},
                               work_s=float(f.get("duration_s", 0.0)),
                               wall_s=float(f.get("finished_max", 0)) - float(f.get("started_min", 0))
                               if "started_min" in f else 0.0,
                               sets=self._index_sets(stage),
                               member=lambda kind, name, stage=stage: self.index.is_member(kind, stage, name))
            out.append(state)
            upstream = upstream and state.complete
        return out

    def _index_sets(self, stage: str):
        def load_set(kind: str) -> set[str]:
            return self.index.pending(stage) if kind == "pending" else self.index.members(kind, stage)
        return load_set

    # -- the index kept equal to the markers ---------------------------------------------------
    def _index_ready(self) -> bool:
        if not self.index.built():
            self.rebuild_index(force=False)
        return True

    def rebuild_index(self, force: bool = True) -> None:
        """Rebuild the RunIndex from the markers (and nothing else); without `force`, only when
        no other reader has rebuilt it meanwhile. It covers every stage the run's inputs could reach,
        so a later --until finds the next stage's expected shards there."""
        stages = REGISTRY.chain(self.cfg.input_kind)

        states = {s.stage: s for s in self._from_store(stages)}

        def markers(stage):
            for name in sorted(states[stage].done):
                yield name, self.marker(stage, name)

        def failed(stage):
            return states[stage].failed

        first = self.first_shards()
        rows = list(url_rows(self.store, first, self._url_rows).values()) \
            if stages[0] == REGISTRY.first("urls") else [None]
        if self.index.rebuild(stages, first, markers, failed, first_samples=None if None in rows else sum(rows),
                              force=force):
            # markers committed while the rebuild ran were recorded into the keys it replaced
            for i, stage in enumerate(stages):
                nxt = stages[i + 1] if i + 1 < len(stages) else None
                for name in self.store.done(stage) - self.index.members("done", stage):
                    marker = self.marker(stage, name)
                    if marker is not None and name in self.index.members("expected", stage):
                        self.index.record(stage, nxt, marker)

    def _url_rows(self, name: str) -> int | None:
        import pyarrow.parquet as pq
        try:
            with self.store.open(layout.url_shard(name)) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except (FileNotFoundError, OSError, ValueError):
            return None


def _fixed(expected: set, done: set, failed: set):
    sets = {"expected": expected, "done": done, "failed": failed, "pending": expected - done - failed}
    return sets.__getitem__


def _fill(state: StageState, summary: Summary, done: set[str], sizes: dict) -> None:
    rows = [summary.shards[n] for n in done]
    state.samples_done = sum(r.samples_in if r.samples_in is not None else (sizes.get(n) or 0)
                             for n, r in zip(done, rows))
    ins, outs = [r.samples_in for r in rows], [r.samples_out for r in rows]
    state.samples_in = None if not rows or None in ins else sum(ins)
    state.samples_out = None if not rows or None in outs else sum(outs)
    state.rows = {n: summary.shards[n] for n in done}
    state.totals = summary.totals_of(done)
    state.dropped = set(summary.dropped)
    state.work_s = sum(r.duration_s for r in rows)
    spans = [(r.started_at, r.finished_at) for r in rows if r.started_at and r.finished_at]
    state.wall_s = max(f for _, f in spans) - min(s for s, _ in spans) if spans else 0.0


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in sorted(flat.items()):
        if "/" in key:
            group, reason = key.split("/", 1)
            out.setdefault(group, {})[reason] = value
        else:
            out[key] = value
    return out


def _int(value) -> int | None:
    return None if value is None else int(value)
