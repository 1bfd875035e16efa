"""Scanning an image folder: one sub-folder per class; what is skipped or relabelled (hidden
entries, nested folders, non-image files, images outside any class folder) is counted for one
warning line, never silent."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salve.data.base import DatasetError, some

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# What the folder scan reports (info keys; fetch copies them into its metrics).
SCAN_KEYS = ("skipped_hidden", "nested_images", "non_image_files", "images_outside_classes")


@dataclass
class ScanNotes:
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
                f"({some(self.outside_classes, 5)})"
            )
        if self.ignored_folders:
            n = len(self.ignored_folders)
            parts.append(
                f"ignored {_count(n, 'folder')} beside train/ and val/ "
                f"({some(self.ignored_folders, 5)})"
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
        text += f" ({some(list(names), 5)})"
    return text


def permission_error(what: str, kind: str, path: Path, exc: OSError) -> DatasetError:
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
        raise permission_error(what, kind, folder, exc) from exc
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


def class_dirs(root: Path, *, what: str, notes: ScanNotes) -> list[Path]:
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


def _class_images(class_dir: Path, *, what: str, notes: ScanNotes) -> list[Path]:
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


def scan_folder(
    class_dirs: list[Path], *, what: str, notes: ScanNotes, allow_empty: bool = False
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


def need_two_classes(folders: list[str], root: Path, what: str) -> list[str]:
    if len(folders) < 2:
        raise DatasetError(
            f"{what}: {root} has {len(folders)} class folder(s) {folders}; need at least 2 "
            "(one sub-folder per class, each holding that class's images). Set data.path to "
            "such a folder."
        )
    return folders
