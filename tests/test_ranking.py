"""salve.ranking: hand-computed class means, dominant/top features and the cross-class rule."""

from __future__ import annotations

import math

import pytest
import torch

from salve.ranking import (
    class_mean_codes,
    cross_class_features,
    dominant_features,
    top_features,
)

F64 = torch.float64


def test_class_mean_codes_hand_case_with_empty_class() -> None:
    codes = torch.tensor(
        [[1.0, 0.0, -2.0], [3.0, 0.0, 0.0], [0.0, 5.0, -1.0], [0.0, 1.0, 0.0], [2.0, 0.0, 4.0]]
    )
    labels = torch.tensor([0, 0, 1, 1, 3])
    mu = class_mean_codes(codes, labels, num_classes=4)
    assert mu.dtype == F64 and mu.shape == (4, 3)
    assert mu[0].tolist() == [2.0, 0.0, -1.0]
    assert mu[1].tolist() == [0.0, 3.0, -0.5]
    assert bool(torch.isnan(mu[2]).all())  # class 2 has no samples
    assert mu[3].tolist() == [2.0, 0.0, 4.0]


def test_class_mean_codes_accumulates_in_float64() -> None:
    # float32 cannot hold 2**24 + 1; the float64 mean of (2**24 + 1, 2**24 + 3) is exact
    codes = torch.tensor([[2.0**24], [2.0**24 + 2]], dtype=F64)
    mu = class_mean_codes(codes, torch.tensor([0, 0]), 2)
    assert mu[0, 0].item() == 2.0**24 + 1
    # float32 input is promoted before summing: 1000 copies of float32(0.1) sum exactly in
    # float64 (24-bit mantissa times < 2**10), so the mean is that value exactly
    small = torch.full((1000, 1), 0.1, dtype=torch.float32)
    mu = class_mean_codes(small, torch.zeros(1000, dtype=torch.long), 1)
    assert mu[0, 0].item() == float(small[0, 0])


def test_class_mean_codes_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(60, 7, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    mu = class_mean_codes(codes, labels, 5)
    for k in range(5):
        rows = codes[labels == k].double()
        assert torch.allclose(mu[k], rows.mean(dim=0), rtol=1e-12, atol=1e-15)


def test_dominant_features_uses_absolute_mean() -> None:
    mu = torch.tensor([[1.0, -5.0, 2.0], [0.5, 0.1, 0.3], [-0.1, 0.0, -0.2]], dtype=F64)
    assert dominant_features(mu).tolist() == [1, 0, 2]


def test_top_features_order_strongest_first() -> None:
    mu = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -1.0, 1.5]], dtype=F64)
    assert top_features(mu, 3).tolist() == [[1, 2, 3], [0, 3, 2]]
    assert top_features(mu, 1).tolist() == [[1], [0]]
    assert top_features(mu, 10).tolist() == [[1, 2, 3, 0], [0, 3, 2, 1]]  # capped at L


# Columns are features, rows classes.
#   f0: |mu| = [4, 2, 1, 0]        m2 = 2 = 0.5 * 4 exactly: cross (boundary inclusive)
#   f1: [1, 3, -2.9, 0]            cross via a negative mean; members 1, 2
#   f2: [5, 2.4, 0, 0]             2.4 < 2.5: not cross
#   f3: [0.2, 0.15, 0, 0]          cross only when min_class_mean < 0.2
#   f4: all zero                   never (a dead feature)
#   f5: [4, 6, 1, 5]               three members, in strength order 1, 3, 0
MU = torch.tensor(
    [
        [4.0, 1.0, 5.0, 0.2, 0.0, 4.0],
        [2.0, 3.0, 2.4, 0.15, 0.0, 6.0],
        [1.0, -2.9, 0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 5.0],
    ],
    dtype=F64,
)


def test_cross_class_rule_hand_case() -> None:
    found = cross_class_features(MU, fraction=0.5, min_class_mean=0.0)
    assert [f["feature"] for f in found] == [5, 1, 0, 3]  # by second-largest |mu|: 5, 2.9, 2, .15
    by = {f["feature"]: f for f in found}
    assert by[0]["classes"] == [0, 1] and by[0]["class_means"] == [4.0, 2.0]
    assert by[0]["ratio"] == 0.5
    assert by[1]["classes"] == [1, 2] and by[1]["class_means"] == [3.0, -2.9]
    assert by[1]["ratio"] == pytest.approx(2.9 / 3.0)
    assert by[3]["classes"] == [0, 1] and by[3]["ratio"] == pytest.approx(0.75)
    assert by[5]["classes"] == [1, 3, 0] and by[5]["class_means"] == [6.0, 5.0, 4.0]
    assert by[5]["ratio"] == pytest.approx(5 / 6)


def test_cross_class_min_class_mean_filter() -> None:
    found = cross_class_features(MU, fraction=0.5, min_class_mean=0.5)
    assert [f["feature"] for f in found] == [5, 1, 0]
    found = cross_class_features(MU, fraction=0.5, min_class_mean=4.5)
    assert [f["feature"] for f in found] == [5]  # m1 = 6 > 4.5; f0's m1 = 4 is below


def test_cross_class_fraction_moves_the_boundary() -> None:
    assert [f["feature"] for f in cross_class_features(MU, 0.45)] == [5, 1, 2, 0, 3]
    assert [f["feature"] for f in cross_class_features(MU, 0.5000001)] == [5, 1, 3]
    assert [f["feature"] for f in cross_class_features(MU, 1.0)] == []
    # with fraction 0.2 class 2 joins f0 (|1| >= 0.8) and class 0 joins f1 (1 >= 0.6)
    by = {f["feature"]: f for f in cross_class_features(MU, 0.2)}
    assert by[0]["classes"] == [0, 1, 2] and by[1]["classes"] == [1, 2, 0]


def test_cross_class_needs_two_classes_and_output_is_json_friendly() -> None:
    assert cross_class_features(MU[:1], 0.5) == []
    found = cross_class_features(MU, 0.5)
    for item in found:
        assert type(item["feature"]) is int and all(type(k) is int for k in item["classes"])
        assert all(type(v) is float and math.isfinite(v) for v in item["class_means"])
