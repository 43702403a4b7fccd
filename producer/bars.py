"""`clipfleet run`'s progress bars: one per stage, in samples once the sizes of its shards are
known (in shards until then), with shards done, in flight, queued, failed and recovered beside it.

On a terminal the bars redraw when a count changes; in a log (not a TTY) a bar is printed when
it changes but at most every LOG_PROGRESS_S, so a long run does not write a line a second."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from clipfleet.shared.runstate import StageState

LOG_PROGRESS_S = 30.0


@dataclass
class Held:
    """What the fleet holds of a stage's pending shards right now (from the sweeper)."""
    in_flight: set[int] = field(default_factory=set)
    queued: set[int] = field(default_factory=set)
    running_samples: int = 0     # samples handled inside shards still running
    recovered: int = 0


class Bars:
    def __init__(self, stages: list[str], show: bool = True):
        from tqdm import tqdm
        # smoothing=0: the rate is (n - initial) / elapsed, samples this command saw done per second.
        self.bars = {s: tqdm(desc=f"{s:>8}", unit="shard", position=i, leave=True, disable=not show,
                             dynamic_ncols=True, smoothing=0)
                     for i, s in enumerate(stages)}
        self.units: dict[str, str] = {}
        self.every = 0.0 if sys.stderr.isatty() else LOG_PROGRESS_S
        self.shown: dict[str, tuple[tuple, float]] = {}  # stage -> (counts drawn, when)

    def draw(self, state: StageState, held: Held) -> None:
        bar = self.bars[state.stage]
        if state.samples_expected is not None:
            total, n, unit = state.samples_expected, state.samples_done, "sample"
            n = min(n + held.running_samples, total)
        else:
            total, n, unit = state.n_expected, state.n_done, "shard"
        if self.units.get(state.stage) != unit:
            bar.reset(total=total)  # what was done before this command is no part of its rate
            bar.unit, bar.initial, bar.n = unit, n, n
            self.units[state.stage] = unit
        bar.total, bar.n = total, n
        postfix = {"shards": f"{state.n_done}/{state.n_expected}", "in flight": len(held.in_flight),
                   "queued": len(held.queued), "failed": state.n_failed}
        if held.recovered:
            postfix["recovered"] = held.recovered
        counts = (total, n, tuple(postfix.values()))
        drawn, when = self.shown.get(state.stage, (None, float("-inf")))
        if counts != drawn and (time.monotonic() - when >= self.every or state.complete):
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            self.shown[state.stage] = (counts, time.monotonic())

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
