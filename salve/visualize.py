"""Activation maximisation for one SAE latent, and PNG figure helpers.

METHOD.md, "Activation maximisation":

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

from salve.models import penultimate
from salve.sae import SparseAutoencoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PNG_METADATA = {"Software": None}


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


def activation_maximisation(
    model: nn.Module,
    sae: SparseAutoencoder,
    feature: int,
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
) -> torch.Tensor:
    """The image [3, S, S] in [0, 1] that maximises latent ``feature`` of ``sae`` on ``model``
    (its pre-activation, which equals the code wherever the feature is active).

    Deterministic for a fixed seed on CPU (noise and jitter come from a private generator, the
    global RNG is untouched). The model and SAE are left as they were: their training flags are
    restored and gradients are taken with respect to the image only (no ``.grad`` is written on
    any parameter). ``steps=0`` returns the de-normalised starting noise.
    """
    if not 0 <= feature < sae.W_enc.shape[0]:
        raise ValueError(f"feature {feature} out of range for an SAE with {sae.W_enc.shape[0]}")
    model_size = getattr(model, "image_size", None)
    if model_size is not None and int(model_size) != image_size:
        raise ValueError(f"this ViT takes {model_size} px images, asked for {image_size}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    lo, hi = (0 - mean_t) / std_t, (1 - mean_t) / std_t
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((1, 3, image_size, image_size), generator=gen, dtype=torch.float64)
    x = (init_scale * noise).to(device=device, dtype=dtype).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    flags = (model.training, sae.training)
    model.eval()
    sae.eval()
    try:
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
                z = sae.pre_activation(penultimate(model, x_in))[0, feature]
                objective = z - l2 * x.pow(2).sum() - tv * total_variation(x)
                (grad,) = torch.autograd.grad(-objective, x)
            opt.zero_grad(set_to_none=True)
            x.grad = grad
            opt.step()
            if clamp_pixels:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    finally:
        model.train(flags[0])
        sae.train(flags[1])
    image = (x.detach() * std_t + mean_t).clamp(0, 1)
    return image[0]


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
    fig.savefig(buf, format="png", dpi=dpi, metadata=_PNG_METADATA)
    return buf.getvalue()


def overlay_grid_png(
    images_u8: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_inches: float = 2.0,
    dpi: int = 100,
) -> bytes:
    """PNG of a grid of images [N, 3, S, S] (uint8) with heatmaps [N, S, S] (in [0, 1]) on top.

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
        ax.imshow(_hwc_float(imgs[i]), interpolation="nearest")
        ax.imshow(
            hms[i].astype(np.float64),
            cmap=cmap,
            alpha=alpha,
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9 if titles else 0.99)
    return _png_bytes(fig, dpi)


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
    matplotlib.image.imsave(buf, rgb_u8, format="png", metadata=_PNG_METADATA)
    return buf.getvalue()
