"""The whole pipeline, WAT files to a serving index, on `clipfleet worker` processes (one per
queue), a Redis with AOF and an S3 store behind a proxy, while the test does what clusters do:

- SIGKILLs the worker of every stage while it runs a task, and starts a fresh one, and the
  index worker once more while it merges (a run-once task: no shard, no lease);
- SIGTERMs one mid-task, as a scale-down does;
- restarts Redis mid-run;
- makes the S3 server unreachable for 30 s.

The run ends by itself, exit 0; every sample the CLIP filter kept is published in dataset/ and
in the serving index exactly once, no key twice, no dead letter. The same run's markers show the
pipeline streaming: each stage starts before the stage before it has finished, the index is trained once
enough vectors are embedded (long before the last shard is tagged; the shards after it are added
as they come), and the merge runs once, at the end.
All faults share one run: each costs a fresh worker and a recovery delay, and one run of 24
shards has room for all of them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()
from clipfleet.shared.storage import Store
from tests.conftest import make_bucket
from tests.e2e.faults import CLI, REPO, PausableProxy, Workers, check_published, delivered, stage_times
from tests.recovery.conftest import RECOVERY_ENV

SHARD_SIZE = 25
TRAIN_AFTER = 100
S3_DELAY_S = 0.01   # per request chunk: a task does a dozen or more store requests, so it is caught running
S3_OUTAGE_S = 30
# (stage, signal) in the order the pipeline reaches them; a SIGTERM on a fresh download worker
# after the SIGKILL of the first one, while downloads still have most of their shards to do.
WORKER_FAULTS = [("extract", signal.SIGKILL), ("download", signal.SIGKILL), ("download", signal.SIGTERM),
                 ("clip", signal.SIGKILL), ("embed", signal.SIGKILL), ("tag", signal.SIGKILL),
                 ("index", signal.SIGKILL)]
RUN_OPTIONS = ["--shard-size", str(SHARD_SIZE), "--allow-private-addresses",
               "--filter-model", "shapes", "--multilingual-filter-model", "shapes", "--embed-model", "shapes",
               "--index-key", "IVF4,Flat", "--index-train-after", str(TRAIN_AFTER), "--index-eval-queries", "20",
               "--download-timeout", "5"]


def inject_worker_faults(workers: Workers, broker: str, run: subprocess.Popen, log, timeout: float = 400) -> list:
    """Each fault as soon as its stage's current worker runs a shard task; returns what was hit."""
    pending, hit, seen = list(WORKER_FAULTS), [], set()
    deadline = time.monotonic() + timeout
    while pending:
        assert run.poll() is None, f"the run ended before every worker fault was injected: {pending}"
        assert time.monotonic() < deadline, f"no task to hit for {pending}"
        try:
            now = delivered(broker, older_than=0.05)
        except Exception:
            time.sleep(0.2)
            continue
        for stage, sig in list(pending):
            queue = QUEUES[stage]
            tasks = [t for t in now.get(queue, []) if t[0] not in seen and t[1] == f"clipfleet.{stage}"]
            if not tasks or any(s == stage for s, _ in pending[:pending.index((stage, sig))]):
                continue
            workers.signal(queue, sig)
            seen.update(t[0] for t in now.get(queue, []))
            hit.append((stage, signal.Signals(sig).name, tasks[0][2]))
            log(f"{signal.Signals(sig).name} {queue} worker while it ran {tasks[0][1]}{tasks[0][2]}")
            pending.remove((stage, sig))
            workers.start(queue)
        time.sleep(0.05)
    return hit


def wait_for_task(broker: str, queue: str, task: str, run: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        assert run.poll() is None, f"the run ended before {task} could be hit"
        assert time.monotonic() < deadline, f"no {task} ran"
        try:
            found = [args for _, name, args in delivered(broker, older_than=0.05).get(queue, []) if name == task]
        except Exception:
            found = []
        if found:
            return found[0]
        time.sleep(0.05)


@pytest.mark.timeout(900)
def test_the_pipeline_survives_worker_kills_a_redis_restart_and_an_s3_outage(
        tmp_path, fault_world, fault_web, redis_aof, s3_server):
    store = Store(f"s3://{make_bucket(s3_server)}/run")
    proxy = PausableProxy(int(s3_server.rsplit(":", 1)[1]), delay_s=S3_DELAY_S).start()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, **RECOVERY_ENV, "CLIPFLEET_S3_ENDPOINT": proxy.url}
    workers = Workers(logs, redis_aof.url, env)
    events = []

    def log(what: str) -> None:
        events.append(f"{time.strftime('%H:%M:%S')} {what}")

    wats = sorted(str(p) for p in (fault_world / "wat").iterdir())
    run_log = logs / "run.log"
    run = None
    try:
        for queue in QUEUES.values():
            workers.start(queue)
        run = subprocess.Popen(CLI + ["run", "--wat", *wats, "--store", store.uri, "--broker", redis_aof.url,
                                      *RUN_OPTIONS],
                               cwd=REPO, env=env, stdout=open(run_log, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        hit = inject_worker_faults(workers, redis_aof.url, run, log)
        workers.wait_ready()
        assert run.poll() is None, "the run ended before Redis was restarted"
        log("redis: stop")
        redis_aof.stop()
        time.sleep(6)  # longer than a lease lives
        redis_aof.start()
        log("redis: started again")
        assert run.poll() is None, "the run ended before the S3 outage"
        log("s3: unreachable")
        proxy.pause()
        time.sleep(S3_OUTAGE_S)
        proxy.resume()
        log("s3: back")
        # the merge is a run-once task, not a shard: no lease, its lock says it runs
        merge = wait_for_task(redis_aof.url, "index-merge", "clipfleet.index-merge", run)
        workers.signal("index-merge", signal.SIGKILL)
        log(f"SIGKILL index-merge worker while it ran clipfleet.index-merge{merge}")
        workers.start("index-merge")
        try:
            code = run.wait(600)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run did not end by itself:\n" + tail(logs, events)) from None
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        workers.stop()
        proxy.stop()
    out = run_log.read_text()
    assert code == 0, tail(logs, events)
    assert [(s, sig) for s, sig, _ in hit] == [(s, signal.Signals(g).name) for s, g in WORKER_FAULTS]

    counts = check_published(store)
    assert counts["shards"] >= 20, counts
    assert "recovered" in out  # the run says it brought shards back
    print(counts, *events, sep="\n")

    # Streaming, from the markers: each stage started before the stage before it had finished.
    # (Not that all four ran at once: on a loaded machine the last download may end before the
    # first shard is tagged, a timing, not a fault.)
    spans = {s: stage_times(store, s) for s in ("download", "clip", "embed", "tag", "index")}
    for before, after in (("download", "clip"), ("clip", "embed"), ("embed", "tag")):
        assert min(a for a, _ in spans[after]) < max(b for _, b in spans[before]), (before, after)
    [train] = store.markers("index-train")
    embedded_before = sum(m["stats"]["vectors"] for m in store.markers("embed") if m["finished_at"] <= train["started_at"])
    assert embedded_before >= TRAIN_AFTER
    # the first index task after that trains (index tasks follow tagging); the shards indexed after
    # it are added to the trained index as they come rather than spooled for the merge. (Not when
    # training starts against the last tag: on a slow machine it started 0.31 s after, a timing.)
    added = [m for m in store.markers("index") if m["stats"].get("added")]
    assert added, "no shard was added to the trained index as it came"
    assert all(m["finished_at"] >= train["finished_at"] for m in added)  # it read the trained index
    [merge] = store.markers("index-merge")  # one merge, after the last shard was indexed
    assert merge["started_at"] >= max(b for _, b in spans["index"])


def tail(logs, events) -> str:
    return "\n".join(events) + "\n" + "\n".join(
        f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.log")))
