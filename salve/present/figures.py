"""The report's matplotlib figures, as PNG bytes.

Drawn on matplotlib's Agg canvas through the object-oriented API (no pyplot state, no display),
under a fixed rc context (fonts bundled with matplotlib, fixed sizes) and saved with
``metadata={"Software": None}`` then palette-compacted: the PNG bytes depend only on the data, so
a page that embeds them is the same file for the same inputs. Every function takes plain data
(lists, dicts, numbers) and returns None when there is nothing to draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from salve.alpha_crit import ESTIMATORS

ESTIMATOR_COLOURS = {
    "linear": "#1f77b4",
    "exact": "#ff7f0e",
    "brentq": "#2ca02c",
    "empirical": "#9467bd",
}
DPI = 80
MAX_CURVE_PANELS = 20  # edit-curve small multiples per figure
CLASSES_PER_ROW = 10  # alpha_crit distributions: classes per subplot row

_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "svg.hashsalt": "salve-report",
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "axes.grid": False,
    "image.interpolation": "nearest",
}
PNG_METADATA = {"Software": None}  # PNG bytes depend only on the figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """PNG bytes of ``fig`` (palette-compacted), with no software/date metadata: the same
    figure gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
    return compact_png(buf.getvalue())


def compact_png(png: bytes, colors: int = 256) -> bytes:
    """``png`` re-encoded with an adaptive palette of ``colors`` (median cut, no dithering) and
    no metadata: a third of the size for figures and overlays, with no visible change. The same
    input gives the same bytes; an unreadable input is returned unchanged."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            small = im.convert("RGB").quantize(
                colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
    except (OSError, ValueError):
        return png
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    out = buf.getvalue()
    return out if len(out) < len(png) else png


def _plot(fn: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Run a figure function under the report's fixed rc settings."""

    def wrapper(*args: Any, **kwargs: Any) -> bytes | None:
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def mpl_text(text: Any, limit: int = 28) -> str:
    """Label text safe for matplotlib: no mathtext ($ escaped), at most ``limit`` characters."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _floats(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (KeyError, TypeError, ValueError):
            out.append(math.nan)
    return out


@_plot
def finetune_figure(epochs: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Fine-tuning loss and accuracy per epoch (rows of plots/finetune/epochs.csv)."""
    if not epochs:
        return None
    x = _floats(epochs, "epoch")
    fig = _figure(7.5, 2.6)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(x, _floats(epochs, "train_loss"), "o-", color="#1d3557", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss")
    for key, colour in (("train_accuracy", "#457b9d"), ("val_accuracy", "#e63946")):
        ax2.plot(x, _floats(epochs, key), "o-", color=colour, label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if len(x) <= 12:
            ax.set_xticks(x)
    return figure_png(fig)


@_plot
def sae_loss_figure(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """SAE training loss terms per epoch (rows of plots/fit_sae/loss.csv), log scale."""
    if not rows:
        return None
    x = _floats(rows, "epoch")
    fig = _figure(7.5, 2.4)
    ax = fig.subplots()
    for key, colour in (("loss", "#1d3557"), ("mse", "#e63946"), ("l1", "#2a9d8f")):
        if key in rows[0]:
            y = np.asarray(_floats(rows, key))
            if np.all(np.isfinite(y) & (y > 0)):
                ax.plot(x, y, color=colour, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("SAE training loss (total, reconstruction, sparsity term)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    return figure_png(fig)


@_plot
def heatmap_figure(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    colorbar_label: str = "",
    diverging: bool = False,
    annotate: bool = False,
    xlabel: str = "",
    ylabel: str = "",
    marks: Sequence[tuple[int, int]] = (),
) -> bytes | None:
    """A labelled heatmap; ``diverging`` centres a red-blue map on zero; ``marks`` (row, column)
    cells are outlined."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return None
    nr, nc = m.shape
    width = min(13.5, max(5.0, 2.2 + 0.16 * nc))
    height = min(14.0, max(2.2, 1.3 + 0.24 * nr))
    fig = _figure(width, height)
    ax = fig.subplots()
    finite = m[np.isfinite(m)]
    if diverging:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        lim = lim or 1.0
        im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    else:
        im = ax.imshow(m, cmap="viridis", aspect="auto")
    step_c = max(1, math.ceil(nc / 64))
    step_r = max(1, math.ceil(nr / 50))
    ax.set_xticks(range(0, nc, step_c))
    ax.set_xticklabels([mpl_text(c, 10) for c in col_labels[::step_c]], rotation=90)
    ax.set_yticks(range(0, nr, step_r))
    ax.set_yticklabels([mpl_text(r, 24) for r in row_labels[::step_r]])
    ax.set_title(mpl_text(title, 120))
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if annotate and nr * nc <= 400:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        for i in range(nr):
            for j in range(nc):
                v = m[i, j]
                if np.isfinite(v):
                    dark = abs(v) > 0.6 * lim if diverging else False
                    ax.text(
                        j,
                        i,
                        f"{v:+.2f}" if diverging else f"{v:.2g}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if dark else "black",
                    )
    for r, c in marks:
        if 0 <= r < nr and 0 <= c < nc:
            ax.add_patch(
                Rectangle(
                    (c - 0.5, r - 0.5),
                    1,
                    1,
                    fill=False,
                    ec="black" if diverging else "white",
                    lw=1.2,
                )
            )
    cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.01)
    if colorbar_label:
        cb.set_label(colorbar_label)
    return figure_png(fig)


# Edit curves: {(feature, sign): {"alpha": [A], "accuracy": [[K] * A], "overall": [A]}}
Curves = dict[tuple[int, str], dict[str, list]]


def curves_from_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], Curves]:
    """Parse long-format edit curves (plots/edit/curves.csv rows) into per-feature arrays.

    Classes are indexed in order of first appearance (the stage writes them in class order);
    rows repeated for a feature that has two roles are counted once.
    """
    classes: list[str] = []
    index: dict[str, int] = {}
    acc: dict[tuple[int, str], dict[float, dict[int, float]]] = {}
    overall: dict[tuple[int, str], dict[float, float]] = {}
    for r in rows:
        name = str(r["class"])
        if name not in index:
            index[name] = len(classes)
            classes.append(name)
        key = (int(float(r["feature"])), str(r["sign"]))
        alpha = float(r["alpha"])
        acc.setdefault(key, {}).setdefault(alpha, {})[index[name]] = float(r["accuracy"])
        overall.setdefault(key, {})[alpha] = float(r["overall"])
    curves: Curves = {}
    k = len(classes)
    for key, by_alpha in acc.items():
        alphas = sorted(by_alpha)
        curves[key] = {
            "alpha": alphas,
            "accuracy": [[by_alpha[a].get(c, math.nan) for c in range(k)] for a in alphas],
            "overall": [overall[key][a] for a in alphas],
        }
    return classes, curves


@_plot
def edit_curves_figure(
    curves: Curves,
    targets: Sequence[tuple[int, int]],
    class_names: Sequence[str],
    sign: str,
    *,
    alpha_label: str = "alpha",
    max_panels: int = MAX_CURVE_PANELS,
) -> bytes | None:
    """Small multiples, one per (class, its dominant feature): every class's accuracy vs alpha
    when that feature is edited (``sign``: "suppress" or "enhance"); the target class in red,
    the other classes in grey, overall accuracy dashed."""
    panels = [(k, f) for k, f in targets if (f, sign) in curves][:max_panels]
    if not panels:
        return None
    ncols = min(5, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(2.3 * ncols, 1.9 * nrows + 0.35)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False))
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, (k, f) in zip(axes.flat, panels, strict=False):
        c = curves[(f, sign)]
        a = np.asarray(c["alpha"])
        y = np.asarray(c["accuracy"], dtype=np.float64)
        for j in range(y.shape[1]):
            if j != k:
                ax.plot(a, y[:, j], color="#9aa5b1", lw=0.8, alpha=0.7)
        ax.plot(a, c["overall"], color="black", lw=1.0, ls="--")
        if k < y.shape[1]:
            ax.plot(a, y[:, k], color="#d62828", lw=2.2)
        name = class_names[k] if k < len(class_names) else str(k)
        ax.set_title(f"{mpl_text(name, 18)} · f{f}", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.25)
    for ax in axes[-1]:
        ax.set_xlabel(alpha_label)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles = [
        Line2D([], [], color="#d62828", lw=2.2, label="target class"),
        Line2D([], [], color="#9aa5b1", lw=0.8, label="other classes"),
        Line2D([], [], color="black", lw=1.0, ls="--", label="overall"),
    ]
    verb = "suppressing" if sign == "suppress" else "enhancing"
    fig.suptitle(f"per-class accuracy when {verb} each class's dominant feature", fontsize=9)
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return figure_png(fig)


def split_alpha_values(
    values: Sequence[float],
) -> tuple[list[float], int, int, int]:
    """(finite positive values, count of +inf, count of values <= 0, count of nan)."""
    arr = np.asarray(values, dtype=np.float64)
    pos = arr[np.isfinite(arr) & (arr > 0)]
    return (
        pos.tolist(),
        int(np.isposinf(arr).sum()),
        int((np.isfinite(arr) & (arr <= 0)).sum()),
        int(np.isnan(arr).sum()),
    )


@_plot
def alpha_crit_figure(
    class_names: Sequence[str],
    values: Mapping[str, Sequence[Sequence[float]]],
    *,
    estimators: Sequence[str] = ESTIMATORS,
    per_row: int = CLASSES_PER_ROW,
) -> bytes | None:
    """Per class, the four estimators' alpha_crit distributions side by side: box plots with
    the samples as points, on a log axis. Only finite positive values are drawn; counts of
    infinite values (the logit never reaches zero) are written above each box instead."""
    k = len(class_names)
    if k == 0 or not any(values.get(e) for e in estimators):
        return None
    rows = math.ceil(k / per_row)
    fig = _figure(min(13.5, 1.2 + 1.15 * min(k, per_row)), 2.9 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, 1, squeeze=False)[:, 0])
    rng = np.random.default_rng(0)
    ne = len(estimators)
    width = 0.8 / ne
    for r, ax in enumerate(axes):
        lo, hi = r * per_row, min(k, (r + 1) * per_row)
        any_points = False
        for ci in range(lo, hi):
            for ei, est in enumerate(estimators):
                per_class = values.get(est) or []
                vals = per_class[ci] if ci < len(per_class) else []
                pos, n_inf, n_le0, n_nan = split_alpha_values(vals)
                x = ci - lo + (ei - (ne - 1) / 2) * width
                colour = ESTIMATOR_COLOURS.get(est, "#333333")
                if pos:
                    any_points = True
                    ax.boxplot(
                        [pos],
                        positions=[x],
                        widths=width * 0.85,
                        showfliers=False,
                        patch_artist=True,
                        boxprops={"facecolor": colour, "alpha": 0.35, "edgecolor": colour},
                        medianprops={"color": colour, "lw": 1.6},
                        whiskerprops={"color": colour},
                        capprops={"color": colour},
                    )
                    jitter = rng.uniform(-width * 0.3, width * 0.3, len(pos))
                    ax.scatter(x + jitter, pos, s=3, color=colour, alpha=0.6, lw=0)
                notes = []
                if n_inf:
                    notes.append(f"∞{n_inf}")
                if n_le0:
                    notes.append(f"≤0:{n_le0}")
                if n_nan:
                    notes.append(f"n/a{n_nan}")
                if notes:
                    ax.text(
                        x,
                        1.01,
                        " ".join(notes),
                        transform=ax.get_xaxis_transform(),
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=colour,
                    )
        ax.set_yscale("log")
        if not any_points:
            ax.set_ylim(0.1, 10)
            ax.text(0.5, 0.5, "no finite alpha_crit", transform=ax.transAxes, ha="center")
        ax.set_xlim(-0.6, hi - lo - 0.4)
        ax.set_xticks(range(hi - lo))
        labels = [mpl_text(class_names[c], 14) for c in range(lo, hi)]
        long = any(len(t) > 4 for t in labels)
        ax.set_xticklabels(labels, rotation=20 if long else 0, ha="right" if long else "center")
        ax.set_ylabel("alpha_crit (log)")
        ax.grid(alpha=0.25, axis="y", which="both")
        for sep in range(1, hi - lo):
            ax.axvline(sep - 0.5, color="#dde1e6", lw=0.8)
    handles = [
        Patch(color=ESTIMATOR_COLOURS.get(e, "#333"), alpha=0.6, label=e) for e in estimators
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=ne, frameon=False)
    return figure_png(fig)


def alpha_medians(values: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Per estimator, per class: the median of the finite positive values (nan when none)."""
    out = {}
    for est, per_class in values.items():
        meds = []
        for vals in per_class:
            pos = split_alpha_values(vals)[0]
            meds.append(float(np.median(pos)) if pos else math.nan)
        out[est] = meds
    return out


@_plot
def alpha_medians_figure(
    class_names: Sequence[str],
    values: Mapping[str, Sequence[Sequence[float]]],
    *,
    estimators: Sequence[str] = ESTIMATORS,
    ylim: tuple[float, float] | None = None,
) -> bytes | None:
    """Per class, the median finite alpha_crit of each estimator (log axis; ``ylim`` fixes the
    range, e.g. to share it between two revisions)."""
    meds = alpha_medians({e: values[e] for e in estimators if e in values})
    if not class_names or not any(np.isfinite(m).any() for m in meds.values() if m):
        return None
    k = len(class_names)
    fig = _figure(min(9.0, 2.0 + 0.45 * k), 2.8)
    ax = fig.subplots()
    x = np.arange(k)
    offsets = np.linspace(-0.2, 0.2, max(1, len(meds)))
    for off, (est, m) in zip(offsets, meds.items(), strict=False):
        ax.plot(
            x + off,
            m,
            "o",
            color=ESTIMATOR_COLOURS.get(est, "#333"),
            label=est,
            ms=4,
        )
    ax.set_yscale("log")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xticks(x)
    labels = [mpl_text(c, 12) for c in class_names]
    long = any(len(t) > 4 for t in labels)
    ax.set_xticklabels(labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylabel("median alpha_crit (finite)")
    ax.grid(alpha=0.25, which="both")
    fig.legend(loc="outside lower center", ncols=len(meds), frameon=False)
    return figure_png(fig)


@_plot
def methods_figure(methods: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> bytes | None:
    """Efficacy against specificity per edit method: means with 95 % intervals over SAE seeds
    (metrics/evaluate.json). Top right is the ideal: the target falls, the others stay."""
    names = [m for m in methods if "efficacy" in methods[m] and "specificity_mean" in methods[m]]
    if not names:
        return None
    fig = _figure(6.2, 3.8)
    ax = fig.subplots()
    for i, name in enumerate(names):
        eff, spec = methods[name]["efficacy"], methods[name]["specificity_mean"]
        x, y = float(eff["mean"]), float(spec["mean"])
        xerr = [[x - float(eff["ci95"][0])], [float(eff["ci95"][1]) - x]]
        yerr = [[y - float(spec["ci95"][0])], [float(spec["ci95"][1]) - y]]
        salve = name.startswith("salve")
        colour = ("#e63946" if name == "salve_projection" else "#9d0208") if salve else f"C{i % 10}"
        marker = ("s" if name == "salve_paper" else "D") if salve else "o"
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, capsize=3, label=name)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.set_xlabel("efficacy: target accuracy drop")
    ax.set_ylabel("specificity: mean change of other classes")
    ax.set_title("edit methods (mean, 95 % CI over SAE seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return figure_png(fig)
