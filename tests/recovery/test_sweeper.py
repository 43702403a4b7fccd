"""The sweeper against a real Redis: an unacked message of a dead worker goes back to its queue,
a shard with no message anywhere is sent again, a live lease or a queued message is left alone,
and a shard that never finishes is dead-lettered after the recovery budget."""
from __future__ import annotations

import redis

from clipfleet.shared.recovery import Sweeper, broker_state
from clipfleet.shared import leases
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.app import make_app


def setup(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("CLIPFLEET_SUSPECT_S", "0")
    store = Store(str(tmp_path / "store"))
    RunConfig.make(store=store.uri, input_kind="urls", until="download").save(store)
    app, client = make_app(redis_url), redis.Redis.from_url(redis_url)
    return store, app, client, Sweeper(app, client, store)


def take_without_ack(app, queue: str):
    """What a worker that then dies does: the message moves to kombu's unacked hash."""
    conn = app.connection_for_read()
    channel = conn.channel()
    message = channel.basic_get(queue=queue, no_ack=False)
    assert message is not None
    return conn  # left open and never acked: the "worker" is gone


def test_a_dead_workers_unacked_message_goes_back_to_its_queue(tmp_path, redis_url, monkeypatch):
    store, app, client, sweeper = setup(tmp_path, redis_url, monkeypatch)
    app.send_task("clipfleet.download", args=(store.uri, 7))
    held = take_without_ack(app, "cpu-download")
    state = broker_state(client, store.uri, ["download"])
    assert not state.queued and list(state.delivered) == [("download", 7)]
    client.zadd("unacked_index", {state.delivered["download", 7][0].tag: 1.0})  # delivered long ago

    holding = sweeper.sweep({"download": {7}}, now=10.0)["download"]
    assert holding.recovered == 1 and holding.queued == {7}
    after = broker_state(client, store.uri, ["download"])
    assert after.queued == {("download", 7): 1} and not after.delivered  # the same message, once
    assert store.read_json("_recovered/download/00007.json")["events"][0]["how"].startswith("put its unacked")
    held.release()


def test_leased_and_queued_shards_are_left_alone(tmp_path, redis_url, monkeypatch):
    store, app, client, sweeper = setup(tmp_path, redis_url, monkeypatch)
    leases.Heartbeat(lambda: client, lambda: {(store.uri, "download", 1): "running"}, worker="w").beat()
    app.send_task("clipfleet.download", args=(store.uri, 2))
    for _ in range(3):
        out = sweeper.sweep({"download": {1, 2}})["download"]
        assert (out.in_flight, out.queued, out.recovered) == ({1}, {2}, 0)
    assert broker_state(client, store.uri, ["download"]).queued == {("download", 2): 1}


def test_a_shard_that_never_finishes_is_dead_lettered_after_the_budget(tmp_path, redis_url, monkeypatch):
    store, app, client, sweeper = setup(tmp_path, redis_url, monkeypatch)
    monkeypatch.setenv("CLIPFLEET_MAX_RECOVERIES", "2")
    for attempt in range(2):
        assert sweeper.sweep({"download": {3}})["download"].recovered == 1
        client.delete("cpu-download", f"clipfleet:recovering:{leases.run_key(store.uri)}:download:3")  # lost again
    assert sweeper.sweep({"download": {3}})["download"].recovered == 0
    [dead] = store.deadletters("download")
    assert dead["shard"] == 3 and "recovered 2 times and never finished" in dead["error"]
    assert sweeper.given_up == [("download", 3)]
