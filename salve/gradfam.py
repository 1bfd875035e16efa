"""Grad-FAM: Grad-CAM with the target changed from a class score to one SAE latent ``z_l``.

METHOD.md, "Grad-FAM". For feature ``l`` and feature maps ``A`` (C x H x W):

    w_c = mean over (h, w) of d z_l / d A[c, h, w]          map = ReLU(sum_c w_c * A[c])

Two implementations:

- ``gradfam_closed_form`` for a global-average-pool head (ResNet): the pooled activations are
  ``a_c = mean_hw A[c]``, so ``d z_l / d A[c, h, w] = sigma'(pre_l) * W_enc[l, c] / (H*W)``, a
  constant over (h, w). All features come out of one einsum, no backward pass. This is the oracle
  the autograd version is tested against.
- ``gradfam_autograd`` for any backbone: one forward with a hook on the tapped module, then one
  ``torch.autograd.grad`` per feature (summed over the batch: samples are independent).

ViT tap. The backbone's head reads the class token after the final encoder LayerNorm. LayerNorm
acts per token, so that class token depends on the *output* tokens of the last encoder block only
through their class token: the gradient with respect to the last block's output patch tokens is
exactly zero and a map taken there is all zero (``tests/test_gradfam.py`` checks this). Gradients
reach the patch tokens only through an attention layer, so by default (``vit_tap="block_input"``)
the tokens are the *input* of the last encoder block (the residual stream after the second-to-last
block; its attention mixes the patches into the class token). ``vit_tap="block_ln1"`` taps the
last block's first LayerNorm output instead (the common ``blocks[-1].norm1`` choice of the
pytorch-grad-cam ViT recipe); ``vit_tap="block_output"`` is the degenerate output tap, kept for
the check. The class token is always stripped and the patch grid is derived from
``model.image_size // model.patch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from salve.models import arch_of, feature_map_module, penultimate
from salve.sae import SparseAutoencoder

VIT_TAPS = ("block_input", "block_ln1", "block_output")


def _feature_list(features: Sequence[int], d_latent: int) -> list[int]:
    feats = [int(f) for f in features]
    if not feats:
        raise ValueError("features must name at least one SAE latent")
    bad = [f for f in feats if not 0 <= f < d_latent]
    if bad:
        raise ValueError(f"features {bad} out of range for an SAE with {d_latent} latents")
    return feats


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
    with torch.no_grad(), _eval_mode(sae):
        acts = fmaps_nchw.mean(dim=(2, 3))
        deriv = sae.code_derivative(acts)[:, feats]  # [N, F]
        w_enc = sae.W_enc[feats]  # [F, C]
        # w_c[n, f, c] = deriv[n, f] * W_enc[f, c] / (H*W), constant over (h, w)
        weights = deriv[:, :, None] * w_enc[None] / (h * w)  # [N, F, C]
        maps = torch.einsum("nfc,nchw->nfhw", weights, fmaps_nchw)
    return torch.relu(maps)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode; restore each one's own training flag afterwards."""
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


class _Tap:
    """Captures a module's output (or input) as a fresh leaf that requires grad.

    The captured tensor replaces the original in the forward, so everything downstream is a
    function of the leaf and ``torch.autograd.grad(z, leaf)`` is the gradient Grad-FAM needs.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def _leaf(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"tapped value is a {type(x).__name__}, expected a tensor")
        leaf = x.detach().requires_grad_(True)
        self.tensor = leaf
        return leaf

    def output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._leaf(output)

    def input_hook(self, module: nn.Module, args: tuple) -> tuple:
        if not args:
            raise RuntimeError("tapped module was called without positional input")
        return (self._leaf(args[0]), *args[1:])


def _register_tap(model: nn.Module, vit_tap: str) -> tuple[_Tap, torch.utils.hooks.RemovableHandle]:
    tap = _Tap()
    module = feature_map_module(model)
    if arch_of(model) == "resnet18":
        return tap, module.register_forward_hook(tap.output_hook)
    if vit_tap not in VIT_TAPS:
        raise ValueError(f"unknown vit_tap {vit_tap!r}; allowed: {', '.join(VIT_TAPS)}")
    if vit_tap == "block_input":
        return tap, module.register_forward_pre_hook(tap.input_hook)
    if vit_tap == "block_ln1":
        return tap, module.ln_1.register_forward_hook(tap.output_hook)
    return tap, module.register_forward_hook(tap.output_hook)


def vit_grid(model: nn.Module) -> int:
    """Side of the ViT patch grid, from the model's own image and patch size."""
    image_size, patch_size = int(model.image_size), int(model.patch_size)
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    return image_size // patch_size


def gradfam_autograd(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features: Sequence[int],
    *,
    batch_size: int = 32,
    vit_tap: str = "block_input",
) -> torch.Tensor:
    """Grad-FAM maps by autograd: [N, F, h, w] (ResNet: layer4's H x W; ViT: the g x g grid).

    Model and SAE are put in eval mode and restored; hooks are removed even when the forward or
    backward raises; parameter ``.grad`` fields are never touched. Maps are on the images' device,
    in the model's dtype, not upsampled (see ``upsample_normalise``).
    """
    feats = _feature_list(features, sae.W_enc.shape[0])
    if images_nchw.ndim != 4:
        raise ValueError(f"images must be [N, 3, S, S], got shape {tuple(images_nchw.shape)}")
    is_vit = arch_of(model) != "resnet18"
    out: list[torch.Tensor] = []
    with _eval_mode(model, sae):
        tap, handle = _register_tap(model, vit_tap)
        try:
            for start in range(0, images_nchw.shape[0], batch_size):
                batch = images_nchw[start : start + batch_size]
                out.append(_gradfam_batch(model, sae, batch, feats, tap, is_vit))
        finally:
            handle.remove()
    return torch.cat(out, dim=0)


def _gradfam_batch(
    model: nn.Module,
    sae: SparseAutoencoder,
    batch: torch.Tensor,
    feats: list[int],
    tap: _Tap,
    is_vit: bool,
) -> torch.Tensor:
    tap.tensor = None
    with torch.enable_grad():
        codes = sae.encode(penultimate(model, batch))  # [n, L]
        acts = tap.tensor
        if acts is None:
            raise RuntimeError("the Grad-FAM hook did not fire during the forward pass")
        if is_vit:
            g = vit_grid(model)
            if acts.shape[1] - 1 != g * g:
                raise RuntimeError(f"{acts.shape[1] - 1} patch tokens do not form a {g}x{g} grid")
        weights = []  # per feature: the gradient averaged over positions, [n, C] or [n, D]
        for i, f in enumerate(feats):
            (grad,) = torch.autograd.grad(
                codes[:, f].sum(), acts, retain_graph=i < len(feats) - 1, allow_unused=True
            )
            if grad is None:  # the code does not depend on the tapped tensor at all
                grad = torch.zeros_like(acts)
            # CNN: mean over (h, w); ViT: mean over the patch tokens, class token stripped
            weights.append(grad[:, 1:].mean(dim=1) if is_vit else grad.mean(dim=(2, 3)))
    weights_t = torch.stack(weights, dim=1)  # [n, F, C] or [n, F, D]
    acts = acts.detach()
    if not is_vit:
        return torch.relu(torch.einsum("nfc,nchw->nfhw", weights_t, acts))
    patches = acts[:, 1:]  # strip the class token: [n, P, D]
    maps = torch.relu(torch.einsum("nfd,npd->nfp", weights_t, patches))
    return maps.reshape(maps.shape[0], maps.shape[1], g, g)


def upsample_normalise(maps_nfhw: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling to ``size`` x ``size``, each map divided by its own max: [N, F, S, S].

    Maps are expected non-negative (ReLU'd); a map that is all zero stays all zero.
    """
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


@torch.no_grad()
def feature_maps(model: nn.Module, images_nchw: torch.Tensor) -> torch.Tensor:
    """The output of `feature_map_module(model)` (ResNet layer4), in eval mode; hook removed."""
    captured: list[torch.Tensor] = []
    handle = feature_map_module(model).register_forward_hook(
        lambda _m, _a, out: captured.append(out.detach())
    )
    try:
        with _eval_mode(model):
            penultimate(model, images_nchw)
    finally:
        handle.remove()
    return captured[0]


def gradfam_maps(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features: Sequence[int],
    *,
    batch_size: int = 32,
    vit_tap: str = "block_input",
) -> torch.Tensor:
    """Grad-FAM maps [N, F, h, w]: the closed form for pooled CNN heads (no backward pass),
    autograd for ViT, whose gradients flow through attention."""
    if arch_of(model) == "resnet18":
        chunks = [
            gradfam_closed_form(feature_maps(model, images_nchw[i : i + batch_size]), sae, features)
            for i in range(0, len(images_nchw), batch_size)
        ]
        return torch.cat(chunks)
    return gradfam_autograd(
        model, sae, images_nchw, features, batch_size=batch_size, vit_tap=vit_tap
    )
