"""extract: the exact head input for train and val, with labels.

The images are read from fetch's files one batch at a time (`tasks.artifacts.open_split`), so
memory holds one batch of images and the activation matrix, whatever the dataset's size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from salve.activations import extract_activations
from salve.config import Config
from salve.io import save_tensors
from salve.runtime import resolve_device, seed_everything
from salve.train import QualityGateError, quality_gate
from tasks import STAGES
from tasks.artifacts import load_model, open_split
from tasks.common import write_metrics
from tasks.records import ExtractMetrics

# Below this relative spread the head input is (numerically) the same for every image: the model
# is untrained or collapsed, and an SAE fitted to it would only fit float32 round-off.
MIN_RELATIVE_SPREAD = 1e-4


def check_spread(acts_nm: torch.Tensor, split: str) -> None:
    spread = float((acts_nm.double() - acts_nm.double().mean(0)).pow(2).sum(1).mean().sqrt())
    scale = float(acts_nm.double().norm(dim=1).mean())
    if acts_nm.shape[0] > 1 and not spread > MIN_RELATIVE_SPREAD * max(scale, 1e-30):
        raise QualityGateError(
            f"the classifier's head input barely varies across the {split} images (spread "
            f"{spread:.3g} around a mean norm of {scale:.3g}): the model is untrained or "
            "collapsed, so there are no features to find. Use trained weights "
            "(finetune.weights) or fine-tune it (finetune.epochs > 0)."
        )


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    model, sidecar = load_model(root)
    problem = quality_gate(
        sidecar["val_accuracy"],
        sidecar["val_class_accuracy"],
        min_val_accuracy=cfg.finetune.min_val_accuracy,
        min_class_accuracy=cfg.finetune.min_class_accuracy,
    )
    if problem:  # before any work: the SAE and everything after it would explain a weak model
        raise QualityGateError(problem)
    norm = sidecar["normalisation"]
    summary = {}
    for split in ("train", "val"):
        images, labels = open_split(root, split)
        acts = extract_activations(
            model,
            images,
            tuple(norm["mean"]),
            tuple(norm["std"]),
            batch_size=cfg.extract.batch_size,
            device=device,
            progress=progress,
            desc=f"extract {split}",
        )
        save_tensors(STAGES["extract"].path(root, split), {"acts": acts, "labels": labels})
        check_spread(acts, split)
        summary[f"{split}_samples"] = int(acts.shape[0])
        summary["dim"] = int(acts.shape[1])
        summary[f"{split}_mean_norm"] = float(acts.norm(dim=1).mean())
    write_metrics(root, "extract", ExtractMetrics, summary)
    return summary
