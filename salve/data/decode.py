"""Image files decoded to uint8 RGB [S,S,3], in threads, in file order.

The rules (`load_image`): EXIF orientation is applied first;
16-bit grey (PIL modes I;16, I;16B, I;16L, I) is scaled to 8 bits as round(v * 255 / 65535),
mode I clipped to 0..65535 first; everything else goes through PIL's `convert("RGB")`: palette
images take their palette colours, alpha is dropped (a transparent pixel keeps its stored
colour, nothing is composited), CMYK uses PIL's plain conversion. Then the shorter side is
resized to S (bilinear) and the centre S x S is cropped.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm.auto import tqdm

from salve.data.base import DatasetError

# PIL modes holding 16-bit grey ("I" is 32-bit, but 16-bit PNG/PGM/TIFF grey decode to it too).
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def _sixteen_to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit grey, v * 255 / 65535 rounded (= round(v / 257), never a tie).

    PIL's own conversion clips at 255, which turns a 16-bit scan almost entirely white.
    """
    v = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return Image.fromarray(((v + 128) // 257).astype(np.uint8))


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to uint8 [size,size,3]: RGB, shorter side -> size, center crop.

    The module docstring gives the colour rules. JPEG `draft` lets the decoder downscale by a
    power of two while keeping both sides >= size, which makes full-size Imagenette several
    times faster to decode.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in SIXTEEN_BIT_MODES:
                img = _sixteen_to_eight_bit(img)
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except PermissionError as exc:
        raise DatasetError(
            f"{path}: permission denied reading this image ({exc.strerror}). Make it readable "
            f"(e.g. `chmod a+r '{path}'`) or remove it from data.path, then prepare again."
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path}: cannot read this image ({type(exc).__name__}: {exc}). Delete or replace "
            "the file in data.path (or re-extract the dataset) and prepare again."
        ) from exc
    if arr.shape != (size, size, 3):
        raise DatasetError(f"{path}: decoded to shape {arr.shape}, expected {(size, size, 3)}")
    return arr


def iter_decoded_images(
    files: Sequence[Path],
    size: int,
    *,
    chunk_size: int = 256,
    progress: bool = True,
    desc: str = "decode",
) -> Iterator[torch.Tensor]:
    """Yield `files` decoded as uint8 [<=chunk_size,3,size,size] chunks, in file order.

    Threads decode ahead by at most two chunks, so memory stays bounded however many files.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = len(files)
    workers = max(1, min(8, os.cpu_count() or 1))
    ahead = 2 * chunk_size
    pending: deque[Future[np.ndarray]] = deque()
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        submitted = 0
        try:
            for start in range(0, n, chunk_size):
                out = torch.empty((min(chunk_size, n - start), 3, size, size), dtype=torch.uint8)
                for i in range(len(out)):
                    while submitted < n and len(pending) < ahead:
                        pending.append(pool.submit(load_image, files[submitted], size))
                        submitted += 1
                    out[i] = torch.from_numpy(pending.popleft().result()).permute(2, 0, 1)
                    bar.update(1)
                yield out
        finally:
            for fut in pending:
                fut.cancel()


def decode_images(
    files: Sequence[Path], size: int, *, progress: bool = True, desc: str = "decode"
) -> torch.Tensor:
    """Decode `files` once each into a preallocated uint8 [N,3,size,size] (threaded, ordered)."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    start = 0
    for chunk in iter_decoded_images(files, size, progress=progress, desc=desc):
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
    return out
