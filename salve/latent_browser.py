"""The latent browser: one entry per SAE latent, sortable and filterable in the page itself.

Each entry shows the latent's activation frequency, its class-mean code per class (a small bar
chart), its top-activating val images with Grad-FAM overlays and its activation-maximisation
image (where the gradfam stage made them), and the change in each class's accuracy when that
latent alone is suppressed (where the edit stage measured it). Sources are optional: the page
says what to run for each one it lacks, and shows the rest.

Bar charts are inline SVG whose geometry is computed here (the template only loops); sorting and
filtering are a short inline script over ``data-*`` attributes. No library, no network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from salve.report import KV, Embeds, Image, ReportInputError, fmt, kv, render

BAR_HEIGHT = 44  # px, the whole chart
MAX_CHART_WIDTH = 240  # px; bars get narrower with more classes
MAX_BAR_STEP = 24.0  # px per class at most
MAX_TICKED_CLASSES = 20  # class indices under the bars up to this many classes
TICK_ROOM = 11  # px below the bars for them


@dataclass(frozen=True)
class LatentSources:
    """What the browser reads, each None where its stage has not produced it.

    ``class_means``: K x L mean code per class (rank). ``ranking``: dominant and cross-class
    roles (rank). ``gradfam``: the results/gradfam/latents.json document, with ``gradfam_images``
    its PNGs by file name. ``edit``: the results/edit/latents.json document. ``hints``: per
    source name (``class_means``, ``ranking``, ``gradfam``, ``edit``), what to run to get it.
    """

    classes: list[str]
    class_means: list[list[float]] | None
    ranking: dict | None
    gradfam: dict | None
    gradfam_images: dict[str, bytes] = field(default_factory=dict)
    edit: dict | None = None
    hints: Mapping[str, str] = field(default_factory=dict)


_SOURCES = {
    "class_means": "class-mean codes (every entry needs them)",
    "ranking": "dominant and cross-class roles",
    "gradfam": "activation frequencies, top images with Grad-FAM, activation maximisation",
    "edit": "per-class accuracy change when a latent is suppressed",
}


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    cls: str
    label: str


@dataclass(frozen=True)
class Bars:
    """An SVG bar chart laid out in pixels; ``baseline`` is the y of value zero."""

    width: float
    height: float
    baseline: float
    bars: list[Bar]
    caption: str
    ticks: list[tuple[float, str]]  # (x, class index) under the bars, when there is room
    tick_y: float


@dataclass(frozen=True)
class LatentEntry:
    latent: int
    frequency: str  # data-* sort keys: numbers as text, "" when unknown
    max_mean: str
    effect: str
    classes: str  # class indices (space separated) the class filter matches
    search: str  # lower-case text the free-text filter matches
    badges: list[str]
    stats: KV
    means: Bars
    change: Bars | None
    overlay: Image | None
    am: Image | None


def bar_chart(
    values: Sequence[float],
    labels: Sequence[str],
    *,
    limit: float | None = None,
    highlight: int | None = None,
    caption: str = "",
) -> Bars:
    """Bars of ``values`` scaled to ``limit`` (default: the largest |value|); zero in the middle
    when any value is negative, else at the bottom. Non-finite values get no bar."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lim = limit if limit is not None else (float(np.abs(finite).max()) if finite.size else 0.0)
    lim = lim or 1.0
    step = max(3.0, min(MAX_BAR_STEP, MAX_CHART_WIDTH / max(len(v), 1)))
    height = float(BAR_HEIGHT)
    signed = limit is not None or bool((finite < 0).any())
    base = height / 2 if signed else height
    bars = []
    for i, (x, name) in enumerate(zip(v.tolist(), labels, strict=True)):
        if not math.isfinite(x):
            continue
        frac = min(abs(x) / lim, 1.0)
        h = frac * (base if x >= 0 else height - base)
        cls = ("top " if i == highlight else "") + ("pos" if x >= 0 else "neg")
        bars.append(
            Bar(
                x=round(i * step + 0.5, 2),
                y=round(base - h if x >= 0 else base, 2),
                width=round(step - 1.0, 2),
                height=round(h, 2),
                cls=cls,
                label=f"{name}: {fmt(x)}",
            )
        )
    ticks = []
    if len(v) <= MAX_TICKED_CLASSES:
        ticks = [(round(i * step + step / 2, 2), str(i)) for i in range(len(v))]
    total = height + (TICK_ROOM if ticks else 0)
    return Bars(round(len(v) * step + 1, 2), total, base, bars, caption, ticks, total - 2)


def _roles(ranking: Mapping[str, Any] | None, classes: Sequence[str]) -> dict[int, list]:
    """Per latent: [(badge text, class indices)] from the ranking's dominant and cross lists."""
    roles: dict[int, list] = {}
    if ranking is None:
        return roles
    for d in ranking["dominant"]:
        k = int(d["class"])
        roles.setdefault(int(d["feature"]), []).append((f"dominant: {classes[k]}", [k]))
    for c in ranking["cross_class"]:
        members = [int(k) for k in c["classes"]]
        names = ", ".join(classes[k] for k in members)
        roles.setdefault(int(c["feature"]), []).append((f"cross-class: {names}", members))
    return roles


def _entry(
    latent: int,
    mu_k: np.ndarray,
    classes: Sequence[str],
    roles: list,
    g: Mapping[str, Any] | None,
    e: Mapping[str, Any] | None,
    images: Mapping[str, bytes],
    embeds: Embeds,
    companion: str | None = None,
) -> LatentEntry:
    k_top = int(np.argmax(np.abs(mu_k)))
    class_set = {k_top} | {k for _, ks in roles for k in ks}
    badges = [text for text, _ in roles]
    strongest = f"{classes[k_top]}: {fmt(mu_k[k_top])}"
    stats: list[tuple[str, Any]] = [("strongest class mean", strongest)]
    search = [f"latent {latent}", f"f{latent}", classes[k_top], *badges]
    frequency = effect = ""
    overlay = am = change = None
    if g is not None:
        if g["frequency"] is not None:  # None: the older gradfam index, which had none
            frequency = repr(float(g["frequency"]))
            stats.insert(0, ("activation frequency", g["frequency"]))
        top = ", ".join(
            str(t["class"]) + (f" (z {fmt(t['code'], 3)})" if t["code"] is not None else "")
            for t in g["top"]
        )
        stats.append(("top val images (class, code)", top or "none active"))
        search += [str(t["class"]) for t in g["top"]]
        if g["deletion_auc"] is not None:
            stats.append(
                (
                    "deletion AUC (random order)",
                    f"{fmt(g['deletion_auc'])} ({fmt(g['deletion_auc_random'])})",
                )
            )
        overlay = embeds.image(images.get(g["overlay"]), f"Grad-FAM, top images of latent {latent}")
        if g["am"]:
            caption = f"activation maximisation, latent {latent}"
            am = embeds.image(images.get(g["am"]), caption, "thumb")
            stats.append(("code of the AM image", g["am_code"]))
    if e is not None:
        ch = np.asarray(e["class_change"], dtype=np.float64)
        if ch.shape != (len(classes),):
            raise ReportInputError(
                f"edit latents: latent {latent} has {ch.size} class changes for {len(classes)} "
                "classes; rerun the edit stage"
            )
        if np.isfinite(ch).any():
            worst = int(np.nanargmin(ch))
            effect = repr(float(-ch[worst]))
            stats.append(("largest drop when suppressed", f"{classes[worst]}: {fmt(ch[worst])}"))
        change = bar_chart(
            ch, classes, limit=1.0, caption="accuracy change per class when suppressed (±1)"
        )
        if companion and e.get("companion_class_change") is not None:
            stats += _companion_stats(np.asarray(e["companion_class_change"]), classes, companion)
    return LatentEntry(
        latent=latent,
        frequency=frequency,
        max_mean=repr(float(abs(mu_k[k_top]))),
        effect=effect,
        classes=" ".join(str(k) for k in sorted(class_set)),
        search=" ".join(search).lower(),
        badges=badges,
        stats=kv(stats),
        means=bar_chart(mu_k, classes, highlight=k_top, caption="mean code per class"),
        change=change,
        overlay=overlay,
        am=am,
    )


_CONTROL = {"steer": "steered", "projection": "projection-edited", "paper": "paper-rule edited"}


def _companion_stats(ch: np.ndarray, classes: Sequence[str], mode: str) -> list:
    """The same latent's effect under the edit stage's other control (steering beside a head
    edit, and the reverse), as text beside the bar chart."""
    how = _CONTROL.get(mode, mode)
    if ch.shape != (len(classes),) or not np.isfinite(ch).any():
        return []
    worst = int(np.nanargmin(ch))
    out = [(f"largest drop when {how}", f"{classes[worst]}: {fmt(ch[worst])}")]
    if len(classes) <= MAX_TICKED_CLASSES:
        per_class = ", ".join(f"{k}: {fmt(v)}" for k, v in enumerate(ch.tolist()))
        out.append((f"accuracy change per class when {how}", per_class))
    return out


def latents_context(src: LatentSources, *, report_page: str = "index.html") -> tuple[dict, Embeds]:
    """The browser's template context (plain data) and what it embeds."""
    embeds = Embeds()
    classes = src.classes
    missing = [
        f"{what}: {src.hints.get(name, 'not provided')}"
        for name, what in _SOURCES.items()
        if getattr(src, name) is None
    ]
    entries: list[LatentEntry] = []
    notes = []
    if src.class_means is not None:
        mu_kl = np.asarray(src.class_means, dtype=np.float64)
        if mu_kl.shape[0] != len(classes):
            raise ReportInputError(
                f"class means have {mu_kl.shape[0]} rows for {len(classes)} classes: rerun rank"
            )
        roles = _roles(src.ranking, classes)
        g_by = {int(x["latent"]): x for x in src.gradfam["latents"]} if src.gradfam else {}
        e_by = {int(x["latent"]): x for x in src.edit["latents"]} if src.edit else {}
        for latent in range(mu_kl.shape[1]):
            entries.append(
                _entry(
                    latent,
                    mu_kl[:, latent],
                    classes,
                    roles.get(latent, []),
                    g_by.get(latent) if src.gradfam else None,
                    e_by.get(latent) if src.edit else None,
                    src.gradfam_images,
                    embeds,
                    src.edit.get("companion_mode") if src.edit else None,
                )
            )
        if src.gradfam:
            g = src.gradfam
            grid = f", {g['map_grid'][0]}x{g['map_grid'][1]} map" if g.get("map_grid") else ""
            notes.append(
                f"Grad-FAM on {g.get('layer') or 'the configured layer'}{grid} at "
                f"{g['image_size']} px; {len(g_by)} of {len(entries)} latents have images."
            )
        if src.edit:
            notes.append(
                f"Suppression: {src.edit['mode']} edit at alpha {fmt(src.edit['alpha'])}, each "
                f"latent alone; {len(e_by)} of {len(entries)} latents measured."
                + (
                    f" Beside it, in text: the same latent {_CONTROL.get(c, c)} at that alpha."
                    if (c := src.edit.get("companion_mode"))
                    else ""
                )
            )
    context = {
        "title": "SALVE latent browser",
        "subtitle": f"{len(entries)} SAE latents · {len(classes)} classes",
        "nav": [(report_page, "← run report", "page")],
        "missing": missing,
        "notes": notes,
        "classes": list(enumerate(classes)),
        "entries": entries,
    }
    return context, embeds


def build_latents_page(
    src: LatentSources, *, report_page: str = "index.html"
) -> tuple[str, dict[str, int]]:
    """The latent browser page and a summary (latents listed, images, sources missing)."""
    context, embeds = latents_context(src, report_page=report_page)
    stats = {
        "latents": len(context["entries"]),
        "images": embeds.images,
        "missing_sources": len(context["missing"]),
    }
    return render("latents.html", **context), stats
