"""Task time limits, read from the environment without importing Celery, so the fleet launcher
checks them before it spawns a worker (importing the Celery app there cost ~0.3 s of start-up)."""
from __future__ import annotations

import os


def time_limits() -> tuple[int, int, int]:
    """(soft, hard, visibility) seconds; a misordered triple is refused."""
    soft = int(os.environ.get("CLIPFLEET_SOFT_TIME_LIMIT", 3000))
    hard = int(os.environ.get("CLIPFLEET_HARD_TIME_LIMIT", 3300))
    visibility = int(os.environ.get("CLIPFLEET_VISIBILITY_TIMEOUT", 3600))
    if not soft < hard < visibility:
        raise ValueError(
            f"time limits must satisfy soft < hard < visibility timeout, got {soft} / {hard} / {visibility}")
    return soft, hard, visibility
