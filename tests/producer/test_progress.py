"""`clipfleet run`'s progress in a log: drawn when counts change, not on every poll."""
from __future__ import annotations

import re
import threading
import time

from clipfleet.producer import run as runlib
from clipfleet.shared.storage import Store


def test_progress_in_a_log_is_drawn_on_changes_not_every_poll(tmp_path, capsys, monkeypatch):
    store = Store(str(tmp_path / "store"))
    first = [runlib.FirstTask("download", shard, {}) for shard in range(4)]
    monkeypatch.setattr(runlib, "LOG_PROGRESS_S", 0.5, raising=False)

    def finish_shards():
        for shard in range(4):
            time.sleep(0.3)
            store.commit("download", shard, {}, {"stats": {}, "next_shards": []})
    worker = threading.Thread(target=finish_shards)
    worker.start()
    state = runlib.follow(store, ["download"], first, poll_s=0.02)  # ~60 polls
    worker.join()
    assert state[0].done == {f"{s:05d}" for s in range(4)}
    draws = re.findall(r"download: +\d+%.*?(\d)/4", capsys.readouterr().err)
    # The first counts, at most one change per 0.5 s, the last: never one line per poll.
    assert 2 <= len(draws) <= 6 and draws[0] == "0" and draws[-1] == "4", draws
