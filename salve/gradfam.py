"""Grad-FAM: Grad-CAM with the target changed from a class score to one SAE latent ``z_l``, and a
deletion test of its faithfulness.

docs/METHOD.md, "Grad-FAM". For feature ``l`` and feature maps ``A`` (C x h x w):

    w_c = mean over (h, w) of d z_l / d A[c, h, w]          map = ReLU(sum_c w_c * A[c])

Which feature map. A map is only readable if its grid resolves the object: ResNet-18's last stage
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

Two ways to compute the maps:

- ``gradfam_closed_form`` when the global average pool reads the layer directly (``pooled``): the
  head input is ``a_c = mean_hw A[c]``, so ``d z_l / d A[c, h, w] = sigma'(pre_l) * W_enc[l, c] /
  (h*w)``, constant over (h, w). All features come out of one einsum, no backward pass. It is the
  oracle the autograd version is tested against.
- autograd for any other layer: the tapped output is replaced by a fresh leaf, so backward passes
  run through the graph above the tap only. ``gradfam_autograd`` (every image x every feature)
  takes all features of a batch in one vmapped backward (``is_grads_batched``);
  ``gradfam_pairs`` (each image with its own feature) needs a single backward per batch, since in
  eval mode the samples are independent.

Faithfulness (docs/METHOD.md, "Faithfulness"): ``deletion_test`` replaces pixels by the
image's mean colour in order of decreasing saliency, in ``steps`` equal steps, records the
feature's code normalised by its unmasked value, and integrates that curve over the fraction
deleted (trapezoid rule on [0, 1]); the same with a seeded random order. A faithful map has a
clearly lower AUC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from salve.models import head_path, penultimate
from salve.modes import eval_mode
from salve.sae import SparseAutoencoder
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


def _feature_list(features: Sequence[int], d_latent: int) -> list[int]:
    feats = [int(f) for f in features]
    if not feats:
        raise ValueError("features must name at least one SAE latent")
    bad = [f for f in feats if not 0 <= f < d_latent]
    if bad:
        raise ValueError(f"features {bad[:5]} out of range for an SAE with {d_latent} latents")
    return feats


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


def _resolve(model: nn.Module, image_size: int, layer: str | FeatureLayer) -> FeatureLayer:
    return layer if isinstance(layer, FeatureLayer) else select_layer(model, image_size, layer)


# --- Maps ----------------------------------------------------------------------------------


def gradfam_closed_form(
    fmaps_nchw: torch.Tensor, sae: SparseAutoencoder, features: Sequence[int]
) -> torch.Tensor:
    """Grad-FAM maps for a global-average-pool head, all features at once: [N, F, H, W].

    ``fmaps_nchw`` are the feature maps the pool reads (ResNet: ``layer4`` output). The pooled
    activations ``mean_hw fmaps`` must be exactly what the SAE was fit on (the head input).
    """
    if fmaps_nchw.ndim != 4:
        raise ValueError(f"fmaps must be [N, C, H, W], got shape {tuple(fmaps_nchw.shape)}")
    feats = _feature_list(features, sae.W_enc.shape[0])
    _, c, h, w = fmaps_nchw.shape
    if sae.W_enc.shape[1] != c:
        raise ValueError(f"SAE reads {sae.W_enc.shape[1]} channels, feature maps have {c}")
    with torch.no_grad(), eval_mode(sae):
        acts = fmaps_nchw.mean(dim=(2, 3))
        deriv = sae.code_derivative(acts)[:, feats]  # [N, F]
        w_enc = sae.W_enc[feats]  # [F, C]
        # w_c[n, f, c] = deriv[n, f] * W_enc[f, c] / (H*W), constant over (h, w)
        weights = deriv[:, :, None] * w_enc[None] / (h * w)  # [N, F, C]
        maps = torch.einsum("nfc,nchw->nfhw", weights, fmaps_nchw)
    return torch.relu(maps)


class _Tap:
    """Replaces a module's output by a fresh leaf that requires grad, so everything downstream
    is a function of the leaf and ``torch.autograd.grad(z, leaf)`` is the gradient Grad-FAM needs
    (and backward stops there). Downstream gets a copy, so in-place ops cannot touch the leaf."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.calls = 0

    def hook(self, _m: nn.Module, _args: tuple, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"tapped output is a {type(output).__name__}, expected a tensor")
        self.calls += 1
        self.tensor = output.detach().requires_grad_(True)
        return self.tensor.clone()


@contextlib.contextmanager
def _tapped(model: nn.Module, layer: FeatureLayer) -> Iterator[_Tap]:
    tap = _Tap()
    handle = model.get_submodule(layer.name).register_forward_hook(tap.hook)
    try:
        yield tap
    finally:
        handle.remove()


def _codes_and_leaf(
    model: nn.Module, sae: SparseAutoencoder, batch: torch.Tensor, tap: _Tap
) -> tuple[torch.Tensor, torch.Tensor]:
    tap.tensor, tap.calls = None, 0
    codes = sae.encode(penultimate(model, batch))
    if tap.calls != 1 or tap.tensor is None:
        raise RuntimeError(f"the Grad-FAM tap ran {tap.calls} times in one forward, expected 1")
    return codes, tap.tensor


def _channel_weights(grad: torch.Tensor, layer: FeatureLayer) -> torch.Tensor:
    """Grad-FAM's channel weights w_c = mean over the grid of the gradient: [n, C]."""
    return to_grid(grad, layer).mean(dim=(2, 3))


def _maps_from_grads(leaf: torch.Tensor, grad: torch.Tensor, layer: FeatureLayer) -> torch.Tensor:
    """ReLU(sum_c w_c * A[c]) per sample, each with its own gradient: [n, h, w]."""
    fmaps = to_grid(leaf.detach(), layer)
    return torch.relu(torch.einsum("nc,nchw->nhw", _channel_weights(grad, layer), fmaps))


def _check_images(images_nchw: torch.Tensor) -> None:
    if images_nchw.ndim != 4:
        raise ValueError(f"images must be [N, 3, S, S], got shape {tuple(images_nchw.shape)}")


def gradfam_autograd(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features: Sequence[int],
    *,
    layer: str | FeatureLayer = "auto",
    batch_size: int = 32,
    feature_chunk: int = 64,
) -> torch.Tensor:
    """Grad-FAM maps by autograd for every image and feature: [N, F, h, w] at the layer's grid.

    Per batch: one forward, then one vmapped backward per ``feature_chunk`` features, through the
    graph above the tap only. Model and SAE are put in eval mode and restored; hooks are removed
    even when the forward or backward raises; parameter ``.grad`` fields are never touched.
    """
    feats = _feature_list(features, sae.W_enc.shape[0])
    _check_images(images_nchw)
    layer = _resolve(model, images_nchw.shape[-1], layer)
    out: list[torch.Tensor] = []
    with eval_mode(model, sae), _tapped(model, layer) as tap:
        for start in range(0, images_nchw.shape[0], batch_size):
            batch = images_nchw[start : start + batch_size]
            with torch.enable_grad():
                codes, leaf = _codes_and_leaf(model, sae, batch, tap)
                chunks = []
                for c0 in range(0, len(feats), feature_chunk):
                    part = feats[c0 : c0 + feature_chunk]
                    sel = codes[:, part]  # [n, f]
                    basis = torch.eye(len(part), dtype=sel.dtype, device=sel.device)
                    basis = basis[:, None, :].expand(len(part), *sel.shape)  # [f, n, f]
                    (grads,) = torch.autograd.grad(
                        sel,
                        leaf,
                        grad_outputs=basis,
                        is_grads_batched=True,
                        retain_graph=c0 + feature_chunk < len(feats),
                        allow_unused=True,
                    )
                    if grads is None:  # no code depends on the tapped tensor at all
                        grads = torch.zeros((len(part), *leaf.shape)).to(leaf)
                    flat = grads.reshape(-1, *leaf.shape[1:])  # [f * n, ...]
                    weights = _channel_weights(flat, layer).view(len(part), leaf.shape[0], -1)
                    fmaps = to_grid(leaf.detach(), layer)
                    chunks.append(torch.relu(torch.einsum("fnc,nchw->nfhw", weights, fmaps)))
            out.append(torch.cat(chunks, dim=1))
    return torch.cat(out, dim=0)


@torch.no_grad()
def feature_maps(
    model: nn.Module, images_nchw: torch.Tensor, layer: str | FeatureLayer = "pooled"
) -> torch.Tensor:
    """The layer's output as [N, C, h, w], in eval mode; hook removed."""
    _check_images(images_nchw)
    layer = _resolve(model, images_nchw.shape[-1], layer)
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer.name).register_forward_hook(
        lambda _m, _a, out: captured.append(out.detach())
    )
    try:
        with eval_mode(model):
            penultimate(model, images_nchw)
    finally:
        handle.remove()
    return to_grid(captured[0], layer)


def gradfam_maps(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features: Sequence[int],
    *,
    layer: str | FeatureLayer = "auto",
    batch_size: int = 32,
) -> torch.Tensor:
    """Grad-FAM maps [N, F, h, w]: the closed form (no backward pass) when the global average
    pool reads the layer directly, autograd otherwise."""
    _check_images(images_nchw)
    layer = _resolve(model, images_nchw.shape[-1], layer)
    if not layer.pooled:
        return gradfam_autograd(
            model, sae, images_nchw, features, layer=layer, batch_size=batch_size
        )
    chunks = [
        gradfam_closed_form(
            feature_maps(model, images_nchw[i : i + batch_size], layer), sae, features
        )
        for i in range(0, len(images_nchw), batch_size)
    ]
    return torch.cat(chunks)


def gradfam_pairs(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features_n: Sequence[int] | torch.Tensor,
    *,
    layer: str | FeatureLayer = "auto",
    batch_size: int = 32,
    closed_form: bool = True,
) -> torch.Tensor:
    """Each image's map for its own feature ``features_n[n]``: [N, h, w].

    Autograd needs one backward per batch: in eval mode the samples are independent, so the
    gradient of ``sum_n z_{f_n}(x_n)`` with respect to sample n's feature map is that of its own
    code. With ``closed_form`` (default) a pooled layer uses the closed form instead.
    """
    _check_images(images_nchw)
    feats = torch.as_tensor(features_n, dtype=torch.long).flatten()
    if feats.shape[0] != images_nchw.shape[0]:
        raise ValueError(f"{feats.shape[0]} features for {images_nchw.shape[0]} images")
    if feats.numel() == 0:
        raise ValueError("no images: pass at least one image and its feature")
    _feature_list(feats.tolist(), sae.W_enc.shape[0])
    layer = _resolve(model, images_nchw.shape[-1], layer)
    out: list[torch.Tensor] = []
    if closed_form and layer.pooled:
        for start in range(0, images_nchw.shape[0], batch_size):
            batch, f = images_nchw[start : start + batch_size], feats[start : start + batch_size]
            uniq, inverse = torch.unique(f, return_inverse=True)
            maps = gradfam_closed_form(feature_maps(model, batch, layer), sae, uniq.tolist())
            out.append(maps[torch.arange(len(f)), inverse])
        return torch.cat(out)
    with eval_mode(model, sae), _tapped(model, layer) as tap:
        for start in range(0, images_nchw.shape[0], batch_size):
            batch = images_nchw[start : start + batch_size]
            f = feats[start : start + batch_size].to(batch.device)
            with torch.enable_grad():
                codes, leaf = _codes_and_leaf(model, sae, batch, tap)
                own = codes.gather(1, f[:, None]).sum()
                (grad,) = torch.autograd.grad(own, leaf, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(leaf)
            out.append(_maps_from_grads(leaf, grad, layer))
    return torch.cat(out)


def upsample_normalise(maps_nfhw: torch.Tensor, size: int) -> torch.Tensor:
    """Smooth (bilinear) upsampling to ``size`` x ``size``, each map divided by its own max:
    [N, F, S, S]. Maps are expected non-negative (ReLU'd); an all-zero map stays all zero."""
    if maps_nfhw.ndim != 4:
        raise ValueError(f"maps must be [N, F, h, w], got shape {tuple(maps_nfhw.shape)}")
    up = F.interpolate(maps_nfhw, size=(size, size), mode="bilinear", align_corners=False)
    up = up.clamp_min(0)
    peak = up.amax(dim=(2, 3), keepdim=True)
    return up / torch.where(peak > 0, peak, torch.ones_like(peak))


def top_activating(
    codes_nl: torch.Tensor, feature: int, k: int, *, by: str = "value"
) -> torch.Tensor:
    """Indices of the ``k`` samples with the largest code of ``feature``, best first.

    ``by="value"`` ranks by the signed code, largest first: for a ReLU/top-k SAE these are the
    strongest activations; for the signed codes of the paper's linear SAE it is the positive
    direction only (pass ``-codes`` for the negative one). ``by="abs"`` ranks by magnitude.
    ``k`` larger than the number of samples returns all of them.
    """
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
    col = codes_nl[:, feature]
    if by == "abs":
        col = col.abs()
    k = min(int(k), col.shape[0])
    # stable tie-break by index: sort descending with a stable sort
    order = torch.sort(col, descending=True, stable=True).indices
    return order[:k]


# --- Faithfulness: the deletion test -------------------------------------------------------


def saliency_order(saliency_nhw: torch.Tensor) -> torch.Tensor:
    """Pixel indices [N, h*w] by decreasing saliency; ties in row-major pixel order."""
    flat = saliency_nhw.flatten(1)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def random_order(n: int, num_pixels: int, *, seed: int) -> torch.Tensor:
    """[n, num_pixels] independent random pixel orders from a private seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(num_pixels, generator=gen) for _ in range(n)])


def deletion_counts(num_pixels: int, steps: int) -> torch.Tensor:
    """Pixels deleted after each of ``steps`` equal steps, 0 first: round(k * P / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1)
    return (2 * k * num_pixels + steps) // (2 * steps)


def deletion_curves(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features_n: Sequence[int] | torch.Tensor,
    order_np: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Feature code of each image as its pixels are replaced by its mean colour in ``order_np``,
    divided by the unmasked code: [N, steps + 1], float64, first column 1. A row is NaN when the
    unmasked code is not positive (nothing to delete)."""
    feats = _check_deletion_inputs(images_nchw, features_n, order_np)
    counts = deletion_counts(images_nchw.shape[2] * images_nchw.shape[3], steps)
    raw = _deletion_codes(model, sae, images_nchw, feats, order_np, counts, batch_size)
    return _relative_to_unmasked(raw)


def _check_deletion_inputs(
    images_nchw: torch.Tensor, features_n: Sequence[int] | torch.Tensor, order_np: torch.Tensor
) -> torch.Tensor:
    _check_images(images_nchw)
    n, _, height, width = images_nchw.shape
    num_pixels = height * width
    feats = torch.as_tensor(features_n, dtype=torch.long).flatten()
    if feats.shape[0] != n or tuple(order_np.shape) != (n, num_pixels):
        raise ValueError(
            f"need one feature and one order of {num_pixels} pixels per image: got "
            f"{feats.shape[0]} features and orders {tuple(order_np.shape)} for {n} images"
        )
    return feats


@torch.no_grad()
def _deletion_codes(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    feats_n: torch.Tensor,
    order_np: torch.Tensor,
    counts_k: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Each image's own feature code after its first counts_k[k] pixels in ``order_np`` are
    replaced by its mean colour: [N, K], float64."""
    n, _, height, width = images_nchw.shape
    num_pixels = height * width
    steps = len(counts_k)
    device = images_nchw.device
    feats = feats_n.to(device)
    ranks = torch.empty_like(order_np)
    ranks.scatter_(1, order_np, torch.arange(num_pixels).expand(n, num_pixels).contiguous())
    ranks = ranks.to(device)
    counts = counts_k.to(device)
    fill = images_nchw.mean(dim=(2, 3), keepdim=True)  # the mean colour, per image
    total = n * steps
    values = torch.empty(total, dtype=torch.float64)
    with eval_mode(model, sae):
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=device)
            i, k = j // steps, j % steps
            deleted = (ranks[i] < counts[k][:, None]).view(-1, 1, height, width)
            x = torch.where(deleted, fill[i], images_nchw[i])
            codes = sae.encode(penultimate(model, x))
            own = codes[torch.arange(len(j), device=device), feats[i]]
            values[start : start + len(j)] = own.double().cpu()
    return values.view(n, steps)


def _relative_to_unmasked(raw_nk: torch.Tensor) -> torch.Tensor:
    z0 = raw_nk[:, :1]
    return torch.where(z0 > 0, raw_nk / torch.where(z0 > 0, z0, 1.0), torch.nan)


def deletion_auc(curves_ns: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """Trapezoid area under each curve over the fraction of pixels deleted, [0, 1]: [N]."""
    steps = curves_ns.shape[1] - 1
    fractions = deletion_counts(num_pixels, steps).double() / num_pixels
    return torch.trapezoid(curves_ns, fractions, dim=1)


@dataclass(frozen=True)
class DeletionResult:
    auc: torch.Tensor  # [N], saliency order; NaN where the unmasked code is not positive
    auc_random: torch.Tensor  # [N], seeded random order
    curves: torch.Tensor  # [N, steps + 1]
    curves_random: torch.Tensor  # [N, steps + 1]


def deletion_test(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features_n: Sequence[int] | torch.Tensor,
    saliency_nhw: torch.Tensor,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
) -> DeletionResult:
    """Deletion AUC of each image's saliency map for its own feature, and of a random order."""
    _check_images(images_nchw)
    n, _, height, width = images_nchw.shape
    if tuple(saliency_nhw.shape) != (n, height, width):
        raise ValueError(
            f"saliency must be [N, H, W] = {(n, height, width)}, got {tuple(saliency_nhw.shape)}"
        )
    num_pixels = height * width
    order = saliency_order(saliency_nhw.cpu())
    feats = _check_deletion_inputs(images_nchw, features_n, order)
    counts = deletion_counts(num_pixels, steps)
    codes = partial(_deletion_codes, model, sae, images_nchw, feats, batch_size=batch_size)
    raw = codes(order, counts)
    # Nothing deleted and everything deleted are the same images in any order: only the
    # steps between are run for the random order (2 of every 2 * (steps + 1) passes saved).
    inner = codes(random_order(n, num_pixels, seed=seed), counts[1:-1])
    raw_random = torch.cat([raw[:, :1], inner, raw[:, -1:]], dim=1)
    curves = [_relative_to_unmasked(raw), _relative_to_unmasked(raw_random)]
    return DeletionResult(
        auc=deletion_auc(curves[0], num_pixels),
        auc_random=deletion_auc(curves[1], num_pixels),
        curves=curves[0],
        curves_random=curves[1],
    )
