"""The sparse autoencoder: encoder, an allocation rule, a unit-norm decoder.

    pre   = (x - b_dec) @ W_enc + b_enc                  (n, F) affinities
    f     = pre * M,  M = allocate(pre, rule.constraints(n, F))   (only positive entries are kept)
    x_hat = f @ W_dec + b_dec                            rows of W_dec have unit norm

A rule (``allocation.sae.rules``) only declares the caps of the allocation LP; the greedy paths and
the certified auction behind ``allocation.allocate`` find the exact mask. Rules whose mask depends
on the batch (a budget, per-feature caps) are priced by the ``ThresholdEstimator``
(``allocation.sae.thresholds``); in ``eval()`` their code uses the learnt thresholds, so a token's
code never depends on its batch mates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .._masks import count_selected
from .._selection import ColumnFrontier
from .._validate import all_finite, positive_int, positive_number
from ..constraints import Constraints
from ..errors import AllocationError
from . import rules, thresholds
from .distributed import LOCAL
from .encoder import affinities
from .rules import Custom, FeatureChoice, MutualChoice, TopK, make_rule, rule_from_dict
from .sparse import SparseCode, decode_dense, decode_sparse
from .thresholds import ITERATE_AVERAGING, ThresholdEstimator

__all__ = [
    "ENCODER_INIT_SCALE", "ITERATE_AVERAGING", "RULE_NAMES", "Custom", "FeatureChoice", "MutualChoice",
    "NonFiniteAffinitiesError", "Rule", "SAEOutput", "SparseAutoencoder", "TopK", "check_activations",
    "default_learning_rate", "geometric_median", "make_rule", "rule_from_dict",
]

Rule = rules.Rule
RULE_NAMES = rules.rule_names()  # the built-in rules; rules.rule_names() also lists registered ones

# ------------------------------------------------------------------------------------- helpers


ENCODER_INIT_SCALE = 1.0 / math.sqrt(3.0)
"""W_enc = c W_dec^T at init, c = 1/sqrt(3): the column norm of nn.Linear's default init (sparsify's
encoder). Under Adam a smaller encoder moves faster relative to its size; measured on MiniLM
(benchmarks/results/ablation_*.json) it lowered held-out FVU against c = 1."""


class NonFiniteAffinitiesError(AllocationError):
    """Finite activations gave NaN or inf affinities: the SAE's weights have diverged."""


def check_activations(x, d_in: int, name: str = "activations") -> Tensor:
    """``x`` as an (n, d_in) float tensor, or AllocationError naming the problem."""
    if not isinstance(x, Tensor):
        raise AllocationError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise AllocationError(f"{name} must be floating point, got {x.dtype}; call .float() first")
    if x.ndim < 2 or x.shape[-1] != d_in:
        raise AllocationError(
            f"{name} must have shape (n_tokens, d_in={d_in}), got {tuple(x.shape)}; "
            "the SAE's d_in must match the activations' last dimension"
        )
    x = x.reshape(-1, d_in)
    if x.shape[0] == 0:
        raise AllocationError(f"{name} is empty: pass at least one token")
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise AllocationError(
            f"{name} contain NaN or inf in {bad} of {x.shape[0]} tokens; "
            "clean or drop those tokens before training"
        )
    return x


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 200, tol: float = 1e-7) -> Tensor:
    """argmin_y sum_i ||p_i - y|| by Weiszfeld's iterations (float64 internally)."""
    pts = points.detach().to(torch.float64).reshape(-1, points.shape[-1])
    guess = pts.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (pts - guess).norm(dim=1).clamp_min(1e-12)
        update = (weights[:, None] * pts).sum(dim=0) / weights.sum()
        moved = float((update - guess).norm())
        guess = update
        if moved <= tol * (1.0 + float(guess.norm())):
            break
    return guess.to(points.dtype)


# --------------------------------------------------------------------------------------- model


@dataclass
class SAEOutput:
    """One forward pass: reconstruction, affinities, the kept mask and its sparse code."""

    x_hat: Tensor  # (n, d_in)
    pre: Tensor  # (n, F) affinities before selection
    mask: Tensor  # (n, F) bool, kept entries
    code: Optional[SparseCode] = None  # kept entries as (token, feature, value), when decoded sparsely
    prices: Optional[Tensor] = None  # mixed caps: the auction's certified eval prices b_j + lambda (F,)
    frontier: Optional[ColumnFrontier] = None  # per-feature caps: the selection's candidates (prices them)

    @property
    def l0(self) -> Tensor:
        """Kept entries per token (n,) (from the sparse code when there is one: no pass over the mask)."""
        return self.code.counts if self.code is not None else count_selected(self.mask, dim=1)

    @property
    def fired(self) -> Tensor:
        """Kept entries per feature (F,)."""
        if self.code is not None:
            return torch.bincount(self.code.feature_index, minlength=self.mask.shape[1])
        return count_selected(self.mask, dim=0)


class SparseAutoencoder(nn.Module):
    """SAE with an allocation rule; ``decode`` is 'sparse', 'dense' or 'auto' (sparse when it pays).

    ``rule``: any rule of ``allocation.sae.rules`` (a provider of ``Constraints``). Its caps decide
    the pricing (``allocation.sae.thresholds``): ``thresholds`` (a ``ThresholdEstimator``) holds the
    running dual prices that eval() uses for batch rules; TopK has none.
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        rule: rules.Rule,
        *,
        decode: str = "auto",
        threshold_decay: float = 0.99,
        threshold_correction: float = 0.05,
        encoder_init_scale: float = ENCODER_INIT_SCALE,
        seed: Optional[int] = 0,
    ) -> None:
        super().__init__()
        d_in = positive_int(d_in, "d_in")
        n_features = positive_int(n_features, "n_features")
        if not (callable(getattr(rule, "constraints", None)) and hasattr(rule, "to_dict")):
            raise AllocationError(
                "rule must be an allocation.sae rule (TopK, FeatureChoice, MutualChoice, Custom or a "
                f"registered Rule subclass), got {type(rule).__name__}"
            )
        rule.validate(n_features)
        if decode not in ("auto", "sparse", "dense"):
            raise AllocationError(f"decode must be 'auto', 'sparse' or 'dense', got {decode!r}")
        positive_number(encoder_init_scale, "encoder_init_scale")
        self.thresholds = ThresholdEstimator(n_features, threshold_decay, threshold_correction)
        self.d_in, self.n_features, self.rule = d_in, n_features, rule
        self.pricing = thresholds.pricing(rule.constraints(1, n_features))
        self._constraints_for: tuple = (None, None)  # (n_tokens, Constraints) of the last batch size
        self.decode_mode = decode
        self.sparse_backward = True  # encoder gradients from the kept entries only (see .encoder)
        self.scope = LOCAL  # the batch training allocates over (allocation.sae.distributed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(n_features, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (F, d_in), unit rows
        # (d_in, F) = c W_dec^T at init, row-major like its Adam state (a transposed view gave the
        # parameter and its loaded optimiser state different strides, which fused Adam mis-steps)
        self.W_enc = nn.Parameter((W_dec.t() * float(encoder_init_scale)).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._register_load_state_dict_pre_hook(_rename_legacy_threshold_buffers)

    @property
    def threshold_decay(self) -> float:
        return self.thresholds.decay

    @property
    def threshold_correction(self) -> float:
        return self.thresholds.correction

    @property
    def batch_dependent(self) -> bool:
        """Whether training selection depends on the batch (then eval uses the learnt thresholds)."""
        return self.pricing != "none"

    def constraints(self, n_tokens: int) -> Constraints:
        """The rule's constraints for a batch of ``n_tokens`` (cached for the last batch size)."""
        cached_n, cached = self._constraints_for
        if cached_n != n_tokens:
            cached = self.rule.constraints(n_tokens, self.n_features)
            self._constraints_for = (n_tokens, cached)
        return cached

    def budget(self, n_tokens: int) -> int:
        """Most entries a batch of ``n_tokens`` keeps in training (``rules.budget_of`` its constraints)."""
        return rules.budget_of(self.constraints(n_tokens), n_tokens, self.n_features)

    # ---- configuration
    def config(self) -> dict:
        return {
            "d_in": self.d_in,
            "n_features": self.n_features,
            "rule": self.rule.to_dict(),
            "decode": self.decode_mode,
            "threshold_decay": self.threshold_decay,
            "threshold_correction": self.threshold_correction,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> "SparseAutoencoder":
        return cls(
            cfg["d_in"],
            cfg["n_features"],
            rule_from_dict(cfg["rule"]),
            decode=cfg.get("decode", "auto"),
            threshold_decay=cfg.get("threshold_decay", 0.99),
            threshold_correction=cfg.get("threshold_correction", 0.05),
            seed=None,
        )

    # ---- initialisation and decoder geometry
    @torch.no_grad()
    def initialize_b_dec(self, sample: Tensor) -> None:
        """b_dec = geometric median of a data sample (n, d_in)."""
        sample = check_activations(sample, self.d_in, "sample")
        self.b_dec.copy_(geometric_median(sample).to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder(self) -> Tensor:
        """Rescale every decoder row to unit norm; returns the rows' norms before (F,)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec /= norms.clamp_min(1e-12)
        return norms.reshape(-1)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """g_j <- g_j - (g_j . w_j) w_j for each decoder row w_j (keeps the step tangent to the sphere)."""
        if self.W_dec.grad is not None:
            grad, rows = self.W_dec.grad, self.W_dec
            grad -= (grad * rows).sum(dim=1, keepdim=True) * rows

    # ---- thresholds (dual prices) for batch-independent inference
    @property
    def threshold(self) -> Tensor:
        """Running dual prices (F,): moving average of batch prices plus the count-matching correction."""
        return self.thresholds.value(self.W_enc.dtype, self.W_enc.device)

    @torch.no_grad()
    def batch_threshold(self, pre: Tensor, mask: Tensor, code: Optional[SparseCode] = None,
                        prices: Optional[Tensor] = None, frontier: Optional[ColumnFrontier] = None) -> Optional[Tensor]:
        """This batch's dual prices (F,), or None for rules without batch dependence (TopK).

        A price lies between the smallest kept and the largest dropped score of its slice (the
        whole matrix for a budget, a column for per-feature caps); we take the midpoint, with the
        dropped side clipped at 0 (only positive scores are ever kept) and price 0 for a feature
        whose capacity was not used up (a slack constraint has a zero dual). Mixed caps take the
        auction's certified prices b_j + lambda (``prices``, from the forward pass; solved here if absent).

        ``code``: the kept entries of ``mask`` as the forward pass built them (built here from
        ``mask`` when absent); the kept side is read from its nnz values, not from the (n, F) matrix.
        ``frontier``: the selection's candidates (``SAEOutput.frontier``), which hold the dropped side.
        """
        if self.pricing == "none":
            return None
        if code is None:
            code = SparseCode.from_mask(pre, mask)
        return thresholds.batch_prices(pre, mask, code.feature_index, code.values.detach(),
                                       self.constraints(self.scope.n_tokens(pre.shape[0])), self.pricing, prices,
                                       self.scope, frontier)

    @torch.no_grad()
    def set_thresholds(self, values: Tensor) -> None:
        """Replace the running eval thresholds by ``values`` (F,) (e.g. calibrated ones)."""
        self.thresholds.set(values)

    @torch.no_grad()
    def update_thresholds(self, pre: Tensor, mask: Tensor, code: Optional[SparseCode] = None,
                          prices: Optional[Tensor] = None, frontier: Optional[ColumnFrontier] = None) -> None:
        """Fold this batch's dual prices into the running estimate (``ThresholdEstimator.update``).

        ``code``, ``prices``, ``frontier``: as in ``batch_threshold`` (from this batch's forward pass).
        """
        price = self.batch_threshold(pre, mask, code, prices, frontier)
        if price is None:
            return
        kept = None
        if self.pricing == "auction":  # the training mask's column counts, over the scope's batch
            kept = self.scope.sum(torch.bincount(code.feature_index, minlength=self.n_features) if code is not None
                                  else mask.sum(dim=0))
        self.thresholds.update(pre, price, self.constraints(self.scope.n_tokens(pre.shape[0])), self.pricing, kept,
                               self.scope, frontier)


    # ---- forward
    def pre_activations(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc for x (n, d_in); validates shape and finiteness."""
        x = check_activations(x, self.d_in)
        return affinities(x, self.b_dec, self.W_enc, self.b_enc, sparse_backward=self.sparse_backward)

    def select(self, pre: Tensor) -> Tensor:
        """Kept mask (n, F): the rule in training mode; thresholds (or TopK) in eval mode."""
        return self._select(pre).mask

    def _select(self, pre: Tensor) -> thresholds.Selection:
        """The mask (and the auction's prices): the one finite check of the (n, F) affinities per step."""
        if not all_finite(pre):
            raise NonFiniteAffinitiesError(
                "the encoder produced NaN or inf affinities from finite activations: the SAE's weights "
                "have diverged (check W_enc, b_enc, b_dec)"
            )
        if self.training:
            constraints = self.constraints(self.scope.n_tokens(pre.shape[0]))
            counted = self.pricing in ("feature", "budget")  # the frontier's floor reaches the count correction's
            reach = self.thresholds.count_point(pre.dtype, pre.device) if counted else None
            return thresholds.select(pre, constraints, self.pricing, self.scope, reach)
        constraints = self.constraints(pre.shape[0])
        return thresholds.Selection(thresholds.eval_select(pre, constraints, self.pricing, self.threshold))

    def uses_sparse_decode(self, nnz: int, n_tokens: int) -> bool:
        """'auto': decode sparsely when at most 1/8 of the (n, F) entries are kept."""
        if self.decode_mode != "auto":
            return self.decode_mode == "sparse"
        return nnz * 8 <= n_tokens * self.n_features

    def decode_code(self, code: SparseCode, *, bias: bool = True) -> Tensor:
        """x_hat (n, d_in) from a sparse code (dense or sparse path as configured)."""
        b_dec = self.b_dec if bias else None
        if self.uses_sparse_decode(code.nnz, code.n_tokens):
            return decode_sparse(code, self.W_dec, b_dec)
        return decode_dense(code.to_dense(), self.W_dec, b_dec)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_activations(x)
        selection = self._select(pre)
        mask = selection.mask
        if self.uses_sparse_decode(int(count_selected(mask)), pre.shape[0]):
            code = SparseCode.from_mask(pre, mask)
            return SAEOutput(decode_sparse(code, self.W_dec, self.b_dec), pre, mask, code, selection.prices,
                             selection.frontier)
        dense = torch.where(mask, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        return SAEOutput(decode_dense(dense, self.W_dec, self.b_dec), pre, mask, prices=selection.prices,
                         frontier=selection.frontier)

    def encode(self, x: Tensor) -> Tensor:
        """Dense activations f (n, F): the kept affinities, zeros elsewhere."""
        pre = self.pre_activations(x)
        mask = self.select(pre)
        return torch.where(mask, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))

    def decode(self, activations: Tensor) -> Tensor:
        """x_hat = f @ W_dec + b_dec for dense activations f (n, F)."""
        return decode_dense(activations, self.W_dec, self.b_dec)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.forward(x).x_hat

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_features={self.n_features}, rule={self.rule}, decode={self.decode_mode}"


LEGACY_THRESHOLD_BUFFERS = {
    "threshold_sum": "thresholds.sum",
    "threshold_weight": "thresholds.weight",
    "threshold_offset": "thresholds.offset",
    "threshold_iterate": "thresholds.iterate",
}
"""State-dict names of the threshold buffers before they moved into ``ThresholdEstimator``."""


def _rename_legacy_threshold_buffers(state_dict, prefix, *args) -> None:
    """Load hook: a state dict saved with the old buffer names loads into ``thresholds``."""
    for old, new in LEGACY_THRESHOLD_BUFFERS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def default_learning_rate(n_features: int) -> float:
    """Adam lr scaled with width: 2e-4 / sqrt(n_features / 2**14) (Gao et al. 2024's rule)."""
    return 2e-4 / math.sqrt(n_features / 2**14)
