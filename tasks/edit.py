"""edit: suppression/enhancement curves per feature from cached val activations, selectivity
metrics, and the configured edit saved as a new checkpoint (the analysis: salve/sweep.py).

``edit.mode`` picks the control (salve/methods/): a permanent head edit (``paper``,
``projection``) or activation steering (``steer``: the saved model is the classifier plus the
steering of the head input). The other kind is measured beside it as the ``companion``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from salve.config import Config, ConfigError
from salve.methods import SweepData
from salve.models import head_of
from salve.steering import latent_codes
from salve.sweep import analyse, checkpoint_edit, unchanged_warning
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
    e, spec = cfg.edit, STAGES["edit"]
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
    acts, labels = load_activations(root, "val")
    data = SweepData(
        acts, labels, head.weight.detach(), head.bias.detach(), sae.W_dec.detach(),
        # The centred projection acts on a - b_dec, the part the SAE codes see (docs/METHOD.md).
        sae.b_dec.detach() if e.centre else None,
        latent_codes(sae, acts),  # steering's codes z(a), float64, once
        num_classes, sae,
    )  # fmt: skip
    rows, effects, metrics = analyse(data, ranking, e, classes)
    write_plot(root, "edit", "curves", rows)
    write_record(spec.path(root, "latents"), EditLatents, effects)

    # Last: a head edit changes `model` (and so the head `data` reads) in place.
    record, shipped = checkpoint_edit(
        model, data, ranking, e, classes, sae_info.get("decoder_columns_normalised")
    )
    path = f"{spec.out_dir}/{spec.files['model']}"
    warning = unchanged_warning(path, record, shipped, e, classes)
    if warning:
        logging.getLogger("salve").warning(warning)
    new_sidecar = {key: sidecar[key] for key in ("classes", "image_size", "normalisation")}
    metadata = run_metadata(root, cfg, torch.device("cpu"), ("edit", "sae", "finetune"))
    shipped.save(spec.path(root, "model"), new_sidecar | {"edit": record} | metadata)
    metrics["checkpoint_edit"] = record
    write_metrics(root, "edit", EditMetrics, metrics)
    return {
        "classes_evaluated": len(metrics["classes_evaluated"]),
        "classes_below_10pct": metrics["classes_below_10pct"],
        "classes_selective": metrics["classes_selective"],
        "mean_score": metrics["mean_score"],
    }
