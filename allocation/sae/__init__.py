"""Sparse autoencoders whose activation is an allocation rule: TopK, Feature Choice, Mutual Choice.

    from allocation.sae import SparseAutoencoder, TopK, FeatureChoice, MutualChoice
    sae = SparseAutoencoder(d_in=384, n_features=4096, rule=MutualChoice(k=32))
"""

from .losses import aux_k_loss, aux_zipf_loss, fvu, mse_loss, zipf_targets
from .metrics import FeatureUsage, evaluate
from .model import (
    FeatureChoice,
    MutualChoice,
    SAEOutput,
    SparseAutoencoder,
    TopK,
    default_learning_rate,
    geometric_median,
    make_rule,
)
from .sparse import SparseCode, decode_dense, decode_sparse

__all__ = [
    "FeatureChoice",
    "FeatureUsage",
    "MutualChoice",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "TopK",
    "aux_k_loss",
    "aux_zipf_loss",
    "decode_dense",
    "decode_sparse",
    "default_learning_rate",
    "evaluate",
    "fvu",
    "geometric_median",
    "make_rule",
    "mse_loss",
    "zipf_targets",
]
