"""Critical suppression strength alpha_crit: how hard to suppress one feature to kill a logit.

For sample n with true class i, activations ``a`` [M], head row ``w = W[i]``, bias ``b = b_i`` and
the feature's decoder column ``c``, the paper-rule suppression gives the true-class logit

    z(alpha) = b + sum_j t_j max(0, 1 - alpha |c_j|),     t_j = w_j a_j.

Four estimates, all float64 and vectorised over samples unless stated:

- :func:`alpha_linear`: the paper's linear estimate ``z(0) / R``, ``R = sum_j t_j |c_j|``; exact
  until the first clamp, and a lower bound of the exact value when every ``t_j >= 0``.
- :func:`alpha_exact`: the smallest root of the piecewise-linear ``z`` (breakpoints ``1/|c_j|``).
- :func:`alpha_brentq`: per-sample scipy ``brentq`` on ``[0, 1/min |c_j|]``, the paper's check.
- :func:`alpha_empirical`: the smallest grid alpha at which the edited head's argmax leaves the
  true class (a decision flip, not a zero logit).

Shared conventions: ``z(0) <= 0`` gives 0 (nothing to suppress); ``inf`` means the logit never
reaches zero; dimensions with ``|c_j| = 0`` never clamp. Inputs may be torch tensors or arrays;
``col`` may be signed (its absolute value is used) and is [M] or per sample [N, M].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq

from salve.config import AlphaCritConfig
from salve.data import normalise
from salve.editing import Mode, edit_head, edited_predictions
from salve.models import head_of

F64 = torch.float64
ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _t64(x: ArrayLike) -> torch.Tensor:
    return _tensor(x).to(F64)


def _labels(x: ArrayLike) -> torch.Tensor:
    return _tensor(x).to(torch.int64).reshape(-1)


def class_rows(
    weight_km: ArrayLike, bias_k: ArrayLike, labels_n: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's true-class head row and bias: ``(w_nm, b_n)`` in float64."""
    labels = _labels(labels_n)
    return _t64(weight_km)[labels], _t64(bias_k)[labels]


def _prepare(
    acts_nm: ArrayLike, w_nm: ArrayLike, b_n: ArrayLike, col: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return terms ``t = w * a`` [N, M], bias [N] and ``|c|`` [N, M]."""
    a, w, b, absc = _t64(acts_nm), _t64(w_nm), _t64(b_n).reshape(-1), _t64(col).abs()
    if a.dim() != 2 or w.shape != a.shape:
        raise ValueError(f"acts_nm and w_nm must both be [N, M], got {a.shape} and {w.shape}")
    n, m = a.shape
    if b.shape != (n,):
        raise ValueError(f"b_n must be [N={n}], got {tuple(b.shape)}")
    if absc.shape not in ((m,), (n, m)):
        raise ValueError(f"col must be [M={m}] or [N={n}, M], got {tuple(absc.shape)}")
    return w * a, b, absc.expand(n, m)


def logit_curve(
    acts_nm: ArrayLike, w_nm: ArrayLike, b_n: ArrayLike, col: ArrayLike, alpha: ArrayLike
) -> torch.Tensor:
    """Direct formula ``z_n(alpha) = b_n + sum_j t_nj max(0, 1 - alpha |c_j|)`` (the oracle).

    ``alpha`` is a scalar (-> [N]), per sample [N] (-> [N]) or a grid [N, P] / [P] (-> [N, P]).
    Dimensions with ``|c_j| = 0`` keep their full term for every finite alpha.
    """
    t, b, absc = _prepare(acts_nm, w_nm, b_n, col)
    al = _t64(alpha)
    if al.dim() == 0:
        return b + (t * (1 - al * absc).clamp_min(0)).sum(1)
    if al.dim() == 1 and al.shape[0] == t.shape[0]:
        return b + (t * (1 - al[:, None] * absc).clamp_min(0)).sum(1)
    grid = al.expand(t.shape[0], -1) if al.dim() == 1 else al  # [N, P]
    keep = (1 - grid[:, :, None] * absc[:, None, :]).clamp_min(0)  # [N, P, M]
    return b[:, None] + (keep * t[:, None, :]).sum(-1)


def _walk(
    t: torch.Tensor, b: torch.Tensor, absc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Breakpoints in DESCENDING order with the line of the segment that ends at each one.

    Returns ``beta_d`` (descending; ``nan`` first, for ``|c_j| = 0``, which never clamps: ``nan``
    makes every comparison on it false), ``icpt`` and ``slope`` [N, M]. ``beta_d`` is [1, M] when
    the column is shared by all samples (sorted once), else [N, M]. Just below ``beta_d[:, q]``
    the dimensions at positions ``<= q`` are still active, so there
    ``z(alpha) = icpt[:, q] - alpha * slope[:, q]`` with ``icpt = b + prefix sum of t`` and
    ``slope = prefix sum of t |c|``. Descending order makes the active-set sums plain prefix sums
    (no flips, no total-minus-prefix cancellation). ``icpt[:, -1] = z(0)``.
    """
    if absc.stride(0) == 0:  # one column shared by all samples: sort it once
        c_m = absc[0]
        beta, order = torch.where(c_m > 0, 1.0 / c_m, math.inf).sort(descending=True, stable=True)
        t_d = t.index_select(1, order)
        r_d = t_d * c_m[order]
        beta = beta.unsqueeze(0)
    else:
        beta, order = torch.where(absc > 0, 1.0 / absc, math.inf).sort(
            dim=1, descending=True, stable=True
        )
        t_d = t.gather(1, order)
        r_d = t_d * absc.gather(1, order)
    beta = torch.where(torch.isinf(beta), math.nan, beta)
    return beta, t_d.cumsum(1).add_(b[:, None]), r_d.cumsum(1)


def breakpoint_logits(
    acts_nm: ArrayLike, w_nm: ArrayLike, b_n: ArrayLike, col: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised ``z`` at every breakpoint: ``(beta_nm sorted ascending, z_nm)`` [N, M] each.

    The values :func:`alpha_exact` walks. Entries with ``|c_j| = 0`` never clamp: they come last
    with ``beta = inf`` and ``z = nan``.
    """
    beta_d, icpt, slope = _walk(*_prepare(acts_nm, w_nm, b_n, col))
    z = icpt - beta_d * slope
    beta = torch.where(torch.isnan(beta_d), math.inf, beta_d).expand_as(z)
    return beta.flip(1), z.flip(1)


def alpha_linear(
    acts_nm: ArrayLike, w_nm: ArrayLike, b_n: ArrayLike, col: ArrayLike
) -> torch.Tensor:
    """The paper's analytic estimate ``z(0) / R`` [N].

    ``z(0) <= 0`` -> 0; ``R <= 0`` with ``z(0) > 0`` -> inf (the linearised logit never falls).
    """
    t, b, absc = _prepare(acts_nm, w_nm, b_n, col)
    z0 = b + t.sum(1)
    r = (t * absc).sum(1)
    out = torch.where(r > 0, z0 / r, torch.full_like(z0, math.inf))
    return torch.where(z0 <= 0, torch.zeros_like(z0), out)


def alpha_exact(
    acts_nm: ArrayLike,
    w_nm: ArrayLike,
    b_n: ArrayLike,
    col: ArrayLike,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Smallest ``alpha >= 0`` with ``z(alpha) = 0`` [N], by walking the sorted breakpoints.

    ``z`` need not be monotone (negative terms push it up as they clamp), so the answer lies on
    the first segment (in increasing alpha) whose end value is ``<= 0``; there ``z`` is linear and
    falls from a positive start, so the root is ``icpt / slope``, clamped to the segment against
    rounding. After the last finite breakpoint ``z`` is constant; if no end value is ``<= 0`` the
    result is inf. Cost: one sort (once if the column is shared), two cumulative sums; samples
    are processed ``chunk_size`` at a time to bound the float64 working set.
    """
    a, w, b, c = (_tensor(x) for x in (acts_nm, w_nm, b_n, col))  # sliced before float64
    b = b.reshape(-1)
    if a.dim() == 2 and a.shape[0] > chunk_size:
        per_sample = c.dim() == 2
        parts = [
            _alpha_exact(
                a[i : i + chunk_size],
                w[i : i + chunk_size],
                b[i : i + chunk_size],
                c[i : i + chunk_size] if per_sample else c,
            )
            for i in range(0, a.shape[0], chunk_size)
        ]
        return torch.cat(parts)
    return _alpha_exact(a, w, b, c)


def _alpha_exact(
    acts_nm: torch.Tensor, w_nm: torch.Tensor, b_n: torch.Tensor, col: torch.Tensor
) -> torch.Tensor:
    t, b, absc = _prepare(acts_nm, w_nm, b_n, col)
    n, m = t.shape
    beta_d, icpt, slope = _walk(t, b, absc)
    hit = icpt - beta_d * slope <= 0  # z at each breakpoint; nan (never clamps) -> False
    any_hit = hit.any(dim=1)
    # Smallest breakpoint with z <= 0 = last hit in descending order.
    q = (m - 1) - hit.flip(1).to(torch.int8).argmax(dim=1, keepdim=True)
    a_q = icpt.gather(1, q).squeeze(1)
    s_q = slope.gather(1, q).squeeze(1)
    beta_n = beta_d.expand(n, -1)
    hi = beta_n.gather(1, q).squeeze(1)
    below = beta_n.gather(1, (q + 1).clamp_max(m - 1)).squeeze(1)
    lo = torch.where(q.squeeze(1) == m - 1, 0.0, below)
    root = torch.where(s_q > 0, a_q / s_q, hi)
    root = torch.minimum(torch.maximum(root, lo), hi)
    out = torch.where(any_hit, root, math.inf)
    z0 = icpt[:, -1]
    return torch.where(z0 <= 0, 0.0, out)


def alpha_brentq(
    acts_nm: ArrayLike,
    w_nm: ArrayLike,
    b_n: ArrayLike,
    col: ArrayLike,
    xtol: float = 2e-12,
    rtol: float = 8.9e-16,
) -> torch.Tensor:
    """Per-sample scipy ``brentq`` on ``[0, 1/min_{|c_j|>0} |c_j|]`` [N] (a Python loop).

    Past the last breakpoint ``z`` is constant, so the bracket covers every root. ``z(0) <= 0``
    -> 0 (same convention as the others); no sign change over the bracket (``z(hi) > 0``, or no
    non-zero ``|c_j|``) -> nan. With several roots brentq returns *a* root, not necessarily the
    smallest: it is a check, valid where the bracket holds exactly one sign change.
    """
    t, b, absc = _prepare(acts_nm, w_nm, b_n, col)
    t_np, b_np, c_np = t.numpy(), b.numpy(), absc.numpy()
    out = np.full(t_np.shape[0], np.nan)
    for i in range(t_np.shape[0]):
        ti, ci, bi = t_np[i], c_np[i], float(b_np[i])

        def z(alpha: float, ti: np.ndarray = ti, ci: np.ndarray = ci, bi: float = bi) -> float:
            return bi + float(np.dot(ti, np.maximum(0.0, 1.0 - alpha * ci)))

        if z(0.0) <= 0:
            out[i] = 0.0
            continue
        pos = ci[ci > 0]
        if pos.size == 0:
            continue
        hi = 1.0 / float(pos.min())
        if z(hi) > 0:
            continue
        out[i] = brentq(z, 0.0, hi, xtol=xtol, rtol=rtol, maxiter=500)
    return torch.from_numpy(out)


def alpha_empirical(
    acts_nm: torch.Tensor,
    labels_n: ArrayLike,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    col_m: torch.Tensor,
    alpha_grid: ArrayLike,
    mode: Mode = "paper",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Smallest grid alpha at which the suppressed head's argmax leaves the true class [N].

    The grid is sorted internally. A sample already misclassified by the unedited head gets 0
    (whether or not 0 is on the grid); one that keeps its label at every grid alpha gets inf.
    Uses the closed-form :func:`salve.editing.edited_predictions` (exact: ``acts_nm`` is the
    head input), in the promoted dtype of activations and weight.
    """
    grid = _t64(alpha_grid).reshape(-1).sort().values
    labels = _labels(labels_n)
    zero = torch.zeros(1, dtype=F64)
    preds = edited_predictions(
        acts_nm, weight_km, bias_k, col_m, torch.cat([zero, grid]), "suppress", mode, chunk_size
    )
    flip = preds[1:] != labels.unsqueeze(0)  # [A, N]
    first = flip.to(torch.int8).argmax(dim=0)
    out = torch.where(flip.any(dim=0), grid[first], torch.full(labels.shape, math.inf, dtype=F64))
    return torch.where(preds[0] != labels, torch.zeros_like(out), out)


def all_terms_nonnegative(acts_nm: ArrayLike, w_nm: ArrayLike) -> torch.Tensor:
    """Bool [N]: every ``w_j a_j >= 0``, the condition that makes alpha_linear <= alpha_exact."""
    return (_t64(w_nm) * _t64(acts_nm) >= 0).all(dim=1)


def summarise(
    values_n: ArrayLike, labels_n: ArrayLike, num_classes: int
) -> dict[int, dict[str, Any]]:
    """Per-class distribution of an alpha_crit estimate.

    For each class k: ``count`` (samples), ``n_finite``, ``frac_inf``, ``frac_nan`` (e.g. brentq
    failures) and ``median``/``q25``/``q75`` over the finite values only. Fractions are of
    ``count``; any statistic without data is ``None`` (JSON friendly).
    """
    vals = np.asarray(
        values_n.detach().cpu().numpy() if isinstance(values_n, torch.Tensor) else values_n,
        dtype=np.float64,
    ).reshape(-1)
    labels = np.asarray(
        labels_n.detach().cpu().numpy() if isinstance(labels_n, torch.Tensor) else labels_n
    ).reshape(-1)
    if vals.shape != labels.shape:
        raise ValueError("values_n and labels_n must have the same length")
    out: dict[int, dict[str, Any]] = {}
    for k in range(num_classes):
        v = vals[labels == k]
        finite = v[np.isfinite(v)]
        count = int(v.size)
        row: dict[str, Any] = {
            "count": count,
            "n_finite": int(finite.size),
            "frac_inf": float(np.isinf(v).mean()) if count else None,
            "frac_nan": float(np.isnan(v).mean()) if count else None,
        }
        if finite.size:
            q25, med, q75 = np.quantile(finite, [0.25, 0.5, 0.75])
            row.update(median=float(med), q25=float(q25), q75=float(q75))
        else:
            row.update(median=None, q25=None, q75=None)
        out[k] = row
    return out


def sign_changes(
    acts_nm: ArrayLike, w_nm: ArrayLike, b_n: ArrayLike, col: ArrayLike
) -> torch.Tensor:
    """Number of roots of ``z(alpha)`` on ``alpha >= 0`` per sample [N] (int64).

    ``z`` is linear between breakpoints, so each sign change between consecutive breakpoint
    values (``z(0)`` first) is exactly one root. brentq's answer is the smallest root, and so
    comparable with :func:`alpha_exact`, only where this is 1.
    """
    t, b, _ = _prepare(acts_nm, w_nm, b_n, col)
    _, z_bp = breakpoint_logits(acts_nm, w_nm, b_n, col)
    seq = torch.cat([(b + t.sum(1))[:, None], z_bp], dim=1)
    valid = ~torch.isnan(seq)
    s = torch.sign(torch.nan_to_num(seq))
    change = (s[:, 1:] * s[:, :-1] < 0) & valid[:, 1:] & valid[:, :-1]
    return change.sum(1)


ESTIMATORS = ("linear", "exact", "brentq", "empirical")


def empirical_grid(a_cfg: AlphaCritConfig) -> torch.Tensor:
    """0, then grid_steps - 1 alphas from grid_min to grid_max (log or linear spacing)."""
    n = a_cfg.grid_steps - 1
    lo, hi = a_cfg.grid_min, a_cfg.grid_max
    if a_cfg.grid_spacing == "log":
        rest = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    else:
        rest = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), rest])


@torch.no_grad()
def real_model_predictions(model, images_u8, col, alphas, norm) -> torch.Tensor:
    """Predictions [N] of the whole edited model (paper rule, suppress), image n at alphas[n]."""
    head = head_of(model)
    original = head.weight.detach().clone()
    x = normalise(images_u8, tuple(norm["mean"]), tuple(norm["std"]))
    preds = torch.empty(len(alphas), dtype=torch.int64)
    try:
        for n, alpha in enumerate(alphas.tolist()):
            head.weight.copy_(edit_head(original, col, alpha, "suppress", "paper"))
            preds[n] = model(x[n : n + 1]).argmax(1)[0]
    finally:
        head.weight.copy_(original)
    return preds


def check_flips_on_real_model(model, images_u8, labels, col, grid, flips, norm) -> torch.Tensor:
    """True where the real edited model confirms a cached decision-flip alpha: the label still
    holds one grid step before the flip and is lost at it (kept at the grid's end when the
    cached flip is inf; lost at alpha = 0 when it is 0)."""
    idx = torch.searchsorted(grid, flips.clamp(max=float(grid[-1])))
    before = torch.where(torch.isinf(flips), grid[-1], grid[(idx - 1).clamp(min=0)])
    at = torch.where(torch.isinf(flips), grid[-1], flips)
    keep = real_model_predictions(model, images_u8, col, before, norm) == labels
    lost = real_model_predictions(model, images_u8, col, at, norm) != labels
    ok_inf = torch.isinf(flips) & keep
    ok_zero = (flips == 0) & lost
    ok_flip = torch.isfinite(flips) & (flips > 0) & keep & lost
    return ok_inf | ok_zero | ok_flip


# --- the alpha_crit stage's analysis ----------------------------------------------------------


def estimate_all(
    acts_nm: torch.Tensor,
    labels_n: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    w_dec_ml: torch.Tensor,
    dominant_k: torch.Tensor,
    grid: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every estimator's alpha_crit per sample [N], each sample's class's dominant feature
    suppressed (float64 head and decoder in)."""
    acts64 = acts_nm.double()
    cols_nm = w_dec_ml[:, dominant_k[labels_n]].T  # each sample's class's dominant column
    w_nm, b_n = class_rows(weight_km, bias_k, labels_n)
    est = {
        "linear": alpha_linear(acts64, w_nm, b_n, cols_nm),
        "exact": alpha_exact(acts64, w_nm, b_n, cols_nm),
        "brentq": alpha_brentq(acts64, w_nm, b_n, cols_nm),
        "empirical": torch.full((len(labels_n),), math.nan, dtype=F64),
    }
    for k in range(len(dominant_k)):
        idx = torch.nonzero(labels_n == k).flatten()
        if len(idx):
            est["empirical"][idx] = alpha_empirical(
                acts64[idx], labels_n[idx], weight_km, bias_k, w_dec_ml[:, dominant_k[k]], grid,
                "paper",
            )  # fmt: skip
    return est


def verify_on_real_model(
    model, images_u8, labels_n, w_dec_ml, dominant_k, grid, empirical_n, samples: int, norm
) -> dict[str, int]:
    """How many of the first ``samples`` val images (spread over the classes) the whole edited
    model confirms the cached empirical flip of (:func:`check_flips_on_real_model`)."""
    verify = {"checked": 0, "agree": 0}
    if not samples:
        return verify
    per_class = max(1, math.ceil(samples / len(dominant_k)))
    for k in range(len(dominant_k)):
        chosen = torch.nonzero(labels_n == k).flatten()[:per_class]
        if not len(chosen):
            continue
        col = w_dec_ml[:, dominant_k[k]]
        ok = check_flips_on_real_model(
            model, images_u8[chosen], labels_n[chosen], col.float(), grid, empirical_n[chosen],
            norm,
        )  # fmt: skip
        verify["checked"] += len(chosen)
        verify["agree"] += int(ok.sum())
    return verify


def sample_rows(
    est: dict[str, torch.Tensor],
    labels_n: torch.Tensor,
    dominant_k: torch.Tensor,
    nonneg_n: torch.Tensor,
    classes: Sequence[str],
) -> list[dict]:
    """plots/alpha_crit/samples.csv: one row per val sample."""
    return [
        {"index": i, "class": classes[int(labels_n[i])], "feature": int(dominant_k[labels_n[i]])}
        | {f"alpha_{name}": float(est[name][i]) for name in ESTIMATORS}
        | {"all_terms_nonnegative": bool(nonneg_n[i])}
        for i in range(len(labels_n))
    ]


def alpha_crit_metrics(
    est: dict[str, torch.Tensor],
    labels_n: torch.Tensor,
    nonneg_n: torch.Tensor,
    roots_n: torch.Tensor,
    a_cfg: AlphaCritConfig,
    classes: Sequence[str],
    verify: dict[str, int],
) -> dict[str, Any]:
    """metrics/alpha_crit.json: per-class distributions and how the estimators agree."""
    num_classes = len(classes)
    single = (roots_n == 1) & torch.isfinite(est["brentq"])
    lin_le_exact = est["linear"] <= est["exact"] + 1e-9
    summaries = {name: summarise(est[name], labels_n, num_classes) for name in ESTIMATORS}
    return {
        "units": "absolute alpha of the paper's rule (decoder columns as fitted)",
        "empirical_grid": {
            "min": a_cfg.grid_min,
            "max": a_cfg.grid_max,
            "steps": a_cfg.grid_steps,
            "spacing": a_cfg.grid_spacing,
        },
        "per_class": {
            classes[k]: {name: summaries[name][k] for name in ESTIMATORS}
            for k in range(num_classes)
        },
        "median_exact": _median(est["exact"]),
        "fraction_all_terms_nonnegative": float(nonneg_n.double().mean()),
        "linear_le_exact_when_nonnegative": _fraction(lin_le_exact[nonneg_n]),
        "linear_le_exact_overall": _fraction(lin_le_exact),
        "fraction_single_root": float((roots_n == 1).double().mean()),
        "fraction_multiple_roots": float((roots_n > 1).double().mean()),
        "exact_vs_brentq_max_abs_diff_single_root": (
            float((est["exact"][single] - est["brentq"][single]).abs().max())
            if single.any()
            else None
        ),
        "real_model_checked": verify["checked"],
        "real_model_agree": verify["agree"],
    }


def _median(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if len(finite) else None


def _fraction(mask: torch.Tensor) -> float | None:
    return float(mask.double().mean()) if len(mask) else None
