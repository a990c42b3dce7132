"""Exact PyTorch solver for mixed caps: an epsilon-scaling auction with an LP-duality certificate.

``solve_mixed(scores, constraints)`` returns the optimal mask for per-token AND per-feature caps
(with or without a budget) on the scores' device, with prices a_i, b_j, lambda that certify it;
``allocation.allocate`` uses it whenever greedy selection is not exact.
"""

from .certificate import Certificate, check_certificate
from .solver import CertificateWarning, MixedSolution, solve_mixed

__all__ = ["Certificate", "CertificateWarning", "MixedSolution", "check_certificate", "solve_mixed"]
