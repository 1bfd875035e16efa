"""The latent browser: one entry per SAE latent, sortable, filterable and paged in the page itself.

Each entry shows the latent's activation frequency, its class-mean code per class (a small bar
chart), its top-activating val images with Grad-FAM overlays and its activation-maximisation
image (where the gradfam stage made them), and the change in each class's accuracy when that
latent alone is suppressed (where the edit stage measured it). Sources are optional: the page
says what to run for each one it lacks, and shows the rest.

Built for thousands of latents: the entries are one JSON document inside the page (plain data,
computed here), and a short inline script sorts and filters all of them but draws only one page
of entries (``PAGE_SIZE``) at a time, bars as SVG and pictures as ``<img loading="lazy">``. The
pictures are files beside the page (``LatentSources.gradfam_images`` holds their relative
paths), not data URIs: 4096 latents at 224 px would be a page of over a gigabyte. No library,
no network; ``#latent-<l>`` opens the page that holds latent l.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from salve.present.kit import ReportInputError, fmt, kv, render

PAGE_SIZE = 48  # entries drawn at a time
DATA_OPEN = '<script type="application/json" id="latent-data">'
# Bar-chart layout, read by the page's script (it draws the bars).
CHART = {
    "height": 44,  # px, the whole chart
    "max_width": 240,  # px; bars get narrower with more classes
    "max_step": 24.0,  # px per class at most
    "max_ticked": 20,  # class indices under the bars up to this many classes
    "tick_room": 11,  # px below the bars for them
}


@dataclass(frozen=True)
class LatentSources:
    """What the browser reads, each None where its stage has not produced it.

    ``class_means``: K x L mean code per class (rank). ``ranking``: dominant and cross-class
    roles (rank). ``gradfam``: the results/gradfam/latents.json document, with ``gradfam_images``
    the ``src`` of each of its PNGs by file name (a path relative to the page: the report stage
    copies them beside it); an image not listed is not shown. ``edit``: the
    results/edit/latents.json document. ``hints``: per source name (``class_means``,
    ``ranking``, ``gradfam``, ``edit``), what to run to get it.
    """

    classes: list[str]
    class_means: list[list[float]] | None
    ranking: dict | None
    gradfam: dict | None
    gradfam_images: Mapping[str, str] = field(default_factory=dict)
    edit: dict | None = None
    hints: Mapping[str, str] = field(default_factory=dict)


_SOURCES = {
    "class_means": "class-mean codes (every entry needs them)",
    "ranking": "dominant and cross-class roles",
    "gradfam": "activation frequencies, top images with Grad-FAM, activation maximisation",
    "edit": "per-class accuracy change when a latent is suppressed",
}


@dataclass(frozen=True)
class LatentEntry:
    """One latent as the page's script reads it (JSON). Sort keys are numbers, None when
    unknown (sorted last); chart values are formatted text (``fmt``), drawn and shown as is."""

    latent: int
    frequency: float | None
    max_mean: float | None
    effect: float | None  # the largest accuracy drop when suppressed
    classes: list[int]  # what the class filter matches
    search: str  # lower-case text the free-text filter matches
    badges: list[str]
    stats: list[tuple[str, str]]
    means: list[str]  # class-mean code per class
    top_class: int  # the bar drawn dark
    change: list[str] | None  # accuracy change per class when suppressed, on a fixed ±1 scale
    overlay: str | None  # image src
    am: str | None


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


def _finite(x: Any) -> float | None:
    """A sort key: the number, None when it is not finite (JSON has no NaN)."""
    v = float(x)
    return v if np.isfinite(v) else None


def _entry(
    latent: int,
    mu_k: np.ndarray,
    classes: Sequence[str],
    roles: list,
    g: Mapping[str, Any] | None,
    e: Mapping[str, Any] | None,
    images: Mapping[str, str],
    companion: str | None = None,
) -> LatentEntry:
    k_top = int(np.argmax(np.abs(mu_k)))
    class_set = {k_top} | {k for _, ks in roles for k in ks}
    badges = [text for text, _ in roles]
    strongest = f"{classes[k_top]}: {fmt(mu_k[k_top])}"
    stats: list[tuple[str, Any]] = [("strongest class mean", strongest)]
    search = [f"latent {latent}", f"f{latent}", classes[k_top], *badges]
    frequency: float | None = None
    effect: float | None = None
    overlay = am = change = None
    if g is not None:
        if g["frequency"] is not None:  # None: the older gradfam index, which had none
            frequency = _finite(g["frequency"])
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
        overlay = images.get(g["overlay"]) if g["overlay"] else None
        if g["am"]:
            am = images.get(g["am"])
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
            effect = _finite(-ch[worst])
            stats.append(("largest drop when suppressed", f"{classes[worst]}: {fmt(ch[worst])}"))
        change = [fmt(v) for v in ch.tolist()]
        if companion and e.get("companion_class_change") is not None:
            stats += _companion_stats(np.asarray(e["companion_class_change"]), classes, companion)
    return LatentEntry(
        latent=latent,
        frequency=frequency,
        max_mean=_finite(abs(mu_k[k_top])),
        effect=effect,
        classes=sorted(class_set),
        search=" ".join(search).lower(),
        badges=badges,
        stats=kv(stats),
        means=[fmt(v) for v in mu_k.tolist()],
        top_class=k_top,
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
    if len(classes) <= CHART["max_ticked"]:
        per_class = ", ".join(f"{k}: {fmt(v)}" for k, v in enumerate(ch.tolist()))
        out.append((f"accuracy change per class when {how}", per_class))
    return out


def latents_context(src: LatentSources, *, report_page: str = "index.html") -> dict:
    """The browser's template context: plain data, the entries as one JSON document."""
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
        "page_size": PAGE_SIZE,
        "data": _script_json(
            {"classes": list(classes), "page_size": PAGE_SIZE, "chart": CHART}
            | {"entries": [asdict(x) for x in entries]}
        ),
    }
    return context


def _script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: no "</script>", no markup."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def page_images(page: str) -> list[str]:
    """The picture paths (relative to the page) a latent browser page shows, read from its
    JSON: what to copy beside a copy of the page."""
    start = page.find(DATA_OPEN)
    if start < 0:
        return []
    start += len(DATA_OPEN)
    data = json.loads(page[start : page.index("</script>", start)])
    return sorted({x[k] for x in data["entries"] for k in ("overlay", "am") if x[k]})


def build_latents_page(
    src: LatentSources, *, report_page: str = "index.html"
) -> tuple[str, dict[str, int]]:
    """The latent browser page and a summary (latents listed, images, sources missing)."""
    context = latents_context(src, report_page=report_page)
    entries = context["entries"]
    stats = {
        "latents": len(entries),
        "images": sum((x.overlay is not None) + (x.am is not None) for x in entries),
        "missing_sources": len(context["missing"]),
    }
    return render("latents.html", **context), stats
