"""Comparing two runs: the compare page and the nightly Markdown, led by what matters.

Input is plain data shaped like `dvc params diff --json` and `dvc metrics diff --json`
(``{file: {dotted.key: {"old": a, "new": b, "diff": d}}}``) plus the key metrics, declared by
the caller as KeyMetric records. Both outputs keep one order: the parameter changes, then every
key metric, then the other metric changes grouped by file (stage), collapsed or trailing.

Each metric change carries two separate signals: its direction (an arrow for the sign of new - old)
and, only where the metric declares which way is better, a judgement (better / worse). A change
smaller than the metric's noise floor (absolute, or relative to the larger magnitude) is "within
noise" and never coloured. Identifiers (feature indices, class names) are compared for equality
only: "4 -> 67 (changed)", never a numeric delta.

Three renderings of one story: the HTML page (`build_compare_page`), Markdown for the nightly
Prefect artifact (`metrics_diff_markdown`) and plain text for a terminal (`metrics_diff_text`);
`experiments_table` lists several runs (DVC experiments) by their key metrics. The figure and page
code (matplotlib, Jinja2) is imported only when first needed, so importing this module (e.g. for
`KeyMetric`) stays cheap.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from salve.matching import LatentMatching, Verdict
    from salve.report import Image

BETTER = ("higher", "lower", "none")
KINDS = ("number", "identifier")
ROUNDOFF = 1e-12  # relative: a float64 change this small is arithmetic, not a result
# Leaf keys whose values name things (feature indices, classes) rather than measure them.
_IDENTIFIER_LEAVES = ("feature", "class", "latent", "label")
_IDENTIFIER_SUFFIXES = ("_feature", "_class", "_latent", "_index")

COMPARE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("params-diff", "Parameter changes"),
    ("key-metrics", "Key metrics"),
    ("feature-matches", "Feature matches"),
    ("other-metrics", "Other metric changes, by stage"),
    ("figures", "Key figures"),
)

Diff = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class KeyMetric:
    """A metric a comparison leads with: where it is, what to call it, which way is better,
    how large a change is only noise, and whether it is a quantity or an identifier."""

    file: str
    key: str
    label: str
    better: str = "none"  # "higher" | "lower" | "none"
    noise_floor: float = 0.0  # absolute: a smaller change is noise
    kind: str = "number"  # "number" | "identifier"
    short: str = ""  # name in terminal tables and one-line summaries (default: the key)
    relative_noise: float = 0.0  # a change below this fraction of max(|old|, |new|) is noise

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"KeyMetric {self.key!r}: better={self.better!r}; use one of {BETTER}")
        if self.kind not in KINDS:
            raise ValueError(f"KeyMetric {self.key!r}: kind={self.kind!r}; use one of {KINDS}")
        for name in ("noise_floor", "relative_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(
                    f"KeyMetric {self.key!r}: {name}={value!r}; use a finite value >= 0"
                )

    @property
    def name(self) -> str:
        return self.short or self.key


@dataclass(frozen=True)
class MetricChange:
    """One metric's change, ready to show. ``judgement``: better, worse, changed, noise,
    unchanged, or "" (no judgement: the metric's better direction is unknown)."""

    file: str
    key: str
    label: str
    old: str
    new: str
    change: str
    direction: str  # "up", "down" or ""
    arrow: str
    judgement: str
    verdict: str


@dataclass(frozen=True)
class MetricGroup:
    file: str
    rows: list[MetricChange]
    summary: str


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def looks_like_identifier(key: str) -> bool:
    """Whether a metric key names a thing (``per_class.3.feature``) rather than measures one."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf in _IDENTIFIER_LEAVES or leaf.endswith(_IDENTIFIER_SUFFIXES)


def fmt(value: Any) -> str:
    """The report's number formatting (salve.report.fmt), imported when first needed."""
    from salve.report import fmt as report_fmt

    return report_fmt(value)


def _row(file: str, key: str, label: str, old: Any, new: Any, **kw: str) -> MetricChange:
    base = {"change": "", "direction": "", "arrow": "", "judgement": "", "verdict": ""}
    return MetricChange(file, key, label, fmt(old), fmt(new), **(base | kw))


def metric_change(
    file: str,
    key: str,
    entry: Mapping[str, Any] | None,
    *,
    label: str | None = None,
    better: str = "none",
    noise_floor: float = 0.0,
    identifier: bool = False,
    relative_noise: float = 0.0,
) -> MetricChange:
    """Classify one diff entry (``{"old": a, "new": b, ...}``, None when the diff omits it).

    A numeric change smaller than ``noise_floor``, or than ``relative_noise`` times the larger
    of |old| and |new|, is "within noise"; a change of exactly the floor is judged."""
    label = label or key
    if entry is None:
        return _row(
            file,
            key,
            label,
            None,
            None,
            change="no change reported",
            judgement="unchanged",
            verdict="unchanged",
        )
    old, new = entry["old"], entry["new"]
    if old is None or new is None:
        what = "added" if old is None else "removed"
        return _row(file, key, label, old, new, change=what, verdict=what)
    if identifier or not (_is_number(old) and _is_number(new)):
        if old == new:
            return _row(
                file,
                key,
                label,
                old,
                new,
                change="unchanged",
                judgement="unchanged",
                verdict="unchanged",
            )
        return _row(
            file,
            key,
            label,
            old,
            new,
            change=f"{fmt(old)} -> {fmt(new)} (changed)",
            judgement="changed",
            verdict="changed",
        )
    if old == new:
        return _row(
            file,
            key,
            label,
            old,
            new,
            change="unchanged",
            judgement="unchanged",
            verdict="unchanged",
        )
    if not (math.isfinite(old) and math.isfinite(new)):
        up = new > old if not (math.isnan(old) or math.isnan(new)) else None
        return _row(
            file,
            key,
            label,
            old,
            new,
            change=f"{fmt(old)} -> {fmt(new)}",
            direction="" if up is None else ("up" if up else "down"),
            arrow="" if up is None else ("▲" if up else "▼"),
        )
    d = float(new) - float(old)
    rel = f" ({d / abs(old) * 100:+.3g} %)" if old != 0 else ""
    up = d > 0
    kw = {
        "change": f"{d:+.4g}{rel}",
        "direction": "up" if up else "down",
        "arrow": "▲" if up else "▼",
    }
    if abs(d) <= ROUNDOFF * max(abs(old), abs(new)):
        return _row(file, key, label, old, new, **kw, judgement="noise", verdict="round-off")
    if abs(d) < max(noise_floor, relative_noise * max(abs(old), abs(new))):
        return _row(file, key, label, old, new, **kw, judgement="noise", verdict="within noise")
    if better == "none":
        return _row(file, key, label, old, new, **kw)
    good = up if better == "higher" else not up
    return _row(
        file,
        key,
        label,
        old,
        new,
        **kw,
        judgement="better" if good else "worse",
        verdict="better" if good else "worse",
    )


def key_metric_changes(metrics_diff: Diff, key_metrics: Sequence[KeyMetric]) -> list[MetricChange]:
    """Every key metric, in declared order, whether or not the diff lists it."""
    return [
        metric_change(
            km.file,
            km.key,
            (metrics_diff.get(km.file) or {}).get(km.key),
            label=km.label,
            better=km.better,
            noise_floor=km.noise_floor,
            identifier=km.kind == "identifier",
            relative_noise=km.relative_noise,
        )
        for km in key_metrics
    ]


def other_metric_groups(
    metrics_diff: Diff, key_metrics: Sequence[KeyMetric], file_order: Sequence[str] = ()
) -> list[MetricGroup]:
    """The metric changes that are not key metrics, one group per file (``file_order`` first,
    then the rest by name). Unchanged entries (from `--all`) are counted, not listed."""
    keys = {(km.file, km.key) for km in key_metrics}
    rank = {f: i for i, f in enumerate(file_order)}
    groups = []
    for file in sorted(metrics_diff, key=lambda f: (rank.get(f, len(rank)), f)):
        rows, unchanged = [], 0
        for key in sorted(metrics_diff[file], key=lambda k: (k.count("."), k)):
            if (file, key) in keys:
                continue
            row = metric_change(
                file, key, metrics_diff[file][key], identifier=looks_like_identifier(key)
            )
            if row.judgement == "unchanged":
                unchanged += 1
            else:
                rows.append(row)
        if not rows:  # nothing changed in this file (`--all` lists it anyway)
            continue
        noise = sum(r.judgement == "noise" for r in rows)
        summary = f"{len(rows)} changed" + (f", {noise} only by round-off" if noise else "")
        if unchanged:
            summary += f"; {unchanged} unchanged, not listed"
        groups.append(MetricGroup(file, rows, summary))
    return groups


def param_rows(params_diff: Diff) -> list[tuple[str, str, str, str, str]]:
    """(file, parameter, old, new, change) for every changed parameter."""
    rows = []
    for file in sorted(params_diff):
        for key in sorted(params_diff[file]):
            e = params_diff[file][key]
            old, new = e["old"], e["new"]
            change = ""
            if _is_number(old) and _is_number(new) and old != new:
                change = f"{new - old:+g}" + (f" (×{new / old:.3g})" if old else "")
            rows.append((file, key, fmt(old), fmt(new), change))
    return rows


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureSide:
    """One revision's SAE as the feature matching reads it (None where absent there).

    ``stage_outputs``: stage -> its outputs' md5 as that revision's dvc.lock records them (which
    activations the SAE read). ``val_codes_nl``: the SAE's codes on that revision's val
    activations. ``browser``: the href of its latent browser from the page, or None with
    ``browser_note`` saying where it is. ``strips``: results/gradfam/latent_<l>.png by latent.
    """

    decoder_ml: Any = None
    val_codes_nl: Any = None
    classes: list[str] | None = None
    dominant: list[int] | None = None
    cross_class: list[dict] | None = None
    stage_outputs: dict[str, str] = field(default_factory=dict)
    browser: str | None = None
    browser_note: str = ""
    strips: dict[int, bytes] = field(default_factory=dict)
    strips_note: str = ""


@dataclass
class RevisionData:
    """One side of a comparison: what was found at a revision (None where absent)."""

    label: str  # as the user wrote it
    sha: str
    finetune_epochs: list[dict] | None = None
    edit_curve_rows: list[dict] | None = None
    edit_metrics: dict | None = None
    alpha_samples: list[dict] | None = None
    features: FeatureSide | None = None


def alpha_values_from_samples(
    rows: Sequence[Mapping[str, Any]],
    estimators: Sequence[str] | None = None,
    class_order: Sequence[str] = (),
) -> tuple[list[str], dict[str, list[list[float]]]]:
    """Per-class value lists from plots/alpha_crit/samples.csv rows: classes in
    ``class_order``, then any others in first-seen order (``estimators``: default all)."""
    if estimators is None:
        from salve.figures import ESTIMATORS as estimators
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


def _edit_targets(classes: Sequence[str], edit_metrics: dict | None) -> list[tuple[int, int]]:
    # An older revision may predate a field: what it lacks is "not available", not an error.
    per_class = (edit_metrics or {}).get("per_class", {})
    return [
        (k, int(per_class[name]["feature"]))
        for k, name in enumerate(classes)
        if name in per_class and "feature" in per_class[name]
    ]


def _revision_alpha(rev: RevisionData) -> tuple[list[str], dict[str, list[list[float]]]]:
    from salve.figures import curves_from_rows

    order = curves_from_rows(rev.edit_curve_rows)[0] if rev.edit_curve_rows else []
    return alpha_values_from_samples(rev.alpha_samples or [], class_order=order)


def _shared_log_range(revs: Sequence[RevisionData]) -> tuple[float, float] | None:
    """One y range (log axis) covering every revision's finite alpha_crit medians."""
    from salve.figures import alpha_medians

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
    from salve.figures import (
        alpha_medians_figure,
        curves_from_rows,
        edit_curves_figure,
        finetune_figure,
    )

    figs: dict[str, bytes | None] = {
        "finetune": finetune_figure(rev.finetune_epochs) if rev.finetune_epochs else None,
        "suppression": None,
        "alpha_medians": None,
    }
    if rev.edit_curve_rows:
        classes, curves = curves_from_rows(rev.edit_curve_rows)
        targets = _edit_targets(classes, rev.edit_metrics)
        if targets:
            figs["suppression"] = edit_curves_figure(curves, targets, classes, "suppress")
    if rev.alpha_samples:
        classes, values = _revision_alpha(rev)
        figs["alpha_medians"] = alpha_medians_figure(classes, values, ylim=alpha_ylim)
    return figs


_FIGURE_TITLES = (
    ("finetune", "Fine-tuning curves"),
    ("suppression", "Suppression curves (each class's dominant feature)"),
    ("alpha_medians", "alpha_crit medians per class and estimator"),
)


def compare_context(
    a: RevisionData,
    b: RevisionData,
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric] = (),
    *,
    file_order: Sequence[str] = (),
    title: str = "SALVE: revision comparison",
    features: FeatureMatches | None = None,
) -> dict:
    """The compare page's template context (plain data). ``features``: the feature matching
    (`match_features`, computed here from the revisions' ``features`` unless given)."""
    from salve.report import Embeds

    embeds = Embeds()
    if features is None:
        features = match_features(a, b)
    ylim = _shared_log_range((a, b))
    fa, fb = revision_figures(a, ylim), revision_figures(b, ylim)
    missing = "not available at this revision"
    figures: list[tuple[str, Image, Image]] = [
        (
            caption,
            embeds.figure(fa[key], f"A ({a.label})", missing),
            embeds.figure(fb[key], f"B ({b.label})", missing),
        )
        for key, caption in _FIGURE_TITLES
    ]
    return {
        "title": title,
        "subtitle": f"A = {a.label} ({a.sha[:10]}) · B = {b.label} ({b.sha[:10]})",
        "nav": [(f"#{sid}", t, "") for sid, t in COMPARE_SECTIONS],
        "sections": dict(COMPARE_SECTIONS),
        "revisions": [("A", a.label, a.sha), ("B", b.label, b.sha)],
        "params": param_rows(params_diff),
        "key_metrics": key_metric_changes(metrics_diff, key_metrics),
        "groups": other_metric_groups(metrics_diff, key_metrics, file_order),
        "figures": figures,
        "features": features_context(features, a, b, embeds),
    }


def build_compare_page(
    a: RevisionData,
    b: RevisionData,
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric] = (),
    *,
    file_order: Sequence[str] = (),
    title: str = "SALVE: revision comparison",
    features: FeatureMatches | None = None,
) -> str:
    """The comparison page: parameter diff, key metrics, feature matches, the other metric
    changes by stage (collapsed), and the key figures of both revisions side by side."""
    from salve.report import render

    context = compare_context(
        a,
        b,
        params_diff,
        metrics_diff,
        key_metrics,
        file_order=file_order,
        title=title,
        features=features,
    )
    return render("compare.html", **context)


# --------------------------------------------------------------------------------------------
# Feature matches: is a class still carried by the same latent?
# --------------------------------------------------------------------------------------------

# Their outputs fix the activations an SAE reads: equal at both revisions, one space.
ACTIVATION_STAGES = ("finetune", "extract")
MAX_STRIP_CLASSES = 20  # classes whose matched pair's Grad-FAM strips the page shows


@dataclass(frozen=True)
class ClassMatch:
    """One class: its dominant latent in A and in B (None where a side lacks it) and what became
    of A's (``verdict``: None where no match is possible). ``code_corr``: |correlation| of the
    codes of A's latent and its assigned pair, beside a decoder-cosine match when both runs kept
    val codes."""

    index: int
    name: str
    a: int | None
    b: int | None
    verdict: Verdict | None = None
    shown_b: int | None = None  # B's latent drawn beside A's: its match, else B's dominant
    code_corr: float | None = None


@dataclass(frozen=True)
class CrossMatch:
    """A cross-class feature of A or B and its counterpart in the other run."""

    a: int | None
    a_classes: tuple[str, ...]
    b: int | None
    b_classes: tuple[str, ...]
    verdict: Verdict | None
    note: str = ""


@dataclass
class FeatureMatches:
    """The feature matching of two revisions. ``status``: "matched"; "impossible" (the
    activations differ and no shared val codes exist: no similarity means anything); or
    "unavailable" (a revision lacks its SAE or ranking). ``note`` says which basis and why."""

    status: str
    basis: str
    threshold: float
    note: str
    matching: LatentMatching | None = None
    codes: LatentMatching | None = None  # code correlation, as a check beside decoder cosine
    classes: list[ClassMatch] = field(default_factory=list)
    cross: list[CrossMatch] = field(default_factory=list)

    @property
    def survived(self) -> int:
        """Classes whose dominant feature in A is still their dominant one in B (any number)."""
        return sum(bool(c.verdict and c.verdict.survived) for c in self.classes)

    @property
    def judged(self) -> int:
        return sum(c.verdict is not None for c in self.classes)

    def counts(self) -> dict[str, int]:
        from salve.matching import VERDICTS

        out = dict.fromkeys(VERDICTS, 0)
        for c in self.classes:
            if c.verdict is not None:
                out[c.verdict.kind] += 1
        return out

    def summary(self) -> str:
        """The matched latents over all, in one sentence ("" without a matching)."""
        m = self.matching
        if m is None:
            return ""
        la, lb = m.sizes
        parts = [
            f"{len(m.matched)} latent pairs matched (|{m.basis}| > {fmt(m.threshold)}) of A's "
            f"{la} and B's {lb} latents",
            f"{len(m.gone)} of A gone",
            f"{len(m.new)} of B new",
        ]
        if m.splits or m.merges:
            parts.append(f"{len(m.splits)} split(s), {len(m.merges)} merge(s)")
        return "; ".join(parts) + "."

    def strip_latents(self) -> tuple[set[int], set[int]]:
        """Latents of A and of B whose Grad-FAM strips the page draws."""
        if self.status != "matched":
            return set(), set()
        rows = [c for c in self.classes if c.a is not None and c.shown_b is not None]
        rows = rows[:MAX_STRIP_CLASSES]
        return {int(c.a) for c in rows}, {int(c.shown_b) for c in rows}


def _short(md5: str | None) -> str:
    return (md5 or "none")[:8]


def _activation_note(fa: FeatureSide, fb: FeatureSide) -> tuple[bool, str]:
    """Whether both SAEs read the same activations (dvc.lock's records agree), and why not."""
    differ, unknown = [], []
    for stage in ACTIVATION_STAGES:
        x, y = fa.stage_outputs.get(stage), fb.stage_outputs.get(stage)
        if x is None or y is None:
            unknown.append(f"{stage} at {'A' if x is None else 'B'}")
        elif x != y:
            what = " (a retrained backbone)" if stage == "finetune" else ""
            differ.append(f"{stage} output {_short(x)} -> {_short(y)}{what}")
    if differ:
        return False, "The activations differ between A and B: " + "; ".join(differ) + "."
    if unknown:
        return False, (
            "Which activations the SAEs read is not recorded in dvc.lock ("
            + ", ".join(unknown)
            + "), so they may differ."
        )
    if fa.decoder_ml.shape[0] != fb.decoder_ml.shape[0]:
        return False, "The SAEs read activations of different widths."
    outs = ", ".join(f"{s} {_short(fa.stage_outputs[s])}" for s in ACTIVATION_STAGES)
    return True, f"A and B read the same activations (the same outputs of {outs})."


def _codes_pair(fa: FeatureSide, fb: FeatureSide, shared_images: bool | None) -> str:
    """Why the two runs' val codes cannot be correlated ("" when they can)."""
    lacking = [s for s, f in (("A", fa), ("B", fb)) if f.val_codes_nl is None]
    if lacking:
        return f"{' and '.join(lacking)} kept no val activations (results/extract)"
    if not shared_images or fa.val_codes_nl.shape[0] != fb.val_codes_nl.shape[0]:
        return "the two runs' val images differ"
    return ""


def _class_verdict(m: LatentMatching, a: int, b: int) -> tuple[Verdict, int]:
    from salve.matching import verdict

    v = verdict(m, a, b)
    if v.kind != "different":
        return v, b
    if v.match >= 0 and m.is_match(a, v.match):
        return v, v.match  # A's feature lives on in B, as another latent
    return v, b


def _cross_rows(m: LatentMatching | None, fa: FeatureSide, fb: FeatureSide) -> list[CrossMatch]:
    from salve.matching import verdict

    def names(f: FeatureSide, entry: Mapping[str, Any]) -> tuple[str, ...]:
        classes = f.classes or []
        return tuple(classes[k] if 0 <= k < len(classes) else str(k) for k in entry["classes"])

    cross_a = {int(c["feature"]): names(fa, c) for c in fa.cross_class or []}
    cross_b = {int(c["feature"]): names(fb, c) for c in fb.cross_class or []}
    rows, used = [], set()
    for a, classes in cross_a.items():
        if m is None:
            rows.append(CrossMatch(a, classes, None, (), None))
            continue
        sims = {b: m.abs_similarity[a, b] for b in cross_b}
        best = max(sims, key=sims.get, default=None)
        b = best if best is not None and sims[best] > m.threshold else int(m.match_a[a])
        v = verdict(m, a, b)
        note = "" if b in cross_b else "not cross-class in B"
        if b in cross_b:
            used.add(b)
        rows.append(CrossMatch(a, classes, b if b >= 0 else None, cross_b.get(b, ()), v, note))
    for b, classes in cross_b.items():
        if b in used:
            continue
        if m is None:
            rows.append(CrossMatch(None, (), b, classes, None))
            continue
        a = int(m.match_b[b])
        v = verdict(m, a, b) if a >= 0 else None
        note = "not cross-class in A" if a >= 0 else "no partner in A"
        rows.append(CrossMatch(a if a >= 0 else None, (), b, classes, v, note))
    return rows


def match_features(
    a: RevisionData,
    b: RevisionData,
    *,
    shared_val_images: bool | None = None,
    threshold: float | None = None,
) -> FeatureMatches:
    """Match A's latents to B's and judge each class's dominant feature and each cross-class
    feature. Decoder cosine when both SAEs read the same activations; after a retrain (the
    finetune or extract outputs differ) the correlation of their codes on the val images both
    kept (``shared_val_images``: the same images at both); else no match, and the note says why.
    ``threshold``: salve.matching.THRESHOLD unless given.
    """
    from salve.matching import (
        CODE_CORRELATION,
        DECODER_COSINE,
        THRESHOLD,
        match_codes,
        match_decoders,
    )

    threshold = THRESHOLD if threshold is None else threshold
    fa, fb = a.features or FeatureSide(), b.features or FeatureSide()
    lacking = [
        f"{what} at {side} ({label})"
        for side, label, f in (("A", a.label, fa), ("B", b.label, fb))
        for what, value in (
            ("no SAE (results/fit_sae)", f.decoder_ml),
            ("no ranking of its SAE (results/rank)", f.dominant),
        )
        if value is None
    ]
    classes = fa.classes or fb.classes or []
    index_b = {name: k for k, name in enumerate(fb.classes or classes)}

    def rows(m: LatentMatching | None, codes: LatentMatching | None) -> list[ClassMatch]:
        out = []
        for k, name in enumerate(classes):
            da = fa.dominant[k] if fa.dominant and k < len(fa.dominant) else None
            kb = index_b.get(name)
            db = (
                fb.dominant[kb]
                if fb.dominant and kb is not None and kb < len(fb.dominant)
                else None
            )
            if m is None or da is None or db is None:
                out.append(ClassMatch(k, name, da, db))
                continue
            v, shown = _class_verdict(m, int(da), int(db))
            corr = codes.score(int(da), v.match) if codes is not None and v.match >= 0 else None
            out.append(ClassMatch(k, name, int(da), int(db), v, shown, corr))
        return out

    if lacking:
        note = "No feature matching: " + "; ".join(lacking) + "."
        return FeatureMatches("unavailable", "", threshold, note, classes=rows(None, None))
    same, why = _activation_note(fa, fb)
    codes_missing = _codes_pair(fa, fb, True if same else shared_val_images)
    if same:
        m = match_decoders(fa.decoder_ml, fb.decoder_ml, threshold)
        codes = None
        if not codes_missing:
            codes = match_codes(fa.val_codes_nl, fb.val_codes_nl, threshold)
        n = "" if codes is None else f" Their codes on the {fa.val_codes_nl.shape[0]} val images"
        check = f"{n} are correlated as a check (column code corr.)." if codes else ""
        note = f"{why} Latents are matched by decoder-column cosine.{check}"
        return FeatureMatches(
            "matched",
            DECODER_COSINE,
            threshold,
            note,
            m,
            codes,
            rows(m, codes),
            _cross_rows(m, fa, fb),
        )
    why += " Decoder cosines would compare two different spaces, so they are not used."
    if codes_missing:
        note = f"{why} No match is possible: {codes_missing}."
        return FeatureMatches(
            "impossible",
            "",
            threshold,
            note,
            classes=rows(None, None),
            cross=_cross_rows(None, fa, fb),
        )
    m = match_codes(fa.val_codes_nl, fb.val_codes_nl, threshold)
    n = fa.val_codes_nl.shape[0]
    note = (
        f"{why} Latents are matched by the correlation of their codes on the {n} val images "
        "both runs kept."
    )
    return FeatureMatches(
        "matched", CODE_CORRELATION, threshold, note, m, None, rows(m, None), _cross_rows(m, fa, fb)
    )


def _latents(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _detail(c: ClassMatch, m: LatentMatching) -> str:
    v = c.verdict
    if v is None:
        return ""
    if v.kind in ("same", "renumbered"):
        flip = " (sign flipped)" if m.sign(v.a, v.b) < 0 else ""
        said = (
            f"latent {v.a} in both"
            if v.kind == "same"
            else f"latent {v.a} of A is latent {v.b} of B"
        )
        if v.match == v.b:
            return said + flip
        return (
            f"{said}{flip}: its closest latent there, |{m.basis}| {fmt(m.score(v.a, v.b))}; the "
            f"one-to-one assignment gives {v.b} to A's {int(m.match_b[v.b])} instead"
        )
    if v.kind == "split":
        cos = ", ".join(fmt(m.score(v.a, p)) for p in v.parts)
        return f"latent {v.a} of A splits into latents {_latents(v.parts)} of B (|{m.basis}| {cos})"
    if v.kind == "merge":
        cos = ", ".join(fmt(m.score(p, v.b)) for p in v.parts)
        return f"latents {_latents(v.parts)} of A merge into latent {v.b} of B (|{m.basis}| {cos})"
    if v.match >= 0 and m.is_match(v.a, v.match):
        return (
            f"A's latent {v.a} lives on as latent {v.match} of B, which is not this class's "
            f"dominant latent there ({v.b} is)"
        )
    if v.match >= 0:
        return (
            f"A's latent {v.a} has no match in B: its assigned pair, latent {v.match}, is at "
            f"|{m.basis}| {fmt(v.score)} ≤ {fmt(m.threshold)} (gone)"
        )
    return f"A's latent {v.a} has no partner in B (B has fewer latents): gone"


def _match_cell(c: ClassMatch, m: LatentMatching | None) -> tuple[str, str, str, str]:
    """(match shown, data-match, |similarity| shown, data-score) of a class row."""
    v = c.verdict
    if m is None or v is None or v.match < 0:
        return "–", "", "–", ""
    score = f"{v.score:.6f}"
    if not m.is_match(v.a, v.match):
        return f"none (closest pair: {v.match})", "", fmt(v.score), score
    flip = " (sign flipped)" if v.sign < 0 else ""
    return f"{v.match}{flip}", str(v.match), fmt(v.score), score


def _links(side: str, f: FeatureSide, latents: Sequence[int | None]) -> list[tuple[str, str]]:
    return [
        (f"{f.browser}#latent-{lat}", f"{side}: latent {lat}")
        for lat in dict.fromkeys(latents)
        if lat is not None and f.browser
    ]


def features_context(
    fm: FeatureMatches, a: RevisionData, b: RevisionData, embeds: Any
) -> dict[str, Any]:
    """The feature-matches section as plain data: rows per class and cross-class feature, the
    assigned pairs, links into both latent browsers, the Grad-FAM strips of matched pairs."""
    fa, fb = a.features or FeatureSide(), b.features or FeatureSide()
    m = fm.matching
    rows = []
    for c in fm.classes:
        shown, match_attr, score, score_attr = _match_cell(c, m)
        v = c.verdict
        rows.append(
            {
                "index": c.index,
                "name": c.name,
                "a": fmt(c.a),
                "b": fmt(c.b),
                "match": shown,
                "match_attr": match_attr,
                "score": score,
                "score_attr": score_attr,
                "code_corr": fmt(c.code_corr) if c.code_corr is not None else "–",
                "verdict": v.kind if v else "none",
                "label": v.label if v else "no match possible",
                "detail": _detail(c, m) if v and m else "",
                "links": _links("A", fa, [c.a]) + _links("B", fb, [c.b, c.shown_b]),
            }
        )
    cross = []
    for x in fm.cross:
        v = x.verdict
        paired = m is not None and x.a is not None and x.b is not None
        score = fmt(m.score(x.a, x.b)) if paired else "–"
        cross.append(
            {
                "a": "–"
                if x.a is None
                else f"{x.a} ({', '.join(x.a_classes) or 'not cross-class'})",
                "b": "–"
                if x.b is None
                else f"{x.b} ({', '.join(x.b_classes) or 'not cross-class'})",
                "score": score,
                "label": (v.label if v else "no match possible")
                + (f"; {x.note}" if x.note else ""),
                "links": _links("A", fa, [x.a]) + _links("B", fb, [x.b]),
            }
        )
    pairs = []
    if m is not None:
        for pa, pb in m.pairs:
            status = "match" if m.is_match(pa, pb) else f"≤ {fmt(m.threshold)}: not a match"
            pairs.append((pa, pb, fmt(m.score(pa, pb)), f"{m.similarity[pa, pb]:+.4f}", status))
    strips = []
    want_a, want_b = fm.strip_latents()
    for c in fm.classes:
        if c.a not in want_a or c.shown_b not in want_b:
            continue
        matched = m is not None and c.verdict is not None and c.verdict.kind != "different"
        matched = matched or (m is not None and m.is_match(c.a, c.shown_b))
        what = (
            f"|{m.basis}| {fmt(m.score(c.a, c.shown_b))}"
            if matched
            else "B's dominant latent: not a match"
        )
        strips.append(
            (
                f"class {c.name}",
                embeds.figure(
                    fa.strips.get(c.a), f"A ({a.label}): latent {c.a}", fa.strips_note or "–"
                ),
                embeds.figure(
                    fb.strips.get(c.shown_b),
                    f"B ({b.label}): latent {c.shown_b}, {what}",
                    fb.strips_note or "–",
                ),
            )
        )
    judged = fm.judged
    return {
        "status": fm.status,
        "note": fm.note,
        "basis": fm.basis,
        "threshold": fmt(fm.threshold),
        "summary": fm.summary(),
        "survived": (
            f"{fm.survived} of {len(fm.classes)} classes keep their dominant feature "
            "(same feature, renumbered or not)."
            if judged
            else ""
        ),
        "has_codes": fm.codes is not None,
        "rows": rows,
        "cross": cross,
        "pairs": pairs,
        "gone": _latents(m.gone) if m is not None else "",
        "new": _latents(m.new) if m is not None else "",
        "strips": strips,
        "browsers": [
            (side, rev.label, f.browser, f.browser_note)
            for side, rev, f in (("A", a, fa), ("B", b, fb))
        ],
    }


def features_markdown(fm: FeatureMatches | None, since: str) -> str:
    """The nightly artifact's line: how many classes' dominant features survived since ``since``."""
    if fm is None:
        return f"Dominant features since {since}: not compared."
    if fm.status != "matched":
        return f"Dominant features since {since}: not compared. {fm.note}"
    from salve.matching import VERDICTS

    detail = ", ".join(f"{n} {VERDICTS[k]}" for k, n in fm.counts().items() if n)
    return (
        f"{fm.survived} of {len(fm.classes)} classes' dominant features survived since {since} "
        f"(by {fm.basis} > {fmt(fm.threshold)}: {detail or 'none judged'})."
    )


# --------------------------------------------------------------------------------------------
# Markdown (the nightly Prefect artifact)
# --------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _group_rows(g: MetricGroup) -> list[tuple[str, str, str, str, str]]:
    def change(r: MetricChange) -> str:
        said = not r.verdict or r.verdict in r.change  # "4 -> 67 (changed)", "added"
        return r.change if said else f"{r.change} ({r.verdict})"

    return [(r.key, r.old, r.new, change(r), r.arrow) for r in g.rows]


def metrics_diff_markdown(
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric],
    *,
    old_label: str = "old",
    new_label: str = "new",
    file_order: Sequence[str] = (),
) -> str:
    """The same story as the compare page, as Markdown: parameters, key metrics, then one line
    per file (stage) for the other metric changes, each with its table folded in a
    ``<details>`` block (Prefect's UI and GitHub render it collapsed)."""
    out = ["### Parameters\n\n"]
    params = param_rows(params_diff)
    if params:
        out.append(_md_table(("file", "parameter", old_label, new_label, "change"), params))
    else:
        out.append("No parameter changed.\n")
    out.append("\n### Key metrics\n\n")
    rows = [
        (f"{c.label} ({c.key})", c.old, c.new, c.change, c.arrow, c.verdict)
        for c in key_metric_changes(metrics_diff, key_metrics)
    ]
    if rows:
        header = ("metric", old_label, new_label, "change", "direction", "judgement")
        out.append(_md_table(header, rows))
    else:
        out.append("No key metrics declared.\n")
    groups = other_metric_groups(metrics_diff, key_metrics, file_order)
    out.append("\n### Other metric changes, by stage\n")
    if not groups:
        out.append("\nNone.\n")
    for g in groups:
        out.append(f"\n#### {_md(g.file)}: {g.summary}\n\n")
        out.append(f"<details><summary>the {len(g.rows)} change(s)</summary>\n\n")
        header = ("metric", old_label, new_label, "change", "direction")
        out.append(_md_table(header, _group_rows(g)))
        out.append("\n</details>\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Plain text (`salve diff`, `salve exps`)
# --------------------------------------------------------------------------------------------

TEXT_WIDTH = 100


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def text_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int = TEXT_WIDTH,
    indent: int = 2,
    shrink: int = 0,
) -> str:
    """Left-aligned columns separated by two spaces; when the table is wider than ``width``,
    column ``shrink`` is clipped (with "…") to fit."""
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    excess = indent + sum(widths) + 2 * (len(widths) - 1) - width
    if excess > 0:
        widths[shrink] = max(widths[shrink] - excess, 8)
    lines = []
    for r in cells:
        parts = [_clip(c, w).ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append((" " * indent + "  ".join(parts)).rstrip())
    return "\n".join(lines) + "\n"


def metrics_diff_text(
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric],
    *,
    old_label: str = "old",
    new_label: str = "new",
    file_order: Sequence[str] = (),
    show_all: bool = False,
    width: int = TEXT_WIDTH,
) -> str:
    """The comparison for a terminal, in the page's order: parameters, every key metric, then
    one line per file (stage) of other changes (``show_all``: their rows too)."""
    out = [f"Parameters ({old_label} -> {new_label})\n"]
    params = param_rows(params_diff)
    if params:
        rows = [(key, old, new, change, file) for file, key, old, new, change in params]
        out.append(text_table(("parameter", old_label, new_label, "change", "file"), rows))
    else:
        out.append("  no parameter changed\n")
    out.append("\nKey metrics\n")
    changes = key_metric_changes(metrics_diff, key_metrics)
    if changes:
        rows = [(c.label, c.old, c.new, c.change, c.arrow, c.verdict) for c in changes]
        header = ("metric", old_label, new_label, "change", "", "judgement")
        out.append(text_table(header, rows, width=width))
    else:
        out.append("  no key metrics declared\n")
    groups = other_metric_groups(metrics_diff, key_metrics, file_order)
    out.append("\nOther metric changes, by stage\n")
    if not groups:
        out.append("  none\n")
    for g in groups:
        out.append(f"  {g.file}: {g.summary}\n")
        if show_all:
            header = ("metric", old_label, new_label, "change", "")
            out.append(text_table(header, _group_rows(g), width=width, indent=4))
    if groups and not show_all:
        out.append("  (--all lists them)\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Several runs side by side (`salve exps`)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentRow:
    """One run in an experiment table: a baseline commit, the workspace or a DVC experiment.
    ``params``: flat dotted names (``sae.width``); ``metrics``: ``{file: nested values}``;
    ``state``: "" when finished, else queued / running / failed (its values may be missing)."""

    name: str
    rev: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, Any]]
    state: str = ""
    baseline: bool = False


def lookup(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    """The value at ``a.b.c`` in nested mappings, None when any part is absent."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


_ARROWS = {"higher": "↑", "lower": "↓", "none": ""}


def changed_params(rows: Sequence[ExperimentRow]) -> list[str]:
    """Parameters whose value differs between any two rows that record parameters (a queued
    or failed run may record none); absent from such a row counts as a value."""
    recorded = [r.params for r in rows if r.params]
    names = sorted({k for p in recorded for k in p})
    return [n for n in names if len({repr(p.get(n, ...)) for p in recorded}) > 1]


def experiments_table(
    rows: Sequence[ExperimentRow],
    key_metrics: Sequence[KeyMetric],
    *,
    markdown: bool = False,
    width: int = TEXT_WIDTH,
) -> str:
    """Runs as rows; columns: the parameters that differ between them, then the key metrics
    (short names, ↑ / ↓ where a direction is better). Plain text is split into column blocks
    that each fit ``width`` (the run column repeated); Markdown is one table."""
    if not rows:
        return "No experiments.\n"
    params = changed_params(rows)
    values = {km: [lookup(r.metrics.get(km.file), km.key) for r in rows] for km in key_metrics}
    present = [km for km in key_metrics if any(v is not None for v in values[km])]
    # With several runs, a key metric equal in all of them is one note, not a column.
    same = [
        km
        for km in present
        if len(rows) > 1 and len({repr(v) for v in values[km] if v is not None}) == 1
    ]
    shown = [km for km in present if km not in same]
    header = ["run", *params, *(f"{km.name}{_ARROWS[km.better]}" for km in shown)]
    body = []
    for r in rows:
        label = r.name if r.rev.startswith(r.name) else f"{r.name} ({r.rev[:7]})"
        if r.state:
            label += f" [{r.state}]"
        cells = [label if r.baseline else f"  {label}"]
        cells += [fmt(r.params.get(p)) for p in params]
        cells += [fmt(lookup(r.metrics.get(km.file), km.key)) for km in shown]
        body.append(cells)
    legend = ", ".join(f"{km.name} = {km.label}" for km in shown)
    notes = [
        f"Changed parameters: {', '.join(params) if params else 'none'}.",
        "↑ higher is better, ↓ lower is better.",
        f"Key metrics: {legend}." if legend else "No key metric differs.",
    ]
    if same:
        notes.append(
            "Same in every run: "
            + ", ".join(
                f"{km.label} {fmt(next(v for v in values[km] if v is not None))}" for km in same
            )
            + "."
        )
    if markdown:
        body = [[c.strip() for c in r] for r in body]
        return _md_table(header, body) + "\n" + "\n".join(notes) + "\n"
    blocks = _column_blocks(header, body, width)
    out = "\n".join(
        text_table([header[i] for i in b], [[r[i] for i in b] for r in body], width=width)
        for b in blocks
    )
    return out + "\n" + "\n".join(textwrap.fill(n, width) for n in notes) + "\n"


def _column_blocks(
    header: Sequence[str], body: Sequence[Sequence[str]], width: int
) -> list[list[int]]:
    """Column index groups, each starting with the run column, each fitting ``width``."""
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    blocks: list[list[int]] = []
    current = [0]
    used = 2 + widths[0]
    for i in range(1, len(header)):
        if used + 2 + widths[i] > width and len(current) > 1:
            blocks.append(current)
            current, used = [0], 2 + widths[0]
        current.append(i)
        used += 2 + widths[i]
    blocks.append(current)
    return blocks
