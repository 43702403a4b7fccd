"""The run state's fast path: per stage, the expected / done / failed shard sets and summed counts
in Redis, updated by one script in the step that commits a marker. `run`'s tick, `status --broker`
and the run-once due checks read O(stages) calls from it, whatever the size of the run.

The markers stay the truth. A shard is recorded once (its SADD to the done set decides; a
redelivered task records nothing twice), and a task that finds its shard already marked records
it again, so a worker killed between its marker and its record leaves nothing out. When the
state is missing (a Redis flush, a restart without AOF) it is rebuilt from the markers by the
first reader that notices (`RunState` does), and `clipfleet status --rebuild` rebuilds it on
demand; the rebuild equals the markers (tests/shared/test_runindex.py).

Every key of a run shares one hash tag, so the scripts run on Redis Cluster too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from clipfleet.shared.leases import run_key

log = logging.getLogger("clipfleet.runindex")

# KEYS: done:S failed:S counts:S expected:NEXT counts:NEXT
# ARGV: shard, n_next, next..., n_fields, (field, value)..., samples handed on ('' when unknown),
#       started_at, finished_at ('' when unknown)
_RECORD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
local n_next = tonumber(ARGV[2])
for i = 1, n_next do redis.call('SADD', KEYS[4], ARGV[2 + i]) end
local at = 3 + n_next
local n_fields = tonumber(ARGV[at])
for i = 1, n_fields do
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[at + 2 * i - 1], ARGV[at + 2 * i])
end
local handed = ARGV[at + 2 * n_fields + 1]
if handed ~= nil and handed ~= '' then redis.call('HINCRBY', KEYS[5], 'samples_expected', handed) end
local started, finished = ARGV[at + 2 * n_fields + 2], ARGV[at + 2 * n_fields + 3]
if started ~= '' then
  local first = redis.call('HGET', KEYS[3], 'started_min')
  if not first or tonumber(started) < tonumber(first) then redis.call('HSET', KEYS[3], 'started_min', started) end
end
if finished ~= '' then
  local last = redis.call('HGET', KEYS[3], 'finished_max')
  if not last or tonumber(finished) > tonumber(last) then redis.call('HSET', KEYS[3], 'finished_max', finished) end
end
return 1
"""
# KEYS: done:S failed:S; ARGV: shard
_FAILED = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
return redis.call('SADD', KEYS[2], ARGV[1])
"""


@dataclass
class StageCounts:
    expected: int
    done: int
    failed: int
    fields: dict = field(default_factory=dict)   # samples_in, samples_out, samples_expected, stat:...


def marker_fields(marker: dict) -> dict[str, float]:
    """The summed fields of one marker: its typed counts, its duration, every numeric stat (groups as
    group/reason), and a "drop:" field per dropped-stat name (present when any shard dropped so)."""
    out = {"duration_s": marker.get("duration_s") or 0}
    for name in ("samples_in", "samples_out"):
        if _number(marker.get(name)):
            out[name] = marker[name]
    out.update({f"drop:{name}": 1 for name in marker.get("dropped") or ()})
    for key, value in (marker.get("stats") or {}).items():
        if isinstance(value, dict):
            out.update({f"stat:{key}/{k}": v for k, v in value.items() if _number(v)})
        elif _number(value):
            out[f"stat:{key}"] = value
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunIndex:
    def __init__(self, client, store_uri: str, created_at: float):
        self.client = client
        self.prefix = f"clipfleet:state:{{{run_key(store_uri)}:{created_at!r}}}"
        self._record = client.register_script(_RECORD)
        self._failed = client.register_script(_FAILED)

    def key(self, kind: str, stage: str = "") -> str:
        return f"{self.prefix}:{kind}:{stage}"

    # -- writing ---------------------------------------------------------------------------------
    def record(self, stage: str, next_stage: str | None, marker: dict) -> bool:
        """Record a committed marker; False when it was recorded already."""
        name = _name(marker["shard"])
        nxt = [_name(s) for s in marker.get("next_shards", [marker["shard"]])] if next_stage else []
        fields = marker_fields(marker)
        # every sample a stage keeps goes to its next shards (extract's pairs fill the URL shards)
        handed = marker.get("samples_out") if nxt and marker.get("samples_out") is not None else ""
        args = [name, len(nxt), *nxt, len(fields)]
        for k, v in fields.items():
            args += [k, v]
        args += [handed, marker.get("started_at") or "", marker.get("finished_at") or ""]
        other = next_stage or stage
        return bool(self._record(keys=[self.key("done", stage), self.key("failed", stage), self.key("counts", stage),
                                       self.key("expected", other), self.key("counts", other)], args=args))

    def record_failed(self, stage: str, shard) -> None:
        self._failed(keys=[self.key("done", stage), self.key("failed", stage)], args=[_name(shard)])

    def forget_failed(self, stage: str, shards) -> None:
        if shards:
            self.client.srem(self.key("failed", stage), *[_name(s) for s in shards])

    def set_first(self, stage: str, shards, samples: int | None = None) -> None:
        """The first stage's shards (and samples, when known), as the producer registers them."""
        pipe = self.client.pipeline(transaction=True)
        if shards:
            pipe.sadd(self.key("expected", stage), *[_name(s) for s in shards])
        if samples is not None:
            pipe.hset(self.key("counts", stage), "samples_expected", samples)
        pipe.execute()

    # -- reading ---------------------------------------------------------------------------------
    def built(self) -> bool:
        return bool(self.client.exists(self.key("built")))

    def counts(self, stages: list[str]) -> dict[str, StageCounts]:
        pipe = self.client.pipeline(transaction=False)
        for stage in stages:
            pipe.scard(self.key("expected", stage)).scard(self.key("done", stage))
            pipe.scard(self.key("failed", stage)).hgetall(self.key("counts", stage))
        replies = pipe.execute()
        out = {}
        for i, stage in enumerate(stages):
            expected, done, failed, raw = replies[4 * i: 4 * i + 4]
            out[stage] = StageCounts(expected, done, failed, {_text(k): _value(v) for k, v in raw.items()})
        return out

    def members(self, kind: str, stage: str) -> set[str]:
        return {_text(m) for m in self.client.smembers(self.key(kind, stage))}

    def pending(self, stage: str) -> set[str]:
        """Expected, neither done nor failed: what is in flight or queued (SDIFF returns only those)."""
        return {_text(m) for m in self.client.sdiff(self.key("expected", stage), self.key("done", stage),
                                                    self.key("failed", stage))}

    def is_member(self, kind: str, stage: str, shard) -> bool:
        return bool(self.client.sismember(self.key(kind, stage), _name(shard)))

    # -- rebuilding ------------------------------------------------------------------------------
    def rebuild(self, stages: list[str], first: set[str], markers, failed, first_samples: int | None = None,
                force: bool = True) -> bool:
        """Replace the state with what the markers say. `markers(stage)` yields (name, marker) of
        a stage's done shards, `failed(stage)` its dead-lettered shard names. Without `force`,
        nothing is done when another reader rebuilt it meanwhile. True when it rebuilt."""
        lock = self.client.lock(self.key("rebuilding"), timeout=600, blocking_timeout=600)
        with lock:
            if not force and self.built():
                return False
            temp = RunIndex(self.client, "", 0.0)
            temp.prefix = self.prefix + ":rebuild"
            temp.clear(stages)
            temp.set_first(stages[0], first, first_samples)
            for i, stage in enumerate(stages):
                nxt = stages[i + 1] if i + 1 < len(stages) else None
                for _, marker in markers(stage):
                    temp.record(stage, nxt, marker)
                for name in failed(stage):
                    temp.record_failed(stage, name)
            pipe = self.client.pipeline(transaction=True)
            for stage in stages:
                for kind in ("expected", "done", "failed", "counts"):
                    if self.client.exists(temp.key(kind, stage)):
                        pipe.rename(temp.key(kind, stage), self.key(kind, stage))
                    else:
                        pipe.delete(self.key(kind, stage))
            pipe.set(self.key("built"), "markers")
            pipe.execute()
        log.info("run state rebuilt from the markers of %s", ", ".join(stages))
        return True

    def clear(self, stages: list[str]) -> None:
        keys = [self.key(kind, stage) for stage in stages for kind in ("expected", "done", "failed", "counts")]
        self.client.delete(self.key("built"), *keys)


def _name(shard) -> str:
    return f"{shard:05d}" if isinstance(shard, int) else str(shard)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _value(raw) -> float | int:
    number = float(_text(raw))
    return int(number) if number.is_integer() else number
