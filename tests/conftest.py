"""Services the tests start themselves: an S3 server and a Redis server on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from clipfleet.producer.fleet import check_broker, find_redis_server, free_port, _wait_for

# img2dataset imports albumentations, which would otherwise ask the network for updates.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


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
    """A real redis-server on a free loopback port, stopped after the test."""
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for(lambda: check_broker(url, 0.5) is None, "redis-server", 20, proc)
    yield url
    proc.terminate()
    proc.wait(10)
