"""Start Ray and Ray Serve on this machine, deploy every application of a serve config, and stop again.

Used by ``saevctl serve`` and by the test suite's session fixture, within the limits measured in INFRA.md: node
address 127.0.0.1 (Ray would otherwise look its address up toward a public one), no dashboard, a small object
store, usage stats and Ray's token auth off for local runs, service ports outside Ray's worker range 10002-19999,
and the gRPC proxy's message limit taken from ``Settings`` (Ray reads it from the environment when it starts).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sae_shared.settings import Settings
from sae_shared.telemetry import get_logger
from services.common.limits import PROXY_MESSAGE_SIZE_ENV, Limits

log = get_logger(__name__)

RAY_RESERVED = range(10002, 20000)
OPENMP_SPIN_COUNT = "3000"
"""``GOMP_SPINCOUNT`` for the local stack's Ray processes (unless set in the environment already): how long an
idle OpenMP thread spins before it sleeps. libgomp's default (300 000) keeps a replica's torch threads spinning for
milliseconds after every batch, on cores the next service in the chain is waiting for. Measured with bench/serve.py
on 2 cores (the setting in the Ray processes only): 16-client throughput 0.73 of in-process batches with the default,
0.94 with 3 000; single-image latency ratio 1.44 and 1.31. The compose file and the RayService manifests set the same
variable on every Ray node."""
OBJECT_STORE_BYTES = 256 << 20
SYSTEM_CONFIG = {"max_direct_call_object_size": 8 << 20}
"""Ray system settings of the local stack. Arguments and results of calls between deployments up to 8 MiB (a batch
of residual streams, per-pixel predictions) travel inline with the call instead of through the shared-memory object
store (Ray's default cut-off is 100 KiB): fewer round trips per hop (bench/serve_hops.py). The compose file and the
RayService manifests set the same with the RAY_max_direct_call_object_size environment variable on every Ray node."""


class ServeStartError(RuntimeError):
    """An application did not reach RUNNING; the message carries Ray's reason."""


@dataclass(frozen=True)
class LocalServe:
    """Where a local stack listens."""

    http_host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def as_dict(self) -> dict[str, Any]:
        return {"http_url": self.http_url, "grpc_address": self.grpc_address, "metrics_url": self.metrics_url}


def port_is_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno in (97, 99):  # no IPv6 here: IPv4 decides
                    continue
                return False
    return True


def free_port(exclude: set[int] | None = None) -> int:
    """A free TCP port outside Ray's reserved range, chosen by the kernel."""
    exclude = exclude or set()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_RESERVED and port not in exclude and port_is_free(port):
            return port
    raise RuntimeError("no free port found outside Ray's reserved range 10002-19999")


def start(settings: Settings, config, *, http_port: int | None = None, grpc_port: int | None = None,
          metrics_port: int | None = None, num_cpus: int | None = None, extra_targets: list | None = None,
          system_config: dict[str, Any] | None = None, timeout_s: float = 300.0, wait: bool = True) -> LocalServe:
    """Start Ray + Serve in this process and deploy ``config``'s applications (built here with ``settings``).

    Ports default to the config's, ``metrics_port`` to a free one. With ``wait`` returns once every application
    is RUNNING (or raises :class:`ServeStartError`); otherwise call :func:`wait_running` later.
    """
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.app import GRPC_SERVICERS, applications_from_config

    http_host = config.http_options.host or "127.0.0.1"
    http_port = http_port or config.http_options.port
    grpc_port = grpc_port or config.grpc_options.port
    metrics_port = metrics_port or free_port({http_port, grpc_port})
    for name, port in (("HTTP", http_port), ("gRPC", grpc_port), ("metrics", metrics_port)):
        if port in RAY_RESERVED:
            raise ValueError(f"{name} port {port} is in Ray's reserved worker range 10002-19999; choose another")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[PROXY_MESSAGE_SIZE_ENV] = str(Limits.from_settings(settings).grpc_message_bytes)
    # Ray's processes (and the workers its raylet starts later) inherit the environment ray.init sees; the spin count
    # is set for them only, not left in this process's environment for whatever it starts next
    spin_was_set = "GOMP_SPINCOUNT" in os.environ
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
                 _metrics_export_port=metrics_port, namespace="serve", log_to_driver=True,
                 _system_config={**SYSTEM_CONFIG, **(system_config or {})})
    finally:
        if not spin_was_set:
            del os.environ["GOMP_SPINCOUNT"]
    serve.start(http_options=HTTPOptions(host=http_host, port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    targets = applications_from_config(config, settings) + list(extra_targets or [])
    serve.run_many(targets, wait_for_applications_running=False)
    if wait:
        wait_running([t.name for t in targets], timeout_s)
    return LocalServe(http_host, http_port, grpc_port, metrics_port)


def wait_running(names: list[str] | None = None, timeout_s: float = 300.0) -> None:
    """Block until every named application (default: all) is RUNNING; ServeStartError on a failure or timeout."""
    from ray import serve

    names = list(names or serve.status().applications)
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise ServeStartError("; ".join(f"{n}: {m}" for n, m in failed.items()))
        if all(n in apps and apps[n].status == "RUNNING" for n in names):
            return
        if time.monotonic() > deadline:
            states = {n: (apps[n].status if n in apps else "missing") for n in names}
            raise ServeStartError(f"applications not running after {timeout_s:g}s: {states}")
        time.sleep(0.5)


def stop() -> None:
    """Shut Serve and Ray down (what this process started)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
