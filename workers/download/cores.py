"""A home core for a download process's threads, held while the other cores have work of their own.

The fleet runs one download process per core (Celery prefork), each with ~70 threads
(fetching, resizing, writing). Left to the scheduler, a process's threads spread over every
core, and its GIL, queues and memory maps bounce between the cores' caches: two processes on
two cores used 3-6% more CPU for the same 3000 images than with each process on a core of
its own (bench.download, 2026-12-07). A pinned process cannot use a core the others leave
idle, though (the last shard of a run, a run of one shard), so the pin is held only while
the other cores were kept busy by others over the last CHECK_S seconds, and let go as soon
as they were not.
"""
from __future__ import annotations

import os
import time

CHECK_S = 0.25
BUSY = 0.75  # share of the other cores' time others used, for the pin to hold


def busy_seconds(cpus: list[int]) -> float:
    """CPU seconds the cores `cpus` have been busy since boot (/proc/stat: user, nice, system,
    irq, softirq; not idle, iowait or steal)."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and not line.startswith("cpu ") and int(line.split()[0][3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in line.split()[1:8])
                busy += user + nice + system + irq + softirq
    return busy / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = os.times()
    return times.user + times.system


def set_affinity(cpus: set[int]) -> None:
    """Every thread of this process on `cpus` (threads started later inherit their starter's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread has ended meanwhile
            pass


class HomeCore:
    """Pins this process to core number `index` (of those it may use) while the others are busy."""

    def __init__(self, index: int, busy=busy_seconds, own=own_seconds, clock=time.monotonic,
                 apply=set_affinity):
        self.allowed = sorted(os.sched_getaffinity(0))
        self.home = self.allowed[index % len(self.allowed)]
        self.pinned = False
        self._busy, self._own, self._clock, self._apply = busy, own, clock, apply
        self._last: tuple[float, float, float] | None = None  # (when, cores' busy s, own s)

    def check(self) -> None:
        """Called often (it is cheap between checks): pin or let go, as the last CHECK_S says."""
        now = self._clock()
        if self._last is not None and now - self._last[0] < CHECK_S:
            return
        sample = (now, self._busy(self.allowed), self._own())
        if self._last is not None:
            elapsed = sample[0] - self._last[0]
            others = (sample[1] - self._last[1]) - (sample[2] - self._last[2])
            pin = others >= BUSY * (len(self.allowed) - 1) * elapsed
            if pin != self.pinned:
                self._apply({self.home} if pin else set(self.allowed))
                self.pinned = pin
        self._last = sample


_process: tuple[int, HomeCore | None] | None = None


def this_process() -> HomeCore | None:
    """This pool process's HomeCore: None outside a Celery prefork child, with one core, or
    where the platform has no affinity."""
    global _process
    if _process is None or _process[0] != os.getpid():  # a forked child gets its own
        home = None
        if hasattr(os, "sched_getaffinity") and os.path.isdir("/proc/self/task"):
            from billiard.process import current_process
            index = getattr(current_process(), "index", None)
            if index is not None and len(os.sched_getaffinity(0)) > 1:
                home = HomeCore(index)
        _process = (os.getpid(), home)
    return _process[1]
