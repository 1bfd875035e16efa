"""Latent matching (salve/matching.py) on hand-made decoders and codes: the oracle is the
construction (a permutation, a sign flip, a column built as the sum of two others)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from salve.matching import (
    THRESHOLD,
    code_correlations,
    decoder_cosines,
    dominant_verdicts,
    match_codes,
    match_decoders,
    match_latents,
    verdict,
)

F64 = torch.float64


def orthonormal(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """n orthonormal columns in m dimensions: cosines exactly 0 between them (up to round-off)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64))
    return q


def test_a_permuted_decoder_matches_back_to_the_permutation_with_cosine_1():
    a = orthonormal(32, 8)
    perm = torch.tensor([5, 2, 7, 0, 3, 1, 6, 4])
    b = a[:, perm] * 3.0  # scale does not matter
    m = match_latents(decoder_cosines(a, b))
    inverse = torch.argsort(perm)  # latent l of A sits at column inverse[l] of B
    assert m.match_a.tolist() == inverse.tolist()
    assert m.match_b.tolist() == perm.tolist()
    assert all(m.score(x, y) == pytest.approx(1.0, abs=1e-12) for x, y in m.pairs)
    assert all(m.score(x, y) <= 1.0 for x, y in m.pairs)  # clipped: never 1 + 2e-16
    assert m.matched == m.pairs and m.gone == [] and m.new == []
    assert m.splits == {} and m.merges == {}
    v = verdict(m, 3, int(inverse[3]))
    assert (v.kind, v.label, v.match, v.sign) == ("renumbered", "same feature, renumbered", 4, 1)
    same = match_latents(decoder_cosines(a, a))
    assert [verdict(same, x, x).kind for x in range(8)] == ["same"] * 8


def test_a_sign_flip_is_the_same_feature_with_its_sign_reported():
    a = orthonormal(16, 4, seed=1)
    b = a.clone()
    b[:, 2] = -b[:, 2]
    m = match_latents(decoder_cosines(a, b))
    assert m.match_a.tolist() == [0, 1, 2, 3]
    v = verdict(m, 2, 2)
    assert v.kind == "same" and v.sign == -1 and v.score == pytest.approx(1.0)
    assert m.similarity[2, 2] == pytest.approx(-1.0)


def test_a_latent_that_is_the_sum_of_two_is_a_split_and_the_reverse_a_merge():
    b = orthonormal(24, 5, seed=2)
    a = torch.stack(
        [b[:, 0], b[:, 1], (b[:, 2] + b[:, 3]) / math.sqrt(2), b[:, 4]], dim=1
    )  # A's latent 2 is B's 2 and 3 together
    m = match_latents(decoder_cosines(a, b))
    assert m.score(2, 2) == pytest.approx(1 / math.sqrt(2)) and m.score(2, 2) > THRESHOLD
    assert m.score(2, 3) == pytest.approx(1 / math.sqrt(2))
    assert m.splits == {2: [2, 3]} or m.splits == {2: [3, 2]}
    assert sorted(m.splits[2]) == [2, 3] and m.merges == {}
    assert m.gone == [] and m.new == []  # both parts are accounted for by the split
    for part in (2, 3):
        v = verdict(m, 2, part)
        assert v.kind == "split" and sorted(v.parts) == [2, 3]
    assert verdict(m, 2, 4).kind == "different"  # B's dominant is another feature

    # Seen from B: two latents merged into one of A.
    back = match_latents(decoder_cosines(b, a))
    assert back.merges == {2: sorted(back.merges[2], key=lambda x: -back.score(x, 2))}
    assert sorted(back.merges[2]) == [2, 3] and back.splits == {}
    assert verdict(back, 3, 2).kind == "merge"


def test_near_duplicates_within_one_sae_are_not_a_split_when_compared_with_itself():
    base = orthonormal(20, 4, seed=3)
    dup = (base[:, 0] + 0.9 * base[:, 1]) / math.sqrt(1 + 0.81)  # cos 0.74 with latent 0
    a = torch.cat([base, dup[:, None]], dim=1)
    m = match_latents(decoder_cosines(a, a))
    assert m.abs_similarity[0, 4] > THRESHOLD  # two latents of one SAE above the threshold
    assert m.splits == {} and m.merges == {}
    assert [verdict(m, x, x).kind for x in range(5)] == ["same"] * 5


def test_threshold_decides_matched_gone_and_new():
    b = orthonormal(16, 3, seed=4)
    # A's latent 1: cosine exactly c with B's latent 1, the rest in a direction B lacks.
    extra = orthonormal(16, 4, seed=4)[:, 3]
    extra = extra - b @ (b.T @ extra)
    extra = extra / torch.linalg.vector_norm(extra)
    for c, matched in ((0.6, True), (0.45, False)):
        col = c * b[:, 1] + math.sqrt(1 - c * c) * extra
        a = torch.stack([b[:, 0], col, b[:, 2]], dim=1)
        m = match_latents(decoder_cosines(a, b))
        assert m.match_a.tolist() == [0, 1, 2]  # the assignment ignores the threshold
        assert m.score(1, 1) == pytest.approx(c)
        assert m.is_match(1, 1) is matched  # strictly above the threshold
        assert (m.gone, m.new) == (([], []) if matched else ([1], [1]))
        assert verdict(m, 1, 1).kind == ("same" if matched else "different")
    # Exactly at the threshold is not a match; just above is.
    assert match_latents(np.array([[0.5]])).matched == []
    assert match_latents(np.array([[-0.5000001]])).matched == [(0, 0)]
    strict = match_latents(decoder_cosines(a, b), threshold=0.95)
    assert strict.threshold == 0.95 and strict.matched == [(0, 0), (2, 2)]
    with pytest.raises(ValueError, match="threshold"):
        match_latents(np.eye(2), threshold=1.0)


def test_unequal_widths_and_dead_latents():
    a = orthonormal(32, 6, seed=5)
    b = a[:, [4, 1, 0]].clone()  # a narrower SAE holding three of A's features
    m = match_latents(decoder_cosines(a, b))
    assert m.pairs == [(0, 2), (1, 1), (4, 0)]
    assert m.gone == [2, 3, 5] and m.new == []
    assert (m.match_a == -1).sum() == 3 and m.scores_a[2] == 0.0
    rows, cols = linear_sum_assignment(np.abs(decoder_cosines(a, b)), maximize=True)
    assert m.pairs == sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    dead = a.clone()
    dead[:, 3] = 0.0
    d = decoder_cosines(dead, a)
    assert np.all(d[3] == 0.0) and np.isfinite(d).all()
    with pytest.raises(ValueError, match="same activation size"):
        decoder_cosines(a, orthonormal(16, 3))


def test_code_correlations_match_a_permutation_and_ignore_silent_latents():
    g = torch.Generator().manual_seed(6)
    codes = torch.relu(torch.randn(200, 5, generator=g, dtype=F64))
    codes[:, 4] = 0.0  # never fires
    perm = [3, 0, 4, 1, 2]
    other = codes[:, perm] * 2.0 + 1.0  # other units, other offsets: same features
    corr = code_correlations(codes, other)
    assert corr.shape == (5, 5) and np.isfinite(corr).all()
    assert np.all(corr[4] == 0.0) and np.all(corr[:, 2] == 0.0)
    m = match_latents(corr)
    for latent in (0, 1, 2, 3):
        assert int(m.match_a[latent]) == perm.index(latent)
        assert m.score(latent, perm.index(latent)) == pytest.approx(1.0)
    assert 4 in m.gone and 2 in m.new  # a silent latent matches nothing
    with pytest.raises(ValueError, match="same N"):
        code_correlations(codes, other[:10])


def test_dominant_verdicts_one_per_class():
    a = orthonormal(16, 4, seed=7)
    b = a[:, [1, 0, 2, 3]]
    m = match_latents(decoder_cosines(a, b))
    out = dominant_verdicts(m, [0, 2, 3], [1, 2, 0])
    assert [v.kind for v in out] == ["renumbered", "same", "different"]
    assert out[2].match == 3 and out[2].survived is False
    assert sum(v.survived for v in out) == 2
    with pytest.raises(ValueError, match="one latent per class"):
        dominant_verdicts(m, [0], [0, 1])


def test_a_split_needs_its_parts_to_explain_more_than_the_best_one():
    """With the similarities within each SAE (match_decoders): a genuine split explains more
    of A's latent together than its best part alone; a narrower SAE's near-duplicates do not."""
    b = orthonormal(24, 5, seed=8)
    a = torch.stack([b[:, 0], (b[:, 1] + b[:, 2]) / math.sqrt(2), b[:, 3], b[:, 4]], dim=1)
    m = match_decoders(a, b)
    assert m.splits == {1: m.splits[1]} and sorted(m.splits[1]) == [1, 2]
    assert verdict(m, 1, 2).kind == "split"
    # B holds A's latent 0 twice, as near-duplicates (cosine 0.8 with each other): both above
    # the threshold and closest to A's 0, but the second adds little: no split.
    base = orthonormal(24, 4, seed=9)
    dup = 0.8 * base[:, 0] + 0.6 * base[:, 3]
    b2 = torch.stack([base[:, 0], base[:, 1], dup, base[:, 2]], dim=1)
    a2 = base[:, :3]
    loose = match_latents(decoder_cosines(a2, b2))  # no within-SAE similarities: a split
    assert loose.splits == {0: [0, 2]}
    m2 = match_decoders(a2, b2)
    assert m2.splits == {} and m2.merges == {}
    assert verdict(m2, 0, 0).kind == "same" and verdict(m2, 0, 2).kind == "different"
    same_codes = match_codes(a2.T @ a2, a2.T @ a2)  # any [N, L] codes: itself
    assert all(verdict(same_codes, x, x).kind == "same" for x in range(3))


def test_the_closest_latent_is_the_same_feature_when_the_assignment_gives_it_away():
    """Halving an SAE: two latents of A want the same latent of B; the assignment gives it to
    one, yet for the other it is still the closest and above the threshold."""
    b = orthonormal(16, 2, seed=10)
    extra = orthonormal(16, 4, seed=11)[:, 3]
    extra = extra - b @ (b.T @ extra)
    extra = extra / torch.linalg.vector_norm(extra)
    # A's 0 is B's 0 at cosine 0.9; A's 1 is B's 0 at 0.95; A's 2 is B's 1 exactly.
    a = torch.stack(
        [
            0.9 * b[:, 0] + math.sqrt(1 - 0.81) * extra,
            0.95 * b[:, 0] - math.sqrt(1 - 0.9025) * extra,
            b[:, 1],
        ],
        dim=1,
    )
    m = match_decoders(a, b)
    assert m.match_a.tolist() == [-1, 0, 1]  # B's 0 goes to A's 1
    v = verdict(m, 0, 0)
    assert v.kind == "same" and v.match == -1  # its closest, not its assigned pair
    assert verdict(m, 1, 0).kind == "renumbered" and verdict(m, 2, 1).kind == "renumbered"
    assert m.merges == {}  # A's 1 adds 0.0975 of B's 0 to A's 0.9025: near-duplicates
    loose = match_latents(decoder_cosines(a, b))  # without the within-SAE similarities
    assert loose.merges == {0: [1, 0]} and verdict(loose, 0, 0).kind == "merge"
