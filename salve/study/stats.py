"""Rank correlation with a bootstrap confidence interval, overall and per class.

Used to ask whether alpha_crit (how hard a head edit must push to kill a sample's class) predicts
the minimal adversarial perturbation. Both quantities can be infinite (alpha_crit when the logit
never reaches zero, the perturbation when eps_max does not flip the sample): ``+inf`` ranks last
and ``-inf`` first, ties share their mean rank; NaN pairs (e.g. a failed root search) are dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

ArrayLike = np.ndarray | torch.Tensor | list | tuple
# Bootstrap resamples ranked at once: bounds memory to ~this many float64 values per array.
_BOOT_CHUNK_ELEMS = 1 << 22


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {out.shape}")
    return out


def _rowwise_pearson(a_bn: np.ndarray, b_bn: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = a_bn - a_bn.mean(axis=1, keepdims=True)
    b = b_bn - b_bn.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def _spearman_rows(x_bn: np.ndarray, y_bn: np.ndarray) -> np.ndarray:
    return _rowwise_pearson(rankdata(x_bn, axis=1), rankdata(y_bn, axis=1))


def spearman_ci(x: ArrayLike, y: ArrayLike, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of paired values with a 95 % percentile bootstrap CI (pairs resampled).

    Returns ``{"spearman": rho, "ci95": [lo, hi], "n": n}`` with ``n`` the pairs kept after
    dropping NaNs. rho is NaN with fewer than 3 pairs or a constant side; resamples that come out
    constant are left out of the CI (NaN bounds if none is left). ``n_boot = 0`` skips the CI.
    """
    xs, ys = _as_1d(x, "x"), _as_1d(y, "y")
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must pair up: lengths {xs.size} and {ys.size}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    keep = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[keep], ys[keep]
    n = int(xs.size)
    nan = float("nan")
    if n < 3:
        return {"spearman": nan, "ci95": [nan, nan], "n": n}
    rho = float(_spearman_rows(xs[None], ys[None])[0])
    if n_boot == 0:
        return {"spearman": rho, "ci95": [nan, nan], "n": n}
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK_ELEMS // n)
    boots = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        boots.append(_spearman_rows(xs[idx], ys[idx]))
    rhos = np.concatenate(boots)
    rhos = rhos[~np.isnan(rhos)]
    if rhos.size == 0:
        return {"spearman": rho, "ci95": [nan, nan], "n": n}
    lo, hi = np.percentile(rhos, [2.5, 97.5])
    return {"spearman": rho, "ci95": [float(lo), float(hi)], "n": n}


def spearman_ci_per_class(
    x: ArrayLike,
    y: ArrayLike,
    labels: ArrayLike,
    *,
    num_classes: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[int, dict[str, Any]]:
    """:func:`spearman_ci` within each class label; class k bootstraps with seed ``(seed, k)``.

    Classes ``0 .. num_classes - 1`` (default: up to the largest label) all appear; an empty one
    has ``n = 0`` and NaN values.
    """
    xs, ys = _as_1d(x, "x"), _as_1d(y, "y")
    lab = _as_1d(labels, "labels")
    if not xs.shape == ys.shape == lab.shape:
        raise ValueError("x, y and labels must have the same length")
    if lab.size and (np.any(lab < 0) or np.any(lab != np.round(lab))):
        raise ValueError("labels must be non-negative integers")
    k = int(lab.max()) + 1 if num_classes is None and lab.size else int(num_classes or 0)
    if lab.size and lab.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}) (num_classes={num_classes})")
    out = {}
    for c in range(k):
        sel = lab == c
        class_seed = int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
        out[c] = spearman_ci(xs[sel], ys[sel], n_boot=n_boot, seed=class_seed)
    return out
