"""Oracle and property tests for salve.alpha_crit (hand-solved roots, brentq, brute force)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salve.alpha_crit import (
    all_terms_nonnegative,
    alpha_brentq,
    alpha_empirical,
    alpha_exact,
    alpha_linear,
    breakpoint_logits,
    class_rows,
    logit_curve,
    summarise,
)
from salve.editing import edit_head

F64 = torch.float64
INF = math.inf


# --- hand-solved cases ---------------------------------------------------------------------------
# Each row: a, w, b, |c| (padded with a = 0, c = 0, which never clamps and adds nothing).
# Sample 0: t = [4, -2, 1], |c| = [1, 2, 0.25] -> breakpoints 0.5, 1, 4; z0 = 2.5;
#   [0, .5]: 2.5 - .25 a; [.5, 1]: 4.5 - 4.25 a (z(1) = .25); [1, 4]: .5 - .25 a -> root 2;
#   then -.5.
#   alpha_lin = 2.5 / (4 - 4 + .25) = 10 (a negative term makes the linear estimate too high).
# Sample 1: t = [3, -2], |c| = [1, .5], b = .5 -> z = 1.5 - 2a on [0, 1]: root .75; then
#   -2.5 + a on [1, 2] (second root 1.5), then .5 for ever: brentq's bracket [0, 2] has no sign
#   change (nan) although the logit does reach zero; linear estimate 1.5 / (3 - 1) = .75 is exact.
# Sample 2: z0 = -1 <= 0 -> 0 for every estimate.
# Sample 3: all terms positive, b = .5 > 0: z falls to .5 and stays: inf (lin = 2.5 / 2.5 = 1).
# Sample 4: only dimension 0 clamps; dimension 1 (|c| = 0) holds z up: z = 1 + 2 max(0, 1-a).
#   Never zero: inf (lin = 3 / 2), and brentq's bracket [0, 1] has no sign change.
HAND_A = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=F64)
HAND_W = torch.tensor([[4, -2, 1], [3, -2, 0], [1, -3, 0], [1, 1, 0], [2, 1, 0]], dtype=F64)
HAND_B = torch.tensor([-0.5, 0.5, 1.0, 0.5, 0.0], dtype=F64)
HAND_C = torch.tensor([[1, 2, 0.25], [-1, 0.5, 0], [1, 1, 0], [2, 0.5, 0], [1, 0, 0]], dtype=F64)


def test_hand_cases() -> None:
    args = (HAND_A, HAND_W, HAND_B, HAND_C)
    torch.testing.assert_close(
        alpha_exact(*args), torch.tensor([2.0, 0.75, 0.0, INF, INF], dtype=F64)
    )
    torch.testing.assert_close(
        alpha_linear(*args), torch.tensor([10.0, 0.75, 0.0, 1.0, 1.5], dtype=F64)
    )
    got = alpha_brentq(*args)
    torch.testing.assert_close(
        got[:3], torch.tensor([2.0, math.nan, 0.0], dtype=F64), equal_nan=True
    )
    assert bool(torch.isnan(got[3:]).all())
    assert all_terms_nonnegative(HAND_A, HAND_W).tolist() == [False, False, False, True, True]
    beta, z = breakpoint_logits(*args)
    torch.testing.assert_close(beta[0], torch.tensor([0.5, 1.0, 4.0], dtype=F64))
    torch.testing.assert_close(z[0], torch.tensor([2.375, 0.25, -0.5], dtype=F64))
    assert math.isinf(beta[4, 2]) and math.isnan(z[4, 2])


def test_class_rows_and_shared_column() -> None:
    weight, bias = torch.tensor([[1.0, 2.0], [3.0, -4.0]]), torch.tensor([0.5, -0.5])
    w_nm, b_n = class_rows(weight, bias, [1, 0, 1])
    assert w_nm.dtype == F64 and w_nm.tolist() == [[3, -4], [1, 2], [3, -4]]
    assert b_n.tolist() == [-0.5, 0.5, -0.5]
    acts = torch.ones(3, 2)
    shared = alpha_exact(acts, w_nm, b_n, torch.tensor([0.5, 0.0]))
    per_sample = alpha_exact(acts, w_nm, b_n, torch.tensor([[0.5, 0.0]] * 3))
    assert torch.equal(shared, per_sample)
    # Sample 1: z = .5 + 2 + 1 (1 - a/2) -> never 0 (|c_1| = 0 keeps the 2): inf.
    assert math.isinf(shared[1])


def test_summarise() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, INF, math.nan, 5.0, INF])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    out = summarise(values, labels, 3)
    assert out[0]["count"] == 5 and out[0]["n_finite"] == 3
    assert out[0]["median"] == 2.0 and out[0]["q25"] == 1.5 and out[0]["q75"] == 2.5
    assert out[0]["frac_inf"] == pytest.approx(0.2) and out[0]["frac_nan"] == pytest.approx(0.2)
    assert out[1]["median"] == 5.0 and out[1]["frac_inf"] == 0.5
    assert out[2] == {
        "count": 0,
        "n_finite": 0,
        "frac_inf": None,
        "frac_nan": None,
        "median": None,
        "q25": None,
        "q75": None,
    }
    only_inf = summarise(np.array([INF]), np.array([0]), 1)
    assert only_inf[0]["median"] is None and only_inf[0]["frac_inf"] == 1.0


# --- property tests ------------------------------------------------------------------------------
@dataclass
class Case:
    acts: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    col: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.acts, self.w, self.b, self.col

    @property
    def scale(self) -> torch.Tensor:
        """Magnitude of the logit's terms, to make tolerances relative."""
        return self.b.abs() + (self.w * self.acts).abs().sum(1) + 1.0


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, m = draw(st.integers(1, 24)), draw(st.integers(1, 40))
    acts = rng.standard_normal((n, m))
    if draw(st.booleans()):
        acts = np.maximum(acts, 0.0)  # post-ReLU features
    w = rng.standard_normal((n, m))
    if draw(st.booleans()):
        w = np.abs(w) * np.sign(acts + (acts == 0))  # every term w_j a_j >= 0
    shape = (n, m) if draw(st.booleans()) else (m,)
    col = rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.2, 0.7]))
    col = np.where(rng.random(shape) < zero_frac, 0.0, col)
    if draw(st.booleans()):
        col = np.round(col * 2) / 2  # ties between breakpoints
    terms = np.abs(w * acts).sum(1)
    b = rng.uniform(-0.5, 0.5, n) * terms + rng.standard_normal(n) * 0.1
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    return Case(t(acts), t(w), t(b), t(col))


def _sign_changes(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign changes of z over [0, last breakpoint], and z at 0 and every finite breakpoint.

    z is linear between breakpoints, so it crosses zero inside a segment exactly when the
    segment's end values have opposite signs: counting over these points counts all crossings.
    Evaluated with the direct formula (the oracle), not the vectorised walk.
    """
    absc = case.col.abs().expand_as(case.acts)
    beta = torch.where(absc > 0, 1 / absc, torch.zeros_like(absc))  # |c| = 0 -> re-evaluate at 0
    z = torch.cat([logit_curve(*case.args, 0.0)[:, None], logit_curve(*case.args, beta)], 1)
    z_sorted = torch.cat([z[:, :1], z[:, 1:].gather(1, beta.argsort(1))], 1)
    s = torch.sign(z_sorted)
    return (s[:, 1:] * s[:, :-1] < 0).sum(1), z


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_exact_agrees_with_brentq_where_root_is_unique(case: Case) -> None:
    exact, ref = alpha_exact(*case.args), alpha_brentq(*case.args)
    assert torch.equal(alpha_exact(*case.args, chunk_size=3), exact)
    changes, _ = _sign_changes(case)
    z0 = logit_curve(*case.args, 0.0)
    unique = (changes == 1) & (z0 > 0)
    assert bool(torch.isfinite(ref[unique]).all())
    torch.testing.assert_close(exact[unique], ref[unique], atol=1e-6, rtol=1e-6)
    # Where z(0) <= 0 all estimates are 0; where z never changes sign, exact is inf or a touch.
    assert bool((exact[z0 <= 0] == 0).all()) and bool((ref[z0 <= 0] == 0).all())


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_exact_is_the_smallest_root(case: Case) -> None:
    exact = alpha_exact(*case.args)
    assert bool((exact >= 0).all()) and not bool(torch.isnan(exact).any())
    tol = 1e-9 * case.scale
    finite = torch.isfinite(exact) & (exact > 0)
    z_root = logit_curve(*case.args, torch.where(finite, exact, torch.zeros_like(exact)))
    assert bool((z_root[finite].abs() <= tol[finite]).all())
    # Below the root z stays positive: on a dense grid, and at every breakpoint (where a
    # piecewise-linear z attains its minima). For inf: positive everywhere, tail included.
    upper = torch.where(torch.isfinite(exact), exact, torch.full_like(exact, 1e6))
    grid = torch.linspace(0, 1, 257, dtype=F64)[:-1][None, :] * upper[:, None]
    z_grid = logit_curve(*case.args, grid)
    ok = exact > 0
    assert bool((z_grid[ok] > -tol[ok, None]).all())
    beta, z_bp = breakpoint_logits(*case.args)
    below = torch.isfinite(beta) & (beta < exact[:, None] * (1 - 1e-9))
    assert bool((z_bp[below & ok[:, None]] > 0).all())
    inf = torch.isinf(exact)
    if bool(inf.any()):
        tail = logit_curve(*case.args, 1e300)  # |c_j| > 0 terms all clamped
        assert bool((tail[inf] > 0).all())


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_linear_is_lower_bound_for_nonnegative_terms(case: Case) -> None:
    lin, exact = alpha_linear(*case.args), alpha_exact(*case.args)
    mask = all_terms_nonnegative(case.acts, case.w)
    assert torch.equal(mask, ((case.w * case.acts) >= 0).all(1))
    bound = exact * (1 + 1e-9) + 1e-12
    assert bool((lin[mask] <= bound[mask]).all())
    # Before the first clamp the linear estimate is exact.
    beta, _ = breakpoint_logits(*case.args)
    first = beta[:, 0]
    early = torch.isfinite(lin) & (lin < first * (1 - 1e-9)) & (lin > 0)
    torch.testing.assert_close(lin[early], exact[early], atol=1e-9, rtol=1e-9)


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_breakpoint_logits_equal_direct_formula(case: Case) -> None:
    beta, z = breakpoint_logits(*case.args)
    assert bool((beta[:, 1:] >= beta[:, :-1]).all())
    finite = torch.isfinite(beta)
    direct = logit_curve(*case.args, torch.where(finite, beta, torch.zeros_like(beta)))
    diff = (z - direct).abs()
    assert bool((diff[finite] <= (1e-10 * case.scale[:, None].expand_as(diff))[finite]).all())
    assert bool(torch.isnan(z[~finite]).all())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 30),
    m=st.integers(1, 16),
    k=st.integers(2, 6),
    mode=st.sampled_from(["paper", "projection"]),
)
def test_empirical_matches_brute_force(seed: int, n: int, m: int, k: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    acts = torch.tensor(np.maximum(rng.standard_normal((n, m)), 0) + 0.1, dtype=F64)
    weight = torch.tensor(rng.standard_normal((k, m)), dtype=F64)
    bias = torch.tensor(rng.standard_normal(k) * 0.1, dtype=F64)
    labels = torch.tensor(rng.integers(0, k, n))
    col = torch.tensor(rng.standard_normal(m), dtype=F64)
    grid = np.unique(np.concatenate([[0.0], rng.exponential(1.0, 12)]))
    got = alpha_empirical(acts, labels, weight, bias, col, rng.permutation(grid), mode=mode)
    want = torch.full((n,), INF, dtype=F64)
    pred0 = (acts @ weight.T + bias).argmax(1)
    for i in range(n):
        if pred0[i] != labels[i]:
            want[i] = 0.0
            continue
        for alpha in grid:  # ascending
            edited = edit_head(weight, col, float(alpha), "suppress", mode)
            if (acts[i] @ edited.T + bias).argmax() != labels[i]:
                want[i] = float(alpha)
                break
    assert torch.equal(got, want)


def test_empirical_suppression_flips_hand() -> None:
    # Identity head, feature on dimension 0: sample 0 (label 0, a = [2, 1]) flips for alpha > .5.
    acts = torch.tensor([[2.0, 1.0], [1.0, 2.0], [0.5, 1.0]], dtype=F64)
    out = alpha_empirical(
        acts,
        [0, 1, 0],
        torch.eye(2, dtype=F64),
        torch.zeros(2, dtype=F64),
        torch.tensor([1.0, 0.0], dtype=F64),
        [1.0, 0.25, 0.5, 0.75],
    )
    assert out.tolist() == [0.75, INF, 0.0]
