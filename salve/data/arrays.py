"""Array sources (scikit-learn digits, CIFAR-100): arrays resized to S x S on the 0..255
scale, then split."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salve.data.base import (
    DatasetError,
    PreparedData,
    override_url,
    stratified_split,
    subsample_per_class,
)
from salve.download import download_file, safe_extract


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


def prepare_digits(
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


def prepare_cifar100(
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
    url, md5 = archive or (override_url(cifar_cls.url, url_override), cifar_cls.tgz_md5)
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
