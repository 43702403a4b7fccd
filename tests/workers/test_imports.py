"""A worker imports only the stages of the queues it serves: a real cpu-download worker, asked
through a selfcheck hop what its pool process has loaded, has download and no torch."""
from __future__ import annotations

from clipfleet.producer.fleet import Fleet, state_dir
from clipfleet.shared.storage import Store
from clipfleet.workers.app import make_app
from tests.helpers import wait_until


def test_a_download_worker_loads_its_stage_and_no_torch(tmp_path, isolated_state):
    store_uri = str(tmp_path / "store")
    fleet = Fleet()
    try:
        fleet.start_redis(state_dir(store_uri))
        worker = fleet.start_worker(["cpu-download"], concurrency=1)
        fleet.wait_for_workers(1)
        make_app(fleet.broker).send_task("clipfleet.selfcheck.cpu-download", args=(store_uri, 3))
        marker = wait_until(lambda: Store(store_uri).marker("selfcheck-cpu-download", 3), 120, "the hop")
    finally:
        fleet.stop(grace=5)
    assert marker["pid"] != worker.pid  # the pool process that runs tasks, not the worker's parent
    modules = marker["modules"]
    assert "clipfleet.workers.download.stage" in modules
    assert "torch" not in modules and "open_clip" not in modules
    other_stages = [m for m in modules if m.endswith((".task", ".stage")) and not m.startswith("clipfleet.workers.download.")]
    assert other_stages == []
