"""Question 3: can an edit inside the backbone change how a concept forms?

An SAE fitted on a layer's pooled output gives each class a dominant direction in that layer's
channel space; :func:`salve.study.deeper.edit_block_output` suppresses it in the layer's output
branch, so every later layer sees the edit. Its effect is measured on real forward passes (val
images and their shifted styles) with the metrics of :mod:`salve.evaluate`, next to the head edit
of the same class. Two diagnostics say why a backbone edit may fall short:

- ``survival``: how much of the target class's mean deviation along the edited direction is
  still in the layer's pooled output after the edit (1 untouched, 0 removed): the residual
  shortcut carries the component past the edited branch;
- ``feature_share``: the dominant layer feature's largest other-class mean over its own class's
  mean (1 = just as active for another class): a shared feature cannot be removed for one class
  alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from salve.config import SaeConfig
from salve.data import normalise
from salve.evaluate import mean_ci95, per_class_accuracy, prediction_metrics
from salve.models import head_of
from salve.ranking import class_mean_codes, dominant_features
from salve.sae import quality_metrics
from salve.study.deeper import _pool, _submodule, edit_block_output, resolve_block
from salve.study.variants import fit_variant

METRICS = ("efficacy", "flip_rate", "specificity_mean", "specificity_worst", "generalisation")


def auto_layer(model: nn.Module) -> str:
    """The layer edited by default: a ResNet's ``layer3`` (the stage before the head's), a
    ViT's encoder block at three quarters of its depth."""
    if isinstance(getattr(model, "layer3", None), nn.Sequential):
        return "layer3"
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) >= 2:
        names = [name for name, _ in layers.named_children()]
        return f"encoder.layers.{names[(3 * len(names)) // 4 - 1]}"
    raise ValueError(
        f"no default layer for a {type(model).__name__}: set study.deeper_layer to a residual "
        "block or stage (a module name)"
    )


def resolve_layer(model: nn.Module, layer: str) -> tuple[str, str]:
    """``(layer, block)``: the module whose pooled output the SAE reads (``auto`` resolved) and
    the name of the block whose output branch is edited (a stage's last block)."""
    name = auto_layer(model) if layer == "auto" else layer
    block = resolve_block(model, name)
    block_name = next(n for n, m in model.named_modules() if m is block)
    return name, block_name


@torch.inference_mode()
def forward_probe(
    model: nn.Module,
    images_u8: torch.Tensor,
    layer: str,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One eval-mode pass: ``(preds [N], pooled layer output [N, C], head input [N, M])``.

    The layer output is pooled as :func:`salve.study.deeper.pooled_activations` pools it. Hooks
    are always removed and the model's mode restored.
    """
    module = _submodule(model, layer)
    has_cls = hasattr(model, "class_token")
    store: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: store.__setitem__("layer", out)),
        head_of(model).register_forward_pre_hook(
            lambda _m, args: store.__setitem__("head", args[0])
        ),
    ]
    was_training = model.training
    model.eval()
    preds, pooled, head_in = [], [], []
    try:
        for start in range(0, images_u8.shape[0], batch_size):
            logits = model(normalise(images_u8[start : start + batch_size], mean, std))
            preds.append(logits.argmax(dim=1))
            pooled.append(_pool(store["layer"], has_cls).float())
            head_in.append(store["head"].float())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not preds:
        raise ValueError("forward_probe needs at least one image")
    return torch.cat(preds), torch.cat(pooled), torch.cat(head_in)


def layer_features(
    pooled_train_nc: torch.Tensor,
    train_labels_n: torch.Tensor,
    pooled_val_nc: torch.Tensor,
    sae: SaeConfig,
    *,
    seed: int,
    num_classes: int,
) -> dict[str, Any]:
    """Fit the layer's SAE; per class its dominant latent, decoder direction and share.

    Returns plain data: ``quality`` (val FVU, L0, dead fraction), ``dominant`` [K],
    ``directions`` (K lists of C floats), ``feature_share`` [K] (see the module docstring).
    """
    fitted, _ = fit_variant(pooled_train_nc, sae, seed=seed)
    quality = quality_metrics(fitted, pooled_val_nc)
    labels = torch.as_tensor(train_labels_n).to(torch.int64)
    mu_kl = class_mean_codes(fitted.encode_batched(pooled_train_nc), labels, num_classes)
    dominant = dominant_features(mu_kl)
    share = []
    for k in range(num_classes):
        column = mu_kl[:, dominant[k]].abs()
        own = float(column[k])
        others = torch.cat([column[:k], column[k + 1 :]])
        share.append(float(others.max()) / own if own > 0 and others.numel() else math.nan)
    w_dec = fitted.W_dec.detach().to(torch.float64)
    return {
        "quality": {key: float(quality[key]) for key in ("fvu", "l0", "dead_fraction")},
        "dominant": [int(v) for v in dominant.tolist()],
        "directions": [w_dec[:, int(d)].tolist() for d in dominant],
        "feature_share": share,
    }


def mean_deviation_along(
    pooled_nc: torch.Tensor, reference_c: torch.Tensor, direction_c: torch.Tensor
) -> float:
    """Mean over samples of ``(pooled - reference) . d``, ``d`` the unit direction."""
    d = torch.as_tensor(direction_c, dtype=torch.float64)
    d = d / torch.linalg.vector_norm(d)
    dev = pooled_nc.to(torch.float64) - torch.as_tensor(reference_c, dtype=torch.float64)
    return float((dev @ d).mean()) if pooled_nc.shape[0] else math.nan


def backbone_edit_effect(
    model: nn.Module,
    layer: str,
    direction_c: Sequence[float] | torch.Tensor,
    alpha: float,
    images_u8: Mapping[str, torch.Tensor],
    labels_n: torch.Tensor,
    base_preds: Mapping[str, torch.Tensor],
    target: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    reference_c: torch.Tensor,
    before_along: float,
) -> dict[str, Any]:
    """Suppress ``direction`` in ``layer``'s output branch; metrics of the edited model.

    ``images_u8`` maps ``"val"`` and each shift kind to images in the val order (``labels_n``);
    ``base_preds`` the unedited model's predictions on each. ``efficacy``, ``flip_rate`` and
    ``specificity_*`` come from the val images, ``generalisation`` (mean over kinds) and
    ``generalisation_<kind>`` are the target's accuracy drop on the shifted ones, as
    :func:`salve.evaluate.evaluate_seed` defines them. ``survival`` compares the target's mean
    deviation along the direction (from ``reference_c``) after the edit with ``before_along``.
    """
    labels = torch.as_tensor(labels_n).to(torch.int64)
    direction = torch.as_tensor(direction_c, dtype=torch.float64)
    edited = edit_block_output(model, layer, direction, alpha, "suppress")
    preds, pooled_val = {}, None
    for kind, images in images_u8.items():
        preds[kind], pooled, _ = forward_probe(edited, images, layer, mean, std)
        if kind == "val":
            pooled_val = pooled
    if pooled_val is None:
        raise ValueError('images_u8 needs the unshifted val images under "val"')
    out = prediction_metrics(base_preds["val"], preds["val"], labels, target, num_classes)
    shifts = [kind for kind in images_u8 if kind != "val"]
    for kind in shifts:
        before = per_class_accuracy(base_preds[kind], labels, num_classes)[target]
        after = per_class_accuracy(preds[kind], labels, num_classes)[target]
        out[f"generalisation_{kind}"] = float(before - after)
    if shifts:
        out["generalisation"] = float(np.mean([out[f"generalisation_{k}"] for k in shifts]))
    after_along = mean_deviation_along(pooled_val[labels == target], reference_c, direction)
    out["along_before"] = before_along
    out["along_after"] = after_along
    tiny = 1e-12 * max(1.0, float(torch.as_tensor(reference_c).abs().max()))
    out["survival"] = after_along / before_along if abs(before_along) > tiny else math.nan
    return out


def compare_with_head(
    deeper: Mapping[int, Mapping[str, float]],
    head: Mapping[int, Mapping[str, float]],
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, dict]]:
    """Means with 95 % CIs over the classes both edits evaluated: ``deeper``, ``head`` and their
    paired ``difference`` (deeper - head), per metric."""
    classes = sorted(set(deeper) & set(head))
    out: dict[str, dict[str, dict]] = {"deeper": {}, "head": {}, "difference": {}}
    for key in metrics:
        d = [deeper[c].get(key, math.nan) for c in classes]
        h = [head[c].get(key, math.nan) for c in classes]
        out["deeper"][key] = mean_ci95(d)
        out["head"][key] = mean_ci95(h)
        out["difference"][key] = mean_ci95([a - b for a, b in zip(d, h, strict=True)])
    return out


def deeper_record(
    *,
    layer: str,
    block: str,
    alpha: float,
    features: Mapping[str, Any],
    deeper: Mapping[int, Mapping[str, float]],
    head: Mapping[int, Mapping[str, float]],
    left_out: Sequence[int],
) -> dict[str, Any]:
    """Question 3's JSON record: per evaluated class both edits side by side, the summary of
    :func:`compare_with_head`, and the diagnostics' means with 95 % CIs over those classes."""
    classes = sorted(set(deeper) | set(head))
    shares = features["feature_share"]
    return {
        "layer": layer,
        "block": block,
        "alpha": alpha,
        "sae": dict(features["quality"]),
        "per_class": [
            {
                "class": k,
                "latent": features["dominant"][k],
                "feature_share": shares[k],
                "deeper": dict(deeper[k]) if k in deeper else None,
                "head": dict(head[k]) if k in head else None,
            }
            for k in classes
        ],
        "left_out_classes": [int(k) for k in left_out],
        "summary": compare_with_head(deeper, head),
        "survival": mean_ci95([deeper[k].get("survival", math.nan) for k in sorted(deeper)]),
        "feature_share": mean_ci95([shares[k] for k in sorted(deeper)]),
    }
