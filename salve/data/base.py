"""What every data source shares: the prepared-data record, its checks, the ImageNet
normalisation and the seeded, index-level splits (only the kept images are ever decoded)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from salve.errors import SalveUserError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SOURCES = ("digits", "imagenette", "cifar100", "imagefolder")
FOLDER_SOURCES = ("imagenette", "imagefolder")

logger = logging.getLogger("salve")


class DatasetError(SalveUserError, ValueError):
    """The dataset (folder, archive, images) is unusable; the message names the fix."""


@dataclass
class PreparedData:
    """A decoded dataset split: uint8 images [N,3,S,S], int64 labels, class names, metadata."""

    train_images: torch.Tensor  # uint8 [N,3,S,S]
    train_labels: torch.Tensor  # int64 [N]
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def normalise(
    images_u8: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
    std: Sequence[float] | torch.Tensor = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 [N,3,H,W] (or [3,H,W]) -> float32 `(x/255 - mean) / std` per channel.

    Refuses non-uint8 input: a float tensor would silently be scaled by 1/255 twice.
    """
    if images_u8.dtype != torch.uint8:
        raise ValueError(
            f"normalise expects uint8 images, got {images_u8.dtype}; pass the raw uint8 tensor "
            "(it divides by 255 itself)"
        )
    if images_u8.dim() not in (3, 4):
        raise ValueError(f"normalise expects [N,C,H,W] or [C,H,W], got {tuple(images_u8.shape)}")
    channels = images_u8.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images_u8.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images_u8.device).reshape(-1, 1, 1)
    if m.shape[0] not in (1, channels) or s.shape[0] not in (1, channels):
        raise ValueError(
            f"mean/std have {m.shape[0]}/{s.shape[0]} entries, images have {channels} channels"
        )
    return (images_u8.to(torch.float32) / 255.0 - m) / s


def check_prepared(data: PreparedData) -> None:
    """Raise ValueError if tensors, labels, classes or info are inconsistent.

    Catches broken sources early, before a long fine-tune fails or silently learns nonsense.
    """
    problems: list[str] = []
    k = len(data.classes)
    if k < 2:
        problems.append(f"need at least 2 classes, got {k}")
    if len(set(data.classes)) != k:
        dup = sorted(c for c, n in Counter(data.classes).items() if n > 1)
        problems.append(f"duplicate class names {dup}")
    sizes = set()
    for split in ("train", "val"):
        x = getattr(data, f"{split}_images")
        y = getattr(data, f"{split}_labels")
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            problems.append(f"{split}: images and labels must be torch tensors")
            continue
        if x.dtype != torch.uint8:
            problems.append(f"{split}_images: dtype {x.dtype}, expected torch.uint8")
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            problems.append(f"{split}_images: shape {tuple(x.shape)}, expected [N,3,S,S]")
        else:
            sizes.add(int(x.shape[-1]))
        if y.dtype != torch.int64:
            problems.append(f"{split}_labels: dtype {y.dtype}, expected torch.int64")
        if y.dim() != 1:
            problems.append(f"{split}_labels: shape {tuple(y.shape)}, expected [N]")
        elif x.dim() >= 1 and y.shape[0] != x.shape[0]:
            problems.append(f"{split}: {x.shape[0]} images but {y.shape[0]} labels")
        if y.numel() and k and (int(y.min()) < 0 or int(y.max()) >= k):
            problems.append(
                f"{split}_labels: values in [{int(y.min())}, {int(y.max())}], "
                f"expected [0, {k - 1}] for {k} classes"
            )
    if len(sizes) > 1:
        problems.append(f"train and val image sizes differ: {sorted(sizes)}")
    if not problems and data.train_labels.numel() == 0:
        problems.append("the train split is empty")
    if not problems:
        counts = torch.bincount(data.train_labels, minlength=k)
        empty = [data.classes[i] for i in range(k) if counts[i] == 0]
        if empty:
            problems.append(f"classes without train samples: {empty}")
    try:
        json.dumps(data.info, allow_nan=True)
    except (TypeError, ValueError) as exc:
        problems.append(f"info is not JSON-serialisable ({exc})")
    if problems:
        raise DatasetError(
            "prepared data is inconsistent: "
            + "; ".join(problems)
            + ". Fix the dataset (or the source's loader) and prepare it again."
        )


def check_args(
    source: str, image_size: int, val_fraction: float, max_per_class: int, min_val_per_class: int
) -> None:
    if source not in SOURCES:
        raise DatasetError(
            f"unknown data source {source!r}; set data.source to one of {list(SOURCES)}"
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"data.image_size must be a positive integer, got {image_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class < 0:
        raise DatasetError(f"data.max_per_class must be >= 0 (0 = all), got {max_per_class}")
    if min_val_per_class < 0:
        raise DatasetError(
            f"data.min_val_per_class must be >= 0 (0 = no check), got {min_val_per_class}"
        )


def common_info(
    source: str,
    image_size: int,
    seed: int,
    max_per_class: int,
    classes: list[str],
    train_labels: np.ndarray,
    val_labels: np.ndarray,
) -> dict[str, Any]:
    return {
        "source": source,
        "image_size": image_size,
        "seed": seed,
        "max_per_class": max_per_class,
        "num_classes": len(classes),
        "counts": {"train": len(train_labels), "val": len(val_labels)},
        "train_per_class": _per_class(train_labels, classes),
        "val_per_class": _per_class(val_labels, classes),
    }


def check_split_counts(
    what: str,
    classes: list[str],
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    *,
    min_val_per_class: int,
    given_split: bool,
    val_fraction: float,
) -> None:
    """Refuse classes with no train images or too few val images, before anything is decoded."""
    k = len(classes)
    train_n = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=k)
    val_n = np.bincount(np.asarray(val_labels, dtype=np.int64), minlength=k)
    no_train = [classes[i] for i in range(k) if train_n[i] == 0]
    if no_train:
        raise DatasetError(
            f"{what}: classes without train images: {some(no_train)}. Add images to them "
            "(in data.path) or remove their folders."
        )
    few = [f"{classes[i]} ({int(val_n[i])})" for i in range(k) if val_n[i] < min_val_per_class]
    if not few:
        return
    if given_split:
        fixes = (
            "add held-out images to those classes' val/ folders (in data.path), or lower "
            "data.min_val_per_class"
        )
    else:
        fixes = (
            "add images to those classes (in data.path), raise data.val_fraction (now "
            f"{val_fraction}), provide train/ and val/ folders with enough val images per class, "
            "or lower data.min_val_per_class"
        )
    raise DatasetError(
        f"{what}: {len(few)} class(es) have fewer than data.min_val_per_class="
        f"{min_val_per_class} val images (val count in brackets): {some(few)}. Their val "
        f"accuracy would be undefined (NaN) or too noisy to judge the model by. Fix: {fixes}."
    )


def some(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded `round(val_fraction * n)` go to val (>= 1 stays in train).

    Returns sorted (train, val) index arrays; the same labels and seed give the same split.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5A1E])
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(int(math.floor(val_fraction * len(idx) + 0.5)), len(idx) - 1)
        if val_fraction > 0 and len(idx) >= 2:
            n_val = max(n_val, 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    cat = np.concatenate
    return np.sort(cat(train)).astype(np.int64), np.sort(cat(val)).astype(np.int64)


def subsample_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices keeping at most `max_per_class` per class (seeded); 0 keeps all."""
    labels = np.asarray(labels)
    if max_per_class <= 0:
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng([seed, 0xCA9])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > max_per_class:
            idx = np.sort(idx[rng.permutation(len(idx))[:max_per_class]])
        keep.append(idx)
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, np.int64)


def _per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).tolist()
    return {c: int(counts[i]) if i < len(counts) else 0 for i, c in enumerate(classes)}


def override_url(default_url: str, url_override: str) -> str:
    if not url_override:
        return default_url
    if url_override.lower().split("?")[0].endswith((".tgz", ".tar.gz", ".tar", ".zip")):
        return url_override
    return url_override.rstrip("/") + "/" + default_url.rsplit("/", 1)[-1]


@dataclass
class ValCopies:
    """Val images that are byte-for-byte copies of a train image once decoded.

    A val split that repeats training images makes val accuracy a memorisation score, and
    nothing downstream can tell. Each image is reduced to a 16-byte blake2b digest as its chunk
    goes by (`add`), so a split of any size is checked while it is streamed, keeping no image.
    """

    train: dict[bytes, int] = field(default_factory=dict)  # digest -> its first train row
    val: list[bytes] = field(default_factory=list)  # digest of each val row
    train_rows: int = 0

    def add(self, split: str, images: torch.Tensor) -> None:
        """Digest a chunk of uint8 images [c,3,S,S] of `split` ("train" or "val"), in row order."""
        rows = images.contiguous().numpy()  # a view of a contiguous chunk, not a copy
        digests = [hashlib.blake2b(row, digest_size=16).digest() for row in rows]
        if split == "train":
            for row, digest in enumerate(digests, start=self.train_rows):
                self.train.setdefault(digest, row)
            self.train_rows += len(digests)
        elif split == "val":
            self.val += digests
        else:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def pairs(self) -> list[tuple[int, int]]:
        """(val row, train row) for each val image that copies a train image."""
        return [(i, self.train[d]) for i, d in enumerate(self.val) if d in self.train]

    def report(self, name: Callable[[str, int], str], fix: str) -> int:
        """The number of copies; when there are any, one warning on the "salve" logger with the
        count, a few examples (`name(split, row)` names a row) and `fix`."""
        pairs = self.pairs()
        if pairs:
            shown = ", ".join(f"{name('val', i)} = {name('train', j)}" for i, j in pairs[:3])
            logger.warning(
                "data: %d of %d val images are exact copies of train images once decoded "
                "(%s%s); val accuracy then measures memorisation, not generalisation: %s",
                len(pairs),
                len(self.val),
                shown,
                ", ..." if len(pairs) > 3 else "",
                fix,
            )
        return len(pairs)


def report_val_copies(data: PreparedData, *, chunk_size: int = 1024) -> int:
    """`ValCopies.report` for in-memory data (the array sources, whose split comes with the
    data set): the number of val images that copy a train image."""
    copies = ValCopies()
    for split in ("train", "val"):
        images = getattr(data, f"{split}_images")
        for start in range(0, len(images), chunk_size):
            copies.add(split, images[start : start + chunk_size])
    source = data.info.get("source", "this source")
    return copies.report(
        lambda split, row: f"{split} #{row}",
        f"they come with the {source} data set itself, so read its val accuracy as partly "
        "memorised",
    )
