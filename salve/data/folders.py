"""Folder sources (any image folder, Imagenette): scanned into a checked file plan, nothing
decoded; what the scan skipped or relabelled is reported, never silent."""

from __future__ import annotations

import copy
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salve.data.base import (
    FOLDER_SOURCES,
    DatasetError,
    PreparedData,
    ValCopies,
    check_args,
    check_prepared,
    check_split_counts,
    common_info,
    override_url,
    stratified_split,
    subsample_per_class,
)
from salve.data.decode import decode_images, iter_decoded_images
from salve.data.scan import (
    ScanNotes,
    class_dirs,
    need_two_classes,
    permission_error,
    scan_folder,
)
from salve.download import download_file, safe_extract
from salve.io import TensorFileWriter, read_json, write_json

logger = logging.getLogger("salve")

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
_EXTRACT_MARKER = ".salve_extracted.json"


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
        return self._prepared(
            lambda split: decode_images(
                self.split(split)[0], self.image_size, progress=progress, desc=f"decode {split}"
            )
        )

    def check(self) -> None:
        """`check_prepared` on what `decode` would give, decoding nothing: the images are
        zero-stride stand-ins of the decoded dtype and shape (no pixel memory)."""
        s = self.image_size
        check_prepared(
            self._prepared(
                lambda split: torch.zeros((), dtype=torch.uint8).expand(
                    len(self.split(split)[0]), 3, s, s
                )
            )
        )

    def write_splits(
        self, paths: Mapping[str, Path], *, chunk_size: int = 64, progress: bool = True
    ) -> int:
        """Decode each split in `paths` ({"train": file, "val": file}) chunk by chunk straight
        into its safetensors file (images, labels): memory stays bounded by a few chunks however
        many images. The bytes equal `save_tensors` of `decode()`'s tensors. No file appears
        under its name until every split is written (a failure leaves the old files).

        Returns the number of val images that are exact copies of a train image once decoded,
        counted from per-image digests on the way (`ValCopies`) and, when not 0, reported in
        one warning naming some of the files."""
        writers: list[TensorFileWriter] = []
        copies = ValCopies()
        try:
            for split, path in paths.items():
                writer = TensorFileWriter(path, self.tensor_specs(split))
                writers.append(writer)
                for images, labels in self.chunks(split, chunk_size=chunk_size, progress=progress):
                    writer.write("images", images)
                    writer.write("labels", labels)
                    copies.add(split, images)
            for writer in writers:
                writer.close()
        finally:
            for writer in writers:
                writer.abort()  # after close: nothing left to discard
        return copies.report(self._file_name(), self._copies_fix())

    def _file_name(self) -> Callable[[str, int], str]:
        """Names a decoded row by its file, relative to the folder holding every file (found
        on the first call: only a warning pays for it)."""
        base: list[Path] = []

        def name(split: str, row: int) -> str:
            if not base:
                base.append(Path(os.path.commonpath([*self.train_files, *self.val_files])))
            return self.split(split)[0][row].relative_to(base[0]).as_posix()

        return name

    def _copies_fix(self) -> str:
        where = self.info.get("root", "data.path")
        if str(self.info.get("split", "")).startswith("given"):
            return (
                f"delete the copies from the val/ folder in {where} (or replace them with "
                "images the model has not trained on)"
            )
        return f"delete the duplicate files from the class folders in {where}"

    def _prepared(self, images: Callable[[str], torch.Tensor]) -> PreparedData:
        return PreparedData(
            train_images=images("train"),
            train_labels=torch.as_tensor(self.train_labels, dtype=torch.int64),
            val_images=images("val"),
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
    check_args(source, image_size, val_fraction, max_per_class, min_val_per_class)
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
        common_info(
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
    notes = ScanNotes(base=root)
    train_dir, val_dir = root / "train", root / "val"
    top = class_dirs(root, what=what, notes=notes)
    has_train, has_val = train_dir in top, val_dir in top
    if has_train and has_val:
        notes.ignored_folders = [d.name for d in top if d not in (train_dir, val_dir)]
        train_map = scan_folder(
            class_dirs(train_dir, what=what, notes=notes), what=what, notes=notes
        )
        val_map = scan_folder(
            class_dirs(val_dir, what=what, notes=notes), what=what, notes=notes, allow_empty=True
        )
        extra = sorted(set(val_map) - set(train_map))
        if extra:
            raise DatasetError(
                f"{what}: {val_dir} has class folders {extra} that {train_dir} lacks; "
                "train/ and val/ must hold the same class folders (fix them in data.path)."
            )
        folders = need_two_classes(sorted(train_map), train_dir, what)
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
        all_map = scan_folder(top, what=what, notes=notes)
        folders = need_two_classes(sorted(all_map), root, what)
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
    check_split_counts(
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
        raise permission_error("imagefolder", "data folder", root, exc) from exc
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


def _archive_stem(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name + ".d"


def _find_split_root(target: Path, what: str) -> Path:
    """The folder holding train/ and val/: the extraction folder or its single top folder."""
    candidates = [target, *class_dirs(target, what=what, notes=ScanNotes(base=target))]
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
        url = override_url(default_url, url_override)
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
