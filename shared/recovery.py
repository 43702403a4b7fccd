"""The sweeper: shards nobody holds are sent again, so a run never waits on a lost task.

A shard of a run is *pending* at a stage when it is expected there (a first task that was sent,
or a shard the stage before handed on), has no marker and no dead letter. A pending shard is
*in flight* while a worker holds a lease on it (shared/leases.py), *queued* while a message for
it waits in its queue or was delivered moments ago, and otherwise *unheld*. A shard that stays
unheld for CLIPFLEET_SUSPECT_S is recovered: the very message a dead worker left unacked is put
back at the head of its queue, or, when no message exists at all (a retry Celery could not
publish, an ack without a marker, a next stage never enqueued), the task is sent again.
Stages skip a marked shard, so the rare double run this can cause is harmless.

Bound: a shard held by a worker that died comes back within
    lease lifetime (CLIPFLEET_LEASE_S, 20 s) + suspect time (CLIPFLEET_SUSPECT_S, 10 s)
    + one sweep interval (CLIPFLEET_SWEEP_S, 5 s)  ~= 35 s,
instead of the broker's visibility timeout (an hour). Each recovery is recorded in the store
under _recovered/<stage>/<shard>.json; a shard recovered CLIPFLEET_MAX_RECOVERIES times (5)
without finishing is dead-lettered, so a run ends, non-zero, naming it.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from clipfleet.shared import leases
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.runstate import RunState, StageState
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store, shard_name

log = logging.getLogger("clipfleet.recovery")

RECOVERED = "_recovered"
PRIORITY_SEP = "\x06\x16"      # kombu's Redis transport: queue name + sep + priority
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


def sweep_s() -> float:
    return float(os.environ.get("CLIPFLEET_SWEEP_S", 5))


def max_recoveries() -> int:
    return int(os.environ.get("CLIPFLEET_MAX_RECOVERIES", 5))


def recovery_bound_s() -> float:
    return leases.lease_s() + leases.suspect_s() + sweep_s()


# -- what the broker holds ----------------------------------------------------------------------
def decode_message(raw) -> tuple[str, list, dict, dict] | None:
    """(task name, args, kwargs, headers) of a kombu Redis message, or None if it is not a task."""
    try:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        return headers.get("task", ""), args, kwargs, headers
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class Delivery:
    tag: str
    delivered_at: float
    eta: str | None


@dataclass
class BrokerState:
    queued: Counter = field(default_factory=Counter)          # (stage, shard) -> messages waiting
    delivered: dict = field(default_factory=dict)             # (stage, shard) -> [Delivery]


def broker_state(client, store_uri: str, stages: list[str]) -> BrokerState:
    """Messages of this run waiting in the stages' queues, and deliveries not yet acked."""
    state = BrokerState()
    wanted = set(stages)
    for queue in {REGISTRY[s].queue for s in stages}:
        for pri in PRIORITY_STEPS:
            name = queue if not pri else f"{queue}{PRIORITY_SEP}{pri}"
            for raw in client.lrange(name, 0, -1):
                call = _shard_call(decode_message(raw), store_uri, wanted)
                if call is not None:
                    state.queued[call] += 1
    index = dict(client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    for tag, value in client.hgetall(UNACKED).items():
        try:
            raw, _exchange, _routing_key = json.loads(value)
        except ValueError:
            continue
        decoded = decode_message(json.dumps(raw))
        call = _shard_call(decoded, store_uri, wanted)
        if call is not None:
            state.delivered.setdefault(call, []).append(
                Delivery(tag.decode() if isinstance(tag, bytes) else tag, index.get(tag, 0.0),
                         decoded[3].get("eta")))
    return state


def _shard_call(decoded, store_uri: str, stages: set[str]):
    if decoded is None:
        return None
    name, args, kwargs, _ = decoded
    call = leases.shard_of_task(name, args, kwargs)
    if call is None or call[0].rstrip("/") != store_uri.rstrip("/") or call[1] not in stages:
        return None
    return call[1], call[2]


def restore_delivery(app, tag: str) -> None:
    """Put one unacked message back at the head of its queue, as kombu does for a visibility
    timeout, with kombu's own code (so priorities and routing stay right)."""
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_by_tag(tag)


def remove_delivery(client, tag: str) -> None:
    """Forget an unacked delivery of a shard that is done: otherwise Redis hands it out again
    after the visibility timeout, for a run that would only skip it."""
    client.pipeline().zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag).execute()


# -- the sweeper --------------------------------------------------------------------------------
@dataclass
class StageHolding:
    in_flight: set[int] = field(default_factory=set)
    queued: set[int] = field(default_factory=set)
    unheld: set[int] = field(default_factory=set)
    recovered: int = 0
    progress: dict[int, int] = field(default_factory=dict)   # in-flight shard -> samples handled so far


class Sweeper:
    """Sweeps one run. `sweep(pending)` takes {stage: shards pending there} and returns, per
    stage, what holds them; it re-sends what has been unheld for the suspect time.

    `task_kwargs(stage, shard)` gives the kwargs a re-sent task needs (the WAT of an extract)."""

    def __init__(self, app, client, store: Store, task_kwargs=lambda stage, shard: {}):
        self.app, self.client, self.store = app, client, store
        self.task_kwargs = task_kwargs
        self.suspects: dict[tuple[str, int], float] = {}
        self.recovered = Counter()    # stage -> recoveries by this sweeper
        self.resumed = Counter()      # stage -> shards sent at once on resume
        self.given_up: list[tuple[str, int]] = []
        self.last_error: str | None = None

    def sweep(self, pending: dict[str, set[int]], done: dict[str, set[int]] | None = None,
              resume: bool = False, now: float | None = None) -> dict[str, StageHolding]:
        """One pass. With `resume`, shards with no message anywhere are sent at once (a rerun
        taking over a store), not after the suspect time."""
        now = time.time() if now is None else now
        stages = list(pending)
        broker = broker_state(self.client, self.store.uri, stages)
        out = {}
        for stage in stages:
            holding = out[stage] = StageHolding()
            shards = sorted(pending[stage])
            held = leases.read_leases(self.client, self.store.uri, stage, shards)
            for shard in shards:
                key = (stage, shard)
                deliveries = broker.delivered.get(key, [])
                if shard in held:
                    holding.in_flight.add(shard)
                elif broker.queued[key] or any(now - d.delivered_at < leases.suspect_s() or _eta_ahead(d, now)
                                               for d in deliveries):
                    holding.queued.add(shard)
                else:
                    first = self.suspects.setdefault(key, now)
                    immediate = resume and not deliveries
                    if (immediate or now - first >= leases.suspect_s()) and \
                            self._recover(stage, shard, deliveries, now, resumed=immediate):
                        holding.recovered += 1
                        holding.queued.add(shard)  # back in its queue now
                    else:
                        holding.unheld.add(shard)
                    continue
                self.suspects.pop(key, None)
            holding.progress = leases.read_progress(self.client, self.store.uri, stage, holding.in_flight)
            finished = (done or {}).get(stage, set())  # a set, or anything that answers `in`
            for (of, shard), deliveries in broker.delivered.items():
                if of == stage and shard in finished:
                    for d in deliveries:
                        if now - d.delivered_at >= leases.suspect_s():
                            remove_delivery(self.client, d.tag)
        for key in [k for k in self.suspects if k[1] not in pending.get(k[0], ())]:
            del self.suspects[key]
        self._sweep_run_once(now)
        return out

    def _sweep_run_once(self, now: float) -> None:
        """Run-once tasks (the index's train and merge; workers/tasks.py) hold no lease: their
        lock, renewed while one runs, says the same. A delivery of this run's older than the
        suspect time whose lock is free was left by a dead worker: it goes back to its queue (or
        is forgotten once its marker exists), so a worker killed mid-merge does not leave the run
        waiting for the visibility timeout."""
        run = leases.run_key(self.store.uri)
        index = dict(self.client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
        for tag, value in self.client.hgetall(UNACKED).items():
            delivered_at = index.get(tag, now)
            try:
                decoded = decode_message(json.dumps(json.loads(value)[0]))
            except (ValueError, IndexError, TypeError):
                continue
            if decoded is None or now - delivered_at < leases.suspect_s():
                continue
            name, args, _kwargs, headers = decoded
            if not name.startswith("clipfleet.") or len(args) < 2 or not isinstance(args[1], str) \
                    or str(args[0]).rstrip("/") != self.store.uri.rstrip("/"):
                continue
            tag = tag.decode() if isinstance(tag, bytes) else tag
            once = name.removeprefix("clipfleet.")
            if _eta_ahead(Delivery(tag, delivered_at, headers.get("eta")), now) or \
                    self.client.exists(f"clipfleet:once-lock:{run}:{once}"):
                continue
            if self.store.marker(once, args[1]) is not None:
                remove_delivery(self.client, tag)
                continue
            restore_delivery(self.app, tag)
            log.warning("%s %s: held by no live worker; put its unacked message back in the queue", once, args[1])

    def _recover(self, stage: str, shard: int, deliveries: list[Delivery], now: float,
                 resumed: bool) -> bool:
        # One sweeper at a time per shard (`run` and `status` may both be sweeping).
        claim = f"clipfleet:recovering:{leases.run_key(self.store.uri)}:{stage}:{shard}"
        if not self.client.set(claim, "1", nx=True, px=max(1000, int(leases.suspect_s() * 1000))):
            return False
        self.suspects.pop((stage, shard), None)
        record = self.store_record(stage, shard) or {"stage": stage, "shard": shard, "events": []}
        if not resumed and len(record["events"]) >= max_recoveries():
            self._dead_letter(stage, shard, {
                "error": f"recovered {len(record['events'])} times and never finished; "
                         "see the worker logs for why", "recovered": record["events"]})
            self.given_up.append((stage, shard))
            log.error("%s %s: recovered %d times without finishing; dead-lettered",
                      stage, shard, len(record["events"]))
            return False
        if deliveries:
            newest = max(deliveries, key=lambda d: d.delivered_at)
            restore_delivery(self.app, newest.tag)
            for d in deliveries:
                if d is not newest:
                    remove_delivery(self.client, d.tag)
            how = "put its unacked message back in the queue"
        else:
            self.app.send_task(REGISTRY[stage].task_name, args=(self.store.uri, shard),
                               kwargs=self.task_kwargs(stage, shard))
            how = "sent the task again"
        if resumed:
            self.resumed[stage] += 1
            log.info("%s %s: resuming (%s)", stage, shard, how)
            return True
        self.recovered[stage] += 1
        log.warning("%s %s: held by no live worker; %s", stage, shard, how)
        record["events"].append({"at": now, "how": how})
        try:
            self.store.write_json(recovered_path(stage, shard), record)
        except Exception as exc:  # the count is a record; the shard is already back
            log.warning("could not record the recovery of %s %s: %s", stage, shard, exc)
        return True

    def _dead_letter(self, stage: str, shard: int, record: dict) -> None:
        self.store.write_deadletter(stage, shard, record)
        created_at = self.store.read_json("run.json")["created_at"]
        RunIndex(self.client, self.store.uri, created_at).record_failed(stage, shard)

    def store_record(self, stage: str, shard: int) -> dict | None:
        try:
            return self.store.read_json(recovered_path(stage, shard))
        except FileNotFoundError:
            return None


def _eta_ahead(d: Delivery, now: float) -> bool:
    # A retry waiting for its countdown is held by the worker that took it (leased), but a
    # lease renewal can trail the delivery by a heartbeat; never sweep before its ETA.
    if not d.eta:
        return False
    from datetime import datetime
    try:
        return datetime.fromisoformat(d.eta).timestamp() + leases.suspect_s() > now
    except ValueError:
        return False


def recovered_path(stage: str, shard) -> str:
    return f"{RECOVERED}/{stage}/{shard_name(shard)}.json"


def recovered_counts(store: Store, stage: str) -> dict[str, int]:
    """Shard name -> times recovered, from the store's records."""
    out = {}
    for name in store.list(f"{RECOVERED}/{stage}"):
        if name.endswith(".json"):
            out[name[:-5]] = len(store.read_json(f"{RECOVERED}/{stage}/{name}").get("events", []))
    return out


# -- runs nobody follows: swept by the fleet ------------------------------------------------------
DETACHED_RUNS = "clipfleet:runs:detached"   # store URIs of `run --detach`ed runs not yet finished
FLEET_SWEEPER_LOCK = "clipfleet:sweeper"


def register_detached(client, store_uri: str) -> None:
    """A `--detach`ed run has no `clipfleet run` following it: the workers sweep it."""
    client.sadd(DETACHED_RUNS, store_uri)


class FleetSweeper:
    """Sweeps every detached run from a worker; one worker of the fleet at a time (a lock
    renewed while it holds it), so a run is not recovered twice over."""

    def __init__(self, app, client, holder: str, on_settled=None):
        self.app, self.client, self.holder = app, client, holder
        self.on_settled = on_settled  # (store, cfg, states): what a settled run publishes (workers/publish)
        self._runs: dict[str, Sweeper] = {}   # store URI -> its sweeper

    def sweep_once(self) -> None:
        lock_ms = int(sweep_s() * 3000)
        if not self.client.set(FLEET_SWEEPER_LOCK, self.holder, nx=True, px=lock_ms):
            if (self.client.get(FLEET_SWEEPER_LOCK) or b"").decode() != self.holder:
                return
            self.client.pexpire(FLEET_SWEEPER_LOCK, lock_ms)
        for raw in self.client.smembers(DETACHED_RUNS):
            uri = raw.decode() if isinstance(raw, bytes) else raw
            try:
                if self._sweep_run(uri):
                    self.client.srem(DETACHED_RUNS, uri)
                    self._runs.pop(uri, None)
                    log.info("detached run %s is finished; no longer swept", uri)
            except Exception:
                log.exception("sweeping detached run %s failed; trying again next time", uri)

    def _sweep_run(self, uri: str) -> bool:
        """One sweep of one run; True when it has settled (every expected shard done or dead-lettered,
        the run-once work done) and what it publishes is published."""
        store = Store(uri)
        run = RunState(store)
        run.index = RunIndex(self.client, uri, run.cfg.created_at)
        if uri not in self._runs:
            self._runs[uri] = Sweeper(self.app, self.client, store, task_kwargs=run.task_kwargs)
        sweeper = self._runs[uri]
        states = run.all()
        if all(s.complete for s in states):
            if not run.settled():  # run-once work (the index's merge, its dedup) still going
                sweeper.sweep({}, {})
                return False
            if self.on_settled is not None:
                try:
                    self.on_settled(store, run.cfg, states)
                except Exception:  # e.g. a percentile the run cannot meet: said once, not every sweep
                    log.exception("detached run %s settled, but publishing it failed; run `clipfleet refilter` "
                                  "or `clipfleet card` on it", uri)
            return True
        sweeper.sweep(pending(states), done(states))
        return False


def pending(states: list[StageState], issued: set | None = None) -> dict[str, set[int]]:
    """Shards the sweeper looks after: expected, not done, not dead; for the first stage only
    those the feeder has sent, when it says (the rest are still waiting for room in the queue)."""
    out = {}
    for i, s in enumerate(states):
        shards = {int(n) for n in s.pending}
        if i == 0 and issued is not None:
            shards = {n for n in shards if (s.stage, n) in issued}
        out[s.stage] = shards
    return out


class _Done:
    """`shard in done[stage]` without loading every done shard (a Redis SISMEMBER per question)."""

    def __init__(self, state: StageState):
        self.state = state

    def __contains__(self, shard) -> bool:
        return self.state.has_done(shard_name(shard))


def done(states: list[StageState]) -> dict[str, _Done]:
    return {s.stage: _Done(s) for s in states}
