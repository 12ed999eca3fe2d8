"""Small inputs and specs for one job of each type, written the same into any bucket, so that a job run in one
bucket (disturbed) and in another (undisturbed) can be compared file by file.

Each :class:`Case` names its spec, the inputs it reads, and which published artifacts it produces; the comparison
leaves out only what describes the run rather than its result (the job's id, where it resumed, how long it took).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

BACKBONE = "dinov2:vit_small_patch14_dinov2/random-init"
OPTIONS = {"image_size": 56}
"""A random-weight ViT-S/14 at 56 px (a 4 x 4 patch grid): cheap forward passes."""
D = 16
"""Width of the synthetic shard set the ``train`` and ``analyze`` jobs read."""

VOLATILE_FIELDS = {"job_id", "resumed_from", "shards_recorded", "output", "seconds", "created_at", "committed_at"}
"""JSON fields that describe the run rather than its result (left out of the comparison, at any depth), besides
durations and rates (names ending in ``_s`` or ``_seconds``)."""


@dataclass(frozen=True)
class Case:
    """One job type's fault-test job."""

    type: str
    spec: dict[str, Any]
    outputs: Callable[[dict[str, Any]], list[str]]
    """The artifact prefixes a result names."""
    volatile_files: tuple[str, ...] = ()
    """JSON files (in the artifacts) compared without :data:`VOLATILE_FIELDS` rather than byte for byte."""
    needs: tuple[str, ...] = ()
    """Inputs to write first: ``shards``, ``small_sae``, ``vit_sae``, ``probe``."""


CASES = {
    "record": Case(
        "record",
        {"dataset": "bundled-lfw", "backbone": BACKBONE, "backbone_options": OPTIONS, "layers": [1, 3],
         "tokens": "patches", "batch_size": 4, "images_per_shard": 4, "max_images": 32},
        lambda r: [f"activations/{r['acts_id']}"],
    ),
    "train": Case(
        "train",
        {"acts_id": "", "layer": 3, "d_sae": 64, "steps": 300, "batch_size": 64, "variant": "topk", "k": 4,
         "lr": 2e-3, "warmup_steps": 10, "log_every": 25, "checkpoint_every": 20, "device": "cpu"},
        lambda r: [f"saes/{i}" for i in r["sae_ids"]],
        volatile_files=("train.json",),
        needs=("shards",),
    ),
    "analyze": Case(
        "analyze",
        {"sae_id": "small-sae", "acts_id": "", "top_k": 6, "reverse_n": 5, "batch_rows": 2, "tiles": False,
         "checkpoint_seconds": 0, "device": "cpu"},
        lambda r: [r["prefix"]],
        volatile_files=("analysis.json",),
        needs=("shards", "small_sae"),
    ),
    "train-head": Case(
        "train-head",
        {"kind": "probe", "dataset": "bundled-lfw", "backbone": BACKBONE, "backbone_options": OPTIONS,
         "max_images": 96, "feature_batch_size": 4, "epochs": 20, "checkpoint_seconds": 0, "device": "cpu"},
        lambda r: [f"heads/{r['head_id']}"],
        volatile_files=("train.json",),
    ),
    "experiment": Case(
        "experiment",
        {"sae_id": "vit-sae", "head_id": "vit-probe", "dataset": "bundled-lfw", "classes": ["face", "non-face"],
         "images": [70, 110], "batch_size": 4, "max_frequency": 0.5, "checkpoint_seconds": 0, "device": "cpu"},
        lambda r: [r["output"]],
        volatile_files=("experiment.json",),
        needs=("vit_sae", "probe"),
    ),
}


# ------------------------------------------------------------------------------------------------ inputs


class Inputs:
    """Builds the input artifacts once (in this process) and writes them into any store."""

    def __init__(self):
        self._files: dict[str, dict[str, bytes]] = {}
        self.acts_id = ""

    def spec(self, case: Case) -> dict[str, Any]:
        spec = dict(case.spec)
        if "acts_id" in spec:
            spec["acts_id"] = self.acts_id
        return spec

    def write(self, store, case: Case) -> None:
        """Write what ``case`` reads into ``store`` (the same bytes into every store)."""
        for need in case.needs:
            for prefix, files in self._build(need).items():
                if store.is_complete(prefix):
                    continue
                writer = store.artifact(prefix)
                for name, data in files.items():
                    writer.put_bytes(name, data)
                writer.commit()

    def _build(self, need: str) -> dict[str, dict[str, bytes]]:
        if need not in self._files:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._files[need] = getattr(self, f"_{need}")()
            finally:
                torch.set_num_threads(before)
        return self._files[need]

    @staticmethod
    def _capture(write: Callable[[Any], None]) -> dict[str, dict[str, bytes]]:
        """The artifacts ``write(store)`` commits, as {prefix: {name: bytes}} (manifests left out)."""
        import tempfile

        from sae_shared.storage import FileStore

        with tempfile.TemporaryDirectory(prefix="saev-inputs-") as tmp:
            store = FileStore(tmp)
            write(store)
            out: dict[str, dict[str, bytes]] = {}
            for key in store.list(""):
                if key.endswith("/_manifest.json"):
                    prefix = key.rsplit("/", 1)[0]
                    out[prefix] = {name: store.get_bytes(f"{prefix}/{name}")
                                   for name in store.read_manifest(prefix)["files"]}
            return out

    def _shards(self) -> dict[str, dict[str, bytes]]:
        """Planted-dictionary activations: d_model 16, 1 CLS + 16 patch tokens, layers 3 and 5, 160 rows."""
        from sae_shared.shards import ShardSetMetadata, ShardSetWriter, TokenLayout, compute_acts_id

        layout = TokenLayout(n_tokens=17, cls_index=0, register_indices=(), patch_start=1, patch_grid=(4, 4))
        n_rows, layers = 160, (3, 5)
        g = torch.Generator().manual_seed(0)
        atoms = torch.randn(24, D, generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        n = n_rows * len(layers) * layout.n_tokens
        codes = torch.zeros(n, 24)
        idx = torch.rand(n, 24, generator=g).topk(3, dim=1).indices
        codes.scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
        acts = (codes @ atoms + 0.02 * torch.randn(n, D, generator=g) + 2.0).reshape(n_rows, len(layers), -1, D)
        aug = {"seed": 0, "views_per_image": 1}
        meta = ShardSetMetadata(
            acts_id=compute_acts_id(dataset_id="planted", dataset_hash="h", backbone_id="fake:vit", layers=layers,
                                    tokens="all", dtype="float32", augmentation=aug),
            backbone_id="fake:vit", layers=layers, tokens="all", token_layout=layout, d_model=D, dtype="float32",
            n_rows=n_rows, rows_per_shard=32, dataset_id="planted", dataset_hash="h", augmentation=aug,
        )
        self.acts_id = meta.acts_id

        def write(store):
            writer = ShardSetWriter(store, meta)
            for s in range(meta.n_shards):
                rows = meta.shard_rows(s)
                writer.write_shard(s, acts[rows.start:rows.stop].contiguous(),
                                   [{"image_index": i, "image_id": f"img{i}", "label": 0, "view": None} for i in rows])
            writer.commit()

        return self._capture(write)

    def _small_sae(self) -> dict[str, dict[str, bytes]]:
        """A ReLU SAE on the synthetic set's layer 3 patches, with statistics."""
        from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats, save_sae

        sae = SparseAutoencoder(SAEConfig(d_model=D, d_sae=48, variant=Relu(), seed=1),
                                contract=Contract(backbone_id="fake:vit", layer=3, tokens="patches"))
        with torch.no_grad():
            sae.b_enc.copy_(torch.linspace(-0.5, -4.0, 48))
        compute_stats(sae, torch.randn(512, D, generator=torch.Generator().manual_seed(2)) + 2.0, source="test")
        return self._capture(lambda store: save_sae(sae, "saes/small-sae", store=store))

    def _backbone(self):
        from sae_shared.recording import parse_backbone

        return parse_backbone(BACKBONE, **OPTIONS).load(device="cpu")

    def _vit_sae(self) -> dict[str, dict[str, bytes]]:
        """A random TopK SAE on the ViT's layer-5 patch tokens, normalised and with statistics on 24 images."""
        from sae_shared.datasets import open_dataset
        from sae_shared.sae import Contract, SAEConfig, SparseAutoencoder, TopK, compute_stats, save_sae

        backbone = self._backbone()
        ds = open_dataset("bundled-lfw")
        with torch.inference_mode():
            resid = backbone.forward_to(backbone.preprocess_batch([ds.load_image(i) for i in range(0, 200, 8)]), 5)
        acts = resid[:, backbone.layout.n_prefix_tokens:].reshape(-1, backbone.layout.d_model).clone()
        sae = SparseAutoencoder(SAEConfig(backbone.layout.d_model, 128, TopK(k=8, k_aux=0), seed=1),
                                contract=Contract(backbone.id, 5, "patches"))
        mean = acts.mean(0)
        sae.set_normalisation(mean, float(((acts - mean) ** 2).sum(1).mean().sqrt() / acts.shape[1] ** 0.5))
        sae.eval()
        compute_stats(sae, acts, source="test")
        return self._capture(lambda store: save_sae(sae, "saes/vit-sae", store=store))

    def _probe(self) -> dict[str, dict[str, bytes]]:
        """A face / non-face probe on the ViT's pooled features of 50 images."""
        from sae_shared.datasets import open_dataset
        from sae_shared.heads import HeadContract, HeadTrainConfig, save_head, train_probe

        backbone = self._backbone()
        ds = open_dataset("bundled-lfw")
        idx = list(range(0, 200, 4))
        with torch.inference_mode():
            pooled = backbone.pool(backbone.forward(backbone.preprocess_batch([ds.load_image(i) for i in idx])))
        probe = train_probe(pooled.float(), torch.tensor([ds.sample(i).label for i in idx]), classes=ds.classes,
                            contract=HeadContract.for_backbone(backbone, "pooled"),
                            config=HeadTrainConfig(epochs=10, heldout_fraction=0)).head
        return self._capture(lambda store: save_head(probe, "heads/vit-probe", store=store))


# ------------------------------------------------------------------------------------------------ comparing


def strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_volatile(v) for k, v in value.items()
                if k not in VOLATILE_FIELDS and not k.endswith(("_s", "_seconds"))}
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def safetensors_contents(data: bytes) -> dict[str, Any]:
    """A safetensors file's metadata and, per tensor, dtype, shape and the sha256 of its bytes: what it holds,
    whatever the order of its header's keys (safetensors writes the metadata from a hash map, in an order that
    changes from one process to the next, so the same tensors need not give the same file bytes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out: dict[str, Any] = {"__metadata__": header.pop("__metadata__", None)}
    for name, info in sorted(header.items()):
        start, stop = info["data_offsets"]
        out[name] = (info["dtype"], info["shape"], hashlib.sha256(body[start:stop]).hexdigest())
    return out


def artifact_contents(store, prefix: str, case: Case) -> dict[str, Any]:
    """What an artifact holds, for comparison: each file's sha256 (a safetensors file: its metadata and its tensors'
    bytes); for the case's volatile files, their JSON without the volatile fields."""
    manifest = store.read_manifest(prefix)
    out: dict[str, Any] = {}
    for name, meta in manifest["files"].items():
        data = store.get_bytes(f"{prefix}/{name}") if name.endswith(".safetensors") or name in case.volatile_files \
            else None
        if name in case.volatile_files:
            out[name] = strip_volatile(json.loads(data))
        else:
            out[name] = safetensors_contents(data) if data is not None else meta["sha256"]
    return out
