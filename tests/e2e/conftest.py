"""Fixtures of the whole-pipeline tests: a sandbox world of many WAT files, served on loopback;
the recovery tests' Redis with AOF (tests/recovery/conftest.py) and the S3 server of tests/conftest.py."""
from __future__ import annotations

import pytest

from clipfleet.producer.fleet import free_port
from tests.recovery.conftest import redis_aof  # noqa: F401 (fixture)

FAULT_SAMPLES, FAULT_WATS = 600, 6


@pytest.fixture(scope="session")
def fault_world(tmp_path_factory):
    from clipfleet.sandbox.web import make_sandbox
    directory = tmp_path_factory.mktemp("fault-world")
    make_sandbox(directory, samples=FAULT_SAMPLES, port=free_port(), seed=11, wat_files=FAULT_WATS)
    return directory


@pytest.fixture(scope="session")
def fault_web(fault_world):
    from clipfleet.sandbox.server import SandboxServer
    with SandboxServer(fault_world) as server:
        yield server
