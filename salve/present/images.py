"""Pictures as PNG bytes: one image, a strip or a grid of images with their saliency maps.

Figures use matplotlib's Agg canvas through the object-oriented API (no pyplot state, no display)
and are written with ``metadata={"Software": None}``, so the PNG bytes depend only on the input:
they are stage outputs (results/gradfam), hashed by DVC.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from salve.present.figures import PNG_METADATA


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
