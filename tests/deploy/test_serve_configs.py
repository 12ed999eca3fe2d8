"""Every serve config the deployments use (deploy/serve_config.*.yaml, and the serveConfigV2 embedded in each overlay)
is a valid Ray Serve deploy config whose import paths resolve, and whose application builders accept the call Ray
makes when it deploys the config (`serve deploy`, KubeRay): one argument, the application's ``args``."""

from __future__ import annotations

import importlib

import pytest
import yaml

from tests.deploy.support import OVERLAYS, REPO

SERVE_CONFIGS = sorted(p.name for p in (REPO / "deploy").glob("serve_config.*.yaml"))


def _configs(rendered) -> list[tuple[str, dict]]:
    configs = [(name, yaml.safe_load((REPO / "deploy" / name).read_text())) for name in SERVE_CONFIGS]
    for overlay in OVERLAYS:
        (rs,) = [d for d in rendered[overlay] if d["kind"] == "RayService"]
        configs.append((f"k8s/overlays/{overlay} serveConfigV2", yaml.safe_load(rs["spec"]["serveConfigV2"])))
    return configs


def _resolve(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_the_deployments_serve_configs_exist():
    assert {"serve_config.cpu.yaml", "serve_config.gpu.yaml", "serve_config.gpu-single.yaml"} <= set(SERVE_CONFIGS)


def test_serve_configs_pass_ray_serve_schema_and_import_paths_resolve(rendered):
    from ray.serve.schema import ServeDeploySchema

    for name, raw in _configs(rendered):
        config = ServeDeploySchema.model_validate(raw)
        assert config.applications, name
        for path in config.grpc_options.grpc_servicer_functions:
            assert callable(_resolve(path)), f"{name}: {path}"
        for app in config.applications:
            assert callable(_resolve(app.import_path)), f"{name}: {app.name}: {app.import_path}"
        for port in (config.http_options.port, config.grpc_options.port):
            assert not 10002 <= port <= 19999, f"{name}: port {port} is in Ray's worker range"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_application_builders_accept_rays_call(name):
    """What Ray runs for each application of a deployed config (ray.serve._private.api): the builder must take
    exactly one parameter, the args, and return an Application. Nothing is deployed."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / name).read_text()))
    failures = []
    for app in config.applications:
        builder = _resolve(app.import_path)
        try:
            call_user_app_builder_with_args_if_necessary(builder, app.args)
        except Exception as exc:  # noqa: BLE001 - report every application at once
            failures.append(f"{app.name} ({app.import_path}): {type(exc).__name__}: {exc}")
    assert not failures, "Ray cannot build these applications from the serve config:\n" + "\n".join(failures)
