"""The sparse autoencoder: encoder, an allocation rule, a unit-norm decoder.

    pre   = (x - b_dec) @ W_enc + b_enc                  (n, F) affinities
    f     = pre * M,  M = rule(pre)  (only positive entries are ever kept, so ReLU is implied)
    x_hat = f @ W_dec + b_dec                            rows of W_dec have unit norm

The rules are the package's greedy allocation rules (``allocation.topk``, ``feature_choice``,
``mutual_choice``). Feature Choice and Mutual Choice depend on the whole batch; during training the
model keeps running estimates of their dual prices (one threshold per feature, or one global
threshold) and in ``eval()`` selects ``pre_ij > threshold_j``, so a token's code never depends on
its batch mates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._masks import count_selected
from .._validate import all_finite
from ..errors import AllocationError
from ..rules import feature_choice, mutual_choice, topk
from .encoder import affinities
from .prices import budget_price, count_above_per_column, feature_prices
from .sparse import SparseCode, decode_dense, decode_sparse

# ----------------------------------------------------------------------------------------- rules


def _positive_int(value, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int,))
        and not (isinstance(value, float) and value.is_integer())
    ):
        raise AllocationError(f"{name} must be a positive integer, got {value!r}")
    if int(value) < 1:
        raise AllocationError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclass(frozen=True)
class _PerTokenBudget:
    """Shared by TopK and MutualChoice: k features per token on average, a budget of k n per batch."""

    k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _positive_int(self.k, "k"))

    def validate(self, n_features: int) -> None:
        if self.k > n_features:
            raise AllocationError(f"k={self.k} exceeds n_features={n_features}; choose k <= n_features")

    def budget(self, n_tokens: int, n_features: int) -> int:
        """Kept entries per batch of n_tokens (at most)."""
        return self.k * n_tokens

    def to_dict(self) -> dict:
        return {"name": self.name, "k": self.k}


@dataclass(frozen=True)
class TopK(_PerTokenBudget):
    """Each token keeps its k largest positive affinities: max <S,M> s.t. M 1 <= k."""

    name = "topk"
    batch_dependent = False

    def select(self, pre: Tensor) -> Tensor:
        return topk(pre, self.k)


@dataclass(frozen=True)
class FeatureChoice:
    """Feature j keeps its m_j best tokens per batch: max <S,M> s.t. M^T 1 <= m.

    Give exactly one of: ``k`` (capacities summing to k n per batch of n tokens, as even as
    integers allow, so the budget matches TopK(k)), ``m`` (the same capacity for every feature), or ``capacities``
    (one capacity per feature, per batch, e.g. Zipf-shaped).
    """

    k: Optional[int] = None
    m: Optional[int] = None
    capacities: Optional[Sequence[int]] = None
    name = "feature-choice"
    batch_dependent = True

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.k, self.m, self.capacities)]
        if sum(given) != 1:
            raise AllocationError(
                "FeatureChoice needs exactly one of k, m or capacities, "
                f"got k={self.k}, m={self.m}, capacities={'set' if given[2] else None}"
            )
        if self.k is not None:
            object.__setattr__(self, "k", _positive_int(self.k, "k"))
        if self.m is not None:
            object.__setattr__(self, "m", _positive_int(self.m, "m"))
        if self.capacities is not None:
            caps = torch.as_tensor(self.capacities).reshape(-1)
            if caps.is_floating_point() and not torch.equal(caps, caps.round()):
                raise AllocationError("capacities must hold integers")
            if bool((caps < 0).any()):
                raise AllocationError("capacities must be >= 0 everywhere")
            object.__setattr__(self, "capacities", tuple(int(c) for c in caps.tolist()))

    def validate(self, n_features: int) -> None:
        if self.k is not None and self.k > n_features:
            raise AllocationError(f"k={self.k} exceeds n_features={n_features}; choose k <= n_features")
        if self.capacities is not None and len(self.capacities) != n_features:
            raise AllocationError(
                f"capacities has {len(self.capacities)} entries but the SAE has "
                f"n_features={n_features}; pass one capacity per feature"
            )

    def capacity(self, n_tokens: int, n_features: int) -> Union[int, Tensor]:
        """Per-feature capacity for a batch of n_tokens: an int, or an int64 (F,) tensor.

        With ``k`` the capacities sum to exactly k n (TopK's budget): floor(k n / F) each, plus one
        for the first (k n mod F) features.
        """
        if self.k is not None:
            base, extra = divmod(self.k * n_tokens, n_features)
            if extra == 0:
                return base
            capacity = torch.full((n_features,), base, dtype=torch.int64)
            capacity[:extra] += 1
            return capacity
        if self.m is not None:
            return self.m
        return torch.tensor(self.capacities, dtype=torch.int64)

    def budget(self, n_tokens: int, n_features: int) -> int:
        cap = self.capacity(n_tokens, n_features)
        if isinstance(cap, Tensor):
            return int(cap.clamp(max=n_tokens).sum())
        return min(cap, n_tokens) * n_features

    def select(self, pre: Tensor) -> Tensor:
        return feature_choice(pre, self.capacity(*pre.shape))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "k": self.k,
            "m": self.m,
            "capacities": list(self.capacities) if self.capacities is not None else None,
        }


@dataclass(frozen=True)
class MutualChoice(_PerTokenBudget):
    """The k n largest positive affinities of the batch (BatchTopK): max <S,M> s.t. 1^T M 1 <= k n."""

    name = "mutual-choice"
    batch_dependent = True

    def select(self, pre: Tensor) -> Tensor:
        return mutual_choice(pre, self.k * pre.shape[0])


Rule = Union[TopK, FeatureChoice, MutualChoice]
RULE_NAMES = ("topk", "feature-choice", "mutual-choice")


def make_rule(name: str, k: Optional[int] = None, **options) -> Rule:
    """A rule from its CLI name: 'topk', 'feature-choice' or 'mutual-choice' (underscores allowed)."""
    key = str(name).lower().replace("_", "-")
    if key == "topk":
        return TopK(k)
    if key == "feature-choice":
        return FeatureChoice(k=k, **options) if k is not None or not options else FeatureChoice(**options)
    if key == "mutual-choice":
        return MutualChoice(k)
    raise AllocationError(f"rule must be one of {', '.join(RULE_NAMES)}, got {name!r}")


def rule_from_dict(data: dict) -> Rule:
    """Inverse of ``rule.to_dict()``."""
    name = data.get("name")
    if name == "feature-choice":
        return FeatureChoice(k=data.get("k"), m=data.get("m"), capacities=data.get("capacities"))
    return make_rule(name, data.get("k"))


# ------------------------------------------------------------------------------------- helpers


ENCODER_INIT_SCALE = 1.0 / math.sqrt(3.0)
"""W_enc = c W_dec^T at init, c = 1/sqrt(3): the column norm of nn.Linear's default init (sparsify's
encoder). Under Adam a smaller encoder moves faster relative to its size; measured on MiniLM
(benchmarks/results/ablation_*.json) it lowered held-out FVU against c = 1."""

ITERATE_AVERAGING = 0.95  # decay of the Polyak average of the threshold-correction iterates


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

    Buffers: ``threshold`` (F,) running dual prices used in eval() by Feature Choice (one per
    feature) and Mutual Choice (one global value, stored in every entry); TopK ignores them.
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        rule: Rule,
        *,
        decode: str = "auto",
        threshold_decay: float = 0.99,
        threshold_correction: float = 0.05,
        encoder_init_scale: float = ENCODER_INIT_SCALE,
        seed: Optional[int] = 0,
    ) -> None:
        super().__init__()
        d_in = _positive_int(d_in, "d_in")
        n_features = _positive_int(n_features, "n_features")
        if not isinstance(rule, (TopK, FeatureChoice, MutualChoice)):
            raise AllocationError(
                f"rule must be TopK, FeatureChoice or MutualChoice, got {type(rule).__name__}"
            )
        rule.validate(n_features)
        if decode not in ("auto", "sparse", "dense"):
            raise AllocationError(f"decode must be 'auto', 'sparse' or 'dense', got {decode!r}")
        if not 0.0 <= threshold_decay < 1.0:
            raise AllocationError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        if not (isinstance(encoder_init_scale, (int, float)) and 0 < encoder_init_scale < math.inf):
            raise AllocationError(f"encoder_init_scale must be a positive number, got {encoder_init_scale!r}")
        if not 0.0 <= threshold_correction <= 1.0:
            raise AllocationError(f"threshold_correction must be in [0, 1], got {threshold_correction}")
        self.threshold_correction = float(threshold_correction)
        self.d_in, self.n_features, self.rule = d_in, n_features, rule
        self.decode_mode, self.threshold_decay = decode, float(threshold_decay)
        self.sparse_backward = True  # encoder gradients from the kept entries only (see .encoder)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(n_features, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (F, d_in), unit rows
        # (d_in, F) = c W_dec^T at init, row-major like its Adam state (a transposed view gave the
        # parameter and its loaded optimiser state different strides, which fused Adam mis-steps)
        self.W_enc = nn.Parameter((W_dec.t() * float(encoder_init_scale)).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold_sum", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("threshold_weight", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_offset", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("threshold_iterate", torch.zeros(n_features, dtype=torch.float64))

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
        if float(self.threshold_weight) == 0.0:
            return torch.zeros(self.n_features, dtype=self.W_enc.dtype, device=self.W_enc.device)
        average = self.threshold_sum / self.threshold_weight
        return (average + self.threshold_offset).clamp_min(0).to(self.W_enc.dtype)

    @torch.no_grad()
    def batch_threshold(self, pre: Tensor, mask: Tensor, code: Optional[SparseCode] = None) -> Optional[Tensor]:
        """This batch's dual prices (F,), or None for TopK.

        A price lies between the smallest kept and the largest dropped score of its slice (the
        whole matrix for Mutual Choice, a column for Feature Choice); we take the midpoint, with
        the dropped side clipped at 0 (only positive scores are ever kept) and price 0 for a
        feature whose capacity was not used up (a slack constraint has a zero dual).

        ``code``: the kept entries of ``mask`` as the forward pass built them (built here from
        ``mask`` when absent); the kept side is read from its nnz values, not from the (n, F) matrix.
        """
        if isinstance(self.rule, TopK):
            return None
        if code is None:
            code = SparseCode.from_mask(pre, mask)
        kept_values = code.values.detach()
        if isinstance(self.rule, MutualChoice):
            price = budget_price(pre, mask, kept_values, self.rule.budget(*pre.shape))
            return price.expand(self.n_features).clone()
        return feature_prices(pre, mask, code.feature_index, kept_values, self.rule.capacity(*pre.shape))

    @torch.no_grad()
    def set_thresholds(self, thresholds: Tensor) -> None:
        """Replace the running eval thresholds by ``thresholds`` (F,) (e.g. calibrated ones)."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=self.threshold_sum.device)
        if thresholds.shape != (self.n_features,) or not bool(torch.isfinite(thresholds).all()):
            raise AllocationError(
                f"thresholds must be {self.n_features} finite numbers, got shape {tuple(thresholds.shape)}"
            )
        self.threshold_sum.copy_(thresholds)
        self.threshold_weight.fill_(1.0)
        self.threshold_offset.zero_()
        self.threshold_iterate.zero_()

    @torch.no_grad()
    def update_thresholds(self, pre: Tensor, mask: Tensor, code: Optional[SparseCode] = None) -> None:
        """Fold this batch's dual prices into the running estimate t = a + c (clipped at 0).

        a: bias-corrected exponential moving average of the batch prices (decay ``threshold_decay``).
        c: a dual-subgradient correction, iterate c' += eta * a * (count(a + c') - cap) / cap, where
        count is how many of this batch's scores exceed a + c' (per feature for Feature Choice, in
        all for Mutual Choice) and cap the rule's capacity (m_j, or k n); c is the moving average of
        the iterates (Polyak averaging, decay ITERATE_AVERAGING = 0.95). An average of per-batch
        order statistics is biased for bursty features (on average fewer than cap scores exceed it);
        the correction drives the expected count at the eval threshold to the training budget.
        ``code``: as in ``batch_threshold``.
        """
        price = self.batch_threshold(pre, mask, code)
        if price is None:
            return
        if float(self.threshold_weight) > 0.0 and self.threshold_correction > 0.0:
            average = self.threshold_sum / self.threshold_weight
            current = (average + self.threshold_iterate).clamp_min(0).to(pre.dtype)
            if isinstance(self.rule, MutualChoice):
                above = count_above_per_column(pre, current[0]).sum()
                capacity = float(self.rule.budget(*pre.shape))
                error = torch.full_like(average, (float(above) - capacity) / max(capacity, 1.0))
            else:
                above = count_above_per_column(pre, current)
                capacity = self.rule.capacity(*pre.shape)
                capacity = (
                    capacity.to(device=pre.device, dtype=torch.float64)
                    if isinstance(capacity, Tensor)
                    else torch.full_like(average, float(capacity))
                )
                error = (above - capacity) / capacity.clamp_min(1.0)
            self.threshold_iterate.add_(self.threshold_correction * average * error)
            self.threshold_iterate.clamp_(min=-average)
            decay = ITERATE_AVERAGING
            self.threshold_offset.mul_(decay).add_(self.threshold_iterate, alpha=1 - decay)
        decay = self.threshold_decay
        self.threshold_sum.mul_(decay).add_(price.to(torch.float64), alpha=1 - decay)
        self.threshold_weight.mul_(decay).add_(1 - decay)

    # ---- forward
    def pre_activations(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc + b_enc for x (n, d_in); validates shape and finiteness."""
        x = check_activations(x, self.d_in)
        return affinities(x, self.b_dec, self.W_enc, self.b_enc, sparse_backward=self.sparse_backward)

    def select(self, pre: Tensor) -> Tensor:
        """Kept mask (n, F): the rule in training mode; thresholds (or TopK) in eval mode."""
        if not all_finite(pre):
            raise NonFiniteAffinitiesError(
                "the encoder produced NaN or inf affinities from finite activations: the SAE's weights "
                "have diverged (check W_enc, b_enc, b_dec)"
            )
        if self.training or not self.rule.batch_dependent:
            return self.rule.select(pre)
        return pre > self.threshold.clamp_min(0)

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
        mask = self.select(pre)
        if self.uses_sparse_decode(int(count_selected(mask)), pre.shape[0]):
            code = SparseCode.from_mask(pre, mask)
            return SAEOutput(decode_sparse(code, self.W_dec, self.b_dec), pre, mask, code)
        dense = torch.where(mask, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        return SAEOutput(decode_dense(dense, self.W_dec, self.b_dec), pre, mask)

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


def default_learning_rate(n_features: int) -> float:
    """Adam lr scaled with width: 2e-4 / sqrt(n_features / 2**14) (Gao et al. 2024's rule)."""
    return 2e-4 / math.sqrt(n_features / 2**14)
