"""`clipfleet sandbox make|serve` through the real command line."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from clipfleet.producer.cli import main

from .conftest import _free_port


def test_make_writes_a_world_with_the_given_port(tmp_path, capsys):
    port = _free_port()
    assert main(["sandbox", "make", str(tmp_path / "w"), "--samples", "12", "--port", str(port),
                 "--seed", "5", "--wat-files", "2"]) == 0
    config = json.loads((tmp_path / "w" / "sandbox.json").read_text())
    assert (config["port"], config["seed"], config["samples"]) == (port, 5, 12)
    assert len(config["wat_files"]) == 2
    assert "12 images" in capsys.readouterr().out


def test_serve_uses_the_port_the_world_was_made_for(tmp_path):
    port = _free_port()
    assert main(["sandbox", "make", str(tmp_path / "w"), "--samples", "3", "--port", str(port)]) == 0
    process = subprocess.Popen([sys.executable, "-m", "clipfleet.producer.cli", "sandbox", "serve",
                                str(tmp_path / "w")], stdout=subprocess.PIPE, text=True,
                               cwd=os.getcwd())
    try:
        assert f"http://127.0.0.1:{port}" in process.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/corner/ok.jpg", timeout=5) as reply:
            assert reply.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0


def test_loopback_guard_refuses_other_addresses():
    with pytest.raises(AssertionError, match="outside loopback"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
