"""`clipfleet run` after registering: feed the first tasks, follow the run state until every stage
is settled (sweeping shards nobody holds), then say what the run produced.

A run is resumable by construction: every shard whose marker exists is skipped when
enqueueing, and the stage itself skips a marked shard if a duplicate task arrives anyway.
While it follows, the sweeper (shared/recovery.py) sends again any shard nobody holds.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from clipfleet.producer.bars import Bars, Held
from clipfleet.producer.feed import enqueue, is_broker_error
from clipfleet.producer.register import FirstTask, RunError
from clipfleet.shared.recovery import done, pending, sweep_s
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.runstate import RunState, StageState
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store, shard_name, unreachable_errors

log = logging.getLogger("clipfleet.run")


def broker_lost_s() -> float:
    """How long `run` waits for an unreachable broker or store before it gives up, naming what is left."""
    return float(os.environ.get("CLIPFLEET_BROKER_LOST_S", 600))


class _Outage:
    """How long something has been unreachable; past broker_lost_s() the run ends with `why`."""

    def __init__(self):
        self.since: float | None = None

    def ok(self) -> None:
        self.since = None

    def failed(self, why) -> None:
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since > broker_lost_s():
            raise RunError(why() if callable(why) else why)


class _Compactor:
    """Keeps the per-stage summaries of the markers (shared/summaries.py) up to date in the
    background, every COMPACT_S, so `status` and the report after a run read few markers."""
    COMPACT_S = 30.0

    def __init__(self, run: RunState):
        self.run, self.thread, self.next = run, None, time.monotonic() + self.COMPACT_S

    def maybe(self) -> None:
        if self.run.index is None or time.monotonic() < self.next or (self.thread and self.thread.is_alive()):
            return  # without an index the follow loop reads the store path, which compacts as it goes
        self.next = time.monotonic() + self.COMPACT_S
        self.thread = threading.Thread(target=self._compact, daemon=True, name="compactor")
        self.thread.start()

    def _compact(self, seal: bool = False) -> None:
        try:
            run = RunState(self.run.store, self.run.cfg)
            run.seal() if seal else run.compact()
        except Exception as exc:  # a cache: the next round, or the next reader, catches up
            log.warning("could not compact the run's summaries: %s", exc)

    def wait(self) -> None:
        """At the end of a run: the summaries brought up to date, and sealed when it is complete."""
        if self.thread is not None:
            self.thread.join(timeout=60)
        self._compact(seal=True)


def held(holdings: dict, state: StageState, sweeper) -> Held:
    h = holdings.get(state.stage)
    out = Held(recovered=sweeper.recovered[state.stage] if sweeper is not None else 0)
    if h is not None:
        out.in_flight = h.in_flight & {int(x) for x in state.pending}
        out.queued = h.queued
        out.running_samples = sum(v for k, v in h.progress.items() if k in out.in_flight)
    return out


# A tick reads O(stages) keys from Redis (~0.5 ms): ten a second sees a run's end within 0.1 s
# instead of up to a second late, for about 0.5% of a core.
POLL_S = 0.1
# While the run state is unreachable, asking (and logging) ten times a second helps nobody.
UNREACHABLE_RETRY_S = 1.0


def follow(run: RunState, fleet=None, poll_s: float = POLL_S, show_progress: bool = True, sweeper=None,
           issued: set | None = None) -> list[StageState]:
    """Block until every expected shard of every stage is done or dead-lettered and the stages'
    run-once work is settled. With a `sweeper`, every CLIPFLEET_SWEEP_S the shards nobody holds
    are sent again; a broker or store unreachable for CLIPFLEET_BROKER_LOST_S ends the run with an
    error naming what is left."""
    bars = Bars(run.stages, show=show_progress)
    compactor = _Compactor(run)
    holdings: dict = {}
    next_sweep, first_sweep = 0.0, True
    store_outage, broker_outage = _Outage(), _Outage()
    try:
        while True:
            try:
                states = run.all()
                settled = all(s.complete for s in states) and run.settled()
                store_outage.ok()
            except Exception as exc:  # the store or the broker (the run state) away for a while: wait
                if not is_broker_error(exc) and not isinstance(exc, unreachable_errors()):
                    raise
                log.warning("run state unreachable, retrying: %s", exc)
                store_outage.failed(f"run state ({run.store.uri}, broker) unreachable for "
                                    f"{broker_lost_s():.0f}s: {exc}")
                time.sleep(max(poll_s, UNREACHABLE_RETRY_S))
                continue
            if sweeper is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + sweep_s()
                try:
                    holdings = sweeper.sweep(pending(states, issued), done(states), resume=first_sweep)
                    first_sweep = False
                    broker_outage.ok()
                except Exception as exc:
                    if not is_broker_error(exc) and not isinstance(exc, unreachable_errors()):
                        raise
                    log.warning("sweep skipped, broker or store unreachable: %s", exc)
                    broker_outage.failed(lambda: f"broker unreachable for {broker_lost_s():.0f}s; unfinished shards: "
                                         + "; ".join(f"{s.stage}: {', '.join(sorted(s.pending))}"
                                                     for s in states if s.pending))
            for state in states:
                bars.draw(state, held(holdings, state, sweeper))
            compactor.maybe()
            if settled:
                compactor.wait()
                return states
            if fleet is not None and fleet.dead():
                raise RunError(f"fleet process exited: {', '.join(fleet.dead())}")
            time.sleep(poll_s)
    finally:
        bars.close()


def summary(states: list[StageState]) -> str:
    return "; ".join(f"{s.stage}: {s.n_done} done, {s.n_failed} failed" for s in states)


def produced(store: Store, states: list[StageState], recovered: dict | None = None) -> tuple[list[str], list[str]]:
    """What the run produced, stage by stage, and the problems that make it fail.

    A stage that took samples in and stored none is a problem: the reasons are printed."""
    lines, problems = [], []
    for s in states:
        n_in, n_out = s.samples_in, s.samples_out
        samples = (f", {n_in} samples in, {n_out} out" if n_in is not None and n_out is not None
                   else f", {n_out} samples out" if n_out is not None else "")
        again = (recovered or {}).get(s.stage)
        lines.append(f"{s.stage}: {s.n_done} of {s.n_expected} shards done, {s.n_failed} failed"
                     + (f", {again} recovered" if again else "") + samples)
        reasons = s.drop_reasons()
        if reasons:
            lines.append("  dropped: " + ", ".join(f"{name} {n}" for name, n in reasons))
        if s.n_done:
            lines.append(f"  outputs: {store.url(REGISTRY[s.stage].outputs)}")
        for d in store.deadletters(s.stage):
            problems.append(f"dead letter {s.stage} {shard_name(d['shard'])}: {d.get('error')}")
        if s.n_done and n_out == 0:
            why = "; ".join(f"{name} {n}" for name, n in reasons) or "no reason was counted"
            if n_in == 0:
                problems.append(f"{s.stage} got no samples: its input is empty ({why})")
            else:
                problems.append(f"{s.stage} stored no samples from {n_in if n_in is not None else 'its'} "
                                f"input samples ({why})")
            break  # the stages after it had nothing to work on
    return lines, problems


def report_outcome(store: Store, states: list[StageState], recovered: dict | None = None) -> int:
    """Print the summary, what was produced and the problems; the exit code of `run`."""
    lines, problems = produced(store, states, recovered)
    print(summary(states))
    for line in lines:
        print(line)
    for problem in problems:
        print(f"clipfleet: {problem}", file=sys.stderr)
    return 1 if problems else 0


def run_with_fleet(run: RunState, first: list[FirstTask], broker: str, fleet=None, detach: bool = False,
                   show_progress: bool = True, replayed: bool = False) -> int:
    """Enqueue, follow with the sweeper, print what was produced; the exit code of `run`.
    The run state is read from the broker's Redis (rebuilt from the markers when it is missing,
    or when dead letters were just replayed)."""
    import redis
    from clipfleet.shared.recovery import Sweeper, register_detached
    from clipfleet.workers.app import make_app
    store = run.store
    app, client = make_app(broker), redis.Redis.from_url(broker, socket_timeout=10, socket_connect_timeout=5)
    run.index = RunIndex(client, store.uri, run.cfg.created_at)
    run.rebuild_index(force=replayed)
    run.index.set_first(first[0].stage, [t.shard for t in first])  # retry-failed's shards join a running run
    if detach:
        sent = enqueue(app, client, store, first)
        register_detached(client, store.uri)  # every task is sent: from now on the workers sweep it
        print(f"enqueued {sent} {first[0].stage} tasks; follow with: clipfleet status --store {store.uri}")
        return 0
    sweeper = Sweeper(app, client, store, task_kwargs=run.task_kwargs)
    issued: set = set()
    sent: list[int] = []  # the feeder's count, so a resumed run can say it sent nothing new
    stop = threading.Event()
    feeder = threading.Thread(target=lambda: sent.append(enqueue(app, client, store, first, issued, stop)),
                              daemon=True, name="feeder")
    feeder.start()
    try:
        states = follow(run, fleet=fleet, sweeper=sweeper, issued=issued, show_progress=show_progress)
    finally:
        stop.set()
    feeder.join(timeout=10)
    if sent:
        print(f"sent {sent[0]} of {len(first)} {first[0].stage} tasks ({len(first) - sent[0]} already done)")
    resumed = sum(sweeper.resumed.values())
    if resumed:
        print(f"resumed {resumed} shards that a stage before had handed on")
    from clipfleet.workers.publish import publish_settled
    for line in publish_settled(store, run.cfg, states):  # settled: the card counts what is published now
        print(line)
    return report_outcome(store, states, dict(sweeper.recovered))
