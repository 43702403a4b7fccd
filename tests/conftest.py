"""Services the tests start themselves (an S3 server and a Redis server on 127.0.0.1), and a guard
that fails any test connecting outside 127.0.0.0/8."""
from __future__ import annotations

import ipaddress
import os
import socket
import uuid

import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.producer.fleet import scratch_redis as redis_server  # noqa: F401  (tests import it from here)

# img2dataset imports albumentations, which would otherwise ask the network for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


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


@pytest.fixture
def isolated_state(tmp_path, monkeypatch):
    """Embedded brokers keep their data under this test's own directory."""
    monkeypatch.setenv("CLIPFLEET_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL and sets it for this process."""
    from moto.server import ThreadedMotoServer
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["CLIPFLEET_S3_ENDPOINT"] = endpoint
    yield endpoint
    server.stop()
    os.environ.pop("CLIPFLEET_S3_ENDPOINT", None)


def make_bucket(endpoint: str) -> str:
    import boto3
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """The same test runs on a local directory and on the S3 protocol."""
    if request.param == "local":
        return str(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    return f"s3://{make_bucket(endpoint)}/run"




@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server for one test."""
    with redis_server(tmp_path) as url:
        yield url
