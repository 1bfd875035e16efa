"""Latent-browser strips: a latent's top images with their Grad-FAM maps, as one PNG each.

The pixels of ``salve.present.images.overlay_strip_png`` (its float64 arithmetic), composited a few
strips per tensor operation and encoded with fast zlib in two threads: a browser of thousands of
latents is written in seconds instead of minutes, with the same pixels.
"""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

CMAP, ALPHA, GAP = "inferno", 0.45, 2  # overlay_strip_png's defaults


def strip_pngs(images_u8: torch.Tensor, saliency: torch.Tensor, *, scale: int = 1) -> list[bytes]:
    """One PNG strip per row of images [B, k, 3, S, S] (uint8) and maps [B, k, S, S]: the pixels
    of ``overlay_strip_png`` (its float64 arithmetic, a few strips per tensor operation; a tile
    whose map is zero is the enlarged image, which that arithmetic returns exactly), encoded as
    RGB with fast zlib. S*scale px high, k*S*scale + (k-1)*gap wide."""
    with ThreadPoolExecutor(2) as pool:  # zlib lets go of the GIL: encode while compositing
        encoded = [pool.map(_png, group) for group in _strip_arrays(images_u8, saliency, scale)]
        return [png for pngs in encoded for png in pngs]


def _strip_arrays(images_u8: torch.Tensor, saliency: torch.Tensor, scale: int):
    """``strip_pngs``' pixels, a few strips at a time (their float64 tiles stay in cache):
    [g, h, width, 3] uint8 arrays."""
    b, k, _, s, _ = images_u8.shape
    h, group = s * scale, 4
    for g0 in range(0, b, group):
        imgs = images_u8[g0 : g0 + group].reshape(-1, 3, s, s)
        sal = saliency[g0 : g0 + group].reshape(-1, s, s)
        big = imgs.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        tiles = big.permute(0, 2, 3, 1).contiguous()  # [n, h, h, 3]
        hot = torch.nonzero(sal.flatten(1).amax(1) > 0).flatten()
        if hot.numel():
            tiles[hot] = _overlay_tiles(big[hot], sal[hot], h)
        tiles = tiles.view(-1, k, h, h, 3)
        strips = torch.full((len(tiles), h, k * h + (k - 1) * GAP, 3), 255, dtype=torch.uint8)
        for j in range(k):
            x0 = j * (h + GAP)
            strips[:, :, x0 : x0 + h] = tiles[:, j]
        yield strips.numpy()


def _overlay_tiles(big_u8: torch.Tensor, sal: torch.Tensor, h: int) -> torch.Tensor:
    """``overlay_rgb`` of enlarged images [n, 3, h, h] and their maps [n, S, S] (bilinear to h),
    rounded to uint8: [n, h, h, 3]."""
    cmap = matplotlib.colormaps[CMAP]
    lut = torch.from_numpy(cmap(np.arange(cmap.N))[:, :3].copy())  # cmap(x), x in [0, 1]
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    sal = F.interpolate(sal[:, None].double(), size=(h, h), mode="bilinear", align_corners=False)
    sal = sal[:, 0].clamp_(0.0, 1.0)
    colour = lut[(sal * cmap.N).long().clamp_(max=cmap.N - 1)]
    rgb = levels[big_u8.long()].permute(0, 2, 3, 1)
    weight = sal.mul_(ALPHA).unsqueeze(-1)
    tiles = (1.0 - weight) * rgb
    tiles += weight * colour
    return tiles.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def _png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG, every row with the Up filter, deflated at level 1: half of Pillow's
    level-1 time (which tries five filters per row) at the same size."""
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, w * 3)
    raw = np.empty((h, 1 + w * 3), dtype=np.uint8)
    raw[:, 0] = 2  # Up: each byte minus the one above it
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    idat = zlib.compress(raw.tobytes(), 1)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
