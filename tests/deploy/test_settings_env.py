"""Configuration flows one way (environment -> Settings): every platform variable a deployment sets (Kubernetes
manifests, docker-compose, the Dockerfile) is ``SAEV_`` + a field of ``sae_shared.settings.Settings`` with a value it
accepts; every other variable is a third-party program's, named below with the reason. Derived values (the gRPC proxy's
message limit) agree with Settings, and the configuration reference in docs/deploy.md is generated from Settings."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.deploy.support import (COMPOSE_FILES, OVERLAYS, REPO, containers, container_env, env_example,
                                  interpolations, load_compose, ray_groups, run)

THIRD_PARTY = {
    "RAY_AUTH_MODE": "Ray: token authentication on (read by Ray in every process of the cluster and its clients)",
    "RAY_AUTH_TOKEN": "Ray: the token itself (docker-compose; on Kubernetes KubeRay sets it from the Secret)",
    "RAY_AUTH_TOKEN_PATH": "Ray: file holding the token (job workers on Kubernetes mount the Secret)",
    "RAY_ADDRESS": "Ray: the cluster a job worker joins as a client for the recording fan-out",
    "RAY_USAGE_STATS_ENABLED": "Ray: no usage reporting (the cluster has no internet access to spend on it)",
    "RAY_max_direct_call_object_size": "Ray: calls between deployments carry up to this many bytes inline (8 MiB, "
                                       "as the local stack sets; services/common/local_ray.py)",
    "GOMP_SPINCOUNT": "GNU OpenMP (torch's CPU threads): how long an idle thread spins before sleeping (3000, as the "
                      "local stack sets; services/common/local_ray.py)",
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": "Ray Serve: the gRPC proxy's message limit, from Settings (checked below)",
    "MINIO_ROOT_USER": "MinIO: administrator (the minio server and the bucket set-up only)",
    "MINIO_ROOT_PASSWORD": "MinIO: administrator's password (the minio server and the bucket set-up only)",
    "REDIS_PASSWORD": "redis image (docker-compose): written to redis.conf at start",
    "GF_SECURITY_ADMIN_PASSWORD": "Grafana: admin password",
    "GF_USERS_ALLOW_SIGN_UP": "Grafana: no self sign-up",
    "GF_ANALYTICS_REPORTING_ENABLED": "Grafana: no usage reporting",
    "GF_ANALYTICS_CHECK_FOR_UPDATES": "Grafana: no update checks",
    "NVIDIA_DRIVER_CAPABILITIES": "NVIDIA container runtime: CUDA compute + NVML (image's cuda target)",
    "PATH": "image: the virtual environment first",
    "HOME": "image: the non-root user's home",
    "PYTHONUNBUFFERED": "image: logs reach the collector line by line",
    "PYTHONDONTWRITEBYTECODE": "image: no .pyc writes on a read-only root filesystem (compiled at build time)",
    "PIP_DISABLE_PIP_VERSION_CHECK": "image build stage: quiet pip",
    "PIP_NO_CACHE_DIR": "image build stage: no pip cache in the layers",
}


def _dockerfile_env() -> dict[str, str]:
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line.strip()[4:]):
                env[key] = value
    return env


def _compose_envs() -> dict[str, dict[str, str]]:
    """service (in the base file and with the GPU override) -> its environment."""
    envs = {}
    for files in ((COMPOSE_FILES[0],), COMPOSE_FILES):
        model = load_compose(*files)
        for name, service in model["services"].items():
            envs[f"{'+'.join(files)}:{name}"] = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    return envs


def _all_envs(rendered) -> dict[str, dict]:
    envs = {}
    for overlay in OVERLAYS:
        for place, _, c in containers(rendered[overlay]):
            envs[f"k8s/overlays/{overlay}:{place}"] = container_env(c, rendered[overlay])
    envs.update(_compose_envs())
    envs["deploy/Dockerfile"] = _dockerfile_env()
    return envs


def test_every_variable_set_is_a_settings_field_or_a_named_third_party_one(rendered):
    from sae_shared.settings import ENV_PREFIX, Settings

    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert not [k for k in THIRD_PARTY if k.startswith(ENV_PREFIX)]
    unknown = []
    for place, env in _all_envs(rendered).items():
        for name in env:
            if name.startswith(ENV_PREFIX):
                if name not in fields:
                    unknown.append(f"{place}: {name} is not a Settings field")
            elif name not in THIRD_PARTY:
                unknown.append(f"{place}: {name} is neither SAEV_* nor a known third-party variable")
    assert not unknown, "\n".join(unknown)


def test_literal_settings_values_are_accepted_by_settings(rendered, monkeypatch, tmp_path):
    from sae_shared.settings import ENV_PREFIX, Settings

    for place, env in _all_envs(rendered).items():
        literal = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and isinstance(v, str)}
        for key in [k for k in list(os.environ) if k.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("SAEV_HOME", str(tmp_path))  # no connection file of a local stack leaks in
        for key, value in literal.items():
            if key != "SAEV_HOME":
                monkeypatch.setenv(key, value)
        try:
            Settings()
        except Exception as exc:  # noqa: BLE001 - name the place
            pytest.fail(f"{place}: Settings rejects {literal}: {exc}")


def test_grpc_proxy_limit_matches_settings(rendered, monkeypatch, tmp_path):
    from sae_shared.settings import ENV_PREFIX, Settings
    from services.common.limits import Limits

    checked = 0
    for place, env in _all_envs(rendered).items():
        if "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE" not in env:
            continue
        for key in [k for k in list(os.environ) if k.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("SAEV_HOME", str(tmp_path))
        for key, value in env.items():
            if key.startswith(ENV_PREFIX) and isinstance(value, str) and key != "SAEV_HOME":
                monkeypatch.setenv(key, value)
        expected = Limits.from_settings(Settings()).grpc_message_bytes
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == expected, place
        checked += 1
    assert checked >= 3, "the Ray containers of both overlays and the compose head set the limit"


def _ray_node_envs(rendered) -> dict[str, dict]:
    """The environment of every container that runs a Ray node: compose's ray-head (with and without the GPU
    override), and the Ray container (the first) of each group of each overlay's RayService."""
    envs = {place: env for place, env in _compose_envs().items() if place.endswith(":ray-head")}
    for overlay in OVERLAYS:
        for doc in rendered[overlay]:
            if doc["kind"] == "RayService":
                for group, _, template in ray_groups(doc):
                    envs[f"k8s/overlays/{overlay}:{group}"] = container_env(template["spec"]["containers"][0],
                                                                            rendered[overlay])
    return envs


def test_ray_nodes_get_the_local_stacks_inline_size_and_openmp_spin_count(rendered):
    from services.common.local_ray import OPENMP_SPIN_COUNT, SYSTEM_CONFIG

    nodes = _ray_node_envs(rendered)
    assert len(nodes) >= 5, f"compose's ray-head twice and the head and worker groups of the overlays: {list(nodes)}"
    for place, env in nodes.items():
        assert int(env.get("RAY_max_direct_call_object_size", 0)) == SYSTEM_CONFIG["max_direct_call_object_size"], \
            place
        assert env.get("GOMP_SPINCOUNT") == OPENMP_SPIN_COUNT, place
    # the job worker is not a Ray node: its own torch compute keeps libgomp's default
    assert all("GOMP_SPINCOUNT" not in env for place, env in _compose_envs().items() if place.endswith(":worker"))


def test_env_example_declares_exactly_what_compose_interpolates():
    used = {name for f in COMPOSE_FILES for name, _ in interpolations((REPO / f).read_text())}
    declared = set(env_example())
    assert used - declared == set(), f"interpolated but not in .env.example: {used - declared}"
    assert declared - used == set(), f"in .env.example but never used: {declared - used}"


def test_settings_reference_in_docs_is_current():
    result = run([sys.executable, "scripts/settings_reference.py", "--check"])
    assert result.returncode == 0, result.stderr
