"""fetch: prepare a decoded train/val split (uint8 images at data.image_size) once."""

from __future__ import annotations

from pathlib import Path

from salve.config import Config
from salve.data import SCAN_KEYS, check_prepared, prepare_dataset
from salve.io import save_tensors, write_json
from tasks.common import resolve_user_path, stage_dir, write_metrics


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    d = cfg.data
    folder = resolve_user_path(root, d.path)
    prepared = prepare_dataset(
        d.source,
        image_size=d.image_size,
        raw_dir=folder,
        variant=d.variant,
        path=str(folder),
        val_fraction=d.val_fraction,
        max_per_class=d.max_per_class,
        min_val_per_class=d.min_val_per_class,
        seed=cfg.common.seed,
        progress=progress,
    )
    if d.source == "imagefolder":
        prepared.info["root"] = d.path  # as configured: meta.json is the same on every clone
    check_prepared(prepared)
    out = stage_dir(root, "fetch")
    save_tensors(
        out / "train.safetensors",
        {"images": prepared.train_images, "labels": prepared.train_labels},
    )
    save_tensors(
        out / "val.safetensors", {"images": prepared.val_images, "labels": prepared.val_labels}
    )
    write_json(out / "meta.json", {"classes": prepared.classes, "info": prepared.info})
    summary = {
        "source": d.source,
        "num_classes": len(prepared.classes),
        "train_samples": int(prepared.train_labels.numel()),
        "val_samples": int(prepared.val_labels.numel()),
        "image_size": d.image_size,
    }
    # Folder sources: what the scan skipped or relabelled, as counts and one line ("" if none).
    summary |= {k: prepared.info[k] for k in (*SCAN_KEYS, "data_notes") if k in prepared.info}
    write_metrics(root, "fetch", summary)
    return summary
