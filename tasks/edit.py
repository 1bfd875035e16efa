"""edit: suppression/enhancement curves per feature from cached val activations, selectivity
metrics, and the configured edit saved as a new checkpoint."""

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
    centre = sae.b_dec.detach() if e.centre and e.mode == "projection" else None
    grid = torch.linspace(0.0, e.alpha_max, e.alpha_steps, dtype=torch.float64)

    def curves_for(col: torch.Tensor, alphas: torch.Tensor, sign: str):
        return accuracy_curves(
            acts, labels, weight, bias, col, alphas, sign, e.mode, num_classes, centre_m=centre
        )

    rows, per_feature = [], []
    for item in edit_targets(ranking, e.targets):
        col = w_dec[:, item["feature"]]
        scale = alpha_scale(col, e.alpha_unit, e.mode)
        curves = {}
        for sign in ("suppress", "enhance"):
            acc_ak, overall_a = curves_for(col, grid * scale, sign)
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

    write_plot(root, "edit", "curves", rows)
    # Only classes the classifier gets right often enough can be "suppressed": a class at 0 %
    # before any edit would otherwise count as a success.
    base_k = curves_for(w_dec[:, 0], torch.zeros(1, dtype=torch.float64), "suppress")[0][0]
    evaluated = [k for k in range(num_classes) if float(base_k[k]) >= e.min_base_accuracy]
    left_out = [
        {"class": classes[k], "base_accuracy": float(base_k[k])}
        for k in range(num_classes)
        if k not in evaluated
    ]
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

    # Every latent's effect when suppressed alone at full strength (the latent browser).
    latents = []
    for latent in range(w_dec.shape[1]):
        col = w_dec[:, latent]
        full = torch.tensor([0.0, e.alpha_max * alpha_scale(col, e.alpha_unit, e.mode)])
        acc = curves_for(col, full, "suppress")[0]
        latents.append(
            {
                "latent": latent,
                "base_accuracy": [float(x) for x in acc[0]],
                "class_change": [float(x) for x in acc[1] - acc[0]],
            }
        )
    effects: EditLatents = {
        "mode": e.mode,
        "alpha": e.alpha_max,
        "classes": classes,
        "latents": latents,
    }
    write_record(STAGES["edit"].path(root, "latents"), EditLatents, effects)

    # The configured edit, saved as a checkpoint a user can ship.
    k = e.checkpoint_class
    feat = ranking["dominant"][k]["feature"]
    col = w_dec[:, feat]
    alpha_abs = e.checkpoint_alpha * alpha_scale(col, e.alpha_unit, e.mode)
    edited = model
    new_head = edit_head(
        weight.clone(), col, alpha_abs, e.checkpoint_sign, e.mode, bias_k=bias, centre_m=centre
    )
    new_weight, new_bias = new_head
    head_changed = not head_unchanged(weight, bias, new_head)  # before the copy below
    spec = STAGES["edit"]
    if not head_changed and alpha_abs > 0:
        doing = {"suppress": "suppressing", "enhance": "enhancing"}[e.checkpoint_sign]
        logging.getLogger("salve").warning(
            f"edit: the saved edited checkpoint {spec.out_dir}/{spec.files['model']} equals "
            f"the input model: {doing} feature {feat} (class {classes[k]}'s "
            f"dominant feature) at alpha={e.checkpoint_alpha} changed nothing in its head, because "
            f"{why_unchanged(weight, col, e.mode)}."
        )
    with torch.no_grad():
        head_of(edited).weight.copy_(new_weight)
        head_of(edited).bias.copy_(new_bias)
    edit_record = {
        "class": k,
        "class_name": classes[k],
        "feature": feat,
        "sign": e.checkpoint_sign,
        "mode": e.mode,
        "centred": centre is not None,
        "alpha": e.checkpoint_alpha,
        "alpha_unit": e.alpha_unit,
        "alpha_abs": alpha_abs,
        "decoder_columns_normalised": sae_info.get("decoder_columns_normalised"),
        "head_changed": head_changed,  # False: the saved checkpoint equals the input model
    }
    new_sidecar = {key: sidecar[key] for key in ("classes", "image_size", "normalisation")} | {
        "edit": edit_record
    }
    new_sidecar |= run_metadata(root, cfg, torch.device("cpu"), ("edit", "sae", "finetune"))
    save_checkpoint(spec.path(root, "model"), edited, new_sidecar)

    n = max(len(per_class), 1)
    metrics = {
        "classes_evaluated": [classes[k] for k in evaluated],
        "classes_left_out": left_out,
        "classes_below_10pct": below,
        "classes_selective": selective,
        "edits_raising_target": sum(v["raises_target"] for v in per_class.values()),
        "mean_score": sum(v["score"] for v in per_class.values()) / n,
        "mean_abs_off_target_change": sum(
            abs(v["off_target_mean_change"]) for v in per_class.values()
        )
        / n,
        "per_class": per_class,
        "cross_class": [f for f in per_feature if f["role"] == "cross"],
        "checkpoint_edit": edit_record,
        "alpha_grid": {"unit": e.alpha_unit, "max": e.alpha_max, "steps": e.alpha_steps},
    }
    write_metrics(root, "edit", EditMetrics, metrics)
    return {
        "classes_evaluated": len(evaluated),
        "classes_below_10pct": below,
        "classes_selective": selective,
        "mean_score": metrics["mean_score"],
    }
