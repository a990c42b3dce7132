"""Constraints: named constructors, expansion to vectors, and validation errors."""

import numpy as np
import pytest
import torch

from allocation import AllocationError, Constraints


def test_named_constructors_set_one_family():
    assert Constraints.topk(3).kind == "topk"
    assert Constraints.feature_choice([1, 2]).kind == "feature_choice"
    assert Constraints.mutual_choice(10).kind == "mutual_choice"
    assert Constraints().kind == "unconstrained"
    assert Constraints(per_token=1, total=3).kind == "custom"


def test_greedy_exact_unless_token_and_feature_caps_mix():
    assert Constraints(per_token=2, total=5).greedy_exact
    assert Constraints(per_feature=2, total=5).greedy_exact
    assert not Constraints(per_token=2, per_feature=1).greedy_exact


def test_resolve_expands_scalars_and_keeps_vectors():
    caps = Constraints(per_token=2, per_feature=np.array([1, 0, 3])).resolve(4, 3)
    assert caps.per_token.tolist() == [2, 2, 2, 2]
    assert caps.per_feature.tolist() == [1, 0, 3]
    assert caps.total is None


def test_accepts_torch_and_list_caps():
    assert Constraints.feature_choice(torch.tensor([1, 2])).per_feature.tolist() == [1, 2]
    assert Constraints.topk([3, 1]).per_token.tolist() == [3, 1]
    assert Constraints.topk(np.int64(2)).per_token == 2
    assert Constraints.topk(2.0).per_token == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_token": -1}, "per_token must be >= 0"),
        ({"per_feature": 1.5}, "per_feature must be an integer"),
        ({"total": -3}, "total must be >= 0"),
        ({"total": [1, 2]}, "total must be a single integer"),
        ({"per_token": [1, -2]}, "per_token must be >= 0"),
        ({"per_token": [1.5, 2]}, "per_token must hold integers"),
        ({"per_feature": [[1, 2]]}, "per_feature must be an int or a 1-D vector"),
        ({"per_token": True}, "per_token must be a non-negative integer"),
        ({"per_feature": [1, float("nan")]}, "per_feature must hold finite integers"),
        ({"per_token": "3"}, "per_token must hold finite integers"),
    ],
)
def test_bad_caps_raise_naming_the_argument(kwargs, message):
    with pytest.raises(AllocationError, match=message):
        Constraints(**kwargs)


def test_cap_vector_of_wrong_length_names_the_argument():
    with pytest.raises(AllocationError, match="per_feature has length 2 but scores have 3 features"):
        Constraints.feature_choice([1, 2]).resolve(4, 3)


def test_equality_and_repr():
    assert Constraints.topk([1, 2]) == Constraints(per_token=np.array([1, 2]))
    assert Constraints.topk(1) != Constraints.feature_choice(1)
    assert "per_token=vector(len=2" in repr(Constraints.topk([1, 2]))


def test_resolve_clips_caps_to_what_the_matrix_can_use():
    """Issue 11.6: caps above n, F or n F mean 'no cap'; resolve clips them (same constraint set)."""
    caps = Constraints(per_token=2**63, per_feature=[1, 10**30, 4], total=10**20).resolve(4, 3)
    assert caps.per_token.tolist() == [3, 3, 3, 3]
    assert caps.per_feature.tolist() == [1, 4, 4]
    assert caps.total == 12
