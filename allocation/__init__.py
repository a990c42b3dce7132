"""allocation: sparse autoencoder activations as constrained allocation problems."""

from .constraints import Constraints
from .errors import AllocationError, InfeasibleError, NotGreedyExactError, SolverError
from .exact import Allocation, solve

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "AllocationError",
    "Constraints",
    "InfeasibleError",
    "NotGreedyExactError",
    "SolverError",
    "solve",
]
