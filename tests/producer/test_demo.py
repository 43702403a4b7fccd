"""The demo's world handling: a store's run is never pointed at a rebuilt world."""
from __future__ import annotations

import json
import socket

import pytest

from clipfleet.producer.demo import DemoError, prepare_world
from clipfleet.sandbox.web import make_sandbox


def test_a_busy_port_never_rebuilds_the_world_a_store_points_at(tmp_path):
    world = tmp_path / "demo-store-sandbox"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        make_sandbox(world, samples=60, port=port)
        before = (world / "sandbox.json").read_text()
        with pytest.raises(DemoError, match=f"port {port} is taken"):
            prepare_world(world, 60, store_has_run=True)
        assert (world / "sandbox.json").read_text() == before  # not rewritten for another port
    # the port free again: the same world is reused, even when --samples differs
    assert prepare_world(world, 999, store_has_run=True)["port"] == port
    assert json.loads((world / "sandbox.json").read_text())["samples"] == 60
