"""allocation: sparse autoencoder activations as constrained allocation problems.

An SAE encoder gives an (n_tokens, n_features) score matrix S; its sparse activation picks a 0/1
mask M maximising <S, M> under per-token caps, per-feature caps and a total budget. ``solve`` finds
the exact optimum (with dual prices); ``topk``, ``feature_choice``, ``mutual_choice`` and
``allocate`` are the fast PyTorch rules that reach it.
"""

from .constraints import Constraints
from .errors import AllocationError, InfeasibleError, SolverError
from .exact import Allocation, solve
from .exact_torch import CertificateWarning, solve_mixed
from .rules import (
    activations,
    allocate,
    allocate_activations,
    feature_choice,
    feature_choice_activations,
    mutual_choice,
    mutual_choice_activations,
    topk,
    topk_activations,
)
from .verification import VerificationReport, verify

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "AllocationError",
    "CertificateWarning",
    "Constraints",
    "InfeasibleError",
    "SolverError",
    "VerificationReport",
    "activations",
    "allocate",
    "allocate_activations",
    "feature_choice",
    "feature_choice_activations",
    "mutual_choice",
    "mutual_choice_activations",
    "solve",
    "solve_mixed",
    "topk",
    "topk_activations",
    "verify",
]
