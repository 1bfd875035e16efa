"""The study page's figures, drawn with the report's figure kit (salve/figures.py): fixed rc
settings and metadata-free, palette-compacted PNGs, so the same numbers give the same bytes.
Plain data in, PNG bytes out; None when there is nothing to draw."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D

from salve.present.figures import _figure, _plot, figure_png, mpl_text

NORM_LABELS = {"linf": "L-inf", "l2": "L2"}
HEAD_COLOUR, DEEPER_COLOUR = "#457b9d", "#e63946"


def _name(class_names: Sequence[str], k: int) -> str:
    return class_names[k] if 0 <= k < len(class_names) else f"class {k}"


def _class_colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _finite_range(values: np.ndarray) -> tuple[float, float] | None:
    finite = values[np.isfinite(values) & (values > 0)]
    if not finite.size:
        return None
    return float(finite.min()), float(finite.max())


@_plot
def vulnerability_figure(
    samples: Mapping[str, Sequence[float]], class_names: Sequence[str]
) -> bytes | None:
    """alpha_crit (exact) against the smallest flipping size, one panel per norm, log axes.

    Infinite values are drawn at the panel's edge as open triangles (never reached)."""
    norms = [n for n in NORM_LABELS if f"eps_{n}" in samples]
    alpha = np.asarray(samples.get("alpha_exact", []), dtype=np.float64)
    labels = np.asarray(samples.get("label", []), dtype=np.int64)
    if not norms or not alpha.size:
        return None
    colours = _class_colours(len(class_names))
    fig = _figure(3.9 * len(norms), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(norms)))
    for ax, norm in zip(axes, norms, strict=True):
        eps = np.asarray(samples[f"eps_{norm}"], dtype=np.float64)
        keep = eps > 0
        x_range, y_range = _finite_range(alpha[keep]), _finite_range(eps[keep])
        if x_range is None or y_range is None:
            ax.text(0.5, 0.5, "no finite pairs", ha="center", va="center", transform=ax.transAxes)
            continue
        x_edge, y_edge = x_range[1] * 3.0, y_range[1] * 3.0
        x = np.where(np.isinf(alpha), x_edge, alpha)
        y = np.where(np.isinf(eps), y_edge, eps)
        for k in sorted(set(labels[keep].tolist())):
            sel = keep & (labels == k)
            edge = sel & (np.isinf(alpha) | np.isinf(eps))
            inner = sel & ~edge
            ax.scatter(x[inner], y[inner], s=12, color=colours[k], lw=0, alpha=0.85)
            ax.scatter(x[edge], y[edge], s=16, marker="^", facecolors="none", edgecolors=colours[k])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(x_range[1] * 1.7, color="#999999", lw=0.6, ls=":")
        ax.axhline(y_range[1] * 1.7, color="#999999", lw=0.6, ls=":")
        ax.set_xlabel("alpha_crit (exact; beyond the dotted line: infinite)")
        ax.set_ylabel(f"smallest flipping {NORM_LABELS[norm]} size (pixels in [0, 1])")
        ax.set_title(f"{NORM_LABELS[norm]}: n = {int(keep.sum())}")
        ax.grid(alpha=0.3, which="major")
    if len(class_names) <= 20:
        handles = [
            Line2D([], [], marker="o", ls="", color=colours[k], label=mpl_text(name, 12))
            for k, name in enumerate(class_names)
        ]
        fig.legend(handles=handles, loc="outside right center", title="class")
    return figure_png(fig)


def _ci_arrays(cells: Sequence[Mapping[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Means and asymmetric error bars [2, n] from mean_ci95 dicts (NaN when absent)."""
    means, lows, highs = [], [], []
    for cell in cells:
        if not cell or cell.get("mean") is None or not math.isfinite(cell["mean"]):
            means.append(math.nan)
            lows.append(0.0)
            highs.append(0.0)
            continue
        lo, hi = cell["ci95"]
        means.append(cell["mean"])
        lows.append(max(cell["mean"] - lo, 0.0) if math.isfinite(lo) else 0.0)
        highs.append(max(hi - cell["mean"], 0.0) if math.isfinite(hi) else 0.0)
    return np.asarray(means), np.asarray([lows, highs])


VARIANT_PANELS = (
    ("salve_projection", "efficacy", "projection: efficacy (target drop)"),
    ("salve_projection", "specificity_mean", "projection: specificity (others' change)"),
    ("salve_paper", "efficacy", "paper rule: efficacy"),
    ("salve_paper", "specificity_mean", "paper rule: specificity"),
)


@_plot
def variants_figure(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Per SAE kind: efficacy and specificity of both SALVE edits, means with 95 % CIs over
    seeds (horizontal error bars), the kind's val L0 in its label."""
    if not rows:
        return None
    names = [f"{r['name']} (L0 {r['l0']['mean']:.3g})" for r in rows]
    y = np.arange(len(rows))
    fig = _figure(10.0, 0.9 + 0.32 * len(rows))
    axes = fig.subplots(1, len(VARIANT_PANELS), sharey=True)
    for ax, (method, metric, title) in zip(axes, VARIANT_PANELS, strict=True):
        cells = [r["methods"].get(method, {}).get(metric) for r in rows]
        means, err = _ci_arrays(cells)
        ax.errorbar(means, y, xerr=err, fmt="o", color="#1d3557", ms=4, capsize=2, lw=1)
        ax.axvline(0.0, color="#999999", lw=0.6)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, [mpl_text(n, 34) for n in names])
    axes[0].invert_yaxis()
    return figure_png(fig)


DEEPER_PANELS = (
    ("efficacy", "efficacy (target accuracy drop)"),
    ("specificity_mean", "specificity (mean change, others)"),
    ("generalisation", "generalisation (drop on shifted)"),
)


@_plot
def deeper_figure(
    per_class: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> bytes | None:
    """Per evaluated class: the backbone edit next to the head edit of the same class."""
    rows = [r for r in per_class if r.get("deeper") and r.get("head")]
    if not rows:
        return None
    x = np.arange(len(rows))
    fig = _figure(min(3.2 + 0.45 * len(rows), 14.0), 2.2 * len(DEEPER_PANELS))
    axes = fig.subplots(len(DEEPER_PANELS), 1, sharex=True)
    for ax, (metric, title) in zip(axes, DEEPER_PANELS, strict=True):
        head = [r["head"].get(metric, math.nan) for r in rows]
        deeper = [r["deeper"].get(metric, math.nan) for r in rows]
        ax.bar(x - 0.2, head, 0.4, color=HEAD_COLOUR, label="head edit")
        ax.bar(x + 0.2, deeper, 0.4, color=DEEPER_COLOUR, label="backbone edit")
        ax.axhline(0.0, color="#666666", lw=0.6)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(loc="best")
    labels = [mpl_text(_name(class_names, r["class"]), 10) for r in rows]
    axes[-1].set_xticks(x, labels, rotation=45 if len(rows) > 12 else 0)
    axes[-1].set_xlabel("class")
    return figure_png(fig)
