"""Checks that need only the parameters and the user's files, run before any stage.

`salve run`/`salve stage` call `preflight` before the first stage and before `--set` writes
params.yaml, so bad input is refused in one line before any long work and before anything is
changed. Everything here is cheap: folder listings and file headers, no decoding, no training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from salve.config import Config, ConfigError

# Class counts of the built-in and downloadable sources.
KNOWN_CLASS_COUNTS = {"digits": 10, "imagenette": 10, "cifar100": 100}


class InputError(ValueError):
    """A user-supplied file or folder is unusable; the message names the parameter to change."""


@dataclass(frozen=True)
class Preflight:
    num_classes: int
    data_path: Path


def resolve_user_path(root: Path, value: str) -> Path:
    """A path from params.yaml: relative to the repository root, as DVC resolves it."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


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


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def count_imagefolder_classes(root_dir: Path) -> int:
    """Class folders directly in the root, or in its train/ folder when it has train/ and val/."""
    split = root_dir / "train"
    folder = split if split.is_dir() and (root_dir / "val").is_dir() else root_dir
    if folder is split:
        _readable_dir(split, "data.path")
    names = _class_folders(folder)
    if len(names) < 2:
        raise InputError(
            f"data.path={root_dir}: {len(names)} class folder(s) {names}; need at least 2 "
            "(one sub-folder per class, each holding that class's images)."
        )
    return len(names)


def check_data(cfg: Config, root: Path, *, create: bool = False) -> Preflight:
    """The data folder: an image folder must exist; a download folder (or the unused folder of
    the built-in digits) is created when ``create`` and missing, since DVC hashes it."""
    path = resolve_user_path(root, cfg.data.path)
    if cfg.data.source == "imagefolder":
        _readable_dir(path, "data.path")
        return Preflight(count_imagefolder_classes(path), path)
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


def preflight(cfg: Config, root: Path, *, create: bool = True) -> Preflight:
    """Every check that needs only the parameters, folder listings and file headers."""
    found = check_data(cfg, Path(root), create=create)
    check_edit(cfg, found.num_classes)
    return found
