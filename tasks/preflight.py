"""Checks that need only the parameters and the user's files, run before any stage.

`salve run`/`salve stage` call `preflight` before the first stage and before `--set` writes
params.yaml, so bad input is refused in one line before any long work and before anything is
changed. Everything here is cheap: folder listings and file headers, no decoding, no training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from salve.config import WEIGHT_KEYWORDS, Config, ConfigError
from tasks.common import resolve_user_path

# Class counts of the built-in and downloadable sources.
KNOWN_CLASS_COUNTS = {"digits": 10, "imagenette": 10, "cifar100": 100}


class InputError(ValueError):
    """A user-supplied file or folder is unusable; the message names the parameter to change."""


@dataclass(frozen=True)
class Preflight:
    num_classes: int
    data_path: Path


def _readable_dir(path: Path, param: str) -> None:
    if not path.exists():
        raise InputError(f"{param}={path}: no such folder; set {param} to an existing folder.")
    if not path.is_dir():
        raise InputError(f"{param}={path}: not a folder; set {param} to a folder.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(
            f"{param}={path}: permission denied (cannot list the folder); make it readable "
            f"(e.g. `chmod -R u+rX {path}`) or point {param} elsewhere."
        )


def _scan_imagefolder(cfg: Config, path: Path):
    """The file plan fetch will decode: class folders, split, per-class minimums, permissions.

    Its one-line scan summary is logged when fetch runs; here it is kept quiet.
    """
    from salve.data import plan_image_files

    d = cfg.data
    log = logging.getLogger("salve")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return plan_image_files(
            "imagefolder",
            image_size=d.image_size,
            raw_dir=path,
            path=str(path),
            val_fraction=d.val_fraction,
            max_per_class=d.max_per_class,
            min_val_per_class=d.min_val_per_class,
            seed=cfg.common.seed,
            progress=False,
        )
    finally:
        log.setLevel(level)


def check_data(cfg: Config, root: Path, *, create: bool = False) -> Preflight:
    """The data folder: an image folder must exist; a download folder (or the unused folder of
    the built-in digits) is created when ``create`` and missing, since DVC hashes it."""
    path = resolve_user_path(root, cfg.data.path)
    if cfg.data.source == "imagefolder":
        _readable_dir(path, "data.path")
        return Preflight(len(_scan_imagefolder(cfg, path).classes), path)
    if not path.exists():
        if not path.parent.is_dir():
            raise InputError(
                f"data.path={path}: neither it nor its parent folder exists; set data.path to "
                "a folder the dataset can be downloaded into (default: data)."
            )
        if create:
            path.mkdir()
    if path.exists():
        _readable_dir(path, "data.path")
    return Preflight(KNOWN_CLASS_COUNTS[cfg.data.source], path)


def check_edit(cfg: Config, num_classes: int) -> None:
    if cfg.edit.checkpoint_class >= num_classes:
        raise ConfigError(
            f"params.yaml: edit.checkpoint_class={cfg.edit.checkpoint_class} is out of range; "
            f"the dataset has {num_classes} classes (0..{num_classes - 1})"
        )


def check_model(cfg: Config, root: Path, num_classes: int) -> None:
    """The architecture exists and has a linear head; a weights file's header fits it."""
    from salve.models import check_architecture, check_weights_file

    f = cfg.finetune
    try:
        check_architecture(f.arch, image_size=cfg.data.image_size)
    except ValueError as exc:  # the parameter is wrong: a configuration error (exit 2)
        raise ConfigError(f"params.yaml: finetune.arch={f.arch!r}: {exc}") from None
    if f.weights in WEIGHT_KEYWORDS:
        return
    path = resolve_user_path(root, f.weights)
    if path.exists() and not os.access(path, os.R_OK):
        raise InputError(
            f"finetune.weights={f.weights}: permission denied reading {path}; make it readable "
            "or point finetune.weights at another file under weights/."
        )
    check_weights_file(
        path, f.arch, num_classes, keep_head=f.epochs == 0, image_size=cfg.data.image_size
    )


def preflight(cfg: Config, root: Path, *, create: bool = True) -> Preflight:
    """Every check that needs only the parameters, folder listings and file headers."""
    found = check_data(cfg, Path(root), create=create)
    check_edit(cfg, found.num_classes)
    check_model(cfg, Path(root), found.num_classes)
    return found
