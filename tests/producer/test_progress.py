"""`clipfleet run`'s progress in a log: drawn when counts change, not on every poll."""
from __future__ import annotations

import re
import threading
import time

from clipfleet.producer import bars
from clipfleet.producer.follow import follow
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import Store


def test_progress_in_a_log_is_drawn_on_changes_not_every_poll(tmp_path, capsys, monkeypatch):
    store = Store(str(tmp_path / "store"))
    run = RunState(store, RunConfig.make(store.uri, input_kind="urls", until="download"),
                   first={f"{shard:05d}" for shard in range(4)})
    monkeypatch.setattr(bars, "LOG_PROGRESS_S", 0.5)

    def finish_shards():
        for shard in range(4):
            time.sleep(0.3)
            store.commit("download", shard, {}, {"stats": {}, "next_shards": []})
    worker = threading.Thread(target=finish_shards)
    worker.start()
    state = follow(run, poll_s=0.02)  # ~60 polls
    worker.join()
    assert state[0].done == {f"{s:05d}" for s in range(4)}
    draws = re.findall(r"download: +\d+%.*?(\d)/4", capsys.readouterr().err)
    # The first counts, at most one change per 0.5 s, the last: never one line per poll.
    assert 2 <= len(draws) <= 6 and draws[0] == "0" and draws[-1] == "4", draws


def test_bars_count_samples_with_the_samples_of_shards_still_running(tmp_path, capsys, monkeypatch, redis_url):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import redis

    from clipfleet.shared.recovery import Sweeper
    from clipfleet.shared import leases
    from clipfleet.workers.app import make_app

    monkeypatch.setattr(bars, "LOG_PROGRESS_S", 0.0)
    monkeypatch.setenv("CLIPFLEET_SWEEP_S", "0.05")
    store = Store(str(tmp_path / "store"))
    for shard in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"url": [f"http://x.test/{i}" for i in range(10)]}), buf)
        store.write_bytes(f"urls/{shard:05d}.parquet", buf.getvalue())
    run = RunState(store, RunConfig.make(store.uri, input_kind="urls", until="download"))
    client = redis.Redis.from_url(redis_url)
    # Shard 0 runs on a worker and has handled 6 of its 10 samples (what Stats.advance reports).
    leases.Heartbeat(lambda: client, lambda: {(store.uri, "download", 0): "running"}, worker="w").beat()
    client.set(leases.progress_key(store.uri, "download", 0), 6)
    sweeper = Sweeper(make_app(redis_url), client, store)

    def finish_shards():
        time.sleep(0.6)
        for shard in range(2):
            store.commit("download", shard, {}, {"stats": {"count": 10, "success": 7}, "samples_in": 10,
                                                 "samples_out": 7, "next_shards": [shard]})
            time.sleep(0.3)
    worker = threading.Thread(target=finish_shards)
    worker.start()
    state = follow(run, poll_s=0.02, sweeper=sweeper, issued={("download", 0), ("download", 1)})
    worker.join()
    assert (state[0].samples_expected, state[0].samples_done, state[0].samples_out) == (20, 20, 14)
    err = capsys.readouterr().err
    assert re.search(r"download: +30%.*? 6/20 .*sample/s.*shards=0/2, in flight=1", err), err
    assert re.search(r"download: +100%.*? 20/20 .*shards=2/2", err), err
