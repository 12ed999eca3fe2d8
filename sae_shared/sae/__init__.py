"""Sparse autoencoders: model, training, evaluation and per-latent statistics, formats and interop.

Stable entry points (docs/api.md)::

    from sae_shared.sae import SparseAutoencoder, load_sae, save_sae, train_sae
    from sae_shared.sae.interop import import_saev, import_saelens, export_saelens

Needs only torch and safetensors.
"""

from sae_shared.sae.config import (
    BatchTopK,
    Contract,
    JumpReLU,
    Matryoshka,
    Relu,
    SAEConfig,
    SweepMember,
    TopK,
    TrainConfig,
    Variant,
)
from sae_shared.sae import interop
from sae_shared.sae.io import InvalidSAEFile, load_sae, save_sae
from sae_shared.sae.modeling import (
    ContractMismatch,
    ForwardOutput,
    MissingStatistics,
    Normalisation,
    SparseAutoencoder,
    SparseCodes,
)
from sae_shared.sae.stats import EvalMetrics, LatentStats, compute_stats
from sae_shared.sae.training import TrainMetrics, TrainResult, Trainer, train_sae

__all__ = [
    "BatchTopK",
    "Contract",
    "ContractMismatch",
    "EvalMetrics",
    "ForwardOutput",
    "InvalidSAEFile",
    "JumpReLU",
    "LatentStats",
    "Matryoshka",
    "MissingStatistics",
    "Normalisation",
    "Relu",
    "SAEConfig",
    "SparseAutoencoder",
    "SparseCodes",
    "SweepMember",
    "TopK",
    "TrainConfig",
    "TrainMetrics",
    "TrainResult",
    "Trainer",
    "Variant",
    "compute_stats",
    "interop",
    "load_sae",
    "save_sae",
    "train_sae",
]
