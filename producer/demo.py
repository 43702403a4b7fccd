"""`clipfleet demo`: the whole pipeline on this machine, offline.

Builds (or reuses) a sandbox world, serves it on 127.0.0.1, runs every built stage on its WAT
files through an embedded fleet, and prints what the run produced. Running it again resumes
the same run, so it never redoes finished work.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from clipfleet.sandbox.server import SandboxServer, read_settings
from clipfleet.sandbox.web import DEFAULT_PORT, make_sandbox


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def prepare_world(world: Path, samples: int) -> dict:
    """Reuse a world with the same sample count; else build one on a port that is free now."""
    try:
        settings = read_settings(world)
        if settings["samples"] == samples and _port_free(settings["port"]):
            return settings
    except FileNotFoundError:
        pass
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    print(f"building a sandbox world of {samples} images in {world} ...", flush=True)
    return make_sandbox(world, samples=samples, port=port)


def _free_port() -> int:
    from clipfleet.producer.fleet import free_port
    return free_port()


def run_demo(store: str, samples: int, keep_serving: bool) -> int:
    from clipfleet.producer.cli import main as cli_main
    from clipfleet.producer.status import run_status

    world = Path(f"{store.rstrip('/')}-sandbox")
    settings = prepare_world(world, samples)
    wats = [str(world / "wat" / name) for name in settings["wat_files"]]
    with SandboxServer(world) as server:
        print(f"sandbox web: {server.url}", flush=True)
        # The sandbox is our own server on loopback: the address guard and the per-host rate
        # limit exist for other people's servers, so the demo lifts both.
        code = cli_main(["run", "--wat", *wats, "--store", store, "--allow-private-addresses",
                         "--domain-max-rate", "0"])
        print()
        run_status(store)
        print(json.dumps({"store": store, "sandbox": str(world)}))
        if keep_serving:
            print("serving the sandbox web; press Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return code
