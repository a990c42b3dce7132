"""SAE rules: declarations of the allocation LP's caps, and the one registry that names them.

A rule is a provider of constraints for a batch of n tokens and F features::

    rule.constraints(n_tokens, n_features) -> allocation.Constraints
    rule.name, rule.options()                 (what a checkpoint, a config and an export record)

    TopK(k)                      M 1 <= k
    FeatureChoice(k | m | capacities, zipf_capacities=s)   M^T 1 <= m,  m_j ~ j^-s summing to k n
    MutualChoice(k)              1^T M 1 <= k n
    Custom(per_token=, per_feature=, total= | k=)          any mix of the three

Training selects ``allocate(pre, rule.constraints(*pre.shape))``; the threshold estimator
(``allocation.sae.thresholds``) reads the same constraints to price a batch. ``register_rule`` adds a
rule to the registry that ``make_rule``, ``rule_from_dict`` (checkpoints), ``TrainConfig``, the CLI
and the SAELens export all use; a rule defined outside the package trains, saves and resumes once
it is registered (see the README's "Add your own rule").
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Sequence, Tuple, Type, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

from .._validate import positive_int
from ..constraints import Constraints
from ..errors import AllocationError
from ..rules import allocate
from ..zipf import zipf_capacities

R = TypeVar("R", bound=type)


class Rule:
    """Base of every SAE rule: a frozen dataclass whose fields are its (JSON-serialisable) options.

    Subclasses set ``name`` and implement ``constraints``; ``validate`` may refuse a dictionary size.
    """

    name: ClassVar[str] = ""

    def constraints(self, n_tokens: int, n_features: int) -> Constraints:
        """The caps of the allocation LP for a batch of ``n_tokens`` tokens and ``n_features`` features."""
        raise NotImplementedError

    def validate(self, n_features: int) -> None:
        """Raise AllocationError if the rule cannot run on ``n_features`` features (default: caps resolve)."""
        self.constraints(1, n_features).resolve(1, n_features)

    def options(self) -> dict:
        """The rule's options as JSON values (the dataclass fields; tuples as lists)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_options(cls, **options) -> "Rule":
        """Inverse of ``options`` (options left out take their defaults)."""
        return cls(**options)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.options()}

    def budget(self, n_tokens: int, n_features: int) -> int:
        """Most entries a batch can keep: min of n F, sum_i k_i, sum_j m_j and B (caps clipped to the matrix)."""
        return budget_of(self.constraints(n_tokens, n_features), n_tokens, n_features)

    def select(self, pre: Tensor) -> Tensor:
        """The exact training mask of one batch: ``allocate(pre, self.constraints(*pre.shape))``."""
        return allocate(pre, self.constraints(*pre.shape))


def budget_of(constraints: Constraints, n_tokens: int, n_features: int) -> int:
    """min(n F, sum_i k_i, sum_j m_j, B) for an (n_tokens, n_features) batch (caps clipped to the matrix)."""
    caps = constraints.resolve(n_tokens, n_features)
    bounds = [n_tokens * n_features]
    bounds += [int(cap.sum()) for cap in (caps.per_token, caps.per_feature) if cap is not None]
    bounds += [caps.total] if caps.total is not None else []
    return min(bounds)


def _json_value(value):
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def _k_within(k: Optional[int], n_features: int) -> None:
    if k is not None and k > n_features:
        raise AllocationError(f"k={k} exceeds n_features={n_features}; choose k <= n_features")


def _int_caps(value, name: str) -> Union[int, Tuple[int, ...], None]:
    """A cap option as an int >= 0 or a tuple of them (hashable, JSON-able), validated like Constraints'."""
    if value is None:
        return None
    cap = Constraints(per_feature=value).per_feature  # the core's validation and messages
    if isinstance(cap, np.ndarray):
        return tuple(int(c) for c in cap.tolist())
    return int(cap)


# ------------------------------------------------------------------------------------ the registry

_REGISTRY: Dict[str, Type[Rule]] = {}


def rule_key(name: str) -> str:
    """A rule name as the registry spells it: lower case, dashes ('Feature_Choice' -> 'feature-choice')."""
    return str(name).lower().replace("_", "-")


def register_rule(cls: Optional[R] = None, *, replace: bool = False) -> Union[R, Callable[[R], R]]:
    """Add a Rule subclass to the registry under ``cls.name`` (usable as a class decorator).

    Registering another class under a taken name is an error unless ``replace=True``.
    """

    def add(rule_cls: R) -> R:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, Rule)) or not rule_cls.name:
            raise AllocationError(f"register_rule takes a Rule subclass with a name, got {rule_cls!r}")
        key = rule_key(rule_cls.name)
        if key != rule_cls.name:
            raise AllocationError(f"rule names are lower case with dashes: use {key!r}, not {rule_cls.name!r}")
        held = _REGISTRY.get(key)
        if held is not None and held is not rule_cls and not replace:
            raise AllocationError(f"a rule named {key!r} is already registered ({held.__qualname__}); "
                                  "pass replace=True to replace it")
        _REGISTRY[key] = rule_cls
        return rule_cls

    return add if cls is None else add(cls)


def unregister_rule(name: str) -> None:
    """Remove a rule from the registry (for tests and plugins that clean up after themselves)."""
    _REGISTRY.pop(rule_key(name), None)


def rule_names() -> Tuple[str, ...]:
    """The registered rule names, in registration order."""
    return tuple(_REGISTRY)


def rule_class(name: str) -> Type[Rule]:
    """The registered class of rule ``name``, or AllocationError listing the registered names."""
    cls = _REGISTRY.get(rule_key(name))
    if cls is None:
        raise AllocationError(
            f"rule must be one of {', '.join(rule_names())}, got {name!r} "
            "(a rule defined elsewhere must be registered with allocation.sae.register_rule first)"
        )
    return cls


def make_rule(name: str, k: Optional[int] = None, **options) -> Rule:
    """A rule from its registered name and options; options that are None are left out."""
    cls = rule_class(name)
    given = {key: value for key, value in {"k": k, **options}.items() if value is not None}
    accepted = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if accepted is not None and set(given) - accepted:
        raise AllocationError(
            f"rule {cls.name!r} does not take {', '.join(sorted(set(given) - accepted))}; "
            f"its options are {', '.join(sorted(accepted))}"
        )
    try:
        return cls.from_options(**given)
    except TypeError as error:
        raise AllocationError(f"rule {cls.name!r}: bad options {given} ({error})") from None


def rule_from_dict(data: dict) -> Rule:
    """Inverse of ``rule.to_dict()`` (a checkpoint's or an export's rule); unknown names are refused."""
    if not isinstance(data, dict) or "name" not in data:
        raise AllocationError(f"a rule is saved as a dict with a 'name', got {data!r}")
    return make_rule(data["name"], **{key: value for key, value in data.items() if key != "name"})


# ------------------------------------------------------------------------------------ the rules


@register_rule
@dataclass(frozen=True)
class TopK(Rule):
    """Each token keeps its k largest positive affinities: max <S,M> s.t. M 1 <= k."""

    k: int
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", positive_int(self.k, "k"))

    def validate(self, n_features: int) -> None:
        _k_within(self.k, n_features)

    def constraints(self, n_tokens: int, n_features: int) -> Constraints:
        return Constraints(per_token=self.k)


@register_rule
@dataclass(frozen=True)
class FeatureChoice(Rule):
    """Feature j keeps its m_j best tokens per batch: max <S,M> s.t. M^T 1 <= m.

    Give exactly one of: ``k`` (capacities summing to k n per batch of n tokens, as even as integers
    allow, so the budget matches TopK(k)), ``m`` (the same capacity for every feature), or
    ``capacities`` (one per feature, per batch). ``zipf_capacities=s`` with ``k``: m_j ~ j^-s,
    water-filled under n and rounded by largest remainders to sum to exactly k n.
    ``min_capacity=c`` with ``zipf_capacities``: every m_j is at least min(c, floor(k n / F)) (the
    Zipf shape above that floor), so that no tail feature gets capacity 0 where k n / F >= c; without
    it, at s = 1 a tail feature's share of a small batch rounds to 0 and it can never fire.
    """

    k: Optional[int] = None
    m: Optional[int] = None
    capacities: Optional[Sequence[int]] = None
    zipf_capacities: Optional[float] = None
    min_capacity: Optional[int] = None
    name: ClassVar[str] = "feature-choice"

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.k, self.m, self.capacities)]
        if sum(given) != 1:
            raise AllocationError(
                "FeatureChoice needs exactly one of k, m or capacities, "
                f"got k={self.k}, m={self.m}, capacities={'set' if given[2] else None}"
            )
        if self.k is not None:
            object.__setattr__(self, "k", positive_int(self.k, "k"))
        if self.m is not None:
            object.__setattr__(self, "m", positive_int(self.m, "m"))
        if self.capacities is not None:
            caps = torch.as_tensor(self.capacities).reshape(-1)
            if caps.is_floating_point() and not torch.equal(caps, caps.round()):
                raise AllocationError("capacities must hold integers")
            if bool((caps < 0).any()):
                raise AllocationError("capacities must be >= 0 everywhere")
            object.__setattr__(self, "capacities", tuple(int(c) for c in caps.tolist()))
        if self.zipf_capacities is not None:
            s = self.zipf_capacities
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < float("inf"):
                raise AllocationError(f"zipf_capacities must be a finite exponent s >= 0, got {s!r}")
            if self.k is None:
                raise AllocationError("zipf_capacities shapes the budget k n: give k with it, not m or capacities")
            object.__setattr__(self, "zipf_capacities", float(s))
        if self.min_capacity is not None:
            if self.zipf_capacities is None:
                raise AllocationError("min_capacity is a floor under Zipf capacities: "
                                      "give zipf_capacities with it")
            object.__setattr__(self, "min_capacity", positive_int(self.min_capacity, "min_capacity"))

    def validate(self, n_features: int) -> None:
        _k_within(self.k, n_features)
        if self.capacities is not None and len(self.capacities) != n_features:
            raise AllocationError(
                f"capacities has {len(self.capacities)} entries but the SAE has "
                f"n_features={n_features}; pass one capacity per feature"
            )

    def capacity(self, n_tokens: int, n_features: int) -> Union[int, Tensor]:
        """Per-feature capacity for a batch of n_tokens: an int, or an int64 (F,) tensor.

        With ``k`` the capacities sum to exactly k n (TopK's budget): floor(k n / F) each, plus one
        for the first (k n mod F) features; with ``zipf_capacities`` they are Zipf-shaped instead.
        """
        if self.k is not None and self.zipf_capacities is not None:
            return _zipf_capacities(n_tokens, n_features, self.k * n_tokens, self.zipf_capacities,
                                    self.min_capacity or 0).clone()
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

    def constraints(self, n_tokens: int, n_features: int) -> Constraints:
        return Constraints(per_feature=self.capacity(n_tokens, n_features))


@functools.lru_cache(maxsize=16)
def _zipf_capacities(n_tokens: int, n_features: int, budget: int, s: float, floor: int) -> Tensor:
    return zipf_capacities(n_tokens, n_features, budget, s, floor)


@register_rule
@dataclass(frozen=True)
class MutualChoice(Rule):
    """The k n largest positive affinities of the batch (BatchTopK): max <S,M> s.t. 1^T M 1 <= k n."""

    k: int
    name: ClassVar[str] = "mutual-choice"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", positive_int(self.k, "k"))

    def validate(self, n_features: int) -> None:
        _k_within(self.k, n_features)

    def constraints(self, n_tokens: int, n_features: int) -> Constraints:
        return Constraints(total=self.k * n_tokens)


@register_rule
@dataclass(frozen=True)
class Custom(Rule):
    """Any mix of caps: M 1 <= per_token, M^T 1 <= per_feature, 1^T M 1 <= total (or k n).

    ``per_token``: an int (every token); ``per_feature``: an int or one cap per feature, per batch;
    ``total``: a budget per batch; without it, ``k`` gives the budget k n (as for Mutual Choice).
    Per-token AND per-feature caps are solved exactly by the certified auction (``solve_mixed``).
    """

    per_token: Optional[int] = None
    per_feature: Union[int, Sequence[int], None] = None
    total: Optional[int] = None
    k: Optional[int] = None
    name: ClassVar[str] = "custom"

    def __post_init__(self) -> None:
        if self.per_token is not None:
            object.__setattr__(self, "per_token", positive_int(self.per_token, "per_token"))
        object.__setattr__(self, "per_feature", _int_caps(self.per_feature, "per_feature"))
        if self.total is not None:
            object.__setattr__(self, "total", positive_int(self.total, "total"))
        if self.k is not None:
            object.__setattr__(self, "k", positive_int(self.k, "k"))
        if self.per_token is None and self.per_feature is None and self.total is None and self.k is None:
            raise AllocationError("Custom needs at least one cap: per_token, per_feature, total or k")

    def validate(self, n_features: int) -> None:
        _k_within(self.k, n_features)
        if isinstance(self.per_feature, tuple) and len(self.per_feature) != n_features:
            raise AllocationError(
                f"per_feature has {len(self.per_feature)} entries but the SAE has n_features={n_features}"
            )

    def constraints(self, n_tokens: int, n_features: int) -> Constraints:
        total = self.total if self.total is not None else (self.k * n_tokens if self.k is not None else None)
        per_feature = list(self.per_feature) if isinstance(self.per_feature, tuple) else self.per_feature
        return Constraints(per_token=self.per_token, per_feature=per_feature, total=total)
