"""fetch: prepare a decoded train/val split (uint8 images at data.image_size) once.

Folder sources (imagefolder, imagenette) are planned and checked first, then decoded chunk by
chunk straight into the split files, so memory stays bounded whatever the dataset's size. The
array sources (digits, CIFAR-100) are small and prepared in memory. Both give the same files.
Val images identical to a train image once decoded are counted on the way (per-image digests,
no image kept): one warning, and `val_copies_of_train` in the metrics.
"""

from __future__ import annotations

from pathlib import Path

from salve.config import Config
from salve.data import (
    FOLDER_SOURCES,
    SCAN_KEYS,
    check_prepared,
    plan_image_files,
    prepare_dataset,
    report_val_copies,
)
from salve.io import save_tensors
from tasks import STAGES
from tasks.common import resolve_user_path, write_metrics
from tasks.records import DatasetMeta, FetchMetrics, write_record


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    d = cfg.data
    folder = resolve_user_path(root, d.path)
    opts = {
        "image_size": d.image_size,
        "raw_dir": folder,
        "variant": d.variant,
        "path": str(folder),
        "val_fraction": d.val_fraction,
        "max_per_class": d.max_per_class,
        "min_val_per_class": d.min_val_per_class,
        "seed": cfg.common.seed,
        "progress": progress,
    }
    spec = STAGES["fetch"]
    paths = {split: spec.path(root, split) for split in ("train", "val")}
    if d.source in FOLDER_SOURCES:
        plan = plan_image_files(d.source, **opts)
        # Paths as configured, relative to data.path: meta.json is the same on every clone.
        for key in ("root", "archive"):
            if key in plan.info:
                where = Path(plan.info[key])
                inside = where.is_relative_to(folder)
                plan.info[key] = str(Path(d.path) / where.relative_to(folder)) if inside else d.path
        plan.check()  # what check_prepared checks, before anything is decoded
        copies = plan.write_splits(paths, progress=progress)
        classes, info = plan.classes, plan.info
        counts = {"train": len(plan.train_labels), "val": len(plan.val_labels)}
    else:
        prepared = prepare_dataset(d.source, **opts)
        check_prepared(prepared)
        copies = report_val_copies(prepared)
        for split, path in paths.items():
            save_tensors(
                path,
                {
                    "images": getattr(prepared, f"{split}_images"),
                    "labels": getattr(prepared, f"{split}_labels"),
                },
            )
        classes, info = prepared.classes, prepared.info
        counts = {split: int(getattr(prepared, f"{split}_labels").numel()) for split in paths}
    meta: DatasetMeta = {"classes": classes, "info": info}
    write_record(spec.path(root, "meta"), DatasetMeta, meta)
    summary = {
        "source": d.source,
        "num_classes": len(classes),
        "train_samples": counts["train"],
        "val_samples": counts["val"],
        "image_size": d.image_size,
        "val_copies_of_train": copies,  # val images identical to a train image once decoded
    }
    # Folder sources: what the scan skipped or relabelled, as counts and one line ("" if none).
    summary |= {k: info[k] for k in (*SCAN_KEYS, "data_notes") if k in info}
    write_metrics(root, "fetch", FetchMetrics, summary)
    return summary
