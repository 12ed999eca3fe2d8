"""The serve configs are valid Ray Serve deploy configs whose args the application builders accept."""

from __future__ import annotations

import importlib

import pytest
from ray.serve.schema import ServeDeploySchema

from services.app import APP_NAMES, BUILDERS, config_path, load_config
from services.common.config import ActivationsArgs, GatewayArgs, SAEArgs, TaskHeadArgs

ARGS = {"services.app:activations_app": ActivationsArgs, "services.app:sae_app": SAEArgs,
        "services.app:taskhead_app": TaskHeadArgs, "services.app:gateway_app": GatewayArgs}
MODEL_APPS = ("activations", "sae", "taskhead")


@pytest.mark.parametrize("name", ["cpu", "gpu", "gpu-single"])
def test_serve_config_validates_with_ray_schema_and_typed_args(name):
    config = load_config(config_path(name))
    assert isinstance(config, ServeDeploySchema)
    assert [a.name for a in config.applications] == list(APP_NAMES)
    for port in (config.http_options.port, config.grpc_options.port):
        assert not 10002 <= port <= 19999  # Ray's worker ports
    for path in config.grpc_options.grpc_servicer_functions:
        module, attr = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr))
    for app in config.applications:
        assert app.import_path in BUILDERS
        args = ARGS[app.import_path].model_validate(app.args)
        (dep,) = app.deployments
        if app.name in MODEL_APPS:
            assert dep.max_ongoing_requests >= args.batching.max_batch_size  # a batch could not fill otherwise
            assert dep.max_queued_requests > 0  # bounded queue: overload is refused, not queued forever
            assert args.torch_threads and args.torch_threads > 0


def test_cpu_config_fits_two_cores():
    config = load_config(config_path("cpu"))
    cpus = sum(app.deployments[0].ray_actor_options.num_cpus * app.deployments[0].num_replicas
               for app in config.applications)
    assert cpus <= 2
    assert config.http_options.host == "127.0.0.1"


def test_gpu_config_gives_each_model_replica_a_gpu_and_autoscales():
    config = load_config(config_path("gpu"))
    for app in config.applications:
        dep = app.deployments[0]
        assert dep.autoscaling_config is not None
        if app.name in MODEL_APPS:
            assert dep.ray_actor_options.num_gpus == 1
            assert app.args["device"] == "cuda"


def test_gpu_single_config_shares_one_gpu():
    config = load_config(config_path("gpu-single"))
    shares = [app.deployments[0].ray_actor_options.num_gpus for app in config.applications if app.name in MODEL_APPS]
    assert all(0 < s < 1 for s in shares) and sum(shares) <= 1


def test_builders_apply_the_config_deployment_options(settings):
    from services.app import applications_from_config

    targets = applications_from_config(load_config(config_path("gpu")), settings)
    activations = targets[0].target._bound_deployment
    assert activations.name == "Activations"
    assert activations.ray_actor_options["num_gpus"] == 1
    assert activations.user_config["max_batch_size"] == 32
    assert [t.route_prefix for t in targets] == ["/_services/activations", "/_services/sae", "/_services/taskhead", "/"]


@pytest.mark.parametrize("name", ["cpu", "gpu", "gpu-single"])
def test_builders_take_ray_serve_deploy_calls(name, monkeypatch, settings):
    """`serve deploy` / KubeRay import each application by path and call it with its args alone."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    import services.app as app_module

    monkeypatch.setattr(app_module, "get_settings", lambda: settings)
    for app in load_config(config_path(name)).applications:
        module, attr = app.import_path.split(":")
        builder = getattr(importlib.import_module(module), attr)
        assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app.args), Application)
