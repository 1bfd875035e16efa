"""fetch: prepare a decoded train/val split (uint8 images at data.image_size) once."""

from __future__ import annotations

from pathlib import Path

from salve.config import Config
from salve.data import SCAN_KEYS, check_prepared, prepare_dataset
from salve.io import save_tensors
from tasks import STAGES
from tasks.common import resolve_user_path, write_metrics
from tasks.records import DatasetMeta, FetchMetrics, write_record


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
    spec = STAGES["fetch"]
    save_tensors(
        spec.path(root, "train"),
        {"images": prepared.train_images, "labels": prepared.train_labels},
    )
    save_tensors(
        spec.path(root, "val"), {"images": prepared.val_images, "labels": prepared.val_labels}
    )
    meta: DatasetMeta = {"classes": prepared.classes, "info": prepared.info}
    write_record(spec.path(root, "meta"), DatasetMeta, meta)
    summary = {
        "source": d.source,
        "num_classes": len(prepared.classes),
        "train_samples": int(prepared.train_labels.numel()),
        "val_samples": int(prepared.val_labels.numel()),
        "image_size": d.image_size,
    }
    # Folder sources: what the scan skipped or relabelled, as counts and one line ("" if none).
    summary |= {k: prepared.info[k] for k in (*SCAN_KEYS, "data_notes") if k in prepared.info}
    write_metrics(root, "fetch", FetchMetrics, summary)
    return summary
