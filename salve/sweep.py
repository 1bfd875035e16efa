"""The edit stage's analysis: suppression and enhancement curves per feature, selectivity per
class, every latent's effect at full strength, and the configured edit made shippable.

``edit.mode`` picks the control (salve.methods.CONTROLS: a permanent head edit, ``paper`` or
``projection``, or activation steering, ``steer``). The other kind is measured beside it on the
same grid, as the ``companion`` (steering beside a head edit; the projection edit, centred as
``edit.centre`` says, beside steering): its curves, per-class table and per-latent effects, for
the report and the latent browser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salve.config import EditConfig
from salve.editing import (
    SELECTIVE_WITHIN,
    SUPPRESSED_BELOW,
    edit_targets,
    evaluated_classes,
    selectivity,
)
from salve.methods import Checkpoint, SalveMethod, SweepData, control


def companion_of(mode: str) -> SalveMethod:
    """The control measured beside ``edit.mode``: steering beside a head edit, else projection."""
    return control(control(mode).companion)


def sweep(
    method: SalveMethod, data: SweepData, ranking: dict, e: EditConfig, classes: Sequence[str]
) -> tuple[list[dict], list[dict]]:
    """curves.csv rows and per-feature selectivity of every target feature, both signs."""
    grid = torch.linspace(0.0, e.alpha_max, e.alpha_steps, dtype=torch.float64)
    rows, per_feature = [], []
    for item in edit_targets(ranking, e.targets):
        scale = method.alpha_scale(data.w_dec_ml[:, item["feature"]], e.alpha_unit)
        curves = {}
        for sign in ("suppress", "enhance"):
            acc_ak, overall_a = method.curves(data, item["feature"], grid * scale, sign)
            curves[sign] = acc_ak
            for a_idx, alpha in enumerate(grid.tolist()):
                for k in range(data.num_classes):
                    rows.append(
                        {
                            "feature": item["feature"],
                            "role": item["role"],
                            "sign": sign,
                            "alpha": round(alpha, 6),
                            "alpha_abs": alpha * scale,
                            "class": classes[k],
                            "accuracy": float(acc_ak[a_idx, k]),
                            "overall": float(overall_a[a_idx]),
                            "method": method.mode,
                        }
                    )
        suppress, enh = curves["suppress"], curves["enhance"]
        per_feature.append(
            item
            | {
                "alpha_scale": scale,
                "suppress": selectivity(suppress[0], suppress[-1], item["classes"]),
                "class_change_full_suppression": {
                    classes[k]: float(suppress[-1, k] - suppress[0, k])
                    for k in range(data.num_classes)
                },
                "enhance_min_class_change": float((enh[-1] - enh[0]).min()),
            }
        )
    return rows, per_feature


def base_accuracy(method: SalveMethod, data: SweepData) -> torch.Tensor:
    """Per-class val accuracy before any edit [K]."""
    return method.curves(data, 0, torch.zeros(1, dtype=torch.float64), "suppress")[0][0]


def per_class_table(
    per_feature: list[dict], evaluated: list[int], classes: Sequence[str]
) -> dict[str, dict]:
    """Each evaluated class's dominant-feature suppression."""
    dominant = {f["classes"][0]: f for f in per_feature if f["role"] == "dominant"}
    return {
        classes[k]: {
            "feature": dominant[k]["feature"],
            "target_acc_base": dominant[k]["suppress"]["target_acc_base"],
            "target_acc_full_suppression": dominant[k]["suppress"]["target_acc_edited"],
            "off_target_mean_change": dominant[k]["suppress"]["off_target_mean_change"],
            "off_target_max_abs_change": dominant[k]["suppress"]["off_target_max_abs_change"],
            "score": dominant[k]["suppress"]["score"],
            "raises_target": dominant[k]["suppress"]["target_drop"] < 0,
        }
        for k in evaluated
    }


def summary(per_class: dict[str, dict]) -> dict:
    """How many classes fall below SUPPRESSED_BELOW (and are selective as well), the mean score
    and the mean off-target change."""
    below = sum(v["target_acc_full_suppression"] < SUPPRESSED_BELOW for v in per_class.values())
    selective = sum(
        v["target_acc_full_suppression"] < SUPPRESSED_BELOW
        and abs(v["off_target_mean_change"]) < SELECTIVE_WITHIN
        for v in per_class.values()
    )
    n = max(len(per_class), 1)
    return {
        "classes_below_10pct": below,
        "classes_selective": selective,
        "edits_raising_target": sum(v["raises_target"] for v in per_class.values()),
        "mean_score": sum(v["score"] for v in per_class.values()) / n,
        "mean_abs_off_target_change": sum(
            abs(v["off_target_mean_change"]) for v in per_class.values()
        )
        / n,
    }


def latent_effects(
    method: SalveMethod,
    companion: SalveMethod,
    data: SweepData,
    e: EditConfig,
    base_k: torch.Tensor,
    classes: Sequence[str],
) -> dict:
    """results/edit/latents.json: every latent suppressed alone at full strength, by the
    configured control and by the companion (the latent browser)."""
    changes_lk = method.latent_changes(data, e.alpha_max, e.alpha_unit)
    companion_lk = companion.latent_changes(data, e.alpha_max, e.alpha_unit)
    latents = [
        {
            "latent": latent,
            "base_accuracy": [float(x) for x in base_k],
            "class_change": [float(x) for x in changes_lk[latent]],
            "companion_class_change": [float(x) for x in companion_lk[latent]],
        }
        for latent in range(data.w_dec_ml.shape[1])
    ]
    return {
        "mode": method.mode,
        "alpha": e.alpha_max,
        "classes": list(classes),
        "latents": latents,
        "companion_mode": companion.mode,
    }


def analyse(
    data: SweepData, ranking: dict, e: EditConfig, classes: Sequence[str]
) -> tuple[list[dict], dict, dict]:
    """Everything the edit stage measures: ``(curves rows, latent effects, metrics without the
    checkpoint)``; the companion's rows first, so a reader that does not filter on ``method``
    (it keys curves by feature and sign) keeps the configured mode's."""
    method, companion = control(e.mode), companion_of(e.mode)
    rows, per_feature = sweep(method, data, ranking, e, classes)
    companion_rows, companion_features = sweep(companion, data, ranking, e, classes)
    base_k = base_accuracy(method, data)
    evaluated = evaluated_classes(base_k, e.min_base_accuracy)
    per_class = per_class_table(per_feature, evaluated, classes)
    companion_per_class = per_class_table(companion_features, evaluated, classes)
    effects = latent_effects(method, companion, data, e, base_k, classes)
    metrics = {
        "classes_evaluated": [classes[k] for k in evaluated],
        "classes_left_out": [
            {"class": classes[k], "base_accuracy": float(base_k[k])}
            for k in range(data.num_classes)
            if k not in evaluated
        ],
        **summary(per_class),
        "per_class": per_class,
        "cross_class": [f for f in per_feature if f["role"] == "cross"],
        "checkpoint_edit": None,
        "alpha_grid": {"unit": e.alpha_unit, "max": e.alpha_max, "steps": e.alpha_steps},
        "companion": {"mode": companion.mode, "per_class": companion_per_class}
        | summary(companion_per_class),
    }
    return companion_rows + rows, effects, metrics


def checkpoint_edit(
    model: torch.nn.Module,
    data: SweepData,
    ranking: dict,
    e: EditConfig,
    classes: Sequence[str],
    decoder_columns_normalised: bool | None,
) -> tuple[dict, Checkpoint]:
    """The configured edit of class ``edit.checkpoint_class``'s dominant feature, as a model a
    user can ship: its record and how to save it. Changes ``model`` (run it last)."""
    method = control(e.mode)
    k = e.checkpoint_class
    feature = ranking["dominant"][k]["feature"]
    alpha_abs = e.checkpoint_alpha * method.alpha_scale(data.w_dec_ml[:, feature], e.alpha_unit)
    record = {
        "class": k,
        "class_name": classes[k],
        "feature": feature,
        "sign": e.checkpoint_sign,
        "mode": e.mode,
        "centred": method.centred(data),
        "alpha": e.checkpoint_alpha,
        "alpha_unit": e.alpha_unit,
        "alpha_abs": alpha_abs,
        "decoder_columns_normalised": decoder_columns_normalised,
    }
    shipped = method.checkpoint(model, data, feature, alpha_abs, e.checkpoint_sign)
    return record | shipped.record, shipped


def unchanged_warning(
    path: str, record: dict, shipped: Checkpoint, e: EditConfig, classes: Sequence[str]
) -> str | None:
    """The warning when the saved model gives the input model's logits although alpha > 0."""
    if shipped.unchanged is None or not record["alpha_abs"] > 0:
        return None
    what, same, nothing = control(e.mode).same_as_input
    doing = {"suppress": "suppressing", "enhance": "enhancing"}[e.checkpoint_sign]
    return (
        f"edit: the saved {what} {path} {same}: {doing} feature {record['feature']} (class "
        f"{classes[record['class']]}'s dominant feature) at alpha={e.checkpoint_alpha} "
        f"{nothing}, because {shipped.unchanged}."
    )
