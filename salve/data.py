"""Dataset sources, decoded once into uint8 tensors with a fixed train/val split.

Every source (scikit-learn digits, Imagenette, CIFAR-100, any image folder) ends as the same
`PreparedData`: square uint8 images [N, 3, S, S], int64 labels, class names and a JSON-able info
dict. Decoding happens once, here; training and extraction only normalise batches.

Folder sources are planned first (`plan_image_files`: file lists, labels and split, checked,
nothing decoded), then decoded in chunks (`ImageFilePlan.chunks`), so a dataset of any size can
be streamed into a file (`salve.io.TensorFileWriter`) with bounded memory.

How an image file becomes uint8 RGB (`load_image`): EXIF orientation is applied first;
16-bit grey (PIL modes I;16, I;16B, I;16L, I) is scaled to 8 bits as round(v * 255 / 65535),
mode I clipped to 0..65535 first; everything else goes through PIL's `convert("RGB")`: palette
images take their palette colours, alpha is dropped (a transparent pixel keeps its stored
colour, nothing is composited), CMYK uses PIL's plain conversion. Then the shorter side is
resized to S (bilinear) and the centre S x S is cropped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import stat
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tqdm.auto import tqdm

from salve.download import download_file, safe_extract
from salve.io import read_json, write_json

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

logger = logging.getLogger("salve")

SOURCES = ("digits", "imagenette", "cifar100", "imagefolder")
FOLDER_SOURCES = ("imagenette", "imagefolder")

# fast.ai's Imagenette archives (same URLs and MD5s as torchvision.datasets.Imagenette).
IMAGENETTE_ARCHIVES: dict[str, tuple[str, str]] = {
    "full": (
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
        "fe2fc210e6bb7c5664d602c3cd71e612",
    ),
    "320px": (
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
        "3df6f0d01a2c9592104656642f5e78a3",
    ),
    "160px": (
        "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
        "e793b78cc4c9e9a4ccc0c1155377a412",
    ),
}
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_EXTRACT_MARKER = ".salve_extracted.json"
# PIL modes holding 16-bit grey ("I" is 32-bit, but 16-bit PNG/PGM/TIFF grey decode to it too).
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# What the folder scan reports (info keys; fetch copies them into its metrics).
SCAN_KEYS = ("skipped_hidden", "nested_images", "non_image_files", "images_outside_classes")


class DatasetError(ValueError):
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


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


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


def _check_args(
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


def prepare_dataset(
    source: str,
    *,
    image_size: int,
    raw_dir: Path,
    variant: str = "160px",
    path: str = "",
    val_fraction: float = 0.2,
    max_per_class: int = 0,
    min_val_per_class: int = 1,
    seed: int = 0,
    url_override: str = "",
    archive: tuple[str, str] | None = None,
    progress: bool = True,
) -> PreparedData:
    """Load `source`, decode it once to uint8 [N,3,S,S] and split it deterministically.

    - digits: scikit-learn's 8x8 digits (offline), stratified split by `val_fraction`/`seed`.
    - imagenette: fast.ai archive `variant` downloaded to `raw_dir` (MD5-checked), its train/val.
      `url_override` is a mirror base URL (the archive file name is appended) or a full URL;
      `archive=(url, md5)` replaces both URL and checksum (tests, private mirrors).
    - cifar100: CIFAR-100 train/test from `raw_dir` (downloaded if missing).
    - imagefolder: `path` with one folder per class, or train/ and val/ each holding them.
    `max_per_class` > 0 keeps at most that many train images per class (seeded). A class with
    fewer than `min_val_per_class` val images is refused (its val accuracy would be NaN or
    noise); 0 turns the check off.
    """
    _check_args(source, image_size, val_fraction, max_per_class, min_val_per_class)
    raw_dir = Path(raw_dir)
    if source in FOLDER_SOURCES:
        plan = plan_image_files(
            source,
            image_size=image_size,
            raw_dir=raw_dir,
            variant=variant,
            path=path,
            val_fraction=val_fraction,
            max_per_class=max_per_class,
            min_val_per_class=min_val_per_class,
            seed=seed,
            url_override=url_override,
            archive=archive,
            progress=progress,
        )
        data = plan.decode(progress=progress)
    else:
        opts = {
            "image_size": image_size,
            "val_fraction": val_fraction,
            "max_per_class": max_per_class,
            "seed": seed,
            "progress": progress,
        }
        if source == "digits":
            data = _prepare_digits(**opts)
        else:
            data = _prepare_cifar100(
                raw_dir=raw_dir, url_override=url_override, archive=archive, **opts
            )
        train_y, val_y = data.train_labels.numpy(), data.val_labels.numpy()
        _check_split_counts(
            source,
            data.classes,
            train_y,
            val_y,
            min_val_per_class=min_val_per_class,
            given_split=source == "cifar100",
            val_fraction=val_fraction,
        )
        data.info.update(
            _common_info(source, image_size, seed, max_per_class, data.classes, train_y, val_y)
        )
    check_prepared(data)
    return data


def _common_info(
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


@dataclass
class ImageFilePlan:
    """A folder dataset split into file lists with labels, checked, nothing decoded yet.

    The order of `train_files`/`val_files` is the order of the decoded rows: the same files
    give the same bytes, whether decoded at once (`decode`) or streamed (`chunks`).
    """

    image_size: int
    classes: list[str]
    train_files: list[Path]
    train_labels: np.ndarray  # int64 [N]
    val_files: list[Path]
    val_labels: np.ndarray
    info: dict[str, Any]  # JSON-able; the same dict `decode` puts in PreparedData.info

    def split(self, split: str) -> tuple[list[Path], np.ndarray]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return getattr(self, f"{split}_files"), getattr(self, f"{split}_labels")

    def tensor_specs(self, split: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The split's tensors as `salve.io.TensorFileWriter` specs: images and labels."""
        n, s = len(self.split(split)[0]), self.image_size
        return {"images": (torch.uint8, (n, 3, s, s)), "labels": (torch.int64, (n,))}

    def chunks(
        self, split: str, *, chunk_size: int = 256, progress: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images [c,3,S,S], int64 labels [c]) in file order, `chunk_size` at once."""
        files, labels = self.split(split)
        y = torch.as_tensor(labels, dtype=torch.int64)
        start = 0
        for images in iter_decoded_images(
            files, self.image_size, chunk_size=chunk_size, progress=progress, desc=f"decode {split}"
        ):
            yield images, y[start : start + len(images)]
            start += len(images)

    def decode(self, *, progress: bool = True) -> PreparedData:
        """Every image decoded into memory (small datasets, tests)."""
        size = self.image_size
        return PreparedData(
            train_images=decode_images(
                self.train_files, size, progress=progress, desc="decode train"
            ),
            train_labels=torch.as_tensor(self.train_labels, dtype=torch.int64),
            val_images=decode_images(self.val_files, size, progress=progress, desc="decode val"),
            val_labels=torch.as_tensor(self.val_labels, dtype=torch.int64),
            classes=list(self.classes),
            info=copy.deepcopy(self.info),  # PreparedData.info may be edited; the plan stays
        )


def plan_image_files(
    source: str,
    *,
    image_size: int,
    raw_dir: Path,
    variant: str = "160px",
    path: str = "",
    val_fraction: float = 0.2,
    max_per_class: int = 0,
    min_val_per_class: int = 1,
    seed: int = 0,
    url_override: str = "",
    archive: tuple[str, str] | None = None,
    progress: bool = True,
) -> ImageFilePlan:
    """Scan (and, for imagenette, download) a folder source into a checked `ImageFilePlan`.

    Same arguments and rules as `prepare_dataset`. What the scan skipped (hidden entries,
    non-image files, images outside class folders) or relabelled (images in nested sub-folders
    take their top class folder's label) is logged once at WARNING on the "salve" logger and
    recorded in `info` (`SCAN_KEYS` and `data_notes`).
    """
    _check_args(source, image_size, val_fraction, max_per_class, min_val_per_class)
    if source not in FOLDER_SOURCES:
        raise DatasetError(
            f"source {source!r} is not a folder of image files; use prepare_dataset for it"
        )
    opts = {
        "image_size": image_size,
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "min_val_per_class": min_val_per_class,
        "seed": seed,
    }
    if source == "imagefolder":
        plan = _plan_imagefolder(path=path, **opts)
    else:
        plan = _plan_imagenette(
            raw_dir=Path(raw_dir),
            variant=variant,
            url_override=url_override,
            archive=archive,
            progress=progress,
            **opts,
        )
    plan.info.update(
        _common_info(
            source,
            image_size,
            seed,
            max_per_class,
            plan.classes,
            plan.train_labels,
            plan.val_labels,
        )
    )
    if plan.info["data_notes"]:
        logger.warning("%s", plan.info["data_notes"])
    return plan


def _check_split_counts(
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
            f"{what}: classes without train images: {_some(no_train)}. Add images to them "
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
        f"{min_val_per_class} val images (val count in brackets): {_some(few)}. Their val "
        f"accuracy would be undefined (NaN) or too noisy to judge the model by. Fix: {fixes}."
    )


def _some(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Splits and subsampling (index level, so only the kept images are ever decoded)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Array sources: digits, CIFAR-100
# --------------------------------------------------------------------------------------------


def resize_array(images: torch.Tensor, size: int, *, chunk: int = 512) -> torch.Tensor:
    """[N,C,H,W] (uint8 or float on the 0..255 scale) -> uint8 [N,C,size,size], bilinear+AA."""
    n, c = images.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start : start + chunk].to(torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        out[start : start + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _from_arrays(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    *,
    classes: list[str],
    image_size: int,
    max_per_class: int,
    seed: int,
    info: dict[str, Any],
) -> PreparedData:
    keep = subsample_per_class(train_y, max_per_class, seed)
    return PreparedData(
        train_images=resize_array(train_x[torch.from_numpy(keep)], image_size),
        train_labels=torch.as_tensor(np.asarray(train_y)[keep], dtype=torch.int64),
        val_images=resize_array(val_x, image_size),
        val_labels=torch.as_tensor(np.asarray(val_y), dtype=torch.int64),
        classes=classes,
        info=info,
    )


def _prepare_digits(
    *, image_size: int, val_fraction: float, max_per_class: int, seed: int, progress: bool
) -> PreparedData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255, grey -> 3 identical channels; kept float until after the resize.
    x = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0))
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    y = digits.target.astype(np.int64)
    tr, va = stratified_split(y, val_fraction, seed)
    return _from_arrays(
        x[torch.from_numpy(tr)],
        y[tr],
        x[torch.from_numpy(va)],
        y[va],
        classes=[str(i) for i in range(10)],
        image_size=image_size,
        max_per_class=max_per_class,
        seed=seed,
        info={
            "variant": "sklearn-8x8",
            "split": "stratified",
            "val_fraction": val_fraction,
            "native_size": 8,
            "resize": "bilinear, antialias (torch)",
        },
    )


def _nhwc_to_nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _prepare_cifar100(
    *,
    raw_dir: Path,
    url_override: str,
    archive: tuple[str, str] | None,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    seed: int,
    progress: bool,
) -> PreparedData:
    from salve.tv import import_torchvision

    cifar_cls = import_torchvision().datasets.CIFAR100
    url, md5 = archive or (_override_url(cifar_cls.url, url_override), cifar_cls.tgz_md5)
    try:
        train = cifar_cls(str(raw_dir), train=True, download=False)
    except RuntimeError:  # missing or corrupted: fetch with our retrying, checked downloader
        tgz = raw_dir / Path(url.split("?")[0]).name
        download_file(url, tgz, md5=md5, progress=progress)
        staging = raw_dir / ".cifar100.extract"
        safe_extract(tgz, staging)
        dest = raw_dir / cifar_cls.base_folder
        if not (staging / cifar_cls.base_folder).is_dir():
            raise DatasetError(
                f"{tgz}: no {cifar_cls.base_folder}/ folder inside; delete it (in data.path) "
                "and retry"
            ) from None
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging / cifar_cls.base_folder, dest)
        shutil.rmtree(staging, ignore_errors=True)
        train = cifar_cls(str(raw_dir), train=True, download=False)
    test = cifar_cls(str(raw_dir), train=False, download=False)
    return _from_arrays(
        _nhwc_to_nchw(train.data),
        np.asarray(train.targets, dtype=np.int64),
        _nhwc_to_nchw(test.data),
        np.asarray(test.targets, dtype=np.int64),
        classes=list(train.classes),
        image_size=image_size,
        max_per_class=max_per_class,
        seed=seed,
        info={
            "variant": "cifar-100 fine labels",
            "split": "given (train / test as val)",
            "url": url,
            "md5": md5,
            "native_size": 32,
            "resize": "bilinear, antialias (torch)",
        },
    )


# --------------------------------------------------------------------------------------------
# Decoding image files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Scanning folders: class folders, what is skipped and why (reported, never silent)
# --------------------------------------------------------------------------------------------


@dataclass
class _ScanNotes:
    """What a folder scan skipped or relabelled, for one warning line and the info dict."""

    base: Path
    hidden_folders: list[str] = field(default_factory=list)
    hidden_files: int = 0
    nested_images: int = 0
    non_image_files: int = 0
    outside_classes: list[str] = field(default_factory=list)  # images in no class folder
    ignored_folders: list[str] = field(default_factory=list)  # beside train/ and val/
    symlinked_folders: list[str] = field(default_factory=list)  # inside class folders

    def rel(self, p: Path | str) -> str:
        try:
            return str(Path(p).relative_to(self.base))
        except ValueError:
            return str(p)

    def summary(self, what: str) -> str:
        parts = []
        hidden = []
        if self.hidden_folders:
            hidden.append(_count(len(self.hidden_folders), "hidden folder", self.hidden_folders))
        if self.hidden_files:
            hidden.append(_count(self.hidden_files, "hidden file"))
        if hidden:
            parts.append("skipped " + ", ".join(hidden))
        if self.nested_images:
            parts.append(
                _count(self.nested_images, "image")
                + " in nested sub-folders were labelled with their top class folder"
            )
        if self.non_image_files:
            parts.append(
                f"ignored {_count(self.non_image_files, 'non-image file')} in class folders "
                "(an image needs one of the extensions " + " ".join(sorted(IMAGE_EXTENSIONS)) + ")"
            )
        if self.outside_classes:
            n = len(self.outside_classes)
            parts.append(
                f"ignored {_count(n, 'image')} outside any class folder "
                f"({_some(self.outside_classes, 5)})"
            )
        if self.ignored_folders:
            n = len(self.ignored_folders)
            parts.append(
                f"ignored {_count(n, 'folder')} beside train/ and val/ "
                f"({_some(self.ignored_folders, 5)})"
            )
        if self.symlinked_folders:
            links = self.symlinked_folders
            parts.append("did not follow " + _count(len(links), "symlinked sub-folder", links))
        return f"{what}: " + "; ".join(parts) if parts else ""

    def info(self, what: str) -> dict[str, Any]:
        return {
            "skipped_hidden": len(self.hidden_folders) + self.hidden_files,
            "hidden_folders": self.hidden_folders[:20],
            "nested_images": self.nested_images,
            "non_image_files": self.non_image_files,
            "images_outside_classes": len(self.outside_classes),
            "data_notes": self.summary(what),
        }


def _count(n: int, noun: str, names: Sequence[str] = ()) -> str:
    text = f"{n} {noun}{'' if n == 1 else 's'}"
    if names:
        text += f" ({_some(list(names), 5)})"
    return text


def _permission_error(what: str, kind: str, path: Path, exc: OSError) -> DatasetError:
    return DatasetError(
        f"{what}: permission denied reading the {kind} {path} ({exc.strerror}); it is under "
        f"data.path. Make it readable by this user (e.g. `chmod -R a+rX '{path}'`) or set "
        "data.path to a folder you can read."
    )


def _list_dir(folder: Path, *, what: str, kind: str = "folder") -> list[os.DirEntry[str]]:
    """The entries of `folder` sorted by name; unreadable folders are a clear DatasetError."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as exc:
        raise _permission_error(what, kind, folder, exc) from exc
    except OSError as exc:
        raise DatasetError(
            f"{what}: cannot list the {kind} {folder} ({exc}). Check the disk or mount, or set "
            "data.path to another folder."
        ) from exc


def _is_dir(entry: os.DirEntry[str], *, follow: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path, *, what: str, notes: _ScanNotes) -> list[Path]:
    """Non-hidden sub-folders of `root` (symlinks to folders count), sorted by name.

    Hidden folders are noted; image files lying directly in `root` are noted (they belong to no
    class); other plain files there (README, .gitignore, DVC files) are not data and pass quietly.
    """
    out = []
    for e in _list_dir(root, what=what):
        if _is_dir(e):
            if e.name.startswith("."):
                notes.hidden_folders.append(notes.rel(e.path))
            else:
                out.append(Path(e.path))
        elif not e.name.startswith(".") and _is_file(e) and _is_image_name(e.name):
            notes.outside_classes.append(notes.rel(e.path))
    return out


def _class_images(class_dir: Path, *, what: str, notes: _ScanNotes) -> list[Path]:
    """Every image under `class_dir` (any depth), sorted; hidden entries are skipped.

    Symlinked sub-folders are not followed (no cycles), files behind symlinks are read.
    """
    files: list[Path] = []
    stack = [(class_dir, 0)]
    while stack:
        folder, depth = stack.pop()
        kind = "class folder" if depth == 0 else "folder"
        for e in _list_dir(folder, what=what, kind=kind):
            if _is_dir(e, follow=False):
                if e.name.startswith("."):
                    notes.hidden_folders.append(notes.rel(e.path))
                else:
                    stack.append((Path(e.path), depth + 1))
            elif _is_dir(e):
                notes.symlinked_folders.append(notes.rel(e.path))
            elif e.name.startswith("."):
                notes.hidden_files += 1
            elif not _is_file(e):
                continue  # a broken link, a socket: not data
            elif _is_image_name(e.name):
                files.append(Path(e.path))
                notes.nested_images += depth > 0
            else:
                notes.non_image_files += 1
    return sorted(files)


def _scan(
    class_dirs: list[Path], *, what: str, notes: _ScanNotes, allow_empty: bool = False
) -> dict[str, list[Path]]:
    """{class folder name: sorted image files}; empty class folders are an error."""
    out = {}
    for d in class_dirs:
        files = _class_images(d, what=what, notes=notes)
        if not files and not allow_empty:
            raise DatasetError(
                f"{what}: class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
                " Add images or remove the folder (it is under data.path)."
            )
        out[d.name] = files
    return out


def _need_two(folders: list[str], root: Path, what: str) -> list[str]:
    if len(folders) < 2:
        raise DatasetError(
            f"{what}: {root} has {len(folders)} class folder(s) {folders}; need at least 2 "
            "(one sub-folder per class, each holding that class's images). Set data.path to "
            "such a folder."
        )
    return folders


def _folder_plan(
    root: Path,
    *,
    what: str,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    min_val_per_class: int,
    seed: int,
    names: dict[str, str] | None = None,
    require_split: bool = False,
) -> ImageFilePlan:
    """Shared planner for image-folder layouts (given train/val, or one folder to split)."""
    notes = _ScanNotes(base=root)
    train_dir, val_dir = root / "train", root / "val"
    top = _class_dirs(root, what=what, notes=notes)
    has_train, has_val = train_dir in top, val_dir in top
    if has_train and has_val:
        notes.ignored_folders = [d.name for d in top if d not in (train_dir, val_dir)]
        train_map = _scan(_class_dirs(train_dir, what=what, notes=notes), what=what, notes=notes)
        val_map = _scan(
            _class_dirs(val_dir, what=what, notes=notes), what=what, notes=notes, allow_empty=True
        )
        extra = sorted(set(val_map) - set(train_map))
        if extra:
            raise DatasetError(
                f"{what}: {val_dir} has class folders {extra} that {train_dir} lacks; "
                "train/ and val/ must hold the same class folders (fix them in data.path)."
            )
        folders = _need_two(sorted(train_map), train_dir, what)
        index = {f: i for i, f in enumerate(folders)}
        tr_files = [p for f in folders for p in train_map[f]]
        tr_y = np.array([index[f] for f in folders for _ in train_map[f]], dtype=np.int64)
        va_files = [p for f in folders for p in val_map.get(f, [])]
        va_y = np.array([index[f] for f in folders for _ in val_map.get(f, [])], dtype=np.int64)
        split = "given (train/ and val/ folders)"
    elif require_split:
        raise DatasetError(
            f"{what}: {root} has no train/ and val/ folders. The archive is not laid out as "
            "expected: delete the extracted folder and the archive (in data.path), then prepare "
            "again."
        )
    elif has_train or has_val:
        raise DatasetError(
            f"{what}: {root} has only one of train/ and val/; provide both, or put the class "
            "folders directly in it (a split is then made with data.val_fraction)."
        )
    else:
        all_map = _scan(top, what=what, notes=notes)
        folders = _need_two(sorted(all_map), root, what)
        files = [p for f in folders for p in all_map[f]]
        labels = np.array([i for i, f in enumerate(folders) for _ in all_map[f]], dtype=np.int64)
        tr, va = stratified_split(labels, val_fraction, seed)
        tr_files, tr_y = [files[i] for i in tr], labels[tr]
        va_files, va_y = [files[i] for i in va], labels[va]
        split = f"stratified (val_fraction={val_fraction})"
    keep = subsample_per_class(tr_y, max_per_class, seed)
    tr_files, tr_y = [tr_files[i] for i in keep], tr_y[keep]
    names = names or {}
    classes = [names.get(f, f) for f in folders]
    _check_split_counts(
        what,
        classes,
        tr_y,
        va_y,
        min_val_per_class=min_val_per_class,
        given_split=split.startswith("given"),
        val_fraction=val_fraction,
    )
    return ImageFilePlan(
        image_size=image_size,
        classes=classes,
        train_files=tr_files,
        train_labels=tr_y,
        val_files=va_files,
        val_labels=va_y,
        info={
            "root": str(root),
            "folders": folders,
            "split": split,
            "val_fraction": val_fraction,
            "resize": "shorter side bilinear (PIL, JPEG draft) + center crop",
            **notes.info(what),
        },
    )


def _plan_imagefolder(
    *,
    path: str,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    min_val_per_class: int,
    seed: int,
) -> ImageFilePlan:
    if not path:
        raise DatasetError(
            "source 'imagefolder' needs data.path: a folder with one sub-folder per class "
            "(or train/ and val/ sub-folders each holding class folders)."
        )
    root = Path(path).expanduser()
    try:
        is_dir = stat.S_ISDIR(root.stat().st_mode)
    except PermissionError as exc:  # a parent folder cannot be traversed
        raise _permission_error("imagefolder", "data folder", root, exc) from exc
    except OSError:  # missing, a dangling link, a file on the way
        is_dir = False
    if not is_dir:
        raise DatasetError(
            f"imagefolder: {root} does not exist or is not a folder; set data.path to a folder "
            "with one sub-folder per class."
        )
    plan = _folder_plan(
        root,
        what="imagefolder",
        image_size=image_size,
        val_fraction=val_fraction,
        max_per_class=max_per_class,
        min_val_per_class=min_val_per_class,
        seed=seed,
    )
    plan.info["variant"] = ""
    return plan


def _override_url(default_url: str, url_override: str) -> str:
    if not url_override:
        return default_url
    if url_override.lower().split("?")[0].endswith((".tgz", ".tar.gz", ".tar", ".zip")):
        return url_override
    return url_override.rstrip("/") + "/" + default_url.rsplit("/", 1)[-1]


def _archive_stem(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name + ".d"


def _find_split_root(target: Path, what: str) -> Path:
    """The folder holding train/ and val/: the extraction folder or its single top folder."""
    candidates = [target, *_class_dirs(target, what=what, notes=_ScanNotes(base=target))]
    for c in candidates:
        if (c / "train").is_dir() and (c / "val").is_dir():
            return c
    return target


def _plan_imagenette(
    *,
    raw_dir: Path,
    variant: str,
    url_override: str,
    archive: tuple[str, str] | None,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    min_val_per_class: int,
    seed: int,
    progress: bool,
) -> ImageFilePlan:
    if archive is None and variant not in IMAGENETTE_ARCHIVES:
        raise DatasetError(
            f"unknown imagenette variant {variant!r}; set data.variant to one of "
            f"{sorted(IMAGENETTE_ARCHIVES)}"
        )
    if archive is not None:
        url, md5 = archive
    else:
        default_url, md5 = IMAGENETTE_ARCHIVES[variant]
        url = _override_url(default_url, url_override)
    filename = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or f"imagenette-{variant}.tgz"
    tgz = raw_dir / filename
    target = raw_dir / _archive_stem(filename)
    marker = target / _EXTRACT_MARKER
    done = False
    if marker.is_file():
        try:
            done = read_json(marker).get("md5") == md5
        except Exception:  # noqa: BLE001 - a bad marker just means "extract again"
            done = False
    if not done:
        download_file(url, tgz, md5=md5, progress=progress)
        safe_extract(tgz, target)
        write_json(marker, {"archive": filename, "md5": md5, "url": url})
    what = f"imagenette ({filename})"
    plan = _folder_plan(
        _find_split_root(target, what),
        what=what,
        image_size=image_size,
        val_fraction=val_fraction,
        max_per_class=max_per_class,
        min_val_per_class=min_val_per_class,
        seed=seed,
        names=IMAGENETTE_CLASSES,
        require_split=True,
    )
    plan.info.update(
        {
            "variant": variant,
            "url": url,
            "md5": md5,
            "archive": str(tgz),
            "wnids": plan.info.pop("folders"),
        }
    )
    return plan
