"""The Kubernetes manifests (k8s/): every overlay renders offline, core resources pass strict schema validation for
the Kubernetes versions we claim, the RayService is valid against KubeRay's CRD schema and its pod templates against
the core schema, and the deployment's promises hold: pinned Ray version, token auth, probes, /dev/shm, limits,
hardened pods, no committed secret, network isolation, disruption budgets, workers for every job type."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy import generated
from tests.deploy.support import (CUSTOM_KINDS, KUBERNETES_VERSIONS, OVERLAYS, REPO, containers, container_env,
                                  kustomize, label_selector_matches, pod_templates, ray_groups, ray_pods, secret_refs,
                                  where)

CRD_SCHEMA = REPO / "tests" / "deploy" / "schemas" / "rayservice.ray.io-v1.kuberay-v1.7.0.json"
COMPONENTS = ("keda",)
"""Optional components (not in an overlay by default), rendered on top of each overlay."""


def _lock_pin(package: str) -> str:
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in requirements/constraints.txt")


def _project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


def _rayservice(docs: list[dict]) -> dict:
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    return rs


def test_generated_manifests_are_current():
    assert generated.stale() == [], "run python tests/deploy/generated.py"


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_optional_components_render_on_every_overlay(name, component, tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "saev",
        # As if listed in the overlay's own kustomization (which sets the namespace); kustomize wants relative paths.
        "resources": [os.path.relpath(REPO / "k8s" / "overlays" / name, tmp_path)],
        "components": [os.path.relpath(REPO / "k8s" / "components" / component, tmp_path)],
    }))
    docs = kustomize(tmp_path)
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled, "the KEDA component adds a ScaledObject"
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    for obj in scaled:
        assert obj["spec"]["scaleTargetRef"]["name"] in names
        assert obj["metadata"]["namespace"] == "saev"


def test_core_resources_pass_strict_schema_validation(overlay):
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert kinds & CUSTOM_KINDS == {"RayService", "PodMonitor", "PrometheusRule"}, "custom kinds are checked below"
    failures = []
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{name} {where(doc)} (Kubernetes {version}): {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)


def test_rayservice_pod_templates_pass_the_core_pod_schema(overlay):
    name, docs = overlay
    failures = []
    for pod in ray_pods(docs):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": pod["metadata"]["name"]},
                    "template": {"metadata": {"labels": pod["metadata"].get("labels", {})}, "spec": pod["spec"]}}
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(template, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{name} {pod['metadata']['name']} (Kubernetes {version}): {exc.message} "
                                f"at {list(exc.path)}")
    assert not failures, "\n".join(failures)


def _strict(schema):
    """KubeRay's structural schema, with unknown fields rejected (as `kubectl apply` with strict field validation)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_rayservice_passes_kuberay_crd_schema(overlay):
    name, docs = overlay
    schema = _strict(json.loads(CRD_SCHEMA.read_text()))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(_rayservice(docs)), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_serve_config_v2_is_the_services_serve_config(overlay):
    from ray.serve.schema import ServeDeploySchema

    name, docs = overlay
    embedded = yaml.safe_load(_rayservice(docs)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == generated.expected_serve_config(name)
    # In a pod, the HTTP proxy must listen on the pod's interface (KubeRay's Service, probes); gRPC always does.
    assert embedded["http_options"]["host"] == "0.0.0.0"
    head = _rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == embedded["http_options"]["port"]
    assert ports["serve-grpc"] == embedded["grpc_options"]["port"]


def test_ray_version_and_image_are_pinned_to_the_lock(overlay):
    name, docs = overlay
    rs = _rayservice(docs)
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == _lock_pin("ray")
    platform = {c["image"] for place, _, c in containers(docs) if "saev-platform" in c["image"]}
    assert len(platform) == 1, f"one platform image for Ray pods and job workers (same Ray, same Python): {platform}"
    (image,) = platform
    tag = image.rsplit(":", 1)[1]
    assert tag == _project_version() + ("-cuda" if name == "gpu" else "")
    for place, _, c in containers(docs):
        repo, _, tag = c["image"].rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{place}: unpinned image {c['image']}"


def test_ray_token_auth_is_on_and_shared_with_the_job_workers(overlay):
    name, docs = overlay
    auth = _rayservice(docs)["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "saev-ray-token"}
    clients = 0
    for place, spec, c in containers(docs):
        env = container_env(c, docs)
        if "RAY_ADDRESS" not in env or "RayService" in place:
            continue
        clients += 1
        assert env["RAY_ADDRESS"] == f"ray://{_rayservice(docs)['metadata']['name']}-head-svc:10001"
        assert env.get("RAY_AUTH_MODE") == "token", place
        token_dir = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent)
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == token_dir]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == auth["secretName"]
        assert {"key": "auth_token", "path": Path(env["RAY_AUTH_TOKEN_PATH"]).name} in volume["secret"]["items"]
    assert clients >= 1, "the job workers that fan out to Ray join it as clients"


def _quantity_bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def test_ray_pods_have_memory_backed_shm_http_probes_and_limits(overlay):
    name, docs = overlay
    rs = _rayservice(docs)
    cluster = rs["spec"]["rayClusterConfig"]
    groups = {g: (t, (cluster["headGroupSpec"] if g == "headgroup" else
                     next(w for w in cluster["workerGroupSpecs"] if w["groupName"] == g)))
              for g, _, t in ray_groups(rs)}
    for group, (template, spec_group) in groups.items():
        pod = template["spec"]
        ray = pod["containers"][0]
        (shm,) = [m for m in ray["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"]
        store = int(spec_group["rayStartParams"]["object-store-memory"])
        assert store <= _quantity_bytes(volume["emptyDir"]["sizeLimit"]), f"{group}: object store larger than /dev/shm"
        for probe in ("readinessProbe", "livenessProbe"):
            assert "httpGet" in ray[probe], f"{group}: {probe} must be HTTP (gRPC probes cannot route)"
        ready = ray["readinessProbe"]["httpGet"]
        # The head must become ready before KubeRay deploys the serve config: Ray's own health, not Serve's.
        expected = ("/api/healthz", "dashboard-agent") if group == "headgroup" else ("/-/healthz", "serve")
        assert (ready["path"], ready["port"]) == expected, group
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(ray["resources"][kind]), f"{group}: {kind}"
    if name == "gpu":
        (gpu,) = cluster["workerGroupSpecs"]
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
        assert cluster["enableInTreeAutoscaling"] is True
        autoscaler = cluster["autoscalerOptions"]
        head_volumes = {v["name"] for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
        assert {m["name"] for m in autoscaler["volumeMounts"]} <= head_volumes, "the sidecar mounts the head's volumes"
        assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in autoscaler["volumeMounts"]} >= {"/tmp", "/home/saev"}


def test_every_container_is_non_root_read_only_and_bounded(overlay):
    name, docs = overlay
    problems = []
    for place, spec, c in containers(docs):
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{place}: runAsNonRoot")
        if (sc.get("runAsUser") or pod_sc.get("runAsUser") or 0) < 10000:
            problems.append(f"{place}: runAsUser below 10000")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{place}: allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{place}: capabilities not dropped")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{place}: root filesystem writable")
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{place}: seccomp")
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})):
                problems.append(f"{place}: resources.{kind}")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplate
            if "emptyDir" in volume and not volume["emptyDir"].get("sizeLimit"):
                problems.append(f"{place}: emptyDir {mount['name']} without sizeLimit")
    for place, template, _ in pod_templates(docs):
        if not place.startswith("Job/"):
            for c in template["spec"]["containers"]:
                if not (c.get("readinessProbe") and c.get("livenessProbe")):
                    problems.append(f"{place}/{c['name']}: probes")
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert [n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] for n in namespaces] == ["restricted"]
    assert not problems, "\n".join(problems)


def _documented_secrets() -> set[tuple[str, str]]:
    """(Secret, key) pairs docs/deploy.md tells the operator to create (`kubectl create secret generic`)."""
    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    created = set()
    for match in re.finditer(r"kubectl[^\n]*create secret generic (\S+)([^\n]*)", text):
        for key in re.findall(r"--from-(?:literal|file)=([^=\s]+)", match.group(2)):
            created.add((match.group(1), key))
    return created


def test_secrets_are_referenced_not_committed_and_documented(overlay):
    name, docs = overlay
    assert not [where(d) for d in docs if d["kind"] == "Secret"], "no Secret is committed"
    documented = _documented_secrets()
    names = {n for n, _ in documented}
    for secret, key in sorted(secret_refs(docs)):
        if key == "*":
            assert secret in names, f"{secret} is used but docs/deploy.md does not create it"
        else:
            assert (secret, key) in documented, f"{secret}/{key} is used but docs/deploy.md does not create it"


def test_network_policies_expose_only_the_gateway(overlay):
    name, docs = overlay
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = [p for p in policies.values() if p["podSelector"] == {} and not p.get("ingress")]
    assert deny and deny[0]["policyTypes"] == ["Ingress"], "a default-deny ingress policy"
    pods = [labels for _, _, labels in pod_templates(docs)]
    open_rules = []
    for policy_name, spec in policies.items():
        assert spec["podSelector"] == {} or any(label_selector_matches(spec["podSelector"], p) for p in pods), \
            f"{policy_name} selects no pod"
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                open_rules.append((policy_name, sorted(p["port"] for p in rule["ports"])))
    # Reachable from anywhere: Ray Serve's proxies on the Ray pods (the gateway), nothing else.
    assert open_rules == [("saev-gateway", [8000, 9000])]
    assert policies["saev-gateway"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "saev-ray"}
    for store in ("saev-minio", "saev-redis"):
        (rule,) = policies[store]["ingress"]
        allowed = {v for peer in rule["from"] for e in peer["podSelector"]["matchExpressions"] for v in e["values"]}
        assert allowed <= {"saev-ray", "saev-worker", "saev-minio-init"}, f"{store} only from the platform's pods"
        assert all(set(peer) == {"podSelector"} for peer in rule["from"]), f"{store}: same namespace only"


def test_services_disruption_budgets_and_monitors_select_pods(overlay):
    name, docs = overlay
    pods = [labels for _, _, labels in pod_templates(docs)]
    for doc in docs:
        if doc["kind"] == "Service":
            selector = {"matchLabels": doc["spec"]["selector"]}
        elif doc["kind"] in ("PodDisruptionBudget", "PodMonitor"):
            selector = doc["spec"]["selector"]
        else:
            continue
        assert any(label_selector_matches(selector, p) for p in pods), f"{where(doc)} selects no pod"
    monitored = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
                 for d in docs if d["kind"] == "PodMonitor"}
    assert monitored == {"saev-ray", "saev-worker"}
    for place, _, c in containers(docs):
        if "saev-platform" in c["image"]:
            assert "metrics" in {p["name"] for p in c.get("ports", [])}, f"{place}: no port named metrics to scrape"


def test_job_workers_serve_every_job_type_with_valid_flags(overlay):
    import typer

    from sae_shared.jobs import JOB_TYPES
    from services.cli import app
    from services.worker.registry import available_types

    name, docs = overlay
    worker = typer.main.get_command(app).commands["worker"]
    served: set[str] = set()
    for place, _, c in containers(docs):
        if c.get("command", [])[:2] != ["saevctl", "worker"]:
            continue
        args = c.get("command", [])[2:] + c.get("args", [])
        ctx = worker.make_context("worker", list(args))  # raises on an unknown flag or a bad value
        types = [t for t in (ctx.params["types"] or "").split(",") if t]
        assert set(types) <= set(JOB_TYPES), f"{place}: unknown job types {types}"
        # A worker asked for a type without a handler refuses to start (exit 2): the pod would crash-loop.
        assert set(types) <= set(available_types()), f"{place}: no handler for {set(types) - set(available_types())}"
        served.update(types or available_types())  # no --types: every type with a handler
        env = container_env(c, docs)
        assert str(ctx.params["metrics_port"]) in {str(p["containerPort"]) for p in c["ports"]}
        assert env.get("SAEV_METRICS_HOST") == "0.0.0.0", f"{place}: metrics must listen beyond loopback"
    assert served == set(JOB_TYPES), f"{name}: no worker serves {set(JOB_TYPES) - served}"
