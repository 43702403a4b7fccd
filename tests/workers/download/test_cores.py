"""A download process's home core: held while the other cores are busy with others' work, let go when not."""
from __future__ import annotations

import os
import threading

import pytest

from clipfleet.workers.download import cores
from clipfleet.workers.download.cores import CHECK_S, HomeCore, busy_seconds, own_seconds, set_affinity


class Machine:
    """Four cores' busy seconds and this process's own, advanced by the test."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0
        self.applied: list[set[int]] = []

    def run(self, seconds: float, ours: float, others: float) -> None:
        """`seconds` pass; this process uses `ours` CPU seconds and everything else `others`."""
        self.now += seconds
        self.own += ours
        self.busy += ours + others

    def home(self, index: int) -> HomeCore:
        return HomeCore(index, busy=lambda cpus: self.busy, own=lambda: self.own, clock=lambda: self.now,
                        apply=self.applied.append)


@pytest.fixture
def machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7})
    return Machine()


def test_pins_while_the_other_cores_are_busy_and_lets_go_when_they_are_idle(machine):
    home = machine.home(5)
    assert home.home == 5  # the sixth of four allowed cores, round the list: 4 5 6 7 -> 5
    home.check()  # the first sample
    machine.run(CHECK_S / 2, ours=CHECK_S / 2, others=3 * CHECK_S / 2)
    home.check()  # too soon to judge
    assert machine.applied == [] and not home.pinned
    machine.run(CHECK_S, ours=CHECK_S, others=3 * CHECK_S)  # the three other cores fully used by others
    home.check()
    assert machine.applied == [{5}] and home.pinned
    machine.run(CHECK_S, ours=CHECK_S, others=2.5 * CHECK_S)  # still busy enough: nothing to change
    home.check()
    assert machine.applied == [{5}]
    machine.run(CHECK_S, ours=CHECK_S, others=0.5 * CHECK_S)  # the others ran out of work: spread out
    home.check()
    assert machine.applied == [{5}, {4, 5, 6, 7}] and not home.pinned


def test_a_process_alone_on_the_machine_is_never_pinned(machine):
    home = machine.home(0)
    for _ in range(10):  # our threads keep every core busy: that is not others' work
        home.check()
        machine.run(CHECK_S, ours=4 * CHECK_S, others=0.1 * CHECK_S)
    assert machine.applied == [] and not home.pinned


def test_affinity_is_set_for_every_thread_of_the_process():
    allowed = os.sched_getaffinity(0)
    one = {min(allowed)}
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), stop.wait()))
    thread.start()
    started.wait()
    try:
        set_affinity(one)
        assert os.sched_getaffinity(thread.native_id) == one
        assert os.sched_getaffinity(threading.get_native_id()) == one
        late = {}
        later = threading.Thread(target=lambda: late.update(cpus=os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert late["cpus"] == one  # threads started afterwards inherit it
    finally:
        set_affinity(allowed)
        stop.set()
        thread.join()
    assert os.sched_getaffinity(0) == allowed  # given back


def test_the_readings_are_this_machine_s():
    cpus = sorted(os.sched_getaffinity(0))
    before_busy, before_own = busy_seconds(cpus), own_seconds()
    x = 0
    for i in range(3_000_000):  # about a quarter of a second of CPU
        x += i
    assert own_seconds() - before_own > 0.05
    assert busy_seconds(cpus) - before_busy >= (own_seconds() - before_own) * 0.5  # our work shows on the cores


def test_outside_a_pool_process_there_is_no_home_core():
    assert cores.this_process() is None  # the test process is no Celery prefork child
