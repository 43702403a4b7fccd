"""A small sandbox world and its server, shared by the sandbox tests.

Every test here runs with a guard that refuses any connection outside 127.0.0.0/8.
"""
from __future__ import annotations

import ipaddress
import socket

import pytest

from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox

WORLD_SAMPLES = 200
WORLD_SEED = 7


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any test that tries to connect outside 127.0.0.0/8."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address):
        if not isinstance(address, tuple):
            return  # a Unix socket
        host = address[0]
        if host == "localhost":
            return
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name: this guard resolves nothing, so it refuses it
        if not loopback:
            raise AssertionError(f"test tried to connect outside loopback: {address}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A sandbox of WORLD_SAMPLES images, made for a free loopback port."""
    directory = tmp_path_factory.mktemp("world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=_free_port(), seed=WORLD_SEED, wat_files=3)
    return directory


@pytest.fixture(scope="session")
def server(world):
    with SandboxServer(world) as running:
        yield running
