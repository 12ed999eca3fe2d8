"""docker-compose.yml (and its GPU override) against the Compose specification, after Compose's own interpolation from
.env.example, plus what the specification cannot see: declared volumes, real dependencies, one published service
(the gateway), health checks, pinned images, secrets only from the env file."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.support import COMPOSE_FILES, REPO, env_example, interpolations, load_compose, validate_compose

VARIANTS = {"cpu": COMPOSE_FILES[:1], "gpu": COMPOSE_FILES}
ONE_SHOT = {"minio-init"}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "API_KEYS")


@pytest.fixture(params=sorted(VARIANTS))
def model(request) -> tuple[str, dict]:
    return request.param, load_compose(*VARIANTS[request.param])


def test_compose_files_pass_the_compose_specification(model):
    name, data = model
    validate_compose(data)


def test_override_file_alone_is_valid_compose():
    validate_compose(load_compose(COMPOSE_FILES[1]))


def test_named_volumes_are_declared_and_used(model):
    name, data = model
    declared = set(data.get("volumes") or {})
    used = set()
    for service in data["services"].values():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":")[0]
                if not source.startswith((".", "/")):
                    used.add(source)
                else:
                    assert (REPO / source).exists(), f"bind-mounted {source} does not exist"
            elif volume.get("type") == "volume":
                used.add(volume["source"])
    assert used == declared, f"used {used}, declared {declared}"


def test_dependencies_exist_and_wait_for_health(model):
    name, data = model
    services = data["services"]
    for sname, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{sname} depends on unknown {dep}"
            condition = cond["condition"]
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully"
                assert services[dep]["restart"] == "no"
            else:
                assert condition == "service_healthy" and "healthcheck" in services[dep], f"{sname} -> {dep}"
    for sname, service in services.items():
        if sname not in ONE_SHOT:
            assert service.get("healthcheck", {}).get("test"), f"{sname} has no health check"


def test_only_the_gateway_is_published_on_loopback_by_default(model):
    name, data = model
    published = {s: svc["ports"] for s, svc in data["services"].items() if svc.get("ports")}
    assert set(published) == {"ray-head"}
    container_ports = sorted(int(p.rsplit(":", 1)[1]) for p in published["ray-head"])
    assert container_ports == [8000, 9000], "Ray Serve's HTTP and gRPC proxies: the gateway"
    assert all(p.startswith("127.0.0.1:") for p in published["ray-head"])


def test_images_are_pinned_and_platform_images_are_built_here(model):
    name, data = model
    for sname, service in data["services"].items():
        repo, _, tag = service["image"].rpartition(":")
        assert repo and tag != "latest" and re.search(r"\d+\.\d+|RELEASE\.\d{4}", tag), f"{sname}: {service['image']}"
        if "build" in service:
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"
            assert service["build"]["target"] == {"cpu": "cpu", "gpu": "cuda"}[name]
            assert service["image"].startswith("saev-platform:")


def test_platform_containers_are_hardened(model):
    name, data = model
    for sname, service in data["services"].items():
        assert service.get("cap_drop") == ["ALL"], sname
        assert "no-new-privileges:true" in service.get("security_opt", []), sname
        if "build" in service:
            assert service.get("read_only") is True, sname
            tmpfs = {v["target"] for v in service.get("volumes", []) if isinstance(v, dict) and v["type"] == "tmpfs"}
            assert {"/tmp", "/home/saev"} <= tmpfs, f"{sname}: writable /tmp and home on a read-only root"


def test_ray_head_runs_a_serve_config_and_ray_auth_is_shared(model):
    name, data = model
    head, worker = data["services"]["ray-head"], data["services"]["worker"]
    command = head["command"]
    assert command[0] == "/opt/saev/deploy/ray-head.sh"
    config = command[1]
    assert (REPO / "deploy" / f"serve_config.{config}.yaml").is_file()
    assert config == {"cpu": "cpu", "gpu": "gpu-single"}[name]
    for service in (head, worker):
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == env_example()["RAY_AUTH_TOKEN"]
    assert worker["environment"]["RAY_ADDRESS"] == "ray://ray-head:10001"
    if name == "gpu":
        for service in (head, worker):
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert worker["environment"]["SAEV_DEVICE"] == "cuda"
        assert head["build"]["target"] == "cuda"


def test_secrets_come_only_from_the_env_file():
    example = env_example()
    for f in COMPOSE_FILES:
        text = (REPO / f).read_text()
        for var, op in interpolations(text):
            if any(word in var for word in SECRET_WORDS):
                assert op == ":?", f"{f}: ${{{var}}} must be required (:?), never defaulted"
                assert example[var] == "change-me", f".env.example: {var} must be a placeholder"
        raw = yaml.safe_load(text)
        for sname, service in (raw.get("services") or {}).items():
            for key, value in (service.get("environment") or {}).items():
                if any(word in key for word in SECRET_WORDS):
                    assert "${" in str(value), f"{f}: {sname}.{key} is a literal secret"


def test_prometheus_scrapes_what_compose_runs():
    data = load_compose(COMPOSE_FILES[0])
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert jobs["saev-ray"]["static_configs"][0]["targets"] == ["ray-head:8080"]
    ray_head_sh = (REPO / "deploy" / "ray-head.sh").read_text()
    assert "metrics_port=8080" in ray_head_sh
    (dns,) = jobs["saev-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and "worker" in data["services"]
    command = data["services"]["worker"]["command"]
    assert command[command.index("--metrics-port") + 1] == str(dns["port"])
    mounts = data["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
