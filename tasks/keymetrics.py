"""The few numbers each stage is judged by, declared once.

Used by `salve compare` (the page's key-metric table), `salve diff` and the nightly artifact
(the same table, as text and Markdown), `salve exps` (the experiment table's columns) and the
terminal's one line per stage (`headline`). No stage imports this module, so editing it never
makes a stage stale: tasks/deps.py derives each stage's DVC dependencies from its imports.

Noise floors are each metric's resolution: a change smaller than the smallest change the model
could make is arithmetic (float32 sums, averaging), not a result, and is shown grey "within
noise" instead of better / worse.

- Accuracies and accuracy-derived means (val accuracy, per-class minimum, splice accuracy, the
  edit's selectivity score and off-target change) and the SAE's L0 (active latents summed over
  val samples, divided by N_val) move in steps of about one val sample, 1/N_val (one flipped
  image changes a class-mean accuracy by 1/n_k, averaged over K ~ N_val/n_k classes). Their
  floor is half a step, 0.5/N_val, with N_val from metrics/fetch.json (`key_metrics`): any
  flipped sample is judged, anything smaller is not.
- Counts (classes, samples, selective classes, distinct features) and fractions of a count (dead
  latents / width) move by whole units: floor 0 (any change is real; round-off is still caught).
- Continuous float32 quantities (FVU, alpha_crit medians, deletion AUC) have no step: their
  floor is relative, 1e-4 of the larger value, well above float32 accumulation error (about
  1e-6 over 1e5 terms) and below any change a parameter makes in practice.
Seed-to-seed spread is a different, larger question (is a change significant?) that these
floors do not answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from salve.present.compare.experiments import lookup
from salve.present.compare.metrics import KeyMetric
from salve.present.kit import fmt
from tasks import STAGE_ORDER, STAGES, STUDY_ORDER

HALF_VAL_SAMPLE = 0.5  # accuracy-like floors: this many val samples (divided by N_val)
FLOAT32_RELATIVE = 1e-4
# When N_val is unknown (no metrics/fetch.json at either revision): the floor of a val split of
# 5000 samples, finer than any real one here, so only arithmetic is called noise.
UNKNOWN_VAL_FLOOR = HALF_VAL_SAMPLE / 5000


def _km(stage: str, key: str, label: str, short: str, better: str = "none", **kw: Any) -> KeyMetric:
    return KeyMetric(STAGES[stage].metrics_file, key, label, better, short=short, **kw)


_PER_SAMPLE: set[tuple[str, str]] = set()  # (file, key) of the metrics declared by _per_sample


def _per_sample(stage: str, key: str, label: str, short: str, better: str = "none") -> KeyMetric:
    """A metric that moves in steps of one val sample: its floor is set by `key_metrics`."""
    _PER_SAMPLE.add((STAGES[stage].metrics_file, key))
    return _km(stage, key, label, short, better, noise_floor=UNKNOWN_VAL_FLOOR)


def _continuous(stage: str, key: str, label: str, short: str, better: str = "none") -> KeyMetric:
    return _km(stage, key, label, short, better, relative_noise=FLOAT32_RELATIVE)


KEY_METRICS_BY_STAGE: dict[str, tuple[KeyMetric, ...]] = {
    "fetch": (
        _km("fetch", "num_classes", "classes", "classes"),
        _km("fetch", "train_samples", "train samples", "train"),
        _km("fetch", "val_samples", "val samples", "val"),
    ),
    "finetune": (
        _per_sample("finetune", "val_accuracy", "fine-tuned val accuracy", "val_acc", "higher"),
        _per_sample(
            "finetune", "min_class_val_accuracy", "worst class val accuracy", "min_class", "higher"
        ),
    ),
    "extract": (_km("extract", "dim", "activation width (head input)", "dim"),),
    "fit_sae": (
        _continuous("fit_sae", "val_fvu", "SAE val FVU", "fvu", "lower"),
        _per_sample("fit_sae", "val_l0", "SAE val L0 (active latents)", "L0"),
        _km("fit_sae", "val_dead_fraction", "SAE dead latent fraction", "dead", "lower"),
        _per_sample(
            "fit_sae", "val_splice_accuracy", "val accuracy, SAE spliced in", "splice", "higher"
        ),
    ),
    "rank": (
        _km("rank", "distinct_dominant_features", "distinct dominant features", "distinct"),
        _km("rank", "cross_class_features", "cross-class features", "cross"),
    ),
    "edit": (
        _km("edit", "classes_selective", "classes edited selectively", "selective", "higher"),
        _per_sample("edit", "mean_score", "mean selectivity score", "score", "higher"),
        _per_sample(
            "edit", "mean_abs_off_target_change", "mean |off-target change|", "off_tgt", "lower"
        ),
        _km(
            "edit",
            "checkpoint_edit.feature",
            "saved edit's feature",
            "edit_feat",
            kind="identifier",
        ),
    ),
    "alpha_crit": (
        _continuous("alpha_crit", "median_exact", "median exact alpha_crit", "alpha_crit"),
    ),
    "gradfam": (
        _continuous("gradfam", "deletion_auc", "Grad-FAM deletion AUC", "del_auc", "lower"),
        _km(
            "gradfam",
            "maps_no_better_than_random",
            "maps no better than random",
            "no_better",
            "lower",
        ),
    ),
    "evaluate": (
        _per_sample(
            "evaluate",
            "methods.salve_projection.efficacy.mean",
            "SALVE projection: efficacy (seed mean)",
            "efficacy",
            "higher",
        ),
        _per_sample(
            "evaluate",
            "methods.salve_projection.specificity_mean.mean",
            "SALVE projection: specificity (seed mean)",
            "specificity",
            "higher",
        ),
        _km(
            "evaluate",
            "stability.dominant_match_fraction",
            "dominant latent found again across seeds",
            "stable",
            "higher",
        ),
    ),
    "report": (),
}

# The study's stages (study/dvc.yaml, `salve study`): apart, so the report (which shows the
# pipeline's) need not know them; `salve compare`, `salve diff` and the nightly show both.
STUDY_KEY_METRICS_BY_STAGE: dict[str, tuple[KeyMetric, ...]] = {
    "study_adversarial": (
        _continuous(
            "study_adversarial",
            "linf.spearman",
            "Spearman: alpha_crit vs L-inf flip size",
            "rho_linf",
            "higher",
        ),
        _continuous(
            "study_adversarial",
            "l2.spearman",
            "Spearman: alpha_crit vs L2 flip size",
            "rho_l2",
            "higher",
        ),
    ),
    "study_sae_variants": (
        _per_sample(
            "study_sae_variants",
            "variants.topk.methods.salve_projection.specificity_mean.mean",
            "top-k SAE: projection specificity (seed mean)",
            "topk_spec",
            "higher",
        ),
        _per_sample(
            "study_sae_variants",
            "variants.relu.methods.salve_projection.specificity_mean.mean",
            "ReLU SAE: projection specificity (seed mean)",
            "relu_spec",
            "higher",
        ),
    ),
    "study_deeper_layer": (
        _per_sample(
            "study_deeper_layer",
            "summary.difference.efficacy.mean",
            "backbone minus head edit: efficacy (class mean)",
            "deep_eff",
        ),
    ),
    "study_report": (),
}
assert list(STUDY_KEY_METRICS_BY_STAGE) == list(STUDY_ORDER)
STUDY_KEY_METRICS_BY_STAGE = {  # shown where a revision ran the study (KeyMetric.optional)
    stage: tuple(dataclasses.replace(km, optional=True) for km in kms)
    for stage, kms in STUDY_KEY_METRICS_BY_STAGE.items()
}
PIPELINE_KEY_METRICS: tuple[KeyMetric, ...] = tuple(
    km for kms in KEY_METRICS_BY_STAGE.values() for km in kms
)

KEY_METRICS: tuple[KeyMetric, ...] = tuple(
    km
    for by_stage in (KEY_METRICS_BY_STAGE, STUDY_KEY_METRICS_BY_STAGE)
    for kms in by_stage.values()
    for km in kms
)
VAL_SAMPLES = (STAGES["fetch"].metrics_file, "val_samples")


def val_samples(*metrics: Mapping[str, Mapping[str, Any]] | None) -> int | None:
    """The smallest positive N_val among some revisions' metrics (``{file: values}``), None when
    none records it. The smallest gives the coarser, safer floor."""
    found = []
    for m in metrics:
        n = lookup((m or {}).get(VAL_SAMPLES[0]), VAL_SAMPLES[1])
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            found.append(n)
    return min(found) if found else None


def key_metrics(n_val: int | None = None) -> tuple[KeyMetric, ...]:
    """Every key metric in stage order, accuracy-like floors set for a val split of ``n_val``
    samples (unknown: the finer UNKNOWN_VAL_FLOOR)."""
    if not n_val:
        return KEY_METRICS
    floor = HALF_VAL_SAMPLE / n_val
    return tuple(
        dataclasses.replace(km, noise_floor=floor) if (km.file, km.key) in _PER_SAMPLE else km
        for km in KEY_METRICS
    )


def headline(stage: str, metrics: Mapping[str, Any]) -> str:
    """A stage's key numbers as ``"k=v, k=v"`` for its line on the terminal (those its metrics
    lack are left out; "" for a stage without key metrics)."""
    parts = []
    for km in KEY_METRICS_BY_STAGE.get(stage) or STUDY_KEY_METRICS_BY_STAGE.get(stage, ()):
        value = lookup(metrics, km.key)
        if value is not None and not isinstance(value, Mapping | list):
            parts.append(f"{km.name}={fmt(value)}")
    return ", ".join(parts)


def metrics_files() -> list[str]:
    """Every stage's metrics file, in DAG order, the study's last (the order of groups in
    comparisons)."""
    return [STAGES[s].metrics_file for s in (*STAGE_ORDER, *STUDY_ORDER)]
