"""The feature map Grad-FAM reads, found per model family.

A map is only readable if its grid resolves the object: ResNet-18's last stage
is 2x2 at 64 px. ``select_layer(model, image_size, "auto")`` runs one dry forward and backward on a
seeded random image, records the output of every top-level stage (modules at most two levels deep,
plus a ViT's encoder blocks), and picks the deepest one whose grid is at least 4x4 and whose
spatial positions reach the head (non-zero gradient). A module name is honoured as given. Layouts:

- CNN stages: [N, C, h, w].
- ViT (torchvision ``VisionTransformer``): tokens [N, 1 + g*g, D]; the class token is stripped and
  the grid ``g = image_size // patch_size`` comes from the model, never guessed. The head reads
  the class token after a per-token LayerNorm, so the *last* block's output patch tokens get
  exactly zero gradient; "auto" therefore lands on the tokens entering the last block.
- Swin (torchvision ``SwinTransformer``): its stages and final norm are [N, h, w, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from salve.models import head_path, penultimate
from salve.modes import eval_mode
from salve.tv import import_torchvision

LAYOUTS = ("nchw", "nhwc", "tokens")
MIN_GRID = 4  # "auto" wants at least this many cells per side


@dataclass(frozen=True)
class FeatureLayer:
    """A tapped feature map: module name, grid (h, w), layout, channels, and whether the global
    average pool reads it directly (then the closed form applies)."""

    name: str
    grid: tuple[int, int]
    layout: str
    channels: int
    pooled: bool

    def describe(self) -> str:
        return f"{self.name} ({self.grid[0]}x{self.grid[1]})"


# --- Layouts: the one place that knows model families -------------------------------------


def _is_vit(model: nn.Module) -> bool:
    return isinstance(model, import_torchvision().models.VisionTransformer)


def _is_swin(model: nn.Module) -> bool:
    return isinstance(model, import_torchvision().models.SwinTransformer)


def vit_grid(model: nn.Module) -> int:
    """Side of the ViT patch grid, from the model's own image and patch size."""
    image_size, patch_size = int(model.image_size), int(model.patch_size)
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    return image_size // patch_size


def _layout(model: nn.Module, name: str, out: object) -> tuple[str, tuple[int, int], int] | None:
    """(layout, grid, channels) of a module's output, or None when it is not a spatial map."""
    if not isinstance(out, torch.Tensor):
        return None
    if _is_vit(model) and out.ndim == 3:
        g = vit_grid(model)
        return ("tokens", (g, g), int(out.shape[2])) if out.shape[1] == 1 + g * g else None
    if out.ndim != 4:
        return None
    if _is_swin(model) and name.split(".")[0] in ("features", "norm"):
        layout, grid, channels = "nhwc", (int(out.shape[1]), int(out.shape[2])), out.shape[3]
    else:
        layout, grid, channels = "nchw", (int(out.shape[2]), int(out.shape[3])), out.shape[1]
    return (layout, grid, int(channels)) if grid[0] * grid[1] > 1 else None


def _stage_names(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
    if _is_vit(model):
        names += [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    return names


def to_grid(t: torch.Tensor, layer: FeatureLayer) -> torch.Tensor:
    """A tapped tensor (or its gradient) as [N, C, h, w]; a ViT's class token is dropped."""
    if layer.layout == "nchw":
        return t
    if layer.layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    h, w = layer.grid
    return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


# --- Layer selection -----------------------------------------------------------------------


def _probe(model: nn.Module, image_size: int, names: list[str]) -> list[FeatureLayer]:
    """Dry forward + backward on one seeded image: every named module's spatial output whose
    positions reach the head, in the order the modules finish (deepest last)."""
    order: list[str] = []
    outputs: dict[str, list[object]] = {n: [] for n in names}

    def recorder(name: str):
        def hook(_m: nn.Module, _args: tuple, out: object) -> object:
            outputs[name].append(out)
            order.append(name)
            # downstream gets a copy: an in-place op there must not alter the recorded tensor
            return out.clone() if isinstance(out, torch.Tensor) else None

        return hook

    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 3, image_size, image_size), generator=gen, dtype=torch.float64)
    x = x.to(device=param.device, dtype=param.dtype).requires_grad_(True)
    handles = [model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
    try:
        with eval_mode(model), torch.enable_grad():
            acts = penultimate(model, x)
    finally:
        for h in handles:
            h.remove()
    found = []
    for name in dict.fromkeys(order):
        if len(outputs[name]) != 1:
            continue  # a module run twice has no single output to explain
        out = outputs[name][0]
        shape = _layout(model, name, out)
        if shape is not None and out.requires_grad:
            found.append((name, out, shape))
    if not found:
        return []
    probe = torch.randn(acts.shape, generator=gen, dtype=torch.float64).to(acts)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            (acts * probe).sum(), [out for _, out, _ in found], allow_unused=True
        )
    layers = []
    for (name, out, (layout, grid, channels)), grad in zip(found, grads, strict=True):
        spatial = grad[:, 1:] if (grad is not None and layout == "tokens") else grad
        if spatial is None or not bool(spatial.abs().amax() > 0):
            continue  # the head does not see these positions: every map would be zero
        pooled = False
        if layout != "tokens" and channels == acts.shape[1]:
            mean = out.mean(dim=(2, 3) if layout == "nchw" else (1, 2))
            tol = 1e-6 * float(acts.detach().abs().amax())  # relative: head inputs can be ~1e-8
            pooled = bool(torch.allclose(mean, acts, rtol=1e-4, atol=tol))
        layers.append(FeatureLayer(name, grid, layout, channels, pooled))
    return layers


def layer_candidates(model: nn.Module, image_size: int) -> list[FeatureLayer]:
    """The stages Grad-FAM can read, shallow to deep, with their grids at ``image_size``."""
    return _probe(model, image_size, _stage_names(model))


def select_layer(model: nn.Module, image_size: int, layer: str = "auto") -> FeatureLayer:
    """The feature map Grad-FAM differentiates.

    "auto": the deepest stage whose grid is at least 4x4 (if none is, the one with the largest
    grid, deepest first). "pooled": the map the global average pool reads (the closed form's
    layer). Anything else: that module, which must run once and output a spatial map the head
    depends on; otherwise a ValueError listing the candidates with their grids.
    """
    candidates = layer_candidates(model, image_size)
    listing = ", ".join(c.describe() for c in candidates) or "none found"
    if layer == "auto":
        if not candidates:
            raise ValueError(
                f"no spatial feature map found in {type(model).__name__}; name one in "
                "gradfam.layer (a module whose output is [N, C, h, w])"
            )
        big = [c for c in candidates if min(c.grid) >= MIN_GRID]
        if big:
            return big[-1]
        return max(reversed(candidates), key=lambda c: c.grid[0] * c.grid[1])
    if layer == "pooled":
        pooled = [c for c in candidates if c.pooled]
        if not pooled:
            raise ValueError(
                f"no feature map of {type(model).__name__} is read directly by a global "
                f"average pool; name a layer in gradfam.layer. Candidates: {listing}"
            )
        return pooled[-1]
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise ValueError(
            f"gradfam.layer={layer!r} is not a module of {type(model).__name__}; use auto or one "
            f"of: {listing}"
        )
    if layer == head_path(model):
        raise ValueError(f"gradfam.layer={layer!r} is the head; choose one of: {listing}")
    found = [c for c in _probe(model, image_size, [layer]) if c.name == layer]
    if not found:
        raise ValueError(
            f"gradfam.layer={layer!r} gives no usable feature map: its output is not a spatial "
            "[N, C, h, w] map (or ViT tokens, or a Swin grid) that the head depends on, or the "
            f"module runs more than once. Use auto or one of: {listing}"
        )
    return found[0]


def resolve_layer(model: nn.Module, image_size: int, layer: str | FeatureLayer) -> FeatureLayer:
    """``layer`` as given, or the one ``select_layer`` resolves its name to."""
    return layer if isinstance(layer, FeatureLayer) else select_layer(model, image_size, layer)


def backward_bytes_per_image(model: nn.Module, image_size: int) -> int:
    """Bytes autograd keeps from one image's forward pass for its backward pass: the state of a
    batch of two blank images less that of one (the weights, saved once, cancel). What an image
    costs in a batch of Grad-FAM or activation-maximisation passes: at 224 px a ResNet-18 keeps
    21 MiB, a ViT-B/16 113 MiB (every block's attention and MLP activations)."""

    def saved_bytes(n: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.zeros(n, 3, image_size, image_size, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            penultimate(model, x)
        return sum(seen.values())

    device = next(model.parameters()).device
    with eval_mode(model):
        return max(0, saved_bytes(2) - saved_bytes(1))


def images_per_pass(model: nn.Module, image_size: int, batch_size: int, memory_mb: int) -> int:
    """``batch_size``, lowered so that a batch's backward state fits in ``memory_mb``: peak
    memory of Grad-FAM and AM is then bounded whatever the model (at least one image)."""
    per_image = backward_bytes_per_image(model, image_size)
    return max(1, min(batch_size, (memory_mb * 2**20) // max(per_image, 1)))
