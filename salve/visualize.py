"""Activation maximisation for SAE latents (batched over latents), and PNG figure helpers.

docs/METHOD.md, "Activation maximisation":

    x* = argmax_x  z_l(x) - l2 * ||x||^2 - tv * TV(x)

optimised with Adam on the image in normalised (model input) space, from small seeded noise, with a
random jitter (a circular shift of up to ``jitter`` pixels in each direction) before every forward.
The penalties act on the normalised image ``x`` (the variable being optimised); after every step
``x`` is clamped to the normalised range of valid pixels [0, 1] (``clamp_pixels``). The returned
image is de-normalised and clamped to [0, 1].

Figures use matplotlib's Agg canvas through the object-oriented API (no pyplot state, no display)
and are written with ``metadata={"Software": None}``, so the PNG bytes depend only on the input.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.figures import PNG_METADATA
from salve.models import penultimate
from salve.modes import eval_mode
from salve.sae import SparseAutoencoder


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: sum of |differences| of vertical and horizontal neighbours.

    ``x`` is [..., H, W] (e.g. [3, H, W] or [N, 3, H, W]); the sum runs over everything, so the
    value scales with the number of pixels and channels.
    """
    if x.ndim < 2:
        raise ValueError(f"total_variation needs at least [H, W], got shape {tuple(x.shape)}")
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().sum()
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().sum()
    return dv + dh


def activation_maximisation_batch(
    model: nn.Module,
    sae: SparseAutoencoder,
    features: Sequence[int],
    *,
    image_size: int = 224,
    steps: int = 256,
    lr: float = 0.05,
    l2: float = 1e-4,
    tv: float = 1e-3,
    jitter: int = 8,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    init_scale: float = 0.01,
    clamp_pixels: bool = True,
    batch_size: int = 64,
) -> torch.Tensor:
    """One image [F, 3, S, S] in [0, 1] per latent, each maximising its own latent of ``sae`` on
    ``model`` (the pre-activation, which equals the code wherever the feature is active).

    One optimisation per ``batch_size`` latents: image f's objective is its own latent's
    pre-activation minus its own penalties, and the sum over the batch is differentiated, so (in
    eval mode, where samples are independent) each image gets exactly the gradient it would get
    alone. Every image starts from the same seeded noise and every step applies the same jitter
    shift to the whole batch, the sequence a single-latent run draws from the same seed; so a
    latent's image does not depend on which other latents share its batch.

    Deterministic for a fixed seed on CPU (noise and jitter come from a private generator, the
    global RNG is untouched). The model and SAE are left as they were: their training flags are
    restored and gradients are taken with respect to the images only (no ``.grad`` is written on
    any parameter). ``steps=0`` returns the de-normalised starting noise.
    """
    feats = [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < sae.W_enc.shape[0]]
    if bad:
        raise ValueError(f"features {bad[:5]} out of range for an SAE with {sae.W_enc.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_size = getattr(model, "image_size", None)
    if isinstance(model_size, int) and model_size != image_size:
        raise ValueError(f"this model takes {model_size} px images, asked for {image_size}")
    with eval_mode(model, sae):
        chunks = [
            _maximise(
                model,
                sae,
                feats[i : i + batch_size],
                image_size=image_size,
                steps=steps,
                lr=lr,
                l2=l2,
                tv=tv,
                jitter=jitter,
                seed=seed,
                mean=mean,
                std=std,
                init_scale=init_scale,
                clamp_pixels=clamp_pixels,
            )
            for i in range(0, len(feats), batch_size)
        ]
    if not chunks:
        return torch.empty(0, 3, image_size, image_size)
    return torch.cat(chunks)


def _maximise(
    model: nn.Module,
    sae: SparseAutoencoder,
    feats: list[int],
    *,
    image_size: int,
    steps: int,
    lr: float,
    l2: float,
    tv: float,
    jitter: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    init_scale: float,
    clamp_pixels: bool,
) -> torch.Tensor:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    lo, hi = (0 - mean_t) / std_t, (1 - mean_t) / std_t
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((1, 3, image_size, image_size), generator=gen, dtype=torch.float64)
    start = (init_scale * noise).to(device=device, dtype=dtype)
    x = start.repeat(len(feats), 1, 1, 1).requires_grad_(True)
    rows = torch.arange(len(feats), device=device)
    cols = torch.tensor(feats, device=device)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(int(steps)):
        if jitter > 0:
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            x_in = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        else:
            x_in = x
        with torch.enable_grad():
            # The pre-activation, not the code: a ReLU/top-k code is 0 (no gradient) until
            # the feature fires, which from small noise it often never does. Where the
            # feature is on, the two are equal (linear SAE: always).
            z = sae.pre_activation(penultimate(model, x_in))[rows, cols]
            objective = z.sum() - l2 * x.pow(2).sum() - tv * total_variation(x)
            (grad,) = torch.autograd.grad(-objective, x)
        opt.zero_grad(set_to_none=True)
        x.grad = grad
        opt.step()
        if clamp_pixels:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return (x.detach() * std_t + mean_t).clamp(0, 1)


def activation_maximisation(
    model: nn.Module, sae: SparseAutoencoder, feature: int, **kwargs
) -> torch.Tensor:
    """The image [3, S, S] for one latent; see ``activation_maximisation_batch`` (same keywords)."""
    return activation_maximisation_batch(model, sae, [feature], **kwargs)[0]


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _hwc_float(image_chw: np.ndarray) -> np.ndarray:
    """[3, S, S] uint8 or float in [0, 1] -> [S, S, 3] float in [0, 1]."""
    if image_chw.ndim != 3 or image_chw.shape[0] != 3:
        raise ValueError(f"image must be [3, S, S], got shape {image_chw.shape}")
    arr = image_chw.astype(np.float64)
    if np.issubdtype(image_chw.dtype, np.integer):
        arr = arr / 255.0
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)


def _png_bytes(fig: Figure, dpi: int) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
    return buf.getvalue()


def overlay_rgb(
    image_chw: np.ndarray, saliency_hw: np.ndarray, *, cmap: str = "inferno", alpha: float = 0.45
) -> np.ndarray:
    """The image [S, S, 3] in [0, 1] with the heatmap blended in: at each pixel the colour of
    ``cmap`` is mixed in with weight ``alpha * saliency``. A pixel of saliency 0 is the image
    exactly, and no pixel keeps less than ``1 - alpha`` of the image, so it stays readable."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _hwc_float(image_chw)
    sal = np.clip(np.asarray(saliency_hw, dtype=np.float64), 0.0, 1.0)
    if sal.shape != rgb.shape[:2]:
        raise ValueError(f"saliency must be {rgb.shape[:2]}, got {sal.shape}")
    colour = matplotlib.colormaps[cmap](sal)[..., :3]
    weight = alpha * sal[..., None]
    return (1.0 - weight) * rgb + weight * colour


def overlay_grid_png(
    images_u8: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    cmap: str = "inferno",
    alpha: float = 0.45,
    cell_inches: float = 2.0,
    dpi: int = 100,
) -> bytes:
    """PNG of a grid of images [N, 3, S, S] (uint8) with heatmaps [N, S, S] (in [0, 1]) blended
    in by ``overlay_rgb`` (a perceptual colormap, at most ``alpha`` opaque, transparent where the
    map is 0), drawn with bilinear resampling so a coarse map does not show as blocks.

    The canvas is ``min(N, ncols) * cell_inches * dpi`` px wide and ``rows * cell_inches * dpi``
    px high (exactly: no tight bounding box).
    """
    imgs, hms = _to_numpy(images_u8), _to_numpy(maps)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, S, S], got shape {imgs.shape}")
    if hms.shape != (imgs.shape[0], *imgs.shape[2:]):
        raise ValueError(f"maps must be [N, S, S] matching the images, got shape {hms.shape}")
    n = imgs.shape[0]
    if n == 0:
        raise ValueError("no images to draw")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    cols = min(n, ncols)
    rows = -(-n // cols)
    fig = Figure(figsize=(cols * cell_inches, rows * cell_inches), dpi=dpi)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= n:
            continue
        blended = overlay_rgb(imgs[i], hms[i], cmap=cmap, alpha=alpha)
        ax.imshow(blended, interpolation="bilinear")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9 if titles else 0.99)
    return _png_bytes(fig, dpi)


def overlay_strip_png(
    images_u8: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    *,
    scale: int = 1,
    cmap: str = "inferno",
    alpha: float = 0.45,
    gap: int = 2,
) -> bytes:
    """PNG of images [N, 3, S, S] (uint8) side by side with their heatmaps [N, S, S] blended in
    (``overlay_rgb``): exactly ``S*scale`` px high and ``N*S*scale + (N-1)*gap`` px wide, white
    gaps. The image is enlarged by pixel repetition, the map bilinearly (smooth, not blocky).
    No text and no figure machinery: fast enough for one strip per SAE latent."""
    imgs, hms = _to_numpy(images_u8), _to_numpy(maps).astype(np.float64)
    if imgs.ndim != 4 or imgs.shape[1] != 3 or imgs.shape[0] == 0:
        raise ValueError(f"images must be [N, 3, S, S] with N >= 1, got shape {imgs.shape}")
    if hms.shape != (imgs.shape[0], *imgs.shape[2:]):
        raise ValueError(f"maps must be [N, S, S] matching the images, got shape {hms.shape}")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be >= 1 and gap >= 0, got scale={scale}, gap={gap}")
    height, width = imgs.shape[2] * scale, imgs.shape[3] * scale
    big_maps = torch.nn.functional.interpolate(
        torch.from_numpy(hms)[:, None], size=(height, width), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    tiles = []
    for img, hm in zip(imgs, big_maps, strict=True):
        big = img.repeat(scale, axis=1).repeat(scale, axis=2)
        tiles.append(overlay_rgb(big, hm, cmap=cmap, alpha=alpha))
        tiles.append(np.ones((height, gap, 3)))
    strip = np.concatenate(tiles[:-1], axis=1)
    buf = io.BytesIO()
    rgb_u8 = np.round(np.clip(strip, 0.0, 1.0) * 255.0).astype(np.uint8)
    matplotlib.image.imsave(buf, rgb_u8, format="png", metadata=PNG_METADATA)
    return buf.getvalue()


def image_png(image: torch.Tensor | np.ndarray, *, scale: int = 1) -> bytes:
    """PNG of one image [3, S, S] (float in [0, 1] or uint8): exactly (S*scale) x (S*scale) px.

    ``scale`` > 1 enlarges by pixel repetition (nearest neighbour), nothing is smoothed.
    """
    arr = _hwc_float(_to_numpy(image))
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    rgb_u8 = np.round(arr * 255.0).astype(np.uint8)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, rgb_u8, format="png", metadata=PNG_METADATA)
    return buf.getvalue()
