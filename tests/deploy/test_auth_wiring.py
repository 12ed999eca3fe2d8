"""Authentication as deployed, across every rendered overlay and compose variant: the names of Ray's token-auth
variables are the ones the installed Ray reads; no container turns Ray's auth off; every Ray node of the RayService
and every compose service that runs or joins Ray has token auth; the gateway's API keys reach the Ray head from a
Secret (Kubernetes) or a required .env entry (compose), never as a literal or an empty default; no command passes
``--no-auth``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.support import COMPOSE_FILES, REPO, container_env, containers, load_compose, ray_groups

RAY_PACKAGE = Path(__import__("ray").__file__).parent


def _ray_reads(name: str) -> bool:
    """Whether the installed Ray reads environment variable ``name`` (its Python sources or its core library)."""
    pattern = name.encode()
    for path in [*RAY_PACKAGE.glob("_private/authentication/*.py"), RAY_PACKAGE / "_raylet.so"]:
        if path.is_file() and re.search(rb"\b" + pattern + rb"\b", path.read_bytes()):
            return True
    return False


def _all_env_names(docs) -> set[str]:
    return {name for _, _, c in containers(docs) for name in container_env(c, docs)}


def test_the_token_auth_variables_we_set_are_the_ones_ray_reads(rendered):
    names = {n for docs in rendered.values() for n in _all_env_names(docs) if n.startswith("RAY_AUTH")}
    for files in (COMPOSE_FILES[:1], COMPOSE_FILES):
        for service in load_compose(*files)["services"].values():
            names |= {n for n in (service.get("environment") or {}) if n.startswith("RAY_AUTH")}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"} <= names
    for name in sorted(names):
        assert _ray_reads(name), f"{name} is set in the manifests but the installed Ray never reads it"


def test_no_container_disables_ray_auth_or_gateway_auth(overlay):
    name, docs = overlay
    for place, _, c in containers(docs):
        env = container_env(c, docs)
        assert str(env.get("RAY_AUTH_MODE", "token")).lower() == "token", place
        command = " ".join(map(str, c.get("command", []) + c.get("args", [])))
        assert "--no-auth" not in command, place


def test_every_ray_node_runs_with_token_auth_and_the_head_gets_the_api_keys_from_a_secret(overlay):
    name, docs = overlay
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    auth = service["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], "KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every node"
    groups = list(ray_groups(service))
    assert groups[0][1] == "head"
    for group, node_type, template in groups:
        for c in template["spec"]["containers"]:
            env = container_env(c, docs)
            assert "RAY_AUTH_MODE" not in env or env["RAY_AUTH_MODE"] == "token", (group, c["name"])
            if node_type == "head":  # the application builders run here and read SAEV_API_KEYS
                keys = env.get("SAEV_API_KEYS")
                assert isinstance(keys, dict) and keys.get("secretKeyRef", {}).get("name"), \
                    f"{group}/{c['name']}: SAEV_API_KEYS must come from a Secret, got {keys!r}"


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["cpu", "gpu"])
def test_compose_wires_ray_token_auth_and_required_api_keys(files):
    model = load_compose(*files)
    ray_services = [s for s, svc in model["services"].items()
                    if "ray-head" in " ".join(map(str, svc.get("command") or [])) or "RAY_ADDRESS" in
                    (svc.get("environment") or {})]
    assert {"ray-head", "worker"} <= set(ray_services)
    for sname in ray_services:
        env = model["services"][sname]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"], sname
    assert model["services"]["ray-head"]["environment"]["SAEV_API_KEYS"], "the gateway's keys reach the head"
    raw = (REPO / "docker-compose.yml").read_text()
    assert re.search(r"SAEV_API_KEYS:\s*\$\{API_KEYS:\?", raw), "API_KEYS is required (:?), never defaulted"
    assert re.search(r"RAY_AUTH_TOKEN:\s*\$\{RAY_AUTH_TOKEN:\?", raw), "RAY_AUTH_TOKEN is required, never defaulted"
    for f in files:
        assert "--no-auth" not in (REPO / f).read_text(), f
