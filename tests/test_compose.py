"""compose/ checked statically (no Docker engine here): services, queues, credentials."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from clipfleet.shared.pipeline import QUEUES

COMPOSE = Path(__file__).resolve().parents[1] / "compose"
spec = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
services = spec["services"]


def test_one_worker_service_per_queue():
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert {s["command"][-1] for s in workers.values()} == set(QUEUES.values())
    for name, s in workers.items():
        assert s["command"][:3] == ["clipfleet", "worker", "--queues"]
        assert name == f"worker-{s['command'][-1]}"
        assert s["environment"]["CLIPFLEET_BROKER"].startswith("redis://:${REDIS_PASSWORD")


def test_gpu_queues_reserve_a_gpu_and_cpu_queues_do_not():
    for name, s in services.items():
        if name.startswith("worker-"):
            wants_gpu = "deploy" in s
            assert wants_gpu == name.startswith("worker-gpu-"), name


def test_flower_is_behind_basic_auth_and_loopback():
    flower = services["flower"]
    assert any(a.startswith("--basic-auth=${FLOWER_BASIC_AUTH:?") for a in flower["command"])
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_no_credentials_in_the_files():
    text = (COMPOSE / "docker-compose.yml").read_text()
    for key in ("REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):
        for value in re.findall(rf"{key}: (.*)", text):
            assert value.startswith("${") and ":?" in value, f"{key} is set literally: {value}"
    assert "requirepass" in text
    example = (COMPOSE / ".env.example").read_text()
    assert all(line.endswith("=") for line in example.splitlines() if "=" in line and not line.startswith("#"))


def test_services_wait_for_healthy_dependencies():
    for name, s in services.items():
        for dep, cond in s.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}
            assert "healthcheck" in services[dep]
