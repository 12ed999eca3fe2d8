"""Application builders: one Ray Serve application per service, from typed args and ``Settings``.

Used three ways, always through the same functions:

- serve config YAML (``import_path: services.app:activations_app`` with ``args:``), e.g. a KubeRay RayService:
  Ray calls the builder with the args; ``Settings`` come from the environment of the cluster;
- ``saevctl serve`` and the test suite: :func:`applications_from_config` reads a serve config, builds every
  application in-process (applying each application's ``deployments:`` overrides) for ``serve.run_many``;
- ``serve run services.app:activations_app``.

Configuration flows one way: environment -> ``Settings`` -> builder -> deployment constructors. This module imports
neither torch nor the deployments' modules until a builder runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sae_shared.settings import Settings, get_settings
from services.common.config import ActivationsArgs, GatewayArgs, SAEArgs, TaskHeadArgs

GRPC_SERVICERS = [
    f"services.common.grpc_servicers.add_{name}Servicer_to_server"
    for name in ("Activations", "SAE", "TaskHead", "Interventions", "Jobs", "Features")
]
"""What the gRPC proxy serves (``grpc_options.grpc_servicer_functions``)."""

APP_NAMES = ("activations", "sae", "taskhead", "gateway")
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"


def _args(model: type[BaseModel], args: Any) -> Any:
    if isinstance(args, model):
        return args
    return model.model_validate(dict(args or {}))


def _bind(deployment, args: BaseModel, settings: Settings, options: dict[str, Any] | None):
    opts = dict(options or {})
    batching = getattr(args, "batching", None)
    if batching is not None and "user_config" not in opts:
        opts["user_config"] = batching.model_dump()
    return (deployment.options(**opts) if opts else deployment).bind(args, settings)


def build_activations(args: dict | ActivationsArgs | None, settings: Settings,
                      deployment_options: dict[str, Any] | None = None):
    """The activations application (``saev.v1.Activations``)."""
    from services.activations.deployment import ActivationsService

    return _bind(ActivationsService, _args(ActivationsArgs, args), settings, deployment_options)


def build_sae(args: dict | SAEArgs | None, settings: Settings, deployment_options: dict[str, Any] | None = None):
    """The SAE application (``saev.v1.SAE``)."""
    from services.sae.deployment import SAEService

    return _bind(SAEService, _args(SAEArgs, args), settings, deployment_options)


def build_taskhead(args: dict | TaskHeadArgs | None, settings: Settings,
                   deployment_options: dict[str, Any] | None = None):
    """The task-head application (``saev.v1.TaskHead``)."""
    from services.taskhead.deployment import TaskHeadService

    return _bind(TaskHeadService, _args(TaskHeadArgs, args), settings, deployment_options)


def build_gateway(args: dict | GatewayArgs | None, settings: Settings,
                  deployment_options: dict[str, Any] | None = None):
    """The gateway application: HTTP ingress + Interventions, Jobs, Features."""
    from services.gateway.deployment import Gateway

    return _bind(Gateway, _args(GatewayArgs, args), settings, deployment_options)


# The builders a serve config names (Ray calls them with the application's `args` only; Settings come from the
# environment of the process that builds, and the `deployments:` overrides are applied by Ray afterwards).


def activations_app(args: dict):
    return build_activations(args, get_settings())


def sae_app(args: dict):
    return build_sae(args, get_settings())


def taskhead_app(args: dict):
    return build_taskhead(args, get_settings())


def gateway_app(args: dict):
    return build_gateway(args, get_settings())


BUILDERS = {
    "services.app:activations_app": build_activations,
    "services.app:sae_app": build_sae,
    "services.app:taskhead_app": build_taskhead,
    "services.app:gateway_app": build_gateway,
}
"""import_path in a serve config -> the builder that also takes Settings and deployment options."""


def config_path(name: str) -> Path:
    """``deploy/serve_config.<name>.yaml`` (name: cpu, gpu, gpu-single), or ``name`` itself if it is a file."""
    path = Path(name)
    return path if path.is_file() else DEPLOY_DIR / f"serve_config.{name}.yaml"


def load_config(path: str | Path):
    """A serve config file, validated with Ray Serve's own schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        return ServeDeploySchema.model_validate(yaml.safe_load(f))


def applications_from_config(config, settings: Settings) -> list:
    """``serve.RunTarget`` s for every application of a serve config, built in this process with ``settings``.

    Each application's ``deployments:`` entry (it has one deployment) becomes that deployment's options, as Ray
    applies it when it deploys the same file.
    """
    from ray import serve

    targets = []
    for app in config.applications:
        builder = BUILDERS.get(app.import_path)
        if builder is None:
            raise ValueError(f"application {app.name!r}: unknown import_path {app.import_path!r}; "
                             f"use one of {sorted(BUILDERS)}")
        options: dict[str, Any] = {}
        for dep in app.deployments:
            options.update(dep.model_dump(exclude_unset=True, exclude={"name"}))
        if isinstance(options.get("backpressure_config"), dict):
            from ray.serve.config import BackpressureConfig

            options["backpressure_config"] = BackpressureConfig(**options["backpressure_config"])
        if "ray_actor_options" in options:
            options["ray_actor_options"] = {k: v for k, v in options["ray_actor_options"].items() if v is not None}
        application = builder(app.args, settings, options)
        targets.append(serve.RunTarget(target=application, name=app.name, route_prefix=app.route_prefix))
    return targets
