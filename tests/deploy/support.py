"""Helpers of the deployment tests: the tools (from the dev install), rendering overlays, walking manifests, and reading
docker-compose files the way Compose does (interpolation from .env, YAML merge keys, override files)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu-dev", "gpu")
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
"""Oldest Kubernetes the manifests claim (docs/deploy.md) and the newest kubernetes-validate knows."""
CUSTOM_KINDS = {"RayService", "PodMonitor", "PrometheusRule", "ScaledObject"}
"""Custom resources: kubernetes-validate has no schema for them; each is checked its own way."""
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}


def tool(name: str) -> str:
    """A command-line tool of the dev install (the venv running the tests), or a failure saying how to get it."""
    found = BIN / name
    if found.is_file():
        return str(found)
    path = shutil.which(name)
    if path:
        return path
    pytest.fail(f"{name} is not installed: it comes with the dev install "
                f"(pip install -c requirements/constraints.txt -e '.[dev]')")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, **kwargs)


# --- Kubernetes ---

def kustomize(path: Path | str) -> list[dict]:
    """``kubectl kustomize PATH``: the rendered documents."""
    result = run([tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def where(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def ray_groups(rayservice: dict) -> Iterator[tuple[str, str, dict]]:
    """(group name, node type, pod template) of a RayService: the head group, then each worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "headgroup", "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield group["groupName"], "worker", group["template"]


def pod_templates(docs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod template, labels Kubernetes or KubeRay put on the pods) of every workload."""
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            template = doc["spec"]["template"]
            yield where(doc), template, dict(template.get("metadata", {}).get("labels", {}))
        elif doc["kind"] == "RayService":
            for group, node_type, template in ray_groups(doc):
                labels = dict(template.get("metadata", {}).get("labels", {}))
                labels.update({"ray.io/node-type": node_type, "ray.io/group": group})
                yield f"{where(doc)}[{group}]", template, labels


def containers(docs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every container and init container."""
    for place, template, _ in pod_templates(docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{place}/{c['name']}", spec, c


def ray_pods(docs: list[dict]) -> list[dict]:
    """The RayService's pod templates as plain Pods (what KubeRay creates, before its own additions)."""
    pods = []
    for doc in docs:
        if doc["kind"] != "RayService":
            continue
        for group, node_type, template in ray_groups(doc):
            metadata = copy.deepcopy(template.get("metadata", {}))
            metadata.update(name=f"{doc['metadata']['name']}-{group}", namespace=doc["metadata"].get("namespace"))
            metadata.setdefault("labels", {}).update({"ray.io/node-type": node_type, "ray.io/group": group})
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                         "spec": copy.deepcopy(template["spec"])})
    return pods


def config_maps(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def container_env(container: dict, docs: list[dict]) -> dict[str, Any]:
    """Every variable a container gets: literal values as strings, references as their ``valueFrom``."""
    env: dict[str, Any] = {}
    maps = config_maps(docs)
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"envFrom other than a ConfigMap: {source}"
        assert ref["name"] in maps, f"envFrom names a ConfigMap that is not rendered: {ref['name']}"
        env.update(maps[ref["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
    return env


def secret_refs(docs: list[dict]) -> set[tuple[str, str]]:
    """(Secret, key) pairs the manifests use; a whole-Secret volume counts as (Secret, '*')."""
    refs: set[tuple[str, str]] = set()
    for doc in docs:
        if doc["kind"] == "RayService":
            auth = doc["spec"]["rayClusterConfig"].get("authOptions") or {}
            if auth.get("secretName"):
                refs.add((auth["secretName"], "auth_token"))
    for _, spec, c in containers(docs):
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                refs.add((source["secretRef"]["name"], "*"))
    for _, template, _ in pod_templates(docs):
        for volume in template["spec"].get("volumes", []):
            secret = volume.get("secret")
            if secret:
                items = secret.get("items")
                refs.update((secret["secretName"], i["key"]) for i in items) if items else \
                    refs.add((secret["secretName"], "*"))
    return refs


def label_selector_matches(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


# --- docker-compose ---

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def env_example() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def interpolations(text: str) -> list[tuple[str, str | None]]:
    """(variable, operator) of every ``${VAR...}`` / ``$VAR`` Compose interpolates in a file: in its values, after YAML
    parsing (comments are not interpolated; ``$$`` is an escaped ``$``)."""
    found = []
    for value in _strings(yaml.safe_load(text)):
        found += [(m.group(1) or m.group(4), m.group(2)) for m in _VAR.finditer(value.replace("$$", ""))]
    return found


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's interpolation of one value: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
    ``${VAR?error}``; ``$$`` is a literal ``$``."""
    def replace(m: re.Match) -> str:
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = values.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"{name} must be set: {arg}")
        return value or ""
    return _VAR.sub(replace, text.replace("$$", "\0")).replace("\0", "$")


def _interpolate_tree(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        result = interpolate(node, values)
        # Compose casts interpolated values to the type the specification wants (e.g. deploy.replicas).
        return int(result) if result != node and result.isdigit() else result
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, values) for v in node]
    return node


def load_compose(*files: str, values: dict[str, str] | None = None) -> dict:
    """The Compose model of ``files`` merged in order (YAML merge keys resolved), interpolated with ``values``
    (default: .env.example)."""
    values = env_example() if values is None else values
    merged: dict = {}
    for name in files:
        merged = merge_compose(merged, _interpolate_tree(yaml.safe_load((REPO / name).read_text()), values))
    return merged


def merge_compose(base: dict, override: dict) -> dict:
    """Compose's merge of an override file: mappings merge key by key, sequences and scalars are replaced (enough for
    the keys these files override: image, build, command, environment, deploy, shm_size)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_compose(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate_compose(model: dict) -> None:
    """Validate against the Compose specification (PyPI compose-spec). YAML merge keys are already resolved."""
    try:
        from compose_spec import PyCompose
    except ImportError:
        pytest.fail("compose-spec is not installed: it comes with the dev install")
    compose = PyCompose.from_json(json.dumps(model))
    compose.validate()
