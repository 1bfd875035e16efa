"""Artifact I/O: atomic writes, safetensors with clear errors, JSON/CSV.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class ArtifactError(RuntimeError):
    """A stored artifact is missing, truncated or not what the stage expects."""


# The temp files `atomic_path` writes: `.NAME.<12 hex>.tmp` next to NAME.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted writer (e.g. a `kill -9`) left under ``folder``.

    Only names `atomic_path` makes are touched. Call it only while no writer can be running
    there (a stage's output folder, under the pipeline lock): a temp file left in an output
    folder makes DVC see the folder as modified and refuse to restore it from its cache.
    """
    base = Path(folder)
    if not base.is_dir():
        return []
    stale = [p for p in base.rglob(".*.tmp") if p.is_file() and TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _new_temp_file(final: Path) -> Path:
    """An empty, uniquely named file next to ``final``, mode 0o666 less the umask, as ``open``
    creates files (``tempfile.mkstemp`` makes them 0o600)."""
    while True:
        tmp = final.parent / f".{final.name}.{os.urandom(6).hex()}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The result has the mode ``open(path, "w")`` would leave: the replaced file's, else 0o666 less
    the umask (not 0o600, which would silently make params.yaml and artifacts owner-only).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(final)
    try:
        mode = stat.S_IMODE((final if final.exists() else tmp).stat().st_mode)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # after writing: some writers recreate the file (safetensors: 0o600)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: file not found. Run the stage that produces it first.")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{p}: not valid JSON ({exc}). Delete it and rerun the stage that produces it."
        ) from exc


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically. Tensors are made contiguous CPU copies."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike, required: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, corrupt or incomplete file raises ArtifactError."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: file not found. Run the stage that produces it first.")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"{p}: not a readable safetensors file ({exc}). It is truncated or corrupted: "
            "delete it and rerun the stage that produces it (e.g. `salve stage NAME --force`)."
        ) from exc
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ArtifactError(
            f"{p}: missing tensors {missing}; found {sorted(tensors)}. "
            "It was written by another version: rerun the stage that produces it."
        )
    return tensors
