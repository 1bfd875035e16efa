"""Backbone registry: torchvision resnet18 / vit_b_16 with a K-class head, split at the head input.

`penultimate` computes exactly what the head reads (ResNet: pooled 512-d; ViT: the class token
after the final LayerNorm), so `head_of(model)(penultimate(model, x)) == model(x)` and an edit of
the head is exact on cached activations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from salve.tv import import_torchvision

ARCHITECTURES = ("resnet18", "vit_b_16")
PATCH_SIZE = {"vit_b_16": 16}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be obtained."""


def _imagenet_weights(arch: str):
    tv = import_torchvision()
    enum = {"resnet18": tv.models.ResNet18_Weights, "vit_b_16": tv.models.ViT_B_16_Weights}[arch]
    return enum.IMAGENET1K_V1


def build_model(
    arch: str, num_classes: int, *, image_size: int = 224, weights: str = "none"
) -> nn.Module:
    """A plain torchvision model with its head replaced by a fresh `num_classes` linear layer.

    weights: "none" (random init), "imagenet" (torchvision's weights API; needs the network or a
    filled torch hub cache), or a path to a safetensors file with backbone weights.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    tv = import_torchvision()
    if arch == "resnet18":
        model = tv.models.resnet18()
    else:
        model = tv.models.vit_b_16(image_size=image_size)
    if weights == "imagenet":
        _load_imagenet(model, arch, image_size)
    elif weights not in ("", "none"):
        _load_local_backbone(model, weights)
    _replace_head(model, num_classes)
    return model


def _load_imagenet(model: nn.Module, arch: str, image_size: int) -> None:
    enum_value = _imagenet_weights(arch)
    try:
        state = enum_value.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # network errors surface as many types; re-raise with the fix
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            "This machine may be offline: set finetune.weights to 'none', or to a local "
            ".safetensors file with the backbone weights."
        ) from exc
    if arch == "vit_b_16" and image_size != 224:
        tv = import_torchvision()
        state = tv.models.vision_transformer.interpolate_embeddings(
            image_size, 16, state, reset_heads=False
        )
    model.load_state_dict(state)


def _load_local_backbone(model: nn.Module, path: str) -> None:
    from salve.io import load_tensors

    state = load_tensors(path)
    head_keys = {k for k in state if k.startswith(("fc.", "heads."))}
    for key in head_keys:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "heads."))]
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the backbone (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}). Give a safetensors state dict of the same torchvision "
            "architecture."
        )


def _replace_head(model: nn.Module, num_classes: int) -> None:
    head = head_of(model)
    new = nn.Linear(head.in_features, num_classes)
    if isinstance(model, _resnet_type()):
        model.fc = new
    else:
        model.heads.head = new


def _resnet_type() -> type:
    return import_torchvision().models.ResNet


def arch_of(model: nn.Module) -> str:
    return "resnet18" if isinstance(model, _resnet_type()) else "vit_b_16"


def head_of(model: nn.Module) -> nn.Linear:
    return model.fc if isinstance(model, _resnet_type()) else model.heads.head


def feature_map_module(model: nn.Module) -> nn.Module:
    """The module whose output Grad-FAM differentiates: ResNet layer4, ViT last encoder block."""
    return model.layer4 if isinstance(model, _resnet_type()) else model.encoder.layers[-1]


def penultimate(model: nn.Module, images_nchw: torch.Tensor) -> torch.Tensor:
    """The exact input of the classification head, [N, M]."""
    if isinstance(model, _resnet_type()):
        m = model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images_nchw))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)
    x = model._process_input(images_nchw)
    cls = model.class_token.expand(x.shape[0], -1, -1)
    x = model.encoder(torch.cat([cls, x], dim=1))
    return x[:, 0]


def feature_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: penultimate(model, images)


def sidecar_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def save_checkpoint(path: str | Path, model: nn.Module, sidecar: dict) -> None:
    """Weights as safetensors (a plain torchvision state dict) plus a JSON sidecar."""
    from salve.io import save_tensors, write_json

    sidecar = {"format": "salve-classifier", "architecture": arch_of(model)} | sidecar
    save_tensors(path, model.state_dict(), metadata={"architecture": sidecar["architecture"]})
    write_json(sidecar_path(path), sidecar)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the plain torchvision model from a checkpoint and its sidecar."""
    from salve.io import ArtifactError, load_tensors, read_json

    sidecar = read_json(sidecar_path(path))
    for key in ("architecture", "classes", "image_size"):
        if key not in sidecar:
            raise ArtifactError(f"{sidecar_path(path)}: missing key {key!r}; rerun finetune.")
    model = build_model(
        sidecar["architecture"], len(sidecar["classes"]), image_size=sidecar["image_size"]
    )
    state = load_tensors(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{path}: weights do not fit a {sidecar['architecture']} with "
            f"{len(sidecar['classes'])} classes ({str(exc)[:200]}). Rerun finetune."
        ) from exc
    return model.eval(), sidecar
