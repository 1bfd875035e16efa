"""Artifact I/O: atomic writes, safetensors with clear errors, JSON/CSV, streamed tensor files.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted run never leaves a half-written file under its final name. Tensors too large
to hold in memory are written row chunk by row chunk (`TensorFileWriter`) and read back by row
range (`read_rows`, `TensorRows`), in the same safetensors format as `save_tensors`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import operator
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from salve.errors import SalveUserError


class ArtifactError(SalveUserError, RuntimeError):
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
    stale = [p for p in base.rglob(".*.tmp") if TEMP_NAME.match(p.name)]
    for p in stale:
        if p.is_dir():  # a folder being assembled (a restore from DVC's cache)
            shutil.rmtree(p, ignore_errors=True)
        else:
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
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds.
    ``fsync=False`` leaves flushing to the caller (one ``os.sync`` after thousands of small files
    instead of one fsync each).

    The result has the mode ``open(path, "w")`` would leave: the replaced file's, else 0o666 less
    the umask (not 0o600, which would silently make params.yaml and artifacts owner-only).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(final)
    try:
        mode = stat.S_IMODE((final if final.exists() else tmp).stat().st_mode)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # after writing: some writers recreate the file (safetensors: 0o600)
        os.replace(tmp, final)
    except SafetensorError as exc:  # its I/O failures carry no errno: give them one, and the path
        code = re.search(r"(?:os error |code: )(\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(final)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
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
        if metadata:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's metadata in key order: safetensors writes it from a hash map, in an
    order that changes from run to run, so the same tensors and metadata gave other bytes."""
    with open(path, "rb+") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > n:  # not the compact JSON safetensors writes: leave the file as it is
            return
        fh.seek(8)
        fh.write(raw + b" " * (n - len(raw)))


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


# --------------------------------------------------------------------------------------------
# Streamed tensor files: safetensors written and read by row ranges, memory bounded by a chunk
# --------------------------------------------------------------------------------------------

# safetensors' dtype codes (the header's "dtype") for the torch dtypes they store.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "F32": torch.float32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# safetensors refuses larger headers; so do we (a corrupt length must not allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000
TensorSpecs = Mapping[str, tuple[torch.dtype, Sequence[int]]]


def _corrupt(p: Path, detail: str) -> ArtifactError:
    return ArtifactError(
        f"{p}: not a readable safetensors file ({detail}). It is truncated or corrupted: "
        "delete it and rerun the stage that produces it (e.g. `salve stage NAME --force`)."
    )


def _data_order(dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """The order safetensors lays tensors out in (by dtype, then name), asked of safetensors.

    One-element stand-ins cost nothing and keep the layout identical to `save_file`'s whatever
    rule the installed safetensors follows.
    """
    if not dtypes:
        return []
    blob = save({name: torch.zeros(1, dtype=dtype) for name, dtype in dtypes.items()})
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    return sorted(dtypes, key=lambda name: header[name]["data_offsets"][0])


def _header_bytes(header: dict[str, Any]) -> bytes:
    """Compact JSON, padded with spaces to a multiple of 8 bytes (as safetensors pads it)."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class _Slot:
    """One tensor's place in the file and how many of its rows are written so far."""

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], begin: int) -> None:
        self.name, self.dtype, self.shape, self.begin = name, dtype, shape, begin
        self.rows = shape[0] if shape else 1  # a 0-dim tensor is written as one "row"
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.end = begin + self.rows * self.row_bytes
        self.written = 0


class TensorFileWriter:
    """Write a safetensors file chunk by chunk, with memory bounded by one chunk.

    The shapes are declared up front, so the header and every tensor's byte range are known
    before any data: each chunk goes straight to its place in the file. Rows of one tensor are
    appended in order; chunks of different tensors may be interleaved freely.

    The file appears under its final name only once every declared row is written (`close`, or
    a `with` block that ends cleanly); an exception, `abort`, or rows that do not add up leave
    nothing there (an existing file is kept). The bytes equal `safetensors.torch.save_file` of
    the full tensors with the same metadata; metadata keys are written sorted (save_file's
    order for two or more keys varies from run to run).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: TensorSpecs,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        slots = self._plan(specs)
        header: dict[str, Any] = {}
        if metadata is not None:
            bad = [k for k, v in metadata.items() if type(k) is not str or type(v) is not str]
            if bad:
                raise ValueError(f"{self.path}: metadata must map str to str; bad keys {bad}")
            header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
        for slot in slots:
            header[slot.name] = {
                "dtype": _DTYPE_CODES[slot.dtype],
                "shape": list(slot.shape),
                "data_offsets": [slot.begin, slot.end],
            }
        head = _header_bytes(header)
        self._slots = {slot.name: slot for slot in slots}
        self._data_start = 8 + len(head)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp: Path | None = _new_temp_file(self.path)
        self._mode = stat.S_IMODE((self.path if self.path.exists() else self._tmp).stat().st_mode)
        try:
            self._fh = open(self._tmp, "r+b")  # noqa: SIM115 - closed in close()/abort()
            self._fh.write(len(head).to_bytes(8, "little") + head)
        except BaseException:
            self.abort()
            raise

    def _plan(self, specs: TensorSpecs) -> list[_Slot]:
        problems = []
        clean: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name, spec in specs.items():
            try:
                dtype, shape = spec
                shape = tuple(operator.index(n) for n in shape)
            except (TypeError, ValueError):
                problems.append(f"{name!r}: expected (dtype, shape), got {spec!r}")
                continue
            if not isinstance(name, str) or not name or name == "__metadata__":
                problems.append(f"{name!r}: not a valid tensor name")
            elif dtype not in _DTYPE_CODES:
                problems.append(f"{name!r}: dtype {dtype} has no safetensors code")
            elif any(n < 0 for n in shape):
                problems.append(f"{name!r}: negative size in shape {shape}")
            else:
                clean[name] = (dtype, shape)
        if problems:
            raise ValueError(f"{self.path}: bad tensor specs: " + "; ".join(problems))
        slots, offset = [], 0
        for name in _data_order({name: dtype for name, (dtype, _) in clean.items()}):
            slot = _Slot(name, *clean[name], begin=offset)
            slots.append(slot)
            offset = slot.end
        return slots

    @property
    def data_order(self) -> list[str]:
        """Tensor names in the order their data lies in the file."""
        return list(self._slots)

    def rows_written(self, name: str) -> int:
        return self._slots[name].written

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append `rows` (shape [r, *shape[1:]], the declared dtype) to tensor `name`."""
        if self._tmp is None:
            raise ValueError(f"{self.path}: the writer is closed")
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"{self.path}: no tensor {name!r}; declared {list(self._slots)}")
        if rows.dtype != slot.dtype:
            raise ValueError(f"{self.path}: {name}: got dtype {rows.dtype}, declared {slot.dtype}")
        if slot.shape:
            ok = rows.dim() == len(slot.shape) and tuple(rows.shape[1:]) == slot.shape[1:]
            n = int(rows.shape[0]) if rows.dim() else 0
        else:
            ok, n = rows.dim() == 0, 1
        if not ok:
            want = f"[r, {', '.join(map(str, slot.shape[1:]))}]" if slot.shape else "[] (0-dim)"
            raise ValueError(f"{self.path}: {name}: chunk shape {list(rows.shape)}, want {want}")
        if slot.written + n > slot.rows:
            raise ValueError(
                f"{self.path}: {name}: {slot.written} + {n} rows exceed the declared {slot.rows}"
            )
        if n == 0:
            return
        flat = rows.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.seek(self._data_start + slot.begin + slot.written * slot.row_bytes)
        self._fh.write(flat.numpy())
        slot.written += n

    def close(self) -> None:
        """Check every row is written, then rename the file into place (fsynced)."""
        if self._tmp is None:
            return
        slots = self._slots.values()
        short = [f"{s.name} {s.written} of {s.rows}" for s in slots if s.written < s.rows]
        if short:
            self.abort()
            raise ValueError(
                f"{self.path}: rows written do not add up ({', '.join(short)} rows); nothing "
                "was written under this name. Write every declared row before closing."
            )
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.chmod(self._tmp, self._mode)
            os.replace(self._tmp, self.path)
            self._tmp = None
        finally:
            self.abort()

    def abort(self) -> None:
        """Discard the temp file; the final name is left as it was."""
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_layout(
    path: str | os.PathLike,
) -> tuple[Path, int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """(path, data start, {name: (dtype, shape, begin, end)} in data order), all checked."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            prefix = fh.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 0:
                raise _corrupt(p, f"{size} bytes, shorter than the 8-byte header length")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _corrupt(p, f"header length {n} does not fit the file's {size} bytes")
            raw = fh.read(n)
    except FileNotFoundError:
        raise ArtifactError(f"{p}: file not found. Run the stage that produces it first.") from None
    except IsADirectoryError:
        raise ArtifactError(f"{p}: is a folder, not a safetensors file.") from None
    except OSError as exc:
        raise ArtifactError(
            f"{p}: cannot read it ({exc}). Check its permissions and the disk, then retry."
        ) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(p, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _corrupt(p, "header is not a JSON object")
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(p, f"bad header entry for {name!r}: {entry!r}") from exc
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise _corrupt(p, f"{name}: offsets {[begin, end]} do not fit shape {list(shape)}")
        layout[name] = (dtype, shape, begin, end)
    layout = dict(sorted(layout.items(), key=lambda kv: (kv[1][2], kv[1][3])))
    at = 0
    for name, (_, _, begin, end) in layout.items():
        if begin != at:
            raise _corrupt(p, f"{name}: data starts at byte {begin}, expected {at}")
        at = end
    if size != 8 + n + at:
        raise _corrupt(p, f"the header promises {8 + n + at} bytes, the file holds {size}")
    return p, 8 + n, layout


def tensor_info(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file, in data order, reading only its header."""
    _, _, layout = _read_layout(path)
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in layout.items()}


def _missing_tensor(p: Path, name: str, found: Iterable[str]) -> ArtifactError:
    return ArtifactError(
        f"{p}: missing tensors {[name]}; found {sorted(found)}. "
        "It was written by another version: rerun the stage that produces it."
    )


class TensorRows:
    """One tensor of a safetensors file, read by row range on demand with plain file reads.

    It answers `len`, `shape`, `dtype`, row slices `rows[a:b]` (Python slice rules) and row
    gathers `rows[idx]` (a 1-D integer tensor or sequence, in its order, repeats allowed) as a
    tensor would, so code that walks a tensor's row slices (`salve.activations.batched_forward`)
    or draws shuffled batches (`salve.train.train_classifier`) reads a file of any size with
    memory bounded by one batch: no memory map, only the requested rows' bytes are read. The
    header is read once; a file replaced or resized since then is an ArtifactError, never rows
    of another layout.
    """

    def __init__(self, path: str | os.PathLike, name: str) -> None:
        p, data_start, layout = _read_layout(path)
        if name not in layout:
            raise _missing_tensor(p, name, layout)
        dtype, shape, begin, _ = layout[name]
        if not shape:
            raise ValueError(f"{p}: {name} is 0-dim and has no rows; use load_tensors")
        self.path, self.name, self.dtype, self.shape = p, name, dtype, shape
        self._offset = data_start + begin
        self._row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._stamp = _file_stamp(p)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TensorRows({str(self.path)!r}, {self.name!r}, {self.dtype}, {list(self.shape)})"

    def __getitem__(self, index: slice | torch.Tensor | Sequence[int]) -> torch.Tensor:
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise TypeError(f"TensorRows reads row slices rows[a:b] with step 1, got {index!r}")
            lo, hi, _ = index.indices(self.shape[0])
            runs = [(lo, max(0, hi - lo))]
        else:
            runs = [(int(i), 1) for i in self._row_indices(index)]
        n = sum(count for _, count in runs)
        out_shape = (n, *self.shape[1:])
        if n * self._row_bytes == 0:
            return torch.empty(out_shape, dtype=self.dtype)
        buf = bytearray(n * self._row_bytes)
        view, at = memoryview(buf), 0
        short = None
        try:
            with open(self.path, "rb") as fh:
                for row, count in runs:
                    size = count * self._row_bytes
                    fh.seek(self._offset + row * self._row_bytes)
                    if fh.readinto(view[at : at + size]) != size and short is None:
                        short = (row, row + count)
                    at += size
            changed = _file_stamp(self.path) != self._stamp  # after the read: nothing slips by
        except FileNotFoundError:
            changed = True
        if changed:
            raise ArtifactError(
                f"{self.path}: the file was replaced, changed or removed while it was being read "
                "(by another run?). Rerun this stage once that run has finished."
            )
        if short is not None:
            raise _corrupt(
                self.path, f"{self.name}: rows {short[0]}:{short[1]} end past the end of the file"
            )
        return torch.frombuffer(buf, dtype=self.dtype).reshape(out_shape)

    def _row_indices(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """A 1-D int64 tensor of rows in [0, N), negative indices counted from the end."""
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            raise TypeError(
                f"TensorRows reads slices rows[a:b] or 1-D index lists rows[idx], got {index!r}"
            )
        idx = torch.as_tensor(index)
        if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.is_complex())):
            raise TypeError(f"TensorRows gathers with a 1-D integer index, got {index!r}")
        idx = idx.to(torch.long)
        n = self.shape[0]
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"{self.path}: {self.name} has {n} rows; index out of range")
        return torch.where(idx < 0, idx + n, idx)


def _file_stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_rows(path: str | os.PathLike, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows `[start:stop]` (Python slice rules) of tensor `name`, read with plain file reads.

    Only those rows' bytes are read (no memory map), so memory stays bounded by the request.
    """
    return TensorRows(path, name)[operator.index(start) : operator.index(stop)]
