"""The compare page: parameter diff, key metrics, feature matches, the other metric changes by
stage (collapsed), and the key figures of both revisions side by side."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from salve.present.compare.features import (
    FeatureMatches,
    FeatureSide,
    features_context,
    match_features,
)
from salve.present.compare.metrics import (
    Diff,
    KeyMetric,
    key_metric_changes,
    other_metric_groups,
    param_rows,
)
from salve.present.figures import (
    ESTIMATORS,
    alpha_medians,
    alpha_medians_figure,
    curves_from_rows,
    edit_curves_figure,
    finetune_figure,
)
from salve.present.kit import Embeds, render

if TYPE_CHECKING:
    from salve.present.kit import Image

COMPARE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("params-diff", "Parameter changes"),
    ("key-metrics", "Key metrics"),
    ("feature-matches", "Feature matches"),
    ("other-metrics", "Other metric changes, by stage"),
    ("figures", "Key figures"),
)


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
        estimators = ESTIMATORS
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
