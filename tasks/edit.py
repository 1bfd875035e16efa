"""edit: suppression/enhancement curves per feature from cached val activations, selectivity
metrics, and the configured edit saved as a new checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from salve.config import Config, ConfigError
from salve.editing import accuracy_curves, edit_head, selectivity
from salve.io import read_json
from salve.models import head_of, save_checkpoint
from tasks.common import (
    load_activations,
    load_dataset_meta,
    run_metadata,
    stage_dir,
    write_metrics,
    write_plot,
)
from tasks.finetune import load_model
from tasks.fit_sae import load_sae


def alpha_scale(col_m: torch.Tensor, unit: str, mode: str) -> float:
    """Multiplier from configured alpha to the rule's alpha. For the paper rule, per_feature
    makes alpha = 1 zero the column's largest |c_j| exactly, so grids mean the same for every
    feature. The projection edit uses the unit direction: alpha = 1 removes the component."""
    if mode == "paper" and unit == "per_feature":
        return 1.0 / float(col_m.abs().max())
    return 1.0


def edit_targets(ranking: dict, targets: str) -> list[dict]:
    """The features to sweep: each class's dominant feature, plus cross-class features."""
    items = [
        {"feature": d["feature"], "role": "dominant", "classes": [d["class"]]}
        for d in ranking["dominant"]
    ]
    if targets == "dominant_and_cross":
        items += [
            {"feature": c["feature"], "role": "cross", "classes": c["classes"]}
            for c in ranking["cross_class"]
        ]
    return items


def check_inputs(cfg: Config, num_classes: int) -> None:
    if cfg.edit.checkpoint_class >= num_classes:
        raise ConfigError(
            f"params.yaml: edit.checkpoint_class={cfg.edit.checkpoint_class} is out of range; "
            f"the dataset has {num_classes} classes (0..{num_classes - 1})"
        )


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    e = cfg.edit
    classes = load_dataset_meta(root)["classes"]
    num_classes = len(classes)
    check_inputs(cfg, num_classes)
    ranking = read_json(stage_dir(root, "rank") / "ranking.json")
    model, sidecar = load_model(root)
    sae, sae_info = load_sae(root)
    head = head_of(model)
    weight, bias = head.weight.detach(), head.bias.detach()
    acts, labels = load_activations(root, "val")
    w_dec = sae.W_dec.detach()
    grid = torch.linspace(0.0, e.alpha_max, e.alpha_steps, dtype=torch.float64)

    rows, per_feature = [], []
    for item in edit_targets(ranking, e.targets):
        col = w_dec[:, item["feature"]]
        scale = alpha_scale(col, e.alpha_unit, e.mode)
        curves = {}
        for sign in ("suppress", "enhance"):
            acc_ak, overall_a = accuracy_curves(
                acts, labels, weight, bias, col, grid * scale, sign, e.mode, num_classes
            )
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

    write_plot(root, "edit", "curves.csv", rows)
    dominant = [f for f in per_feature if f["role"] == "dominant"]
    per_class = {
        classes[f["classes"][0]]: {
            "feature": f["feature"],
            "target_acc_base": f["suppress"]["target_acc_base"],
            "target_acc_full_suppression": f["suppress"]["target_acc_edited"],
            "off_target_mean_change": f["suppress"]["off_target_mean_change"],
            "off_target_max_abs_change": f["suppress"]["off_target_max_abs_change"],
            "score": f["suppress"]["score"],
        }
        for f in dominant
    }
    below = sum(v["target_acc_full_suppression"] < 0.10 for v in per_class.values())
    selective = sum(
        v["target_acc_full_suppression"] < 0.10 and abs(v["off_target_mean_change"]) < 0.03
        for v in per_class.values()
    )

    # The configured edit, saved as a checkpoint a user can ship.
    k = e.checkpoint_class
    feat = ranking["dominant"][k]["feature"]
    col = w_dec[:, feat]
    alpha_abs = e.checkpoint_alpha * alpha_scale(col, e.alpha_unit, e.mode)
    edited = model
    with torch.no_grad():
        head_of(edited).weight.copy_(
            edit_head(weight.clone(), col, alpha_abs, e.checkpoint_sign, e.mode)
        )
    edit_record = {
        "class": k,
        "class_name": classes[k],
        "feature": feat,
        "sign": e.checkpoint_sign,
        "mode": e.mode,
        "alpha": e.checkpoint_alpha,
        "alpha_unit": e.alpha_unit,
        "alpha_abs": alpha_abs,
        "decoder_columns_normalised": sae_info.get("decoder_columns_normalised"),
    }
    new_sidecar = {
        key: sidecar[key] for key in ("classes", "image_size", "normalisation", "head")
    } | {"edit": edit_record}
    new_sidecar |= run_metadata(root, cfg, torch.device("cpu"), ("edit", "sae", "finetune"))
    save_checkpoint(stage_dir(root, "edit") / "model.safetensors", edited, new_sidecar)

    metrics = {
        "classes_below_10pct": below,
        "classes_selective": selective,
        "mean_score": sum(v["score"] for v in per_class.values()) / max(len(per_class), 1),
        "mean_abs_off_target_change": sum(
            abs(v["off_target_mean_change"]) for v in per_class.values()
        )
        / max(len(per_class), 1),
        "per_class": per_class,
        "cross_class": [f for f in per_feature if f["role"] == "cross"],
        "checkpoint_edit": edit_record,
        "alpha_grid": {"unit": e.alpha_unit, "max": e.alpha_max, "steps": e.alpha_steps},
    }
    write_metrics(root, "edit", metrics)
    return {key: metrics[key] for key in ("classes_below_10pct", "classes_selective", "mean_score")}
