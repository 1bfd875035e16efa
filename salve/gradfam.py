"""Grad-FAM: Grad-CAM with the target changed from a class score to one SAE latent ``z_l``, and a
deletion test of its faithfulness.

docs/METHOD.md, "Grad-FAM". For feature ``l`` and feature maps ``A`` (C x h x w):

    w_c = mean over (h, w) of d z_l / d A[c, h, w]          map = ReLU(sum_c w_c * A[c])

Which feature map: salve/feature_layers.py.

Two ways to compute the maps:

- ``gradfam_closed_form`` when the global average pool reads the layer directly (``pooled``): the
  head input is ``a_c = mean_hw A[c]``, so ``d z_l / d A[c, h, w] = sigma'(pre_l) * W_enc[l, c] /
  (h*w)``, constant over (h, w). All features come out of one einsum, no backward pass. It is the
  oracle the autograd version is tested against.
- autograd for any other layer: the tapped output is replaced by a fresh leaf, so backward passes
  run through the graph above the tap only. ``gradfam_autograd`` (every image x every feature)
  takes all features of a batch in one vmapped backward (``is_grads_batched``);
  ``gradfam_pairs`` (each image with its own feature) needs a single backward per batch, since in
  eval mode the samples are independent. ``gradfam_shared`` gives the same maps for many
  (image, feature) pairs with one forward pass per distinct image: the closed form pair by
  pair, or one-hot cotangents grouped by image into vmapped backward passes above the tap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from salve.feature_layers import FeatureLayer, resolve_layer, to_grid
from salve.models import penultimate
from salve.modes import eval_mode
from salve.sae import SparseAutoencoder


def _feature_list(features: Sequence[int], d_latent: int) -> list[int]:
    feats = [int(f) for f in features]
    if not feats:
        raise ValueError("features must name at least one SAE latent")
    bad = [f for f in feats if not 0 <= f < d_latent]
    if bad:
        raise ValueError(f"features {bad[:5]} out of range for an SAE with {d_latent} latents")
    return feats


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


def check_images(images_nchw: torch.Tensor) -> None:
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
    check_images(images_nchw)
    layer = resolve_layer(model, images_nchw.shape[-1], layer)
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
    check_images(images_nchw)
    layer = resolve_layer(model, images_nchw.shape[-1], layer)
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
    check_images(images_nchw)
    layer = resolve_layer(model, images_nchw.shape[-1], layer)
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
    check_images(images_nchw)
    feats = torch.as_tensor(features_n, dtype=torch.long).flatten()
    if feats.shape[0] != images_nchw.shape[0]:
        raise ValueError(f"{feats.shape[0]} features for {images_nchw.shape[0]} images")
    if feats.numel() == 0:
        raise ValueError("no images: pass at least one image and its feature")
    _feature_list(feats.tolist(), sae.W_enc.shape[0])
    layer = resolve_layer(model, images_nchw.shape[-1], layer)
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


def gradfam_shared(
    model: nn.Module,
    sae: SparseAutoencoder,
    images: torch.Tensor,
    rows_p: Sequence[int] | torch.Tensor,
    features_p: Sequence[int] | torch.Tensor,
    *,
    layer: str | FeatureLayer = "auto",
    batch_size: int = 32,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pair_rows: int = 256,
    on_hint: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maps of (image, feature) pairs, ``images[rows_p[p]]`` with ``features_p[p]``: [P, h, w].

    The maps of ``gradfam_pairs(model, sae, transform(images[rows_p]), features_p)``, with one
    forward pass per distinct image however many features it is paired with: a pooled layer
    takes the closed form from that pass; any other layer vmapped backward passes (above the
    tap), and a pair whose latent is off (``sae.support`` false, so its gradient is exactly
    zero) gets the zero map without one. ``pair_rows`` bounds the pairs (backward rows) held at
    once. ``transform`` (e.g. normalisation) is applied per batch of at most ``batch_size``
    distinct images: ``images`` may be a whole split (a tensor, or ``TensorRows``). ``on_hint``
    (bool per pair, e.g. cached codes != 0) only groups images with as many backward rows into
    a batch (a batch's backward is padded to its largest); the maps do not depend on it.
    """
    rows = torch.as_tensor(rows_p, dtype=torch.long).flatten()
    feats = torch.as_tensor(features_p, dtype=torch.long).flatten()
    if rows.shape != feats.shape:
        raise ValueError(f"{feats.shape[0]} features for {rows.shape[0]} image rows")
    if len(images.shape) != 4:
        raise ValueError(f"images must be [N, 3, S, S], got shape {tuple(images.shape)}")
    layer = resolve_layer(model, images.shape[-1], layer)
    out = torch.zeros(len(rows), *layer.grid, dtype=next(model.parameters()).dtype)
    if rows.numel() == 0:
        return out
    _feature_list(feats.unique().tolist(), sae.W_enc.shape[0])
    uniq, inverse = torch.unique(rows, return_inverse=True)
    hint = torch.ones(len(rows)) if on_hint is None else on_hint.flatten().double()
    counts = torch.bincount(inverse, weights=hint, minlength=len(uniq))
    order = torch.sort(counts, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    pair_position = position[inverse]  # each pair's image, in processing order
    start = 0
    for size in _image_batches(counts[order], batch_size):
        batch = images[uniq[order[start : start + size]]]
        batch = transform(batch) if transform is not None else batch
        mine = torch.nonzero((pair_position >= start) & (pair_position < start + size)).flatten()
        image_p = pair_position[mine] - start  # row within the batch
        if layer.pooled:
            out[mine] = _closed_form_pairs(
                model, sae, batch, image_p, feats[mine], layer, pair_rows
            )
        else:
            out[mine] = _autograd_pairs(model, sae, batch, image_p, feats[mine], layer, pair_rows)
        start += size
    return out


def _image_batches(counts: torch.Tensor, batch_size: int) -> list[int]:
    """Sizes of consecutive batches of images whose ``counts`` (backward rows, largest first)
    are within 3/4 of the batch's first, at most ``batch_size`` each; none of one image where
    that can be avoided (a batch of one may take other CPU kernels than a larger one)."""
    c, sizes, i = counts.tolist(), [], 0
    while i < len(c):
        j = i + 1
        while j < len(c) and j - i < batch_size and (j - i < 2 or 4 * c[j] >= 3 * c[i]):
            j += 1
        sizes.append(j - i)
        i = j
    if len(sizes) > 1 and sizes[-1] == 1:  # a last single image joins the batch before
        if sizes[-2] < batch_size:
            sizes[-2:] = [sizes[-2] + 1]
        elif sizes[-2] > 2:
            sizes[-2:] = [sizes[-2] - 1, 2]
    return sizes


def _closed_form_pairs(
    model: nn.Module,
    sae: SparseAutoencoder,
    batch: torch.Tensor,
    image_p: torch.Tensor,
    feats_p: torch.Tensor,
    layer: FeatureLayer,
    pair_rows: int,
) -> torch.Tensor:
    """``gradfam_closed_form`` for each pair (image ``image_p[p]`` of the batch, its feature),
    ``pair_rows`` pairs at a time."""
    fmaps = feature_maps(model, batch, layer)
    _, _, h, w = fmaps.shape
    maps = torch.empty(len(image_p), h, w, dtype=fmaps.dtype)
    with torch.no_grad(), eval_mode(sae):
        deriv = sae.code_derivative(fmaps.mean(dim=(2, 3)))
        for p0 in range(0, len(image_p), pair_rows):
            img = image_p[p0 : p0 + pair_rows].to(fmaps.device)
            f = feats_p[p0 : p0 + pair_rows].to(fmaps.device)
            weights = deriv[img, f][:, None] * sae.W_enc[f] / (h * w)  # [P, C]
            own = torch.einsum("pc,pchw->phw", weights, fmaps[img])
            maps[p0 : p0 + pair_rows] = torch.relu(own).cpu()
    return maps


def _autograd_pairs(
    model: nn.Module,
    sae: SparseAutoencoder,
    batch: torch.Tensor,
    image_p: torch.Tensor,
    feats_p: torch.Tensor,
    layer: FeatureLayer,
    pair_rows: int,
) -> torch.Tensor:
    """The pairs of one batch by autograd: one forward, then backward "slots": slot s holds each
    image's s-th active pair as a one-hot cotangent on its codes, and one vmapped backward takes
    ``pair_rows`` // batch slots."""
    maps = torch.zeros(len(image_p), *layer.grid, dtype=batch.dtype)
    with eval_mode(model, sae), _tapped(model, layer) as tap, torch.enable_grad():
        tap.tensor, tap.calls = None, 0
        pre = sae.pre_activation(penultimate(model, batch))
        codes, leaf = sae.codes_from_pre(pre), tap.tensor
        if tap.calls != 1 or leaf is None:
            raise RuntimeError(f"the Grad-FAM tap ran {tap.calls} times in one forward, expected 1")
        device = codes.device
        on = sae.support(pre.detach())[image_p.to(device), feats_p.to(device)].cpu()
        active = torch.nonzero(on).flatten()
        if active.numel() == 0:
            return maps
        # each active pair's slot: its rank among the active pairs of its image
        key = image_p[active]
        by_image = torch.sort(key, stable=True).indices
        slots = torch.empty_like(key)
        slots[by_image] = torch.arange(len(key)) - torch.searchsorted(key[by_image], key[by_image])
        n_slots = int(slots.max()) + 1
        per = max(1, pair_rows // batch.shape[0])
        fmaps = to_grid(leaf.detach(), layer)
        for s0 in range(0, n_slots, per):
            s1 = min(s0 + per, n_slots)
            chosen = (slots >= s0) & (slots < s1)
            sel, s = active[chosen], (slots[chosen] - s0).to(device)
            img, f = image_p[sel].to(device), feats_p[sel].to(device)
            basis = torch.zeros((s1 - s0, *codes.shape), dtype=codes.dtype, device=device)
            basis[s, img, f] = 1.0
            (grads,) = torch.autograd.grad(
                codes,
                leaf,
                grad_outputs=basis,
                is_grads_batched=True,
                retain_graph=s1 < n_slots,
                allow_unused=True,
            )
            if grads is None:  # no code depends on the tapped tensor: every map is zero
                continue
            weights = _channel_weights(grads[s, img], layer)
            own = torch.relu(torch.einsum("nc,nchw->nhw", weights, fmaps[img]))
            maps[sel] = own.detach().cpu().to(maps.dtype)
    return maps


def upsample_normalise(maps_nfhw: torch.Tensor, size: int) -> torch.Tensor:
    """Smooth (bilinear) upsampling to ``size`` x ``size``, each map divided by its own max:
    [N, F, S, S]. Maps are expected non-negative (ReLU'd); an all-zero map stays all zero."""
    if maps_nfhw.ndim != 4:
        raise ValueError(f"maps must be [N, F, h, w], got shape {tuple(maps_nfhw.shape)}")
    up = F.interpolate(maps_nfhw, size=(size, size), mode="bilinear", align_corners=False)
    up = up.clamp_min(0)
    peak = up.amax(dim=(2, 3), keepdim=True)
    return up / torch.where(peak > 0, peak, torch.ones_like(peak))
