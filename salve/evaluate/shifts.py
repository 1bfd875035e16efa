"""Held-out image styles (noise, blur, colour jitter) for the generalisation metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from salve.io import TensorRows
from salve.methods import seeded_rng

SHIFTS = ("noise", "blur", "jitter")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the usual RGB -> grey weights


def shift_images(images_u8: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """A held-out "style" of uint8 images [N, 3, S, S], for the generalisation metric.

    ``noise``: additive Gaussian, sigma = 0.1 of the range (25.5 grey levels), each image from
    its own seeded stream. ``blur``: Gaussian, sigma 1 px, radius 3, edges replicated (no
    randomness: the seed is unused). ``jitter``: per image, brightness, contrast and saturation
    factors drawn from [0.7, 1.3], applied in that order with clamping after each (contrast
    blends with the image's mean grey, saturation with each pixel's grey). Deterministic for a
    seed; pure torch; returns uint8. :class:`ShiftedRows` makes the same images batch by batch.
    """
    return ShiftedRows(images_u8, kind, seed)[:]


class ShiftedRows:
    """``shift_images`` of a split, made one row slice at a time: ``rows[a:b]`` is exactly
    ``shift_images(images)[a:b]`` (per-image noise streams; the jitter factors of every image
    drawn up front), so the images may be ``TensorRows`` and a split of any size is shifted
    with one batch in memory (``salve.activations.extract_activations`` walks row slices)."""

    def __init__(self, images_u8: torch.Tensor | TensorRows, kind: str, seed: int) -> None:
        if kind not in SHIFTS:
            raise ValueError(f"unknown shift {kind!r}; choose from {SHIFTS}")
        shape = tuple(images_u8.shape)
        if images_u8.dtype != torch.uint8 or len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"images_u8 must be uint8 [N, 3, H, W], got {images_u8.dtype} {shape}")
        self.images, self.kind, self.shape, self.dtype = images_u8, kind, shape, torch.uint8
        self._noise_seed = _seed_int(seed, "noise")
        self._factors_n3 = None
        if kind == "jitter":
            g = torch.Generator().manual_seed(_seed_int(seed, "jitter"))
            self._factors_n3 = 0.7 + 0.6 * torch.rand(shape[0], 3, generator=g, dtype=torch.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"ShiftedRows reads row slices rows[a:b] only, got {index!r}")
        lo, hi, _ = index.indices(self.shape[0])
        hi = max(lo, hi)
        x = self.images[lo:hi].to(torch.float32)
        if self.kind == "noise":
            noise = torch.empty_like(x)
            for j in range(hi - lo):
                g = torch.Generator().manual_seed(self._noise_seed + lo + j)
                noise[j] = torch.randn(x.shape[1:], generator=g, dtype=torch.float32)
            out = x + 25.5 * noise
        elif self.kind == "blur":
            out = _gaussian_blur(x, sigma=1.0, radius=3)
        else:
            out = _colour_jitter(x / 255.0, self._factors_n3[lo:hi]) * 255.0
        return out.round().clamp(0, 255).to(torch.uint8)


def _seed_int(seed: int, what: str) -> int:
    return int(seeded_rng(seed, 0, what).integers(2**62))


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), rows, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), cols, groups=c)


def _grey(x: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _colour_jitter(x: torch.Tensor, factors_n3: torch.Tensor) -> torch.Tensor:
    bright, contrast, saturation = (factors_n3[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * bright).clamp(0, 1)
    mean_grey = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean_grey).clamp(0, 1)
    return (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 1)
