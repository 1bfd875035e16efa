"""Typed, validated parameters: one frozen dataclass per params.yaml section.

Constraints live next to each field (`setting(default, min=..., max=..., choices=...)`), so
validation, error messages and the failure-drill tests are all generated from this one schema.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, get_args, get_type_hints

from salve.errors import SalveUserError

# finetune.weights: these words, or a file under this folder (a DVC input of finetune).
WEIGHT_KEYWORDS = ("none", "imagenet")
WEIGHTS_DIR = "weights"


def _under(path: str, folder: str) -> bool:
    parts = PurePosixPath(path).parts
    return len(parts) >= 2 and parts[0] == folder and ".." not in parts


class ConfigError(SalveUserError, ValueError):
    """params.yaml (or an override) is invalid; the message names the key and what is allowed."""


def setting(
    default: Any,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,  # noqa: A002
    choices: tuple | None = None,
    min_exclusive: bool = False,
    auto: bool = False,
) -> Any:
    """A config field; ``auto``: the string "auto" is accepted besides the field's type (the
    stage resolves it from the data)."""
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": choices,
        "min_exclusive": min_exclusive,
        "auto": auto,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CommonConfig:
    seed: int = setting(0, min=0, help="global seed (data split, init, SAE, AM)")
    device: str = setting(
        "auto", choices=("auto", "cpu", "cuda"), help="auto picks cuda when present"
    )
    num_threads: int = setting(0, min=0, max=256, help="torch CPU threads; 0 = torch's default")
    reproducible: bool = setting(
        False,
        help="true: pin CPU kernels to CPU-independent code paths (MKL COMPATIBLE, oneDNN and "
        "ATen at AVX2), the same bytes on every x86-64 CPU, 1.5x slower CNN passes; false: this "
        "CPU's fastest kernels, the same bytes from run to run on this machine "
        "(docs/REPRODUCIBILITY.md)",
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = setting(
        "digits",
        choices=("digits", "imagenette", "cifar100", "imagefolder"),
        help="dataset; digits is built in and offline",
    )
    variant: str = setting("160px", choices=("160px", "320px", "full"), help="imagenette archive")
    path: str = setting(
        "data",
        help="the folder DVC tracks as fetch's input: imagefolder: its root (a folder per class); "
        "imagenette/cifar100: where archives are downloaded; digits: unused",
    )
    image_size: int = setting(64, min=16, max=1024, help="square side images are resized to")
    val_fraction: float = setting(
        0.2,
        min=0.0,
        max=0.9,
        min_exclusive=True,
        help="held-out share when the source has no split",
    )
    max_per_class: int = setting(0, min=0, help="cap on train images per class; 0 = all")
    min_val_per_class: int = setting(
        5, min=1, help="fetch refuses a class with fewer val images than this"
    )


@dataclass(frozen=True)
class FinetuneConfig:
    arch: str = setting(
        "resnet18",
        help="any torchvision classification model with a linear head (resnet18, vit_b_16, "
        "mobilenet_v3_small, convnext_tiny, ...)",
    )
    weights: str = setting(
        "none",
        help="none | imagenet | a .safetensors state dict under weights/ (a DVC input)",
    )
    epochs: int = setting(
        4,
        min=0,
        max=1000,
        help="epoch budget (raised to reach finetune.min_steps); 0 explains finetune.weights as is",
    )
    min_steps: int | str = setting(
        "auto",
        min=0,
        max=10_000_000,
        auto=True,
        help="at least this many optimiser steps: a small dataset gets more epochs than "
        "finetune.epochs (0: the epoch budget alone); auto: 960 for any data",
    )
    batch_size: int = setting(
        16, min=2, max=4096, help="small batches give more disentangled features (min 2: BatchNorm)"
    )
    lr: float = setting(1e-3, min=0.0, max=10.0, min_exclusive=True, help="learning rate")
    optimizer: str = setting("adamw", choices=("adamw", "sgd"), help="optimiser")
    weight_decay: float = setting(1e-4, min=0.0, max=1.0, help="decoupled weight decay")
    schedule: str = setting(
        "onecycle",
        choices=("onecycle", "cosine", "constant"),
        help="learning-rate schedule over the epoch budget (warm-up, then decay)",
    )
    warmup: float = setting(0.15, min=0.0, max=0.9, help="share of the budget spent warming up")
    patience: int = setting(
        2, min=0, max=1000, help="stop after this many epochs without a better val accuracy"
    )
    augment: str = setting(
        "auto",
        choices=("auto", "none", "crop", "crop_flip"),
        help="train-time augmentation; auto: crop for digits, crop_flip otherwise",
    )
    mixed_precision: bool = setting(True, help="bf16/fp16 autocast on CUDA; ignored on CPU")
    min_val_accuracy: float = setting(
        0.8, min=0.0, max=1.0, help="quality gate: stop before the SAE below this val accuracy"
    )
    min_class_accuracy: float = setting(
        0.5, min=0.0, max=1.0, help="quality gate: stop when any class is below this"
    )


@dataclass(frozen=True)
class ExtractConfig:
    batch_size: int = setting(256, min=1, max=65536, help="inference batch size")


@dataclass(frozen=True)
class SaeConfig:
    kind: str = setting(
        "relu",
        choices=("linear", "relu", "topk", "batchtopk", "jumprelu"),
        help="linear is the paper's variant; the others go beyond it",
    )
    width: int = setting(64, min=1, max=1_000_000, help="number of latent features")
    l1: float = setting(
        0.03, min=0.0, help="lambda_1, l1 weight on codes (scale-free, see docs/METHOD.md)"
    )
    k: int = setting(8, min=1, help="active latents for topk / batchtopk")
    aux_l1: float = setting(0.0, min=0.0, help="topk: l1 on pre-activations outside the top-k")
    l1_l2_ratio: float = setting(0.0, min=0.0, help="topk: scale-invariant l1/l2 penalty")
    lr: float = setting(1e-3, min=0.0, max=10.0, min_exclusive=True, help="Adam learning rate")
    epochs: int = setting(300, min=1, max=100_000, help="passes over the training activations")
    max_steps: int = setting(
        2000,
        min=0,
        max=100_000_000,
        help="at most this many optimiser steps: fewer epochs on a large dataset, so a fit's "
        "cost stops growing with the data (0: sae.epochs alone)",
    )
    batch_size: int = setting(256, min=1, max=1_000_000, help="SAE batch size")
    normalise_decoder: bool = setting(True, help="unit-norm decoder columns (sets alpha's scale)")


@dataclass(frozen=True)
class RankConfig:
    cross_class_fraction: float = setting(
        0.5,
        min=0.0,
        max=1.0,
        min_exclusive=True,
        help="a feature is cross-class when its 2nd-largest |class mean| is at least "
        "this fraction of its largest",
    )
    min_mean_fraction: float = setting(
        0.1,
        min=0.0,
        max=1.0,
        help="a cross-class feature's largest |class mean| must be at least this fraction of "
        "the largest |class mean| of any feature",
    )
    top_n: int = setting(5, min=1, max=1000, help="features listed per class")


@dataclass(frozen=True)
class EditConfig:
    mode: str = setting(
        "projection",
        choices=("paper", "projection", "steer"),
        help="projection: W(I+s*alpha*dd^T); paper: w_ij*max(0,1+s*alpha*|c_j|); steer: "
        "a'=a+(g-1)*z_l(a)*W_dec[:,l], g=max(0,1+s*alpha), a steered model instead of a head edit",
    )
    centre: bool = setting(
        True, help="projection: act on a - b_dec (the SAE's centre), bias moved to match"
    )
    targets: str = setting(
        "dominant_and_cross",
        choices=("dominant", "dominant_and_cross"),
        help="features swept: each class's dominant feature, plus cross-class ones",
    )
    alpha_unit: str = setting(
        "absolute",
        choices=("per_feature", "absolute"),
        help="paper rule only: per_feature divides alpha by max|c_j|, so alpha=1 zeroes the "
        "column's largest component",
    )
    alpha_max: float = setting(
        1.5,
        min=0.0,
        min_exclusive=True,
        help="end of the alpha grid; full suppression is measured here",
    )
    alpha_steps: int = setting(16, min=2, max=1001, help="points on the alpha grid, 0 included")
    checkpoint_class: int = setting(
        0, min=0, help="class whose dominant feature the saved edit uses"
    )
    checkpoint_sign: str = setting(
        "suppress", choices=("suppress", "enhance"), help="direction of the saved edit"
    )
    checkpoint_alpha: float = setting(1.5, min=0.0, help="strength of the saved edit (alpha_unit)")
    min_base_accuracy: float = setting(
        0.5, min=0.0, max=1.0, help="classes below this accuracy before any edit are not evaluated"
    )


@dataclass(frozen=True)
class AlphaCritConfig:
    grid_min: float = setting(
        0.01,
        min=0.0,
        min_exclusive=True,
        help="first non-zero alpha of the empirical grid (paper rule, absolute)",
    )
    grid_max: float = setting(
        1e4,
        min=0.0,
        min_exclusive=True,
        help="last alpha of the empirical grid; alpha_crit often spans decades",
    )
    grid_steps: int = setting(
        121, min=2, max=10001, help="points on the empirical grid, 0 included"
    )
    grid_spacing: str = setting("log", choices=("log", "linear"), help="spacing of the grid")
    verify_samples: int = setting(20, min=0, help="val samples re-checked on the real edited model")


@dataclass(frozen=True)
class GradfamConfig:
    top_k: int = setting(6, min=1, max=64, help="top-activating val images shown per feature")
    batch_size: int = setting(32, min=1, max=4096, help="images per Grad-FAM batch")
    memory_mb: int = setting(
        1024,
        min=1,
        max=1_000_000,
        help="memory for a batch's backward state: fewer images per Grad-FAM and AM pass where "
        "gradfam.batch_size would need more (at 224 px a ViT-B/16 keeps 113 MiB per image, a "
        "ResNet-18 21 MiB)",
    )
    layer: str = setting(
        "auto",
        help="feature map differentiated: auto (the deepest with a grid of at least 4x4), or a "
        "module name (layer3, layer4, encoder.layers.encoder_layer_10, ...)",
    )
    deletion_steps: int = setting(
        10,
        min=2,
        max=1000,
        help="faithfulness: pixels deleted in this many equal steps (10 and 20 gave mean "
        "AUCs 0.380 and 0.378 on the default, at half the forward passes)",
    )
    deletion_sample: int = setting(
        16,
        min=0,
        max=100_000,
        help="faithfulness: the deletion test runs on the dominant features, this many of the "
        "cross-class features and this many other latents, each drawn (seeded) from those "
        "active on val: a fixed cost at any SAE width (each latent costs 20 forward passes per "
        "top image: at 224 px the test was 0.7 of a pass over 4k images)",
    )
    am_steps: int = setting(64, min=0, max=100_000, help="activation-maximisation steps")
    am_lr: float = setting(
        0.1, min=0.0, min_exclusive=True, help="activation-maximisation Adam step size"
    )
    am_l2: float = setting(1e-4, min=0.0, help="lambda_L2")
    am_tv: float = setting(1e-3, min=0.0, help="lambda_TV")
    am_jitter: int = setting(
        4, min=0, max=64, help="random shift in pixels per step (with a small scale and rotation)"
    )
    am_restarts: int = setting(
        4,
        min=1,
        max=64,
        help="seeded AM runs per feature; the best after a quarter of the steps goes on",
    )


@dataclass(frozen=True)
class EvaluateConfig:
    seeds: int = setting(
        5, min=1, max=100, help="SAE fits (seeds) every edit metric is averaged over"
    )
    projection_alpha: float = setting(
        1.0, min=0.0, help="strength of the projection edits (1 removes the component)"
    )
    paper_alpha: float = setting(
        8.0, min=0.0, help="strength of the paper-rule edit, per-feature units"
    )
    shift_sample: int = setting(
        512,
        min=10,
        max=10_000_000,
        help="generalisation: the shifted images (noise, blur, jitter) are made of at most this "
        "many val images (seeded), three backbone passes over them",
    )
    train_sample: int = setting(
        2000,
        min=10,
        max=10_000_000,
        help="the baselines fitted on train activations (mean difference, LEACE) and the probe "
        "recovery's logistic probes use at most this many train rows (seeded), so their cost "
        "and memory stop growing with the data (the seeds' SAE refits use every row)",
    )


# Sections only the study's stages read (study/dvc.yaml, `salve study`: docs/METHOD.md's open
# questions q1-q3): no pipeline stage declares them, so changing them reruns no pipeline stage.
STUDY_SECTIONS = ("study",)


@dataclass(frozen=True)
class StudyConfig:
    workers: int = setting(
        0, min=0, max=256, help="Dask worker processes, one thread each; 0 = one per CPU core"
    )
    attack_per_class: int = setting(
        20, min=1, max=100_000, help="q1: correctly classified val samples attacked per class"
    )
    attack_steps: int = setting(10, min=1, max=10_000, help="q1: PGD steps per attack")
    attack_bisection_steps: int = setting(
        8, min=0, max=40, help="q1: bisection steps on the size (resolution eps_max / 2^steps)"
    )
    attack_targets: int = setting(
        1,
        min=0,
        max=1000,
        help="q1: targeted PGD runs on the top wrong classes after the untargeted one",
    )
    eps_max_linf: float = setting(
        0.25,
        min=0.0,
        max=1.0,
        min_exclusive=True,
        help="q1: largest L-inf size tried ([0, 1] pixels)",
    )
    eps_max_l2: float = setting(
        8.0, min=0.0, min_exclusive=True, help="q1: largest L2 size tried ([0, 1] pixels)"
    )
    bootstrap: int = setting(
        1000, min=0, max=100_000, help="q1: bootstrap resamples for Spearman's 95 % CI"
    )
    seeds: int = setting(3, min=1, max=100, help="q2: SAE fits (seeds) per variant; CIs over seeds")
    target_l0: float = setting(
        0.0, min=0.0, help="q2: L0 the variants are matched to; 0 = the pipeline SAE's val L0"
    )
    match_l0_fits: int = setting(
        5,
        min=0,
        max=50,
        help="q2: relu/jumprelu fits bisecting l1 towards the target L0 (0 = keep sae.l1)",
    )
    aux_l1: float = setting(
        0.03, min=0.0, min_exclusive=True, help="q2: strength of topk_aux_l1's penalty"
    )
    l1_l2_ratio: float = setting(
        0.01, min=0.0, min_exclusive=True, help="q2: strength of topk_l1_l2_ratio's penalty"
    )
    deeper_layer: str = setting(
        "auto",
        help="q3: backbone stage or block edited: auto (layer3 of a ResNet, the block at 3/4 "
        "depth of a ViT) or a module name",
    )
    deeper_alpha: float = setting(
        1.0,
        min=0.0,
        min_exclusive=True,
        help="q3: strength of the backbone edit (1 removes the deviation along the feature)",
    )


@dataclass(frozen=True)
class Config:
    common: CommonConfig = field(default_factory=CommonConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    alpha_crit: AlphaCritConfig = field(default_factory=AlphaCritConfig)
    gradfam: GradfamConfig = field(default_factory=GradfamConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def section_fields(section_cls: type) -> dict[str, tuple[type, dataclasses.Field]]:
    """Each field's value type (``int`` for an ``int | str`` field that also takes "auto")."""
    hints = get_type_hints(section_cls)
    out = {}
    for f in fields(section_cls):
        typ = hints[f.name]
        if f.metadata.get("auto"):
            typ = next(t for t in get_args(typ) if t is not str)
        out[f.name] = (typ, f)
    return out


def _check_value(where: str, value: Any, typ: type, fld: dataclasses.Field) -> Any:
    meta = fld.metadata
    if meta["auto"] and value == "auto":
        return value
    type_ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not type_ok:
        expected = f"{typ.__name__} or 'auto'" if meta["auto"] else typ.__name__
        raise ConfigError(
            f"{where}: expected {expected}, got {type(value).__name__} {value!r}. ({meta['help']})"
        )
    if typ is float:
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float, e.g. 10**400
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of: {allowed}")
    lo, hi = meta["min"], meta["max"]
    if lo is not None and (value < lo or (meta["min_exclusive"] and value == lo)):
        op = ">" if meta["min_exclusive"] else ">="
        raise ConfigError(
            f"{where}: {value!r} is out of range; must be {op} {lo}"
            + (f" and <= {hi}" if hi is not None else "")
        )
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is out of range; must be <= {hi}")
    return value


def from_dict(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a parsed params mapping; missing keys take their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    known = sections()
    built = {}
    for name, section in raw.items():
        if name not in known:
            raise ConfigError(
                f"{source}: unknown section {name!r}; allowed sections: {', '.join(known)}"
            )
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys")
        spec = section_fields(known[name])
        values = {}
        for key, value in section.items():
            if key not in spec:
                raise ConfigError(
                    f"{source}: unknown key {name}.{key}; allowed keys in {name}: {', '.join(spec)}"
                )
            typ, fld = spec[key]
            values[key] = _check_value(f"{source}: {name}.{key}", value, typ, fld)
        built[name] = known[name](**values)
    cfg = Config(**built)
    _check_cross_field(cfg, source)
    return cfg


def _check_cross_field(cfg: Config, source: str) -> None:
    if not cfg.data.path.strip():
        raise ConfigError(
            f"{source}: data.path must name a folder (DVC tracks it as fetch's input); the "
            "default is data, the repository's data folder"
        )
    arch = cfg.finetune.arch
    if not re.fullmatch(r"[a-z][a-z0-9_]*", arch):
        raise ConfigError(
            f"{source}: finetune.arch={arch!r} is not a torchvision model name (e.g. resnet18, "
            "vit_b_16, mobilenet_v3_small)"
        )
    patch = re.fullmatch(r"vit_[a-z]_(\d+)", arch)
    if patch and cfg.data.image_size % int(patch[1]):
        raise ConfigError(
            f"{source}: data.image_size={cfg.data.image_size} must be a multiple of "
            f"{patch[1]} for {arch} (its patch size)"
        )
    weights = cfg.finetune.weights
    if weights not in WEIGHT_KEYWORDS and not _under(weights, WEIGHTS_DIR):
        raise ConfigError(
            f"{source}: finetune.weights={weights!r} must be none, imagenet, or a file under "
            f"{WEIGHTS_DIR}/ (DVC tracks that folder as finetune's input): copy or link it "
            f"there, e.g. `ln -s /path/to/model.safetensors {WEIGHTS_DIR}/`"
        )
    if cfg.finetune.epochs == 0 and weights in WEIGHT_KEYWORDS:
        raise ConfigError(
            f"{source}: finetune.epochs=0 explains a trained model as it is, so "
            "finetune.weights must name its .safetensors file under weights/"
        )
    if cfg.alpha_crit.grid_min >= cfg.alpha_crit.grid_max:
        raise ConfigError(
            f"{source}: alpha_crit.grid_min={cfg.alpha_crit.grid_min} must be below "
            f"alpha_crit.grid_max={cfg.alpha_crit.grid_max}"
        )
    layer = cfg.study.deeper_layer
    if layer != "auto" and not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", layer):
        raise ConfigError(
            f"{source}: study.deeper_layer={layer!r} must be auto or a dotted module name "
            "(layer3, layer3.1, encoder.layers.encoder_layer_8)"
        )
    if cfg.sae.kind in ("topk", "batchtopk") and cfg.sae.k > cfg.sae.width:
        raise ConfigError(f"{source}: sae.k={cfg.sae.k} must be <= sae.width={cfg.sae.width}")


def load(path: str | Path = "params.yaml") -> Config:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: not found. Run from the repository root, or pass --params.")
    from salve.params_file import read_params  # that module reads the schema defined here

    return from_dict(read_params(p), str(p))


def params_markdown() -> str:
    """The parameter reference (docs/PARAMETERS.md), generated from the schema so docs match the
    code."""
    lines = []
    for name, cls in sections().items():
        lines += [
            f"#### `{name}`",
            "",
            "| key | default | allowed | meaning |",
            "|---|---|---|---|",
        ]
        for key, (typ, fld) in section_fields(cls).items():
            meta = fld.metadata
            if meta["choices"]:
                allowed = " \\| ".join(f"`{c}`" for c in meta["choices"])
            elif meta["min"] is not None or meta["max"] is not None:
                lo = (
                    ""
                    if meta["min"] is None
                    else f"{'>' if meta['min_exclusive'] else '>='} {meta['min']}"
                )
                hi = "" if meta["max"] is None else f"<= {meta['max']}"
                allowed = f"{typ.__name__} " + ", ".join(x for x in (lo, hi) if x)
            else:
                allowed = typ.__name__
            if meta["auto"]:
                allowed = f"`auto` or {allowed}"
            default = fld.default
            lines.append(f"| `{key}` | `{default!r}` | {allowed} | {meta['help']} |")
        lines.append("")
    return "\n".join(lines)
