"""`clipfleet demo`: the whole pipeline on this machine, offline, in a few minutes.

Builds (or reuses) a sandbox world, serves it on 127.0.0.1, runs every stage on its WAT files
through an embedded fleet with the shipped `shapes` model, writes the run's report, prints a
sample query's top results, and with `--serve` serves search until Ctrl-C. Running it again
resumes the same run, so it never redoes finished work.
"""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from clipfleet.producer.register import RunError
from clipfleet.sandbox.server import SandboxServer, read_settings
from clipfleet.sandbox.web import DEFAULT_PORT, make_sandbox

SAMPLE_QUERY = "a red circle"
DEMO_MODEL = "shapes"
DEMO_SHARD_SIZE = 250


class DemoError(RunError):
    """The demo cannot run as asked (a busy port its store depends on)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as the sandbox server binds: connections the last demo closed (TIME_WAIT) do not hold
        # the port, only a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def prepare_world(world: Path, samples: int, store_has_run: bool) -> dict:
    """Reuse the world a store's run points at; else build one on a port that is free now.

    The world's URLs carry its port, and a store's URL shards carry those URLs: a run that exists
    is never pointed at a rebuilt world. A busy port is an error then, not a new world."""
    try:
        settings = read_settings(world)
    except FileNotFoundError:
        settings = None
    if settings is not None and (store_has_run or settings["samples"] == samples):
        if not _port_free(settings["port"]):
            raise DemoError(f"port {settings['port']} is taken, and the sandbox world in {world} (which "
                            f"this demo's store was built from) serves its images there; stop what uses "
                            f"the port, or run the demo with another --store")
        if settings["samples"] != samples:
            print(f"reusing the {settings['samples']}-image world of this store's run "
                  f"(--samples {samples} applies to a new --store)", flush=True)
        return settings
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    if port != DEFAULT_PORT:
        print(f"port {DEFAULT_PORT} is taken; the sandbox web will use {port}", flush=True)
    print(f"building a sandbox world of {samples} images in {world} ...", flush=True)
    return make_sandbox(world, samples=samples, port=port)


def _free_port() -> int:
    from clipfleet.producer.fleet import free_port
    return free_port()


def show_sample_query(store: str) -> None:
    import pyarrow.parquet as pq

    from clipfleet.search.subset import run_subset
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "subset.parquet")
        # the library, not the `subset` command: its lines name a file this function deletes
        if not run_subset(store, SAMPLE_QUERY, 5, out)["rows"]:
            print(f"\nno results for {SAMPLE_QUERY!r}")
            return
        rows = pq.read_table(out).to_pylist()
    print(f"\ntop results for {SAMPLE_QUERY!r}:")
    for row in rows:
        print(f"  {row.get('similarity', 0):.3f}  {row.get('caption')!s:<40.40}  {row.get('url')}")


def run_demo(store: str, samples: int, serve: bool, port: int = 1234) -> int:
    from clipfleet.producer.cli import build_parser, main as cli_main
    from clipfleet.shared.storage import Store

    store_uri = str(Path(store).resolve()) if "://" not in store else store
    world = Path(f"{store_uri.rstrip('/')}-sandbox")
    settings = prepare_world(world, samples, Store(store_uri).exists("run.json"))
    wats = [str(world / "wat" / name) for name in settings["wat_files"]]
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    with SandboxServer(world) as server:
        print(f"sandbox web: {server.url}", flush=True)
        # The sandbox is our own server on loopback: the address guard exists for other people's
        # servers, so the demo opens loopback; every politeness rule still applies.
        # Shards of DEMO_SHARD_SIZE, not the default 10 000, so the stages stream: a few thousand
        # samples make a dozen shards flowing through every stage at once.
        code = cli_main(["run", "--wat", *wats, "--store", store_uri, "--allow-private-addresses",
                         "--shard-size", str(DEMO_SHARD_SIZE),
                         "--filter-model", DEMO_MODEL, "--multilingual-filter-model", DEMO_MODEL,
                         "--embed-model", DEMO_MODEL, "--index-text",  # text index: modality=text search
                         # shapes learnt from whole images: border padding pulls its similarities down
                         "--resize-mode", "keep_ratio"])
        if code != 0:
            return code
        if "report" in commands:
            report = str(Path(store_uri) / "report.html") if "://" not in store_uri else "report.html"
            if cli_main(["report", "--store", store_uri, "--out", report]) == 0:
                print(f"report: {report}")
        if "subset" in commands:
            show_sample_query(store_uri)
        print(f"\nstore: {store_uri}\nsandbox: {world}")
        if not serve:
            print(f"search it with: clipfleet serve --store {store_uri}  (or rerun with --serve)")
        if serve and "serve" in commands:
            print("serving search until Ctrl-C (the sandbox web stays up for the images)", flush=True)
            try:
                return cli_main(["serve", "--store", store_uri, "--port", str(port)])
            except KeyboardInterrupt:
                return 0
    return code
