"""Small helpers the test packages share."""
from __future__ import annotations

import time


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    """Poll `check` until it returns something truthy; the timeout bounds a hang, it is no speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def run_direct(stage, store, shard: int, out, **inputs):
    """stage.run as the framework calls it, without the commit: (StageOutput, counts dict)."""
    from clipfleet.shared.pipeline import Stats
    stats = Stats()
    output = stage.run(store, shard, out, stats, **inputs)
    return output, stats.as_dict()
