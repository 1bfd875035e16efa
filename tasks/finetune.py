"""finetune: train the backbone with a K-class head; resumable per epoch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from salve.config import Config
from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.io import ArtifactError, load_tensors, save_tensors
from salve.models import build_model, save_checkpoint
from salve.runtime import resolve_device, seed_everything
from salve.train import (
    TrainSettings,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    train_classifier,
)
from tasks.common import (
    load_dataset_meta,
    load_split,
    run_metadata,
    stage_dir,
    write_metrics,
    write_plot,
)


def _fingerprint(cfg: Config, root: Path) -> str:
    params = cfg.to_dict()
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [params[section] for section in ("finetune", "common", "data")],
            sort_keys=True,
        ).encode()
    )
    for split in ("train", "val"):
        h.update((stage_dir(root, "fetch") / f"{split}.safetensors").read_bytes())
    return h.hexdigest()[:16]


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    f = cfg.finetune
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    train_x, train_y = load_split(root, "train")
    val_x, val_y = load_split(root, "val")
    meta = load_dataset_meta(root)
    classes = meta["classes"]
    image_size = int(train_x.shape[-1])
    model = build_model(
        f.arch,
        len(classes),
        image_size=image_size,
        weights=f.weights,
        keep_head=f.epochs == 0,  # explain the given model as it is
    ).to(device)
    settings = TrainSettings(
        epochs=f.epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        optimizer=f.optimizer,
        weight_decay=f.weight_decay,
        augment=f.augment not in ("auto", "none"),
        mixed_precision=f.mixed_precision,
        seed=cfg.common.seed,
    )
    optimizer = make_optimizer(model, settings)

    # Resume point: last finished epoch of an interrupted run with the same inputs.
    resume_path = root / ".salve" / "resume" / "finetune.safetensors"
    fingerprint = _fingerprint(cfg, root)
    start_epoch, history = 0, []
    if resume_path.exists():
        try:
            state = load_tensors(resume_path)
            from safetensors import safe_open

            with safe_open(str(resume_path), "pt") as fh:
                info = fh.metadata() or {}
            if info.get("fingerprint") == fingerprint:
                model.load_state_dict(
                    {k[6:]: v for k, v in state.items() if k.startswith("model.")}
                )
                load_optimizer_tensors(optimizer, state)
                start_epoch = int(info["epoch"])
                history = json.loads(info["history"])
        except (ArtifactError, KeyError, ValueError):
            start_epoch, history = 0, []  # unusable resume point: start over

    def save_resume(epoch, model, optimizer, hist) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= optimizer_tensors(optimizer)
        save_tensors(
            resume_path,
            tensors,
            metadata={
                "fingerprint": fingerprint,
                "epoch": str(epoch),
                "history": json.dumps([h.as_dict() for h in hist]),
            },
        )

    from salve.train import EpochRecord

    records = train_classifier(
        model,
        train_x,
        train_y,
        val_x,
        val_y,
        settings,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=device,
        start_epoch=start_epoch,
        optimizer=optimizer,
        history=[EpochRecord(**h) for h in history],
        on_epoch_end=save_resume,
        progress=progress,
    )
    model.eval().cpu()
    sidecar = {
        "classes": classes,
        "image_size": image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "edit": None,
        "resumed_from_epoch": start_epoch,
    } | run_metadata(root, cfg, device, ("finetune", "common", "data"))
    save_checkpoint(stage_dir(root, "finetune") / "model.safetensors", model, sidecar)
    resume_path.unlink(missing_ok=True)
    rows = [r.as_dict() for r in records]
    write_plot(root, "finetune", "epochs.csv", rows)
    last = records[-1]
    summary = {
        "arch": f.arch,
        "val_accuracy": last.val_accuracy,
        "train_accuracy": last.train_accuracy,
        "train_loss": last.train_loss,
        "epochs": f.epochs,
        "device": str(device),
    }
    write_metrics(root, "finetune", summary)
    return summary


def load_model(root: Path) -> tuple[torch.nn.Module, dict]:
    from salve.models import load_checkpoint

    return load_checkpoint(stage_dir(root, "finetune") / "model.safetensors")
