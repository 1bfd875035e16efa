"""Checks that need only the parameters and the user's files, run before any stage.

`salve run`/`salve stage` call `preflight` before the first stage and before `--set` writes
params.yaml, so bad input is refused in one line before any long work and before anything is
changed. Everything here is cheap: folder listings, file headers and an untrained skeleton of
the model; no decoding, no training.

Every parameter whose validity depends on the machine, the data or the model is checked here
(the schema in salve/config.py checks each value on its own):

- machine: ``common.device=cuda`` needs a CUDA device (``torch.cuda.is_available``);
- data: the data folder (``data.*``, an image folder's per-class counts) and the class index
  ``edit.checkpoint_class``;
- model: ``finetune.arch`` at ``data.image_size`` (a dry forward on a skeleton),
  ``finetune.weights`` (its header), and the module names ``gradfam.layer`` and
  ``study.deeper_layer`` when not ``auto`` (resolved on a skeleton as the stages resolve them).

Other counts (``gradfam.top_k``, ``rank.top_n``, ``alpha_crit.verify_samples``, ...) are clamped
by their stages and ``common.num_threads`` is valid on any machine (a thread count above the
cores is slower, not wrong, and repeats a run made elsewhere), so they need no check. A model
explained as it is whose head cannot tell classes apart gets one warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from salve.config import WEIGHT_KEYWORDS, Config, ConfigError
from salve.errors import SalveUserError
from tasks.common import resolve_user_path

# Class counts of the built-in and downloadable sources.
KNOWN_CLASS_COUNTS = {"digits": 10, "imagenette": 10, "cifar100": 100}


class InputError(SalveUserError, ValueError):
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


def check_device(cfg: Config) -> None:
    """``common.device=cuda`` on a machine without a usable CUDA device (``auto`` always works).

    Asked only for ``cuda``: ``torch.cuda.is_available`` initialises the CUDA runtime."""
    if cfg.common.device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    build = (
        f"torch {torch.__version__} is a CPU build"
        if torch.version.cuda is None
        else f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no "
        "usable GPU or driver"
    )
    raise ConfigError(
        f"params.yaml: common.device='cuda' but this machine has no CUDA device ({build}); "
        "set common.device=cpu or auto"
    )


def check_model(cfg: Config, root: Path, num_classes: int) -> None:
    """The architecture exists and has a linear head; a weights file's header fits it; the
    module names in gradfam.layer and study.deeper_layer exist in it."""
    from salve.models import check_architecture, check_weights_file, skeleton

    f = cfg.finetune
    layers = cfg.gradfam.layer != "auto" or cfg.study.deeper_layer != "auto"
    try:  # a skeleton to resolve module names on, validated as check_architecture validates
        skel = skeleton(f.arch, cfg.data.image_size) if layers else None
        check_architecture(f.arch, image_size=cfg.data.image_size)
    except ValueError as exc:  # the parameter is wrong: a configuration error (exit 2)
        raise ConfigError(f"params.yaml: finetune.arch={f.arch!r}: {exc}") from None
    if skel is not None:
        check_layers(cfg, skel)
    if f.weights in WEIGHT_KEYWORDS:
        return
    path = resolve_user_path(root, f.weights)
    if path.exists() and not os.access(path, os.R_OK):
        raise InputError(
            f"finetune.weights={f.weights}: permission denied reading {path}; make it readable "
            "or point finetune.weights at another file under weights/."
        )
    keep_head = f.epochs == 0
    check_weights_file(
        path, f.arch, num_classes, keep_head=keep_head, image_size=cfg.data.image_size
    )
    if keep_head:
        warn_degenerate_head(cfg, path)


def _some(names: list[str], limit: int = 8) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join([*names[:3], "...", *names[-3:]]) + f" ({len(names)} in all)"


def _close(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.8)
    return f"did you mean {close[0]}? " if close else ""


def _gradfam_choices(skel, size: int, layer: str) -> str:
    """The feature maps Grad-FAM can read (stages, and a ViT's encoder blocks), and auto's pick."""
    from salve.feature_layers import layer_candidates, select_layer

    found = layer_candidates(skel, size)
    if not found:
        return f"no module's output is a feature map Grad-FAM can read at {size} px"
    known = layer in dict(skel.named_modules())
    guess = "" if known else _close(layer, [c.name for c in found])
    stages = [
        c
        for c in found
        if any(True for _ in skel.get_submodule(c.name).children())
        and ("." not in c.name or c.name.startswith("encoder.layers."))
    ]
    shown = [c.describe() for c in (stages or found)]
    inner = [c.name for c in found if any(c.name.startswith(f"{s.name}.") for s in stages)]
    more = f", or a module inside one (e.g. {inner[-1]})" if stages and inner else ""
    auto = select_layer(skel, size, "auto").name
    return f"{guess}choose auto or one of {_some(shown)}{more}; auto picks {auto} at {size} px"


def check_gradfam_layer(cfg: Config, skel) -> None:
    """``gradfam.layer`` resolves on the model as the gradfam stage resolves it."""
    from salve.feature_layers import select_layer
    from salve.models import arch_spec

    layer, arch, size = cfg.gradfam.layer, cfg.finetune.arch, cfg.data.image_size
    spec = arch_spec(arch, size)
    where = f"params.yaml: gradfam.layer={layer!r}"
    if layer not in ("auto", "pooled") and layer not in spec.modules:
        why = f"is not a module of {arch}"
    else:
        try:
            select_layer(skel, size, layer)
            return
        except ValueError:
            if layer == "pooled":
                why = f"but no feature map of {arch} is read directly by a global average pool"
            elif layer == spec.head:
                why = f"is the head of {arch}, not a feature map"
            else:
                why = (
                    f"gives no usable feature map of {arch} at {size} px: its output is not a "
                    "spatial map (or ViT patch tokens, or a Swin grid) that the head depends on, "
                    "or it runs more than once"
                )
    raise ConfigError(f"{where} {why}; {_gradfam_choices(skel, size, layer)}")


def check_deeper_layer(cfg: Config, skel) -> None:
    """``study.deeper_layer`` names a residual block or stage of the model (``salve study``)."""
    from salve.models import arch_spec
    from salve.study.deeper import resolve_block

    layer, arch = cfg.study.deeper_layer, cfg.finetune.arch
    modules = arch_spec(arch, cfg.data.image_size).modules

    def editable(name: str) -> bool:
        try:
            resolve_block(skel, name)
        except ValueError:
            return False
        return True

    if layer in modules and editable(layer):
        return
    what = "is not a module of" if layer not in modules else "is not a residual block or stage of"
    blocks = [name for name in modules if editable(name)]
    choose = (
        f"{'' if layer in modules else _close(layer, blocks)}choose auto or one of {_some(blocks)}"
        if blocks
        else "no module of it can be edited"
    )
    raise ConfigError(f"params.yaml: study.deeper_layer={layer!r} {what} {arch}; {choose}")


def check_layers(cfg: Config, skel) -> None:
    """Module names given in gradfam.layer and study.deeper_layer (``auto`` is not checked:
    no model is built for it), on ``skel``, a skeleton of finetune.arch."""
    if cfg.gradfam.layer != "auto":
        check_gradfam_layer(cfg, skel)
    if cfg.study.deeper_layer != "auto":
        check_deeper_layer(cfg, skel)


def degenerate_head(weight_km) -> str | None:
    """What makes a head unable to tell classes apart, or None: an all-zero weight (every logit
    is its bias) or identical rows (the logits differ by the bias alone)."""
    if weight_km.ndim != 2 or weight_km.shape[0] < 2:
        return None
    if not bool(weight_km.any()):
        return "is all zero: every logit is its bias"
    if bool((weight_km == weight_km[:1]).all()):
        return "has identical rows: the logits differ by the bias alone"
    return None


def warn_degenerate_head(cfg: Config, path: Path) -> None:
    """One warning when the model explained as it is (finetune.epochs=0) predicts one class for
    every image whatever it sees: only its head's tensors are read."""
    from salve.models import arch_spec, read_head

    spec = arch_spec(cfg.finetune.arch, cfg.data.image_size)
    key = f"{spec.head}.weight"
    weight = read_head(path, cfg.finetune.arch, cfg.data.image_size).get(key)
    what = degenerate_head(weight) if weight is not None else None
    if what is None:
        return
    same = ", the edited checkpoint equal to this one" if not bool(weight.any()) else ""
    logging.getLogger("salve").warning(
        f"finetune.weights={cfg.finetune.weights}: the head's weight {key} {what}, so the "
        "model predicts the same class for every image and no edit along any feature can "
        f"change a prediction (alpha_crit and the edits' efficacy will be 0{same}). It is "
        "explained as it is because finetune.epochs=0: train the head (set finetune.epochs > 0) "
        "or export the trained model."
    )


def preflight(cfg: Config, root: Path, *, create: bool = True) -> Preflight:
    """Every check that needs only the parameters, the machine, folder listings, file headers
    and an untrained skeleton of the model."""
    check_device(cfg)
    found = check_data(cfg, Path(root), create=create)
    check_edit(cfg, found.num_classes)
    check_model(cfg, Path(root), found.num_classes)
    return found
