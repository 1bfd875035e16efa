"""Dataset sources, decoded once into uint8 tensors with a fixed train/val split.

Every source (scikit-learn digits, Imagenette, CIFAR-100, any image folder) ends as the same
`PreparedData`: square uint8 images [N, 3, S, S], int64 labels, class names and a JSON-able info
dict. Decoding happens once, here; training and extraction only normalise batches.

Folder sources are planned first (`plan_image_files`: file lists, labels and split, checked,
nothing decoded), then decoded in chunks (`ImageFilePlan.chunks`), so a dataset of any size can
be streamed into a file (`salve.io.TensorFileWriter`) with bounded memory.

Modules: `base` (the record, checks, normalisation, splits), `arrays` (digits, CIFAR-100),
`folders` (image folders, Imagenette: scan and plan), `decode` (image files to uint8).
"""

from __future__ import annotations

from pathlib import Path

from salve.data.arrays import prepare_cifar100, prepare_digits, resize_array
from salve.data.base import (
    FOLDER_SOURCES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    DatasetError,
    PreparedData,
    ValCopies,
    check_args,
    check_prepared,
    check_split_counts,
    common_info,
    normalise,
    report_val_copies,
    stratified_split,
    subsample_per_class,
)
from salve.data.decode import decode_images, iter_decoded_images, load_image
from salve.data.folders import (
    IMAGENETTE_ARCHIVES,
    IMAGENETTE_CLASSES,
    ImageFilePlan,
    plan_image_files,
)
from salve.data.scan import IMAGE_EXTENSIONS, SCAN_KEYS

__all__ = [
    "FOLDER_SOURCES",
    "IMAGE_EXTENSIONS",
    "IMAGENETTE_ARCHIVES",
    "IMAGENETTE_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCAN_KEYS",
    "SOURCES",
    "DatasetError",
    "ImageFilePlan",
    "PreparedData",
    "ValCopies",
    "check_prepared",
    "decode_images",
    "iter_decoded_images",
    "load_image",
    "normalise",
    "plan_image_files",
    "prepare_dataset",
    "report_val_copies",
    "resize_array",
    "stratified_split",
    "subsample_per_class",
]


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
    check_args(source, image_size, val_fraction, max_per_class, min_val_per_class)
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
            data = prepare_digits(**opts)
        else:
            data = prepare_cifar100(
                raw_dir=raw_dir, url_override=url_override, archive=archive, **opts
            )
        train_y, val_y = data.train_labels.numpy(), data.val_labels.numpy()
        check_split_counts(
            source,
            data.classes,
            train_y,
            val_y,
            min_val_per_class=min_val_per_class,
            given_split=source == "cifar100",
            val_fraction=val_fraction,
        )
        data.info.update(
            common_info(source, image_size, seed, max_per_class, data.classes, train_y, val_y)
        )
    check_prepared(data)
    return data
