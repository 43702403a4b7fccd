"""The Celery app's contract: six declared queues, routes by name, reliability settings."""
from __future__ import annotations

import pytest

from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()
from clipfleet.workers import app as app_module
from clipfleet.workers.app import make_app, route, time_limits


def test_six_queues_declared_and_no_others_created():
    app = make_app("redis://127.0.0.1:1/0")
    assert [q.name for q in app.conf.task_queues] == [
        "cpu-extract", "cpu-download", "gpu-clip", "gpu-embed", "tagging", "index-merge"]
    assert app.conf.task_create_missing_queues is False


def test_time_limits_are_ordered_below_visibility_timeout():
    app = make_app("redis://127.0.0.1:1/0")
    soft, hard = app.conf.task_soft_time_limit, app.conf.task_time_limit
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert 0 < soft < hard < visibility


@pytest.mark.parametrize("soft,hard,vis", [(10, 10, 20), (30, 20, 40), (10, 20, 15)])
def test_misordered_time_limits_are_refused(monkeypatch, soft, hard, vis):
    monkeypatch.setenv("CLIPFLEET_SOFT_TIME_LIMIT", str(soft))
    monkeypatch.setenv("CLIPFLEET_HARD_TIME_LIMIT", str(hard))
    monkeypatch.setenv("CLIPFLEET_VISIBILITY_TIMEOUT", str(vis))
    with pytest.raises(ValueError, match="soft < hard < visibility"):
        time_limits()


def test_reliability_settings():
    conf = make_app("redis://127.0.0.1:1/0").conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_send_task_events and conf.worker_soft_shutdown_timeout > 0


def test_routes_by_task_name():
    for stage, queue in QUEUES.items():
        assert route(f"clipfleet.{stage}", (), {}, {}) == {"queue": queue}
        assert route(f"clipfleet.selfcheck.{queue}", (), {}, {}) == {"queue": queue}
    assert route("somebody.else", (), {}, {}) is None


def test_shard_task_retries_only_transient_errors():
    from clipfleet.shared.pipeline import TransientError
    import kombu.exceptions
    import redis.exceptions
    # Transient: our own marker, and a lost connection to Redis wherever a task meets one.
    assert {TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            kombu.exceptions.OperationalError} <= set(app_module.ShardTask.autoretry_for)
    assert not any(issubclass(ValueError, e) for e in app_module.ShardTask.autoretry_for)
    assert 0 < app_module.ShardTask.max_retries <= 10
    assert app_module.ShardTask.retry_backoff


def test_permanent_failure_is_dead_lettered_without_retry(tmp_path):
    from clipfleet.shared.storage import Store
    calls = []

    @app_module.app.task(name="clipfleet.test-permanent", base=app_module.ShardTask, bind=True)
    def permanent(self, store_uri, shard):
        calls.append(shard)
        raise ValueError("corrupt input")

    permanent.apply(args=(str(tmp_path), 4))
    [dead] = Store(str(tmp_path)).deadletters("test-permanent")
    assert calls == [4]
    assert dead["shard"] == 4 and dead["error"] == "ValueError: corrupt input" and dead["retries"] == 0


def test_transient_failure_is_retried_a_bounded_number_of_times(tmp_path):
    from clipfleet.shared.pipeline import TransientError
    from clipfleet.shared.storage import Store
    calls = []

    @app_module.app.task(name="clipfleet.test-transient", base=app_module.ShardTask, bind=True)
    def transient(self, store_uri, shard):
        calls.append(shard)
        raise TransientError("storage timed out")

    transient.apply(args=(str(tmp_path), 5))
    [dead] = Store(str(tmp_path)).deadletters("test-transient")
    assert len(calls) == app_module.ShardTask.max_retries + 1
    assert dead["retries"] == app_module.ShardTask.max_retries
