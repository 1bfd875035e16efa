"""Study stage `study_deeper_layer`: can an edit inside the backbone change how a concept forms?

An SAE on an earlier layer's pooled output (``study.deeper_layer``), each class's dominant
direction suppressed inside the backbone (salve/study/concept.py), next to the head edit of the
same class. Two rounds of jobs: the layer's shared work (one job), then one backbone edit per
class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from salve.config import Config, SaeConfig
from salve.evaluate import SHIFTS, evaluate_seed, shift_images
from salve.models import head_of
from salve.study.concept import (
    backbone_edit_effect,
    deeper_record,
    forward_probe,
    layer_features,
    mean_deviation_along,
    resolve_layer,
)
from salve.study.deeper import pooled_activations
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
    load_split,
)
from tasks.study_common import (
    Mapper,
    common_job,
    normalisation,
    serial_map,
    worker_root,
    worker_setup,
    write_part,
)

NAME = "study_deeper_layer"


def layer_job(job: dict) -> dict:
    """The shared work: the layer's SAE and directions, the unedited model's predictions on val
    and shifted images, and the head edit of every class."""
    worker_setup(job["reproducible"], job["seed"])
    root, seed = worker_root(job["root"]), job["seed"]
    model, sidecar = load_model(root)
    mean, std = normalisation(sidecar)
    layer_name, block = resolve_layer(model, job["layer"])
    train_u8, train_labels = load_split(root, "train")
    val_u8, val_labels = load_split(root, "val")
    num_classes = head_of(model).out_features
    pooled_train = pooled_activations(model, train_u8, layer_name, mean, std)
    base_val, pooled_val, _ = forward_probe(model, val_u8, layer_name, mean, std)
    base, shifted_acts = {"val": base_val}, {}
    for kind in SHIFTS:
        images = shift_images(val_u8, kind, seed)
        base[kind], _, shifted_acts[kind] = forward_probe(model, images, layer_name, mean, std)
    features = layer_features(
        pooled_train,
        train_labels,
        pooled_val,
        SaeConfig(**job["sae"]),
        seed=seed,
        num_classes=num_classes,
    )
    reference = pooled_val.double().mean(0)
    before = [
        mean_deviation_along(pooled_val[val_labels == k], reference, torch.tensor(d))
        for k, d in enumerate(features["directions"])
    ]
    pipeline_sae, _ = load_sae(root)
    dominant = [d["feature"] for d in load_ranking(root)["dominant"]]
    train_acts, train_acts_labels = load_activations(root, "train")
    val_acts, _ = load_activations(root, "val")
    head = head_of(model)
    head_eval = evaluate_seed(
        head.weight.detach(),
        head.bias.detach(),
        train_acts,
        train_acts_labels,
        val_acts,
        val_labels,
        pipeline_sae.W_dec.detach(),
        pipeline_sae.b_dec.detach(),
        dominant,
        shifted_val_acts=shifted_acts,
        methods=("salve_projection",),
        probe=False,
        seed=seed,
        projection_alpha=job["projection_alpha"],
        paper_alpha=job["paper_alpha"],
        min_base_accuracy=job["min_base_accuracy"],
    )
    return {
        "layer": layer_name,
        "block": block,
        "num_classes": num_classes,
        "features": features,
        "reference": reference.tolist(),
        "before_along": before,
        "base_preds": {kind: p.tolist() for kind, p in base.items()},
        "evaluated": head_eval["evaluated_classes"],
        "left_out": head_eval["left_out_classes"],
        "head": {int(k): v for k, v in head_eval["per_class"]["salve_projection"].items()},
    }


def backbone_edit_job(job: dict) -> dict:
    """Class ``job["target"]``'s direction suppressed inside the backbone: its effects."""
    worker_setup(job["reproducible"], job["seed"])
    root, seed = worker_root(job["root"]), job["seed"]
    model, sidecar = load_model(root)
    mean, std = normalisation(sidecar)
    val_u8, val_labels = load_split(root, "val")
    images = {"val": val_u8} | {k: shift_images(val_u8, k, seed) for k in SHIFTS}
    return backbone_edit_effect(
        model,
        job["layer"],
        job["direction"],
        job["alpha"],
        images,
        val_labels,
        {kind: torch.tensor(p) for kind, p in job["base_preds"].items()},
        job["target"],
        job["num_classes"],
        mean,
        std,
        reference_c=torch.tensor(job["reference"], dtype=torch.float64),
        before_along=job["before_along"],
    )


def run(cfg: Config, root: Path, progress: bool = True, map_fn: Mapper | None = None) -> dict:
    import dataclasses

    mapper = map_fn or serial_map
    classes = load_dataset_meta(root)["classes"]
    base = {"root": str(Path(root).resolve()), **common_job(cfg)}
    edit = {
        "projection_alpha": cfg.evaluate.projection_alpha,
        "paper_alpha": cfg.evaluate.paper_alpha,
        "min_base_accuracy": cfg.edit.min_base_accuracy,
    }
    alpha = cfg.study.deeper_alpha
    (shared,) = mapper(
        layer_job,
        [base | edit | {"layer": cfg.study.deeper_layer, "sae": dataclasses.asdict(cfg.sae)}],
    )
    targets = [k for k in range(len(classes)) if k in shared["evaluated"]]
    jobs = [
        base
        | {
            "layer": shared["layer"],
            "direction": shared["features"]["directions"][k],
            "alpha": alpha,
            "base_preds": shared["base_preds"],
            "target": k,
            "num_classes": shared["num_classes"],
            "reference": shared["reference"],
            "before_along": shared["before_along"][k],
        }
        for k in targets
    ]
    deeper = dict(zip(targets, mapper(backbone_edit_job, jobs), strict=True))
    record = deeper_record(
        layer=shared["layer"],
        block=shared["block"],
        alpha=alpha,
        features=shared["features"],
        deeper=deeper,
        head=shared["head"],
        left_out=shared["left_out"],
    )
    settings = {
        "layer": shared["layer"],
        "block": shared["block"],
        "alpha": alpha,
        "head_alpha": cfg.evaluate.projection_alpha,
        "min_base_accuracy": cfg.edit.min_base_accuracy,
    }
    metrics = {k: v for k, v in record.items() if k != "per_class"}
    return write_part(root, NAME, record, settings, metrics)
