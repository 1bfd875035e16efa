"""finetune: train the backbone with a K-class head (resumable per epoch), or, with
`finetune.epochs: 0`, take the user's trained model as it is; the best val epoch is kept."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from salve.config import WEIGHT_KEYWORDS, Config
from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.io import ArtifactError, load_tensors, save_tensors
from salve.models import build_model, save_checkpoint
from salve.runtime import resolve_device, seed_everything
from salve.train import (
    EpochRecord,
    TrainState,
    as_is_state,
    finetune_summary,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    resolve_augment,
    resolve_min_steps,
    train_classifier,
)
from tasks import STAGES
from tasks.artifacts import load_dataset_meta, open_split, require
from tasks.common import resolve_user_path, run_metadata, write_metrics, write_plot
from tasks.records import FinetuneMetrics

# DVC tracks the plot: no wall-clock column (epoch seconds differ between identical runs; they
# go to the run record, .salve/runs/finetune.json).
PLOT_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_accuracy", "lr")


def _fingerprint(cfg: Config, root: Path) -> str:
    params = cfg.to_dict()
    h = hashlib.sha256()
    h.update(
        json.dumps([params[s] for s in ("finetune", "common", "data")], sort_keys=True).encode()
    )
    for split in ("train", "val"):
        h.update(require(root, "fetch", split).read_bytes())
    return h.hexdigest()[:16]


def _resume_path(root: Path) -> Path:
    return root / ".salve" / "resume" / "finetune.safetensors"


def _save_resume(path: Path, fingerprint: str, model, optimizer, state: TrainState) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in (state.best_state or {}).items()}
    tensors |= optimizer_tensors(optimizer)
    metadata = {
        "fingerprint": fingerprint,
        "best_epoch": str(state.best_epoch),
        "history": json.dumps([h.as_dict() for h in state.history]),
    }
    save_tensors(path, tensors, metadata=metadata)


def _load_resume(path: Path, fingerprint: str, model, optimizer) -> TrainState:
    """The state of an interrupted run with the same inputs, or a fresh one."""
    if not path.exists():
        return TrainState()
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            info = fh.metadata() or {}
        if info.get("fingerprint") != fingerprint:
            return TrainState()
        tensors = load_tensors(path)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_tensors(optimizer, tensors)
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        history = [EpochRecord(**h) for h in json.loads(info["history"])]
        return TrainState(history, int(info["best_epoch"]), best or None)
    except (ArtifactError, KeyError, ValueError, RuntimeError):
        return TrainState()  # unusable resume point: start over


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    f = cfg.finetune
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    train_x, train_y = open_split(root, "train")  # read batch by batch
    val_x, val_y = open_split(root, "val")
    meta = load_dataset_meta(root)
    source = meta["info"]["source"]
    f = dataclasses.replace(f, min_steps=resolve_min_steps(f.min_steps))
    classes = meta["classes"]
    num_classes = len(classes)
    image_size = int(train_x.shape[-1])
    weights = f.weights if f.weights in WEIGHT_KEYWORDS else str(resolve_user_path(root, f.weights))
    model = build_model(
        f.arch,
        num_classes,
        image_size=image_size,
        weights=weights,
        keep_head=f.epochs == 0,  # explain the given model as it is
    ).to(device)

    resume_path = _resume_path(root)
    resumed_from = None
    if f.epochs == 0:
        state = as_is_state(model, val_x, val_y, num_classes, IMAGENET_MEAN, IMAGENET_STD, device)
        best = state.history[0]
    else:
        optimizer = make_optimizer(model, f)
        fingerprint = _fingerprint(cfg, root)
        state = _load_resume(resume_path, fingerprint, model, optimizer)
        resumed_from = len(state.history)
        state = train_classifier(
            model,
            train_x,
            train_y,
            val_x,
            val_y,
            f,
            seed=cfg.common.seed,
            augment=resolve_augment(f.augment, source),
            num_classes=num_classes,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            device=device,
            optimizer=optimizer,
            state=state,
            on_epoch_end=lambda m, o, s: _save_resume(resume_path, fingerprint, m, o, s),
            progress=progress,
        )
        model.load_state_dict(state.best_state)
        best = state.history[state.best_epoch - 1]
    model.eval().cpu()
    val_class = dict(zip(classes, best.val_class_accuracy, strict=True))
    sidecar = {
        "classes": classes,
        "image_size": image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "edit": None,
        "best_epoch": state.best_epoch,
        "val_accuracy": best.val_accuracy,
        "val_class_accuracy": val_class,
    } | run_metadata(root, cfg, device, ("finetune", "common", "data"))
    save_checkpoint(STAGES["finetune"].path(root, "model"), model, sidecar)
    resume_path.unlink(missing_ok=True)
    rows = [{k: r.as_dict()[k] for k in PLOT_COLUMNS} for r in state.history]
    write_plot(root, "finetune", "epochs", rows)
    summary = finetune_summary(state, best, f, len(train_y), val_class, device)
    # A resumed run gives the same bytes as an uninterrupted one: where it resumed is a fact of
    # this run, like the epoch times, not of the result.
    seconds = [r.seconds for r in state.history]
    facts = {"epoch_seconds": seconds, "resumed_from_epoch": resumed_from}
    write_metrics(root, "finetune", FinetuneMetrics, summary, run=facts)
    return {k: summary[k] for k in ("val_accuracy", "best_epoch", "epochs_run")}
