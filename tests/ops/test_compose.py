"""compose/ and ops/ checked statically (no Docker engine or cluster here): one service per queue,
every command a valid `clipfleet` command, no credential as a literal or on a command line,
persistence and auth where they belong, scaling on what the queues really hold."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from clipfleet.producer.cli import build_parser
from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
spec = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
override = yaml.safe_load((COMPOSE / "e2e.override.yml").read_text())
services = spec["services"]
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH|TOKEN|MC_HOST|BROKER", re.I)


def commands():
    for name, s in {**services, **override["services"]}.items():
        cmd = s.get("command") or s.get("entrypoint")
        if cmd:
            yield name, cmd


def test_one_worker_service_per_queue():
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert {s["command"][-1] for s in workers.values()} == set(QUEUES.values())
    for name, s in workers.items():
        assert s["command"][:3] == ["clipfleet", "worker", "--queues"]
        assert name == f"worker-{s['command'][-1]}"
        assert s["environment"]["CLIPFLEET_BROKER"].startswith("redis://:${REDIS_PASSWORD:?")


def test_every_clipfleet_command_parses():
    parser = build_parser()
    seen = set()
    for name, cmd in commands():
        if cmd[0] != "clipfleet":
            continue
        args = parser.parse_args([re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", a) for a in cmd[1:]])
        seen.add(args.command)
    assert {"worker", "serve", "metrics", "sandbox"} <= seen


def test_gpu_queues_reserve_a_gpu_and_cpu_queues_do_not():
    for name, s in services.items():
        if name.startswith("worker-"):
            wants_gpu = "deploy" in s
            assert wants_gpu == name.startswith("worker-gpu-"), name


def test_flower_is_behind_basic_auth_on_loopback_and_its_login_is_not_on_a_command_line():
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_USER:?")
    assert not any("auth" in a for a in flower["command"])
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_every_published_port_is_on_loopback():
    for name, s in services.items():
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_no_credential_is_a_literal_or_on_a_command_line():
    for doc in (services, override["services"]):
        for name, s in doc.items():
            for key, value in (s.get("environment") or {}).items():
                if SECRET_NAMES.search(key) and key != "<<":
                    assert "${" in value and ":?" in value, f"{name}: {key} is set literally"
                    assert not re.search(r"(PASSWORD|KEY)=\w", value)
    for name, cmd in commands():
        text = " ".join(cmd)
        assert not re.search(r"--(basic-auth|password|requirepass)\b|requirepass [^%]", text), (name, text)
        assert "${REDIS_PASSWORD" not in text and "${MINIO_ROOT_PASSWORD" not in text, name
    example = (COMPOSE / ".env.example").read_text()
    assert all(line.endswith("=") for line in example.splitlines() if "=" in line and not line.startswith("#"))
    assert "/compose/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_redis_persists_and_never_evicts():
    entry = " ".join(services["redis"]["entrypoint"])
    assert "--appendonly yes" in entry and "--maxmemory-policy noeviction" in entry
    assert "requirepass" in entry and "redis-server -" in entry  # config from stdin, not argv


def test_the_bucket_is_created_and_download_workers_use_the_caching_resolver():
    assert services["minio-bucket"]["entrypoint"][:3] == ["mc", "mb", "--ignore-existing"]
    resolver_ip = services["resolver"]["networks"]["fleet"]["ipv4_address"]
    assert services["worker-cpu-download"]["dns"] == [resolver_ip]
    corefile = (COMPOSE / "coredns" / "Corefile").read_text()
    assert "cache" in corefile and "forward" in corefile


def test_services_wait_for_healthy_dependencies():
    for name, s in services.items():
        for dep, cond in (s.get("depends_on") or {}).items() if isinstance(s.get("depends_on"), dict) else []:
            assert cond["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], dep


def test_prometheus_scrapes_flower_queues_and_search_and_grafana_has_the_dashboard():
    prom = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["flower"]["basic_auth"]["password_file"].startswith("/run/secrets/")
    assert jobs["queues"]["static_configs"][0]["targets"] == ["queue-metrics:9808"]
    assert jobs["search"]["static_configs"][0]["targets"] == ["search:1234"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "../ops/grafana" in mounts and "provisioning" in mounts


# -- ops/ ---------------------------------------------------------------------------------------
def known_metrics() -> set[str]:
    from flower import events
    from clipfleet.producer import metrics
    text = Path(events.__file__).read_text() + Path(metrics.__file__).read_text()
    text += "".join(p.read_text() for p in (ROOT / "search").glob("*.py"))
    names = set(re.findall(r"['\"]((?:flower|clipfleet)_[a-z_]+)['\"]", text))
    return names | {f"{n}_bucket" for n in names}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:flower|clipfleet)_[a-z_]+)", expr))


def test_alerts_and_dashboard_use_metrics_that_exist():
    known = known_metrics()
    rules = yaml.safe_load((ROOT / "ops/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"ClipfleetWorkerOffline", "ClipfleetTaskFailureRatio",
                                           "ClipfleetQueueNotDraining"}
    for rule in rules:
        assert metric_names(rule["expr"]) <= known, rule["alert"]
    dashboard = json.loads((ROOT / "ops/grafana/clipfleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(metric_names(e) and metric_names(e) <= known for e in exprs)


def test_every_queue_scales_on_waiting_plus_reserved_and_drains_before_it_is_killed():
    docs = [d for d in yaml.safe_load_all((ROOT / "ops/k8s/workers.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert set(deployments) == set(scaled) == {f"clipfleet-{q}" for q in QUEUES.values()}
    for queue in QUEUES.values():
        pod = deployments[f"clipfleet-{queue}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["command"] == ["clipfleet", "worker", "--queues", queue]
        soft = int({e["name"]: e["value"] for e in container["env"]}["CLIPFLEET_SOFT_SHUTDOWN"])
        assert pod["terminationGracePeriodSeconds"] > soft
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == queue.startswith("gpu-")
        trigger = scaled[f"clipfleet-{queue}"]["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["query"] == f'sum(clipfleet_queue_load{{queue="{queue}"}})'
        assert not any(SECRET_NAMES.search(e["name"]) for e in container["env"])  # those come from the Secret
        assert container["envFrom"] == [{"secretRef": {"name": "clipfleet-secrets"}}]


@pytest.mark.parametrize("section", ["Adding a node", "Draining a node", "Replaying dead letters"])
def test_the_runbook_covers(section):
    assert f"## {section}" in (ROOT / "ops/runbook.md").read_text()
