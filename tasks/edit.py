"""edit: suppression/enhancement curves per feature from cached val activations, selectivity
metrics, and the configured edit saved as a new checkpoint.

``edit.mode`` picks the control: a permanent head edit (``paper``, ``projection``) or activation
steering (``steer``, salve/steering.py: the saved model is the classifier plus the steering of
the head input). The other kind is measured beside it on the same grid, as the ``companion``
(steering beside a head edit; the projection edit, centred as ``edit.centre`` says, beside
steering): its curves (rows of curves.csv whose ``method`` names it), per-class table and
per-latent effects, for the report and the latent browser.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from salve.config import Config, ConfigError
from salve.editing import (
    SELECTIVE_WITHIN,
    SUPPRESSED_BELOW,
    accuracy_curves,
    alpha_scale,
    edit_head,
    edit_targets,
    head_unchanged,
    selectivity,
    why_unchanged,
)
from salve.models import head_of, save_checkpoint
from salve.steering import (
    Steer,
    ablation_class_changes,
    latent_codes,
    save_steered,
    steered_accuracy_curves,
    steered_classifier,
)
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
)
from tasks.common import run_metadata, write_metrics, write_plot
from tasks.records import EditLatents, EditMetrics, write_record


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    e = cfg.edit
    classes = load_dataset_meta(root)["classes"]
    num_classes = len(classes)
    # Refused by preflight first; tasks.preflight is not imported here: its model checks would
    # make this stage depend on the gradfam and study code (tasks/deps.py).
    if e.checkpoint_class >= num_classes:
        raise ConfigError(
            f"params.yaml: edit.checkpoint_class={e.checkpoint_class} is out of range; "
            f"the dataset has {num_classes} classes (0..{num_classes - 1})"
        )
    ranking = load_ranking(root)
    model, sidecar = load_model(root)
    sae, sae_info = load_sae(root)
    head = head_of(model)
    weight, bias = head.weight.detach(), head.bias.detach()
    acts, labels = load_activations(root, "val")
    w_dec = sae.W_dec.detach()
    # The centred projection acts on a - b_dec, the part the SAE codes see (docs/METHOD.md).
    centre = sae.b_dec.detach() if e.centre else None
    codes_nl = latent_codes(sae, acts)  # steering's codes z(a), float64, once
    grid = torch.linspace(0.0, e.alpha_max, e.alpha_steps, dtype=torch.float64)
    companion = "projection" if e.mode == "steer" else "steer"

    def curves_for(mode: str, latent: int, alphas: torch.Tensor, sign: str):
        col = w_dec[:, latent]
        if mode == "steer":
            return steered_accuracy_curves(
                acts, labels, weight, bias, codes_nl[:, latent], col, alphas, sign, num_classes
            )
        c = centre if mode == "projection" else None
        return accuracy_curves(
            acts, labels, weight, bias, col, alphas, sign, mode, num_classes, centre_m=c
        )

    def sweep(mode: str) -> tuple[list[dict], list[dict]]:
        rows, per_feature = [], []
        for item in edit_targets(ranking, e.targets):
            scale = alpha_scale(w_dec[:, item["feature"]], e.alpha_unit, mode)
            curves = {}
            for sign in ("suppress", "enhance"):
                acc_ak, overall_a = curves_for(mode, item["feature"], grid * scale, sign)
                curves[sign] = acc_ak
                for a_idx, alpha in enumerate(grid.tolist()):
                    for k in range(num_classes):
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
                                "method": mode,
                            }
                        )
            sel = selectivity(curves["suppress"][0], curves["suppress"][-1], item["classes"])
            enh = curves["enhance"]
            per_feature.append(
                item
                | {
                    "alpha_scale": scale,
                    "suppress": sel,
                    "class_change_full_suppression": {
                        classes[k]: float(curves["suppress"][-1, k] - curves["suppress"][0, k])
                        for k in range(num_classes)
                    },
                    "enhance_min_class_change": float((enh[-1] - enh[0]).min()),
                }
            )
        return rows, per_feature

    rows, per_feature = sweep(e.mode)
    companion_rows, companion_features = sweep(companion)
    # The configured mode's rows last: a reader that does not filter on `method` (it keys
    # curves by feature and sign) keeps them.
    write_plot(root, "edit", "curves", companion_rows + rows)
    # Only classes the classifier gets right often enough can be "suppressed": a class at 0 %
    # before any edit would otherwise count as a success.
    base_k = curves_for(e.mode, 0, torch.zeros(1, dtype=torch.float64), "suppress")[0][0]
    evaluated = [k for k in range(num_classes) if float(base_k[k]) >= e.min_base_accuracy]
    left_out = [
        {"class": classes[k], "base_accuracy": float(base_k[k])}
        for k in range(num_classes)
        if k not in evaluated
    ]
    per_class, below, selective = _per_class(per_feature, evaluated, classes)
    companion_per_class, companion_below, companion_selective = _per_class(
        companion_features, evaluated, classes
    )

    # Every latent's effect when suppressed alone at full strength (the latent browser), by
    # the configured mode and by the companion.
    def latent_changes(mode: str) -> torch.Tensor:
        if mode == "steer":
            return ablation_class_changes(
                acts, labels, weight, bias, codes_nl, w_dec, e.alpha_max, num_classes
            )
        out = []
        for latent in range(w_dec.shape[1]):
            scale = alpha_scale(w_dec[:, latent], e.alpha_unit, mode)
            full = torch.tensor([0.0, e.alpha_max * scale], dtype=torch.float64)
            acc = curves_for(mode, latent, full, "suppress")[0]
            out.append(acc[1] - acc[0])
        return torch.stack(out)

    changes_lk, companion_lk = latent_changes(e.mode), latent_changes(companion)
    latents = [
        {
            "latent": latent,
            "base_accuracy": [float(x) for x in base_k],
            "class_change": [float(x) for x in changes_lk[latent]],
            "companion_class_change": [float(x) for x in companion_lk[latent]],
        }
        for latent in range(w_dec.shape[1])
    ]
    effects: EditLatents = {
        "mode": e.mode,
        "alpha": e.alpha_max,
        "classes": classes,
        "latents": latents,
        "companion_mode": companion,
    }
    write_record(STAGES["edit"].path(root, "latents"), EditLatents, effects)

    # The configured edit, saved as a checkpoint a user can ship.
    k = e.checkpoint_class
    feat = ranking["dominant"][k]["feature"]
    col = w_dec[:, feat]
    alpha_abs = e.checkpoint_alpha * alpha_scale(col, e.alpha_unit, e.mode)
    spec = STAGES["edit"]
    doing = {"suppress": "suppressing", "enhance": "enhancing"}[e.checkpoint_sign]
    edit_record = {
        "class": k,
        "class_name": classes[k],
        "feature": feat,
        "sign": e.checkpoint_sign,
        "mode": e.mode,
        "centred": centre is not None and e.mode == "projection",
        "alpha": e.checkpoint_alpha,
        "alpha_unit": e.alpha_unit,
        "alpha_abs": alpha_abs,
        "decoder_columns_normalised": sae_info.get("decoder_columns_normalised"),
    }
    new_sidecar = {key: sidecar[key] for key in ("classes", "image_size", "normalisation")}
    metadata = run_metadata(root, cfg, torch.device("cpu"), ("edit", "sae", "finetune"))
    if e.mode == "steer":
        steer = Steer(feat, alpha_abs, e.checkpoint_sign)
        # The head is not edited; the saved model steers its input. It gives the input model's
        # logits when the step is skipped (g = 1) or cannot reach the logits (W c = 0).
        reaches = bool((weight.double() @ col.double()).any())
        changed = not steer.is_identity and reaches
        if not changed and alpha_abs > 0:
            logging.getLogger("salve").warning(
                f"edit: the saved steered model {spec.out_dir}/{spec.files['model']} gives the "
                f"input model's logits: {doing} feature {feat} (class {classes[k]}'s dominant "
                f"feature) at alpha={e.checkpoint_alpha} cannot move them, because "
                f"{why_unchanged(weight, col, 'projection')}."
            )
        edit_record |= {"gain": steer.gain, "head_changed": False, "steered": True}
        edit_record["logits_changed"] = changed
        steered = steered_classifier(model, sae, steer)
        save_steered(
            spec.path(root, "model"), steered, new_sidecar | {"edit": edit_record} | metadata
        )
    else:
        new_head = edit_head(
            weight.clone(), col, alpha_abs, e.checkpoint_sign, e.mode, bias_k=bias,
            centre_m=centre if e.mode == "projection" else None,
        )  # fmt: skip
        new_weight, new_bias = new_head
        head_changed = not head_unchanged(weight, bias, new_head)  # before the copy below
        if not head_changed and alpha_abs > 0:
            logging.getLogger("salve").warning(
                f"edit: the saved edited checkpoint {spec.out_dir}/{spec.files['model']} equals "
                f"the input model: {doing} feature {feat} (class {classes[k]}'s dominant "
                f"feature) at alpha={e.checkpoint_alpha} changed nothing in its head, because "
                f"{why_unchanged(weight, col, e.mode)}."
            )
        edited = model
        with torch.no_grad():
            head_of(edited).weight.copy_(new_weight)
            head_of(edited).bias.copy_(new_bias)
        edit_record["head_changed"] = head_changed  # False: the checkpoint equals the input model
        save_checkpoint(
            spec.path(root, "model"), edited, new_sidecar | {"edit": edit_record} | metadata
        )

    metrics = {
        "classes_evaluated": [classes[k] for k in evaluated],
        "classes_left_out": left_out,
        **_summary(per_class, below, selective),
        "per_class": per_class,
        "cross_class": [f for f in per_feature if f["role"] == "cross"],
        "checkpoint_edit": edit_record,
        "alpha_grid": {"unit": e.alpha_unit, "max": e.alpha_max, "steps": e.alpha_steps},
        "companion": {"mode": companion, "per_class": companion_per_class}
        | _summary(companion_per_class, companion_below, companion_selective),
    }
    write_metrics(root, "edit", EditMetrics, metrics)
    return {
        "classes_evaluated": len(evaluated),
        "classes_below_10pct": below,
        "classes_selective": selective,
        "mean_score": metrics["mean_score"],
    }


def _per_class(
    per_feature: list[dict], evaluated: list[int], classes: list[str]
) -> tuple[dict[str, dict], int, int]:
    """Each evaluated class's dominant-feature suppression, and how many of those fall below
    SUPPRESSED_BELOW (and are selective as well)."""
    dominant = {f["classes"][0]: f for f in per_feature if f["role"] == "dominant"}
    per_class = {
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
    below = sum(v["target_acc_full_suppression"] < SUPPRESSED_BELOW for v in per_class.values())
    selective = sum(
        v["target_acc_full_suppression"] < SUPPRESSED_BELOW
        and abs(v["off_target_mean_change"]) < SELECTIVE_WITHIN
        for v in per_class.values()
    )
    return per_class, below, selective


def _summary(per_class: dict[str, dict], below: int, selective: int) -> dict:
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
