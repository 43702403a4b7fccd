"""A small sandbox world and its server, shared by the sandbox tests.
"""
from __future__ import annotations

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
