"""Sparse autoencoders whose activation is an allocation rule: TopK, Feature Choice, Mutual Choice.

from allocation.sae import SparseAutoencoder, TopK, FeatureChoice, MutualChoice, TrainConfig, Trainer
sae = SparseAutoencoder(d_in=384, n_features=4096, rule=MutualChoice(k=32))
summary = Trainer(TrainConfig(rule="mutual-choice", k=32, aux="zipf"), "synthetic").run()
"""

from .calibration import calibrate_thresholds, calibrated_copy
from .checkpoint import CheckpointError, load_checkpoint, load_sae, save_sae
from .data import ActivationSource, ArraySource, load_activations
from .downstream import downstream_fidelity, evaluate_downstream
from .hf import hf_activations
from .losses import aux_k_loss, aux_zipf_loss, fvu, mse_loss, normalized_mse, zipf_targets
from .metrics import FeatureUsage, evaluate
from .minilm import minilm_activations
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
from .rundir import RunDirectoryError
from .saelens import export_saelens
from .sparse import SparseCode, decode_dense, decode_sparse
from .synthetic import SyntheticSource, feature_recovery
from .train import (
    StepResult,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    TrainingExplodedWarning,
    train,
)

__all__ = [
    "ActivationSource",
    "ArraySource",
    "CheckpointError",
    "FeatureChoice",
    "FeatureUsage",
    "MutualChoice",
    "RunDirectoryError",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "StepResult",
    "SyntheticSource",
    "TopK",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "TrainingExplodedWarning",
    "aux_k_loss",
    "calibrate_thresholds",
    "calibrated_copy",
    "aux_zipf_loss",
    "decode_dense",
    "decode_sparse",
    "default_learning_rate",
    "downstream_fidelity",
    "evaluate",
    "evaluate_downstream",
    "export_saelens",
    "feature_recovery",
    "fvu",
    "geometric_median",
    "hf_activations",
    "load_activations",
    "load_checkpoint",
    "load_sae",
    "make_rule",
    "minilm_activations",
    "mse_loss",
    "normalized_mse",
    "save_sae",
    "train",
    "zipf_targets",
]
