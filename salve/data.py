"""Dataset sources, decoded once into uint8 tensors with a fixed train/val split.

Every source (scikit-learn digits, Imagenette, CIFAR-100, any image folder) ends as the same
`PreparedData`: square uint8 images [N, 3, S, S], int64 labels, class names and a JSON-able info
dict. Decoding happens once, here; training and extraction only normalise batches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from salve.download import download_file, safe_extract
from salve.io import read_json, write_json

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SOURCES = ("digits", "imagenette", "cifar100", "imagefolder")

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


def prepare_dataset(
    source: str,
    *,
    image_size: int,
    raw_dir: Path,
    variant: str = "160px",
    path: str = "",
    val_fraction: float = 0.2,
    max_per_class: int = 0,
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
    `max_per_class` > 0 keeps at most that many train images per class (seeded).
    """
    if source not in SOURCES:
        raise DatasetError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class < 0:
        raise DatasetError(f"max_per_class must be >= 0 (0 = all), got {max_per_class}")
    raw_dir = Path(raw_dir)
    opts = {
        "image_size": image_size,
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "seed": seed,
        "progress": progress,
    }
    if source == "digits":
        data = _prepare_digits(**opts)
    elif source == "imagenette":
        data = _prepare_imagenette(
            raw_dir=raw_dir, variant=variant, url_override=url_override, archive=archive, **opts
        )
    elif source == "cifar100":
        data = _prepare_cifar100(
            raw_dir=raw_dir, url_override=url_override, archive=archive, **opts
        )
    else:
        data = _prepare_imagefolder(path=path, **opts)
    data.info.update(
        {
            "source": source,
            "image_size": image_size,
            "seed": seed,
            "max_per_class": max_per_class,
            "num_classes": len(data.classes),
            "counts": {"train": len(data.train_labels), "val": len(data.val_labels)},
            "train_per_class": _per_class(data.train_labels, data.classes),
            "val_per_class": _per_class(data.val_labels, data.classes),
        }
    )
    check_prepared(data)
    return data


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


def _per_class(labels: torch.Tensor, classes: list[str]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(classes)).tolist() if labels.numel() else []
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
                f"{tgz}: no {cifar_cls.base_folder}/ folder inside; delete it and retry"
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
# Folder sources: Imagenette, image folders
# --------------------------------------------------------------------------------------------


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to uint8 [size,size,3]: RGB, shorter side -> size, center crop.

    JPEG `draft` lets the decoder downscale by a power of two while keeping both sides >= size,
    which makes full-size Imagenette several times faster to decode.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path}: cannot read this image ({type(exc).__name__}: {exc}). Delete or replace "
            "the file (or re-extract the dataset) and prepare again."
        ) from exc
    if arr.shape != (size, size, 3):
        raise DatasetError(f"{path}: decoded to shape {arr.shape}, expected {(size, size, 3)}")
    return arr


def decode_images(
    files: Sequence[Path], size: int, *, progress: bool = True, desc: str = "decode"
) -> torch.Tensor:
    """Decode `files` once each into a preallocated uint8 [N,3,size,size] (threaded, ordered)."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    if not files:
        return out
    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for i, arr in enumerate(pool.map(lambda p: load_image(p, size), files)):
            out[i] = torch.from_numpy(arr).permute(2, 0, 1)
            bar.update(1)
    return out


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(root: Path, *, what: str, allow_empty: bool = False) -> dict[str, list[Path]]:
    """{class folder name: sorted image files}; empty class folders are an error."""
    out = {}
    for d in _class_dirs(root):
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        if not files and not allow_empty:
            raise DatasetError(
                f"{what}: class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
                " Add images or remove the folder."
            )
        out[d.name] = files
    return out


def _need_two(folders: list[str], root: Path, what: str) -> list[str]:
    if len(folders) < 2:
        raise DatasetError(
            f"{what}: {root} has {len(folders)} class folder(s) {folders}; need at least 2 "
            "(one sub-folder per class, each holding that class's images)."
        )
    return folders


def _folder_split(
    root: Path,
    *,
    what: str,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    seed: int,
    progress: bool,
    names: dict[str, str] | None = None,
    require_split: bool = False,
) -> PreparedData:
    """Shared reader for image-folder layouts (given train/val, or one folder to split)."""
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        train_map = _scan(train_dir, what=what)
        val_map = _scan(val_dir, what=what, allow_empty=True)
        extra = sorted(set(val_map) - set(train_map))
        if extra:
            raise DatasetError(
                f"{what}: {val_dir} has class folders {extra} that {train_dir} lacks; "
                "train/ and val/ must hold the same class folders."
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
            "expected: delete the extracted folder and the archive, then prepare again."
        )
    elif train_dir.is_dir() or val_dir.is_dir():
        raise DatasetError(
            f"{what}: {root} has only one of train/ and val/; provide both, or put the class "
            "folders directly in it (a split is then made with val_fraction)."
        )
    else:
        all_map = _scan(root, what=what)
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
    return PreparedData(
        train_images=decode_images(tr_files, image_size, progress=progress, desc="decode train"),
        train_labels=torch.as_tensor(tr_y, dtype=torch.int64),
        val_images=decode_images(va_files, image_size, progress=progress, desc="decode val"),
        val_labels=torch.as_tensor(va_y, dtype=torch.int64),
        classes=[names.get(f, f) for f in folders],
        info={
            "root": str(root),
            "folders": folders,
            "split": split,
            "val_fraction": val_fraction,
            "resize": "shorter side bilinear (PIL, JPEG draft) + center crop",
        },
    )


def _prepare_imagefolder(
    *,
    path: str,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    seed: int,
    progress: bool,
) -> PreparedData:
    if not path:
        raise DatasetError(
            "source 'imagefolder' needs path= a folder with one sub-folder per class "
            "(or train/ and val/ sub-folders each holding class folders)."
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"imagefolder: {root} does not exist or is not a folder; set data.path to a folder "
            "with one sub-folder per class."
        )
    data = _folder_split(
        root,
        what="imagefolder",
        image_size=image_size,
        val_fraction=val_fraction,
        max_per_class=max_per_class,
        seed=seed,
        progress=progress,
    )
    data.info["variant"] = ""
    return data


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


def _find_split_root(target: Path) -> Path:
    """The folder holding train/ and val/: the extraction folder or its single top folder."""
    candidates = [target, *_class_dirs(target)]
    for c in candidates:
        if (c / "train").is_dir() and (c / "val").is_dir():
            return c
    return target


def _prepare_imagenette(
    *,
    raw_dir: Path,
    variant: str,
    url_override: str,
    archive: tuple[str, str] | None,
    image_size: int,
    val_fraction: float,
    max_per_class: int,
    seed: int,
    progress: bool,
) -> PreparedData:
    if archive is None and variant not in IMAGENETTE_ARCHIVES:
        raise DatasetError(
            f"unknown imagenette variant {variant!r}; choose one of {sorted(IMAGENETTE_ARCHIVES)}"
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
    root = _find_split_root(target)
    data = _folder_split(
        root,
        what=f"imagenette ({filename})",
        image_size=image_size,
        val_fraction=val_fraction,
        max_per_class=max_per_class,
        seed=seed,
        progress=progress,
        names=IMAGENETTE_CLASSES,
        require_split=True,
    )
    data.info.update(
        {
            "variant": variant,
            "url": url,
            "md5": md5,
            "archive": str(tgz),
            "wnids": data.info.pop("folders"),
        }
    )
    return data
