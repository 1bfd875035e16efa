"""The run report and the revision comparison page: figures and self-contained HTML.

Pure functions of plain data (lists, dicts, numbers, PNG bytes): nothing here knows where the
pipeline keeps its artifacts. ``tasks/report.py`` and ``flows/compare.py`` load them and call in.

Figures are drawn with matplotlib's Agg canvas through the object-oriented API (no pyplot state,
no display), under a fixed rc context (fonts bundled with matplotlib, fixed sizes) and saved with
``metadata={"Software": None}``: the PNG bytes depend only on the data. They are embedded as
``data:image/png;base64`` URIs, so a page is one file that opens offline: inline CSS, no
JavaScript, no external reference of any kind. Every piece of text that comes from data (class
names, paths, parameter values) goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

ESTIMATORS = ("linear", "exact", "brentq", "empirical")
ESTIMATOR_COLOURS = {
    "linear": "#1f77b4",
    "exact": "#ff7f0e",
    "brentq": "#2ca02c",
    "empirical": "#9467bd",
}
DPI = 80
MAX_CURVE_PANELS = 20  # edit-curve small multiples per figure
MAX_HEATMAP_FEATURES = 128  # wider SAEs: only the features some class ranks in its top list
CLASSES_PER_ROW = 10  # alpha_crit distributions: classes per subplot row

# (id, title) of the report's sections, in page order.
REPORT_SECTIONS: tuple[tuple[str, str], ...] = (
    ("metadata", "Run metadata"),
    ("training", "Data and fine-tuning"),
    ("sae-quality", "SAE quality"),
    ("class-feature-heatmap", "Class x feature mean codes"),
    ("dominant-features", "Dominant features: Grad-FAM and activation maximisation"),
    ("edit-curves", "Suppression and enhancement curves"),
    ("cross-class", "Cross-class effects"),
    ("alpha-crit", "alpha_crit distributions"),
    ("edited-checkpoint", "Edited checkpoint"),
)
COMPARE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("revisions", "Revisions"),
    ("params-diff", "Parameter changes"),
    ("metrics-diff", "Metric changes"),
    ("figures", "Key figures"),
)

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
_PNG_METADATA = {"Software": None}


# --------------------------------------------------------------------------------------------
# HTML building blocks
# --------------------------------------------------------------------------------------------


class Raw(str):
    """HTML that is already safe (built here): inserted as is, never escaped again."""


def esc(value: Any) -> str:
    """HTML-escape ``value``'s text (quotes included); Raw passes through."""
    if isinstance(value, Raw):
        return str(value)
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Short text for a number or other value: 4 significant digits, inf as ∞, None as –."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value + 0.0:.{digits}g}" if value != 0 else "0"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def cell(value: Any) -> str:
    return esc(value) if isinstance(value, Raw | str) else esc(fmt(value))


def table(
    header: Sequence[Any],
    rows: Iterable[Sequence[Any]],
    *,
    cls: str = "",
    row_classes: Sequence[str] | None = None,
) -> Raw:
    """A table; str cells are escaped, Raw cells inserted, other values formatted with fmt."""
    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{esc(row_classes[i])}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{rc}>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>")
    attr = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def kv_table(items: Mapping[str, Any] | Iterable[tuple[str, Any]], *, cls: str = "kv") -> Raw:
    pairs = items.items() if isinstance(items, Mapping) else items
    return table(("", ""), [(str(k), v) for k, v in pairs], cls=cls)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, *, cls: str = "fig", width: int | None = None) -> Raw:
    """An <img> whose source is the PNG itself (a data URI)."""
    w = f' width="{int(width)}"' if width else ""
    return Raw(f'<img class="{esc(cls)}" src="{png_data_uri(png)}" alt="{esc(alt)}"{w}>')


def figure_block(png: bytes | None, caption: str, *, missing: str = "not available") -> Raw:
    if png is None:
        return Raw(f'<p class="missing">{esc(caption)}: {esc(missing)}</p>')
    return Raw(f"<figure>{img(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>")


def para(text: str, cls: str = "") -> Raw:
    attr = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<p{attr}>{esc(text)}</p>")


def heading(text: str, level: int = 3, *, anchor: str = "") -> Raw:
    attr = f' id="{esc(anchor)}"' if anchor else ""
    return Raw(f"<h{level}{attr}>{esc(text)}</h{level}>")


def section(sid: str, title: str, parts: Iterable[str]) -> Raw:
    body = "\n".join(str(p) for p in parts)
    return Raw(f'<section id="{esc(sid)}">\n<h2>{esc(title)}</h2>\n{body}\n</section>')


_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  margin: 0; color: #1d232a; background: #f6f7f9; font-size: 14px; line-height: 1.4; }
header { background: #1d3557; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; opacity: .85; font-size: 13px; }
nav { background: #fff; border-bottom: 1px solid #dde1e6; padding: 8px 24px;
  position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 4px 16px; }
nav a { color: #1d3557; text-decoration: none; font-size: 13px; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px;
  padding: 4px 18px 14px; margin: 16px 0; overflow-x: auto; }
h2 { font-size: 18px; border-bottom: 1px solid #e6e9ed; padding-bottom: 6px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 12.5px; }
th, td { border: 1px solid #dde1e6; padding: 3px 8px; text-align: left;
  vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td { font-variant-numeric: tabular-nums; }
table.kv td:first-child { font-weight: 600; color: #43506b; }
table.kv thead { display: none; }
figure { margin: 8px 0 14px; }
figcaption { font-size: 12px; color: #5a6573; margin-top: 2px; }
img.fig { max-width: 100%; height: auto; display: block; }
img.thumb { image-rendering: pixelated; border: 1px solid #dde1e6; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 12px; }
.card { border: 1px solid #dde1e6; border-radius: 6px; padding: 6px 12px 10px; }
.card h3 { margin-top: 6px; }
h3, figcaption { overflow-wrap: anywhere; }
.card .pair { display: flex; gap: 12px; align-items: flex-start; }
.card .pair figure { margin: 4px 0; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.side > div { min-width: 0; }
.better { background: #e3f4e6; color: #14532d; }
.worse { background: #fbe4e4; color: #7f1d1d; }
.neutral { background: #f3f4f6; }
.missing { color: #8a5a00; font-style: italic; }
.note { color: #5a6573; font-size: 12.5px; }
code { background: #f0f2f5; padding: 0 3px; border-radius: 3px; font-size: 12.5px; }
.row { display: flex; flex-wrap: wrap; gap: 0 28px; align-items: flex-start; }
.params { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr));
  gap: 0 16px; }
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """A complete HTML document: header, in-page navigation, the sections (id, title, body)."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(section(sid, t, [b]) for sid, t, b in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """PNG bytes of ``fig`` (palette-compacted), with no software/date metadata: the same
    figure gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=_PNG_METADATA)
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


# --------------------------------------------------------------------------------------------
# The run report
# --------------------------------------------------------------------------------------------


@dataclass
class ReportInputs:
    """Everything the report shows, as loaded from the pipeline's artifacts.

    ``classes`` are the display names (index order). Metrics that key their entries by class
    name use ``metric_class_names`` (the names the upstream stages saw; normally the same).
    """

    classes: list[str]
    dataset_info: dict = field(default_factory=dict)
    fetch_metrics: dict = field(default_factory=dict)
    finetune_epochs: list[dict] = field(default_factory=list)
    finetune_metrics: dict = field(default_factory=dict)
    sidecars: dict[str, dict] = field(default_factory=dict)  # stage -> model/SAE sidecar
    timings: list[dict] = field(default_factory=list)
    sae_metrics: dict = field(default_factory=dict)
    sae_loss: list[dict] = field(default_factory=list)
    ranking: dict = field(default_factory=dict)
    class_means: list[list[float]] = field(default_factory=list)
    gradfam_index: dict = field(default_factory=dict)
    gradfam_images: dict[str, bytes] = field(default_factory=dict)
    edit_metrics: dict = field(default_factory=dict)
    edit_curve_rows: list[dict] = field(default_factory=list)
    alpha_crit_metrics: dict = field(default_factory=dict)
    alpha_values: dict[str, list[list[float]]] = field(default_factory=dict)
    extra_params: dict[str, dict] = field(default_factory=dict)
    metric_class_names: list[str] | None = None
    title: str = "SALVE run report"


@dataclass
class _Counter:
    figures: int = 0
    images: int = 0

    def fig(self, png: bytes | None, caption: str, missing: str = "not available") -> Raw:
        if png is not None:
            self.figures += 1
        return figure_block(png, caption, missing=missing)

    def image(self, png: bytes, alt: str, **kw: Any) -> Raw:
        self.images += 1
        return img(png, alt, **kw)


def _name(classes: Sequence[str], k: int) -> str:
    return classes[k] if 0 <= k < len(classes) else f"class {k}"


def _by_name(
    mapping: Mapping[str, Any], key_names: Sequence[str], k: int, default: Any = None
) -> Any:
    """The entry of a by-class-name metrics dict for class index ``k``."""
    return mapping.get(key_names[k], default) if 0 <= k < len(key_names) else default


def _metadata_section(d: ReportInputs) -> Raw:
    parts = []
    stages = list(d.sidecars)
    if stages:
        rows = []
        for s in stages:
            sc = d.sidecars[s]
            rows.append(
                (
                    s,
                    Raw(f"<code>{esc(sc.get('git_revision', 'unknown'))}</code>"),
                    sc.get("device", "–"),
                    sc.get("cuda_device") or "–",
                    sc.get("torch_threads", "–"),
                )
            )
        prov = [
            heading("Provenance (recorded with each checkpoint)"),
            table(("stage", "git revision", "device", "CUDA device", "torch threads"), rows),
        ]
        libs: dict[str, dict[str, str]] = {}
        for s in stages:
            for lib, ver in (d.sidecars[s].get("libraries") or {}).items():
                libs.setdefault(lib, {})[s] = ver
        if libs:
            lib_stages = [s for s in stages if d.sidecars[s].get("libraries")]
            same = all(len(set(v.values())) == 1 for v in libs.values())
            if same:
                rows = [(lib, next(iter(v.values()))) for lib, v in sorted(libs.items())]
                lib_html = [heading("Library versions"), table(("library", "version"), rows)]
            else:
                rows = [
                    (lib, *(v.get(s, "–") for s in lib_stages)) for lib, v in sorted(libs.items())
                ]
                lib_html = [heading("Library versions"), table(("library", *lib_stages), rows)]
            prov = [Raw(f"<div>{''.join(prov)}</div>"), Raw(f"<div>{''.join(lib_html)}</div>")]
        parts.append(Raw(f'<div class="row">{"".join(prov)}</div>'))
    params: dict[str, dict] = {}
    for s in stages:
        for sec, vals in (d.sidecars[s].get("params") or {}).items():
            params.setdefault(sec, {}).update(vals)
    for sec, vals in d.extra_params.items():
        params.setdefault(sec, {}).update(vals)
    if params:
        blocks = []
        for sec in sorted(params):
            rows = [(k, fmt(v)) for k, v in sorted(params[sec].items())]
            blocks.append(f"<div>{heading(sec, 4)}{table(('key', 'value'), rows)}</div>")
        parts += [
            heading("Parameters"),
            para(
                "As recorded by the stages (checkpoint sidecars and metrics), not read from "
                "params.yaml: these are the values the artifacts were made with.",
                "note",
            ),
            Raw(f'<div class="params">{"".join(blocks)}</div>'),
        ]
    if d.timings:
        rows = []
        for t in d.timings:
            finished = t.get("finished")
            when = (
                datetime.fromtimestamp(float(finished), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                if isinstance(finished, int | float)
                else "–"
            )
            rows.append((t.get("stage", "?"), t.get("status", "?"), t.get("seconds"), when))
        parts += [
            heading("Stage times (last run of each stage)"),
            para(
                "From this workspace's run log: a skipped stage's time is the freshness check "
                "only; stages with no record are not listed.",
                "note",
            ),
            table(("stage", "status", "seconds", "finished"), rows),
        ]
    else:
        parts.append(para("Stage times: not recorded for this workspace.", "missing"))
    return Raw("\n".join(parts))


def _training_section(d: ReportInputs, n: _Counter) -> Raw:
    info = d.dataset_info
    class_list = ", ".join(d.classes)
    items = [
        ("source", info.get("source", d.fetch_metrics.get("source", "–"))),
        ("classes", f"{len(d.classes)}: {class_list}"),
        ("image size", info.get("image_size", d.fetch_metrics.get("image_size", "–"))),
        ("train samples", d.fetch_metrics.get("train_samples", "–")),
        ("val samples", d.fetch_metrics.get("val_samples", "–")),
    ]
    for key in ("split", "val_fraction", "resize", "variant", "seed"):
        if key in info:
            items.append((key.replace("_", " "), info[key]))
    left = [heading("Data"), kv_table(items)]
    right = [heading("Fine-tuning")]
    if d.finetune_metrics:
        right.append(kv_table(sorted(d.finetune_metrics.items())))
    parts = [Raw(f'<div class="row"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>')]
    per_class = info.get("train_per_class")
    val_per_class = info.get("val_per_class") or {}
    if isinstance(per_class, dict) and 0 < len(per_class) <= 30:
        names = list(per_class)
        parts += [
            heading("Samples per class", 4),
            table(
                ("split", *names),
                [
                    ("train", *(per_class[k] for k in names)),
                    ("val", *(val_per_class.get(k, "–") for k in names)),
                ],
            ),
        ]
    parts.append(n.fig(finetune_figure(d.finetune_epochs), "fine-tuning loss and accuracy"))
    return Raw("\n".join(parts))


_SAE_ROWS = (
    ("fvu", "FVU (fraction of variance unexplained)"),
    ("explained_variance", "explained variance"),
    ("l0", "L0 (mean active latents)"),
    ("dead_fraction", "dead fraction"),
    ("splice_accuracy", "splice accuracy (head reads a_hat)"),
    ("splice_agreement", "splice agreement with original predictions"),
    ("accuracy_original", "accuracy (original activations)"),
    ("n_samples", "samples"),
)


def _sae_section(d: ReportInputs, n: _Counter) -> Raw:
    m = d.sae_metrics
    rows = [(label, m.get(f"train_{key}"), m.get(f"val_{key}")) for key, label in _SAE_ROWS]
    parts = [table(("metric", "train", "val"), rows)]
    sae = d.sidecars.get("fit_sae", {})
    if sae:
        keys = ("kind", "d_in", "d_latent", "k", "hook_point", "decoder_columns_normalised")
        parts.append(kv_table([(k, sae[k]) for k in keys if k in sae]))
    if "final_loss" in m:
        parts.append(para(f"final training loss: {fmt(m['final_loss'])}", "note"))
    parts.append(n.fig(sae_loss_figure(d.sae_loss), "SAE training loss"))
    return Raw("\n".join(parts))


def _heatmap_section(d: ReportInputs, n: _Counter) -> Raw:
    m = np.asarray(d.class_means, dtype=np.float64)
    if m.size == 0:
        return para("class-mean codes: not available", "missing")
    cols = list(range(m.shape[1]))
    note = ""
    if len(cols) > MAX_HEATMAP_FEATURES:
        keep = sorted({int(f) for fs in (d.ranking.get("top") or {}).values() for f in fs})
        keep = keep or cols[:MAX_HEATMAP_FEATURES]
        cols = keep
        note = (
            f"{m.shape[1]} features: only the {len(cols)} that appear in some class's top list "
            "are drawn."
        )
    col_pos = {c: i for i, c in enumerate(cols)}
    marks = [
        (int(x["class"]), col_pos[int(x["feature"])])
        for x in d.ranking.get("dominant", [])
        if int(x["feature"]) in col_pos
    ]
    png = heatmap_figure(
        m[:, cols],
        d.classes[: m.shape[0]],
        [str(c) for c in cols],
        title="mean SAE code per class (training split); outlined: each class's dominant feature",
        colorbar_label="mean code",
        xlabel="feature",
        ylabel="class",
        marks=marks,
    )
    parts = [
        para(
            "mu_k = mean latent code over the training samples of class k; the dominant "
            "feature of class k is argmax_l |mu_k[l]|.",
            "note",
        ),
        n.fig(png, "class x feature mean codes"),
    ]
    if note:
        parts.append(para(note, "note"))
    return Raw("\n".join(parts))


def _dominant_section(d: ReportInputs, n: _Counter, key_names: Sequence[str]) -> Raw:
    entries = {int(e["feature"]): e for e in d.gradfam_index.get("features", [])}
    per_class = d.edit_metrics.get("per_class", {})
    top = d.ranking.get("top") or {}
    cards = []
    for dom in d.ranking.get("dominant", []):
        k, f = int(dom["class"]), int(dom["feature"])
        name = _name(d.classes, k)
        e = entries.get(f, {})
        ed = _by_name(per_class, key_names, k, {}) or {}
        items = [
            ("dominant feature", f),
            ("class-mean code", dom.get("class_mean")),
            ("top features", ", ".join(map(str, _by_name(top, key_names, k, None) or [])) or "–"),
        ]
        if e:
            items += [
                ("top-activating val images (classes)", ", ".join(map(str, e["top_classes"]))),
                ("mean code of those images", e.get("top_code_mean")),
                ("code of the AM image", e.get("am_code")),
            ]
        if ed:
            items += [
                (
                    "val accuracy → at full suppression",
                    (
                        f"{fmt(ed.get('target_acc_base'))} → "
                        f"{fmt(ed.get('target_acc_full_suppression'))}"
                    ),
                ),
                ("off-target mean change", ed.get("off_target_mean_change")),
            ]
        figs = []
        overlay = d.gradfam_images.get(str(e.get("overlay", "")))
        if overlay is not None:
            overlay = compact_png(overlay)
            figs.append(
                f"<figure>{n.image(overlay, f'Grad-FAM overlays, feature {f}')}"
                "<figcaption>Grad-FAM of the top-activating val images</figcaption></figure>"
            )
        else:
            figs.append(str(para("Grad-FAM overlay: not available", "missing")))
        am = d.gradfam_images.get(str(e.get("am", "")))
        am = compact_png(am) if am is not None else None
        am_code = e.get("am_code")
        am_note = (
            "<br>it does not activate the feature (code ≤ 0)"
            if isinstance(am_code, int | float) and am_code <= 0
            else ""
        )
        am_html = (
            f"<figure>{n.image(am, f'activation maximisation, feature {f}', cls='thumb')}"
            f"<figcaption>activation maximisation{am_note}</figcaption></figure>"
            if am is not None
            else str(para("activation maximisation: not available", "missing"))
        )
        cards.append(
            f'<div class="card" id="class-{k}">'
            f"{heading(f'{name} — feature {f}')}"
            f'<div class="pair"><div>{kv_table(items)}</div>{am_html}</div>'
            f"{''.join(figs)}</div>"
        )
    if not cards:
        return para("no dominant features ranked", "missing")
    return Raw(f'<div class="cards">{"".join(cards)}</div>')


def _edit_section(d: ReportInputs, n: _Counter, key_names: Sequence[str]) -> Raw:
    m = d.edit_metrics
    _, curves = curves_from_rows(d.edit_curve_rows)
    targets = [(int(x["class"]), int(x["feature"])) for x in d.ranking.get("dominant", [])]
    grid = m.get("alpha_grid", {})
    alpha_label = f"alpha ({grid.get('unit', '?')} units)"
    parts = [
        kv_table(
            [
                ("classes below 10% at full suppression", m.get("classes_below_10pct")),
                (
                    "classes selective (below 10%, off-target |mean change| < 3%)",
                    m.get("classes_selective"),
                ),
                ("mean selectivity score", m.get("mean_score")),
                ("mean |off-target change|", m.get("mean_abs_off_target_change")),
                (
                    "alpha grid",
                    f"0 … {fmt(grid.get('max'))}, {fmt(grid.get('steps'))} steps, "
                    f"{grid.get('unit', '?')}",
                ),
            ]
        )
    ]
    for sign, caption in (("suppress", "suppression"), ("enhance", "enhancement")):
        png = edit_curves_figure(curves, targets, d.classes, sign, alpha_label=alpha_label)
        parts.append(n.fig(png, f"{caption} curves (dominant feature of each class)"))
    if len(targets) > MAX_CURVE_PANELS:
        parts.append(para(f"first {MAX_CURVE_PANELS} classes drawn; all are in the table.", "note"))
    per_class = m.get("per_class", {})
    rows = []
    for k, f in targets:
        v = _by_name(per_class, key_names, k, {}) or {}
        rows.append(
            (
                _name(d.classes, k),
                f,
                v.get("target_acc_base"),
                v.get("target_acc_full_suppression"),
                v.get("off_target_mean_change"),
                v.get("off_target_max_abs_change"),
                v.get("score"),
            )
        )
    parts += [
        heading("Per class, suppressing its dominant feature"),
        table(
            (
                "class",
                "feature",
                "target acc (base)",
                "target acc (full suppression)",
                "off-target mean change",
                "off-target max |change|",
                "score",
            ),
            rows,
        ),
    ]
    return Raw("\n".join(parts))


def _cross_section(d: ReportInputs, n: _Counter, key_names: Sequence[str]) -> Raw:
    cross = d.edit_metrics.get("cross_class", [])
    rule = d.ranking.get("rule") or {}
    parts = []
    if rule:
        frac = fmt(rule.get("cross_class_fraction"))
        parts.append(
            para(
                f"Rule: with m1 ≥ m2 the two largest |class mean| of a feature, it is cross-class "
                f"when m1 > {fmt(rule.get('min_class_mean'))} and m2 ≥ {frac} × m1; its classes "
                f"are those with |mean| ≥ {frac} × m1. Each is suppressed at full strength and "
                "the change in every class's val accuracy is shown (outlined: the sharing "
                "classes).",
                "note",
            )
        )
    if not cross:
        parts.append(para("no cross-class features under this rule", "missing"))
        return Raw("\n".join(parts))
    k = len(d.classes)
    mat, labels, rows, marks = [], [], [], []
    for c in cross:
        marks += [(len(mat), int(j)) for j in c.get("classes", [])]
        ch = c.get("class_change_full_suppression", {})
        mat.append([_by_name(ch, key_names, j, math.nan) for j in range(k)])
        shared = [_name(d.classes, int(j)) for j in c.get("classes", [])]
        labels.append(f"f{c['feature']} ({', '.join(shared)})")
        changes = [(j, v) for j, v in enumerate(mat[-1]) if isinstance(v, int | float)]
        worst = min(changes, key=lambda t: t[1]) if changes else None
        best = max(changes, key=lambda t: t[1]) if changes else None
        rows.append(
            (
                c["feature"],
                ", ".join(shared),
                (c.get("suppress") or {}).get("target_acc_base"),
                (c.get("suppress") or {}).get("target_acc_edited"),
                f"{_name(d.classes, worst[0])}: {fmt(worst[1])}" if worst else "–",
                f"{_name(d.classes, best[0])}: {fmt(best[1])}" if best and best[1] > 0 else "–",
                c.get("enhance_min_class_change"),
            )
        )
    png = heatmap_figure(
        mat,
        labels,
        d.classes,
        title="change in per-class accuracy at full suppression of each cross-class feature",
        colorbar_label="accuracy change",
        diverging=True,
        annotate=True,
        xlabel="class",
        marks=marks,
    )
    parts += [
        n.fig(png, "cross-class effects (rows: feature and the classes sharing it)"),
        table(
            (
                "feature",
                "shared by",
                "acc of sharing classes (base)",
                "at full suppression",
                "largest drop",
                "largest gain",
                "worst change when enhancing",
            ),
            rows,
        ),
    ]
    return Raw("\n".join(parts))


def _alpha_section(d: ReportInputs, n: _Counter, key_names: Sequence[str]) -> Raw:
    m = d.alpha_crit_metrics
    parts = []
    if m.get("units"):
        parts.append(para(f"units: {m['units']}", "note"))
    parts.append(
        n.fig(
            alpha_crit_figure(d.classes, d.alpha_values),
            "alpha_crit per class and estimator (log axis; ∞N: N samples whose class logit "
            "never reaches zero, not drawn; n/a: no root bracketed)",
        )
    )
    per_class = m.get("per_class", {})
    rows = []
    for k in range(len(d.classes)):
        v = _by_name(per_class, key_names, k, {}) or {}
        row: list[Any] = [_name(d.classes, k)]
        count = None
        for est in ESTIMATORS:
            s = v.get(est) or {}
            count = s.get("count", count)
            bits = []
            if s.get("median") is not None:
                txt = fmt(s.get("median"))
                if s.get("q25") is not None:
                    txt += f" [{fmt(s.get('q25'), 3)}, {fmt(s.get('q75'), 3)}]"
                bits.append(txt)
            for key, sym in (("frac_inf", "∞"), ("frac_nan", "n/a")):
                frac = s.get(key)
                if frac:
                    bits.append(f"{sym} {'all' if frac >= 1 else fmt(frac * 100, 3) + '%'}")
            row.append(" · ".join(bits) or "–")
        row.insert(1, count)
        rows.append(row)
    if rows:
        parts += [
            heading(
                "Median [q25, q75] of the finite values; share infinite (∞) or not found (n/a)"
            ),
            table(("class", "n", *ESTIMATORS), rows),
        ]
    checks = [
        ("median exact alpha_crit (finite, all samples)", m.get("median_exact")),
        ("samples with every term w_ij a_j ≥ 0", m.get("fraction_all_terms_nonnegative")),
        ("linear ≤ exact where every term ≥ 0", m.get("linear_le_exact_when_nonnegative")),
        ("linear ≤ exact overall", m.get("linear_le_exact_overall")),
        (
            "single root / multiple roots",
            f"{fmt(m.get('fraction_single_root'))} / {fmt(m.get('fraction_multiple_roots'))}",
        ),
        ("max |exact − brentq| (single root)", m.get("exact_vs_brentq_max_abs_diff_single_root")),
        (
            "empirical flips confirmed on the real model",
            f"{fmt(m.get('real_model_agree'))} of {fmt(m.get('real_model_checked'))}",
        ),
    ]
    grid = m.get("empirical_grid")
    if grid:
        checks.append(
            (
                "empirical grid",
                f"0, then {fmt(grid.get('min'))} … {fmt(grid.get('max'))}, "
                f"{fmt(grid.get('steps'))} steps, {grid.get('spacing', '?')} spacing",
            )
        )
    parts += [heading("Checks"), kv_table(checks)]
    return Raw("\n".join(parts))


def _checkpoint_section(d: ReportInputs, key_names: Sequence[str]) -> Raw:
    rec = d.edit_metrics.get("checkpoint_edit") or (d.sidecars.get("edit") or {}).get("edit")
    if not rec:
        return para("no edited checkpoint recorded", "missing")
    k = int(rec.get("class", -1))
    name = _name(d.classes, k)
    sign = rec.get("sign", "?")
    unit = rec.get("alpha_unit", "?")
    scale = "" if unit == "absolute" else f", {fmt(rec.get('alpha_abs'))} in absolute units"
    desc = (
        f"The saved checkpoint (results/edit/model.safetensors) is the fine-tuned classifier "
        f"with its head edited permanently: {sign} feature {rec.get('feature')} (the dominant "
        f"feature of class {name}) with alpha = {fmt(rec.get('alpha'))} ({unit} units{scale}), "
        f"{rec.get('mode', '?')} rule."
    )
    items = [(key.replace("_", " "), v) for key, v in sorted(rec.items()) if key != "class_name"]
    items.insert(0, ("class name", name))
    parts = [para(desc), kv_table(items)]
    ed = _by_name(d.edit_metrics.get("per_class", {}), key_names, k, {}) or {}
    if ed:
        parts.append(
            para(
                f"For comparison, full suppression of this feature on the sweep's grid (alpha = "
                f"{fmt((d.edit_metrics.get('alpha_grid') or {}).get('max'))}) takes "
                f"class {name} from {fmt(ed.get('target_acc_base'))} to "
                f"{fmt(ed.get('target_acc_full_suppression'))} val accuracy.",
                "note",
            )
        )
    sc = d.sidecars.get("edit") or {}
    if sc:
        parts.append(
            para(
                f"Recorded with it: git revision {sc.get('git_revision', 'unknown')}, "
                f"head {sc.get('head', '?')}, image size {sc.get('image_size', '?')}.",
                "note",
            )
        )
    return Raw("\n".join(parts))


def build_report(d: ReportInputs) -> tuple[str, dict[str, int]]:
    """The report page and a small summary (figures drawn, images embedded, sections)."""
    n = _Counter()
    key_names = d.metric_class_names or d.classes
    bodies = {
        "metadata": _metadata_section(d),
        "training": _training_section(d, n),
        "sae-quality": _sae_section(d, n),
        "class-feature-heatmap": _heatmap_section(d, n),
        "dominant-features": _dominant_section(d, n, key_names),
        "edit-curves": _edit_section(d, n, key_names),
        "cross-class": _cross_section(d, n, key_names),
        "alpha-crit": _alpha_section(d, n, key_names),
        "edited-checkpoint": _checkpoint_section(d, key_names),
    }
    sections = [(sid, title, bodies[sid]) for sid, title in REPORT_SECTIONS]
    revs = sorted({str(s.get("git_revision")) for s in d.sidecars.values() if s})
    subtitle = (
        f"{len(d.classes)} classes · {d.dataset_info.get('source', 'unknown source')} · "
        f"git {', '.join(revs) if revs else 'unknown'}"
    )
    text = page(d.title, subtitle, sections)
    return text, {
        "figures": n.figures,
        "images": n.images,
        "sections": len(sections),
        "classes": len(d.classes),
    }


# --------------------------------------------------------------------------------------------
# The comparison page
# --------------------------------------------------------------------------------------------

# Metric name fragments whose direction is known; checked in order, the first match wins.
_LOWER_BETTER = (
    "target_acc_full_suppression",
    "target_acc_edited",
    "off_target_max_abs_change",
    "off_target_mean_abs_change",
    "mean_abs_off_target_change",
    "dead_fraction",
    "fvu",
    "loss",
    "mse",
)
_HIGHER_BETTER = (
    "accuracy",
    "agreement",
    "explained_variance",
    "score",
    "classes_selective",
    "classes_below_10pct",
    "real_model_agree",
    "target_drop",
    "target_acc_base",
)


def metric_direction(name: str) -> int:
    """+1 when a larger value is better, -1 when smaller is better, 0 when unknown."""
    leaf = name.lower()
    if any(f in leaf for f in _LOWER_BETTER):
        return -1
    if any(f in leaf for f in _HIGHER_BETTER):
        return 1
    return 0


def delta_class(name: str, diff: Any) -> str:
    """CSS class of a metric change: better, worse or neutral."""
    if not isinstance(diff, int | float) or isinstance(diff, bool) or diff == 0:
        return "neutral"
    if isinstance(diff, float) and not math.isfinite(diff):
        return "neutral"
    direction = metric_direction(name)
    if direction == 0:
        return "neutral"
    return "better" if diff * direction > 0 else "worse"


@dataclass
class RevisionData:
    """One side of a comparison: what was found at a revision (None where absent)."""

    label: str  # as the user wrote it
    sha: str
    finetune_epochs: list[dict] | None = None
    edit_curve_rows: list[dict] | None = None
    edit_metrics: dict | None = None
    alpha_samples: list[dict] | None = None


def alpha_values_from_samples(
    rows: Sequence[Mapping[str, Any]],
    estimators: Sequence[str] = ESTIMATORS,
    class_order: Sequence[str] = (),
) -> tuple[list[str], dict[str, list[list[float]]]]:
    """Per-class value lists from plots/alpha_crit/samples.csv rows: classes in
    ``class_order``, then any others in first-seen order."""
    classes: list[str] = [str(c) for c in class_order]
    index: dict[str, int] = {c: i for i, c in enumerate(classes)}
    values: dict[str, list[list[float]]] = {e: [[] for _ in classes] for e in estimators}
    for r in rows:
        name = str(r["class"])
        if name not in index:
            index[name] = len(classes)
            classes.append(name)
            for e in estimators:
                values[e].append([])
        for e in estimators:
            try:
                values[e][index[name]].append(float(r[f"alpha_{e}"]))
            except (KeyError, TypeError, ValueError):
                values[e][index[name]].append(math.nan)
    return classes, values


def _edit_targets_from_metrics(classes: Sequence[str], edit_metrics: dict | None) -> list:
    per_class = (edit_metrics or {}).get("per_class", {})
    return [
        (k, int(per_class[name]["feature"]))
        for k, name in enumerate(classes)
        if name in per_class and "feature" in per_class[name]
    ]


def _revision_alpha(rev: RevisionData) -> tuple[list[str], dict[str, list[list[float]]]]:
    order = curves_from_rows(rev.edit_curve_rows)[0] if rev.edit_curve_rows else []
    return alpha_values_from_samples(rev.alpha_samples or [], class_order=order)


def _shared_log_range(revs: Sequence[RevisionData]) -> tuple[float, float] | None:
    """One y range (log axis) covering every revision's finite alpha_crit medians."""
    meds = []
    for rev in revs:
        if rev.alpha_samples:
            for m in alpha_medians(_revision_alpha(rev)[1]).values():
                meds += [v for v in m if math.isfinite(v) and v > 0]
    if not meds:
        return None
    return min(meds) / 1.5, max(meds) * 1.5


def revision_figures(
    rev: RevisionData, alpha_ylim: tuple[float, float] | None = None
) -> dict[str, bytes | None]:
    """The comparison's key figures for one revision (None where the data is absent)."""
    figs: dict[str, bytes | None] = {
        "finetune": finetune_figure(rev.finetune_epochs) if rev.finetune_epochs else None
    }
    figs["suppression"] = None
    if rev.edit_curve_rows:
        classes, curves = curves_from_rows(rev.edit_curve_rows)
        targets = _edit_targets_from_metrics(classes, rev.edit_metrics)
        if targets:
            figs["suppression"] = edit_curves_figure(curves, targets, classes, "suppress")
    figs["alpha_medians"] = None
    if rev.alpha_samples:
        classes, values = _revision_alpha(rev)
        figs["alpha_medians"] = alpha_medians_figure(classes, values, ylim=alpha_ylim)
    return figs


_FIGURE_TITLES = (
    ("finetune", "Fine-tuning curves"),
    ("suppression", "Suppression curves (each class's dominant feature)"),
    ("alpha_medians", "alpha_crit medians per class and estimator"),
)


def _diff_rows(diff: Mapping[str, Mapping[str, Any]], kind: str) -> tuple[list, list[str]]:
    rows, classes = [], []
    for path in sorted(diff):
        for name in sorted(diff[path], key=lambda n: (n.count("."), n)):
            entry = diff[path][name] or {}
            old, new = entry.get("old"), entry.get("new")
            row: list[Any] = [path, name, fmt(old), fmt(new)]
            if kind == "metrics":
                d = entry.get("diff")
                if d is None and isinstance(old, int | float) and isinstance(new, int | float):
                    d = new - old
                cls = delta_class(name, d)
                arrow = {"better": " ▲ better", "worse": " ▼ worse"}.get(cls, "")
                row.append(Raw(f"{esc(fmt(d))}{esc(arrow)}") if d is not None else "–")
                classes.append(cls)
            else:
                classes.append("")
            rows.append(row)
    return rows, classes


def build_compare_page(
    a: RevisionData,
    b: RevisionData,
    params_diff: Mapping[str, Mapping[str, Any]],
    metrics_diff: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "SALVE: revision comparison",
) -> str:
    """The comparison page: revisions, parameter diff, metric diff with coloured deltas, and
    the key figures of both revisions side by side."""
    revs = table(
        ("", "as given", "commit"),
        [
            ("A", a.label, Raw(f"<code>{esc(a.sha)}</code>")),
            ("B", b.label, Raw(f"<code>{esc(b.sha)}</code>")),
        ],
    )
    p_rows, _ = _diff_rows(params_diff, "params")
    params_html = (
        table(("file", "parameter", "A", "B"), p_rows)
        if p_rows
        else para("no parameter differs between A and B", "note")
    )
    m_rows, m_cls = _diff_rows(metrics_diff, "metrics")
    if m_rows:
        metrics_html = Raw(
            str(
                para(
                    "Green: better, red: worse, where the metric's direction is known; "
                    "grey: direction unknown or no change.",
                    "note",
                )
            )
            + table(("file", "metric", "A", "B", "change (B − A)"), m_rows, row_classes=m_cls)
        )
    else:
        metrics_html = para("no metric differs between A and B", "note")
    ylim = _shared_log_range((a, b))
    fa, fb = revision_figures(a, ylim), revision_figures(b, ylim)
    blocks = []
    for key, caption in _FIGURE_TITLES:
        left = figure_block(fa[key], f"A ({a.label})", missing="not available at this revision")
        right = figure_block(fb[key], f"B ({b.label})", missing="not available at this revision")
        blocks.append(
            f'{heading(caption)}<div class="side"><div>{left}</div><div>{right}</div></div>'
        )
    bodies = {
        "revisions": revs,
        "params-diff": params_html,
        "metrics-diff": metrics_html,
        "figures": Raw("".join(blocks)),
    }
    sections = [(sid, t, bodies[sid]) for sid, t in COMPARE_SECTIONS]
    return page(title, f"A = {a.label} ({a.sha[:10]}) · B = {b.label} ({b.sha[:10]})", sections)
