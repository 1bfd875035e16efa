"""Fingerprints that decide whether a study part must be recomputed.

A part's fingerprint is the sha256 of everything its numbers depend on: the bytes of the files
it reads (named by role, so a copy of the project elsewhere has the same fingerprint), its
parameters (canonical JSON) and the source of the code it runs (named by repository-relative
path), plus the library version. Any change gives a new fingerprint; nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = b"salve-study-fingerprint/1"
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(child.relative_to(p).as_posix().encode() + b"\0")
            h.update(file_digest(child).encode())
        return h.hexdigest()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(
    inputs: Mapping[str, str | Path],
    params: Mapping[str, Any],
    code: Mapping[str, str | Path],
    *,
    version: str,
) -> str:
    """sha256 over ``inputs`` (role -> file), ``params`` (JSON-able), ``code`` (name -> file)
    and ``version``. Raises FileNotFoundError naming a missing input."""
    h = hashlib.sha256(FORMAT + b"\0" + version.encode() + b"\0")
    for section, items in (("inputs", inputs), ("code", code)):
        h.update(section.encode() + b"\0")
        for name in sorted(items):
            path = Path(items[name])
            if not path.exists():
                raise FileNotFoundError(f"{path} ({section} {name!r}) is missing")
            h.update(f"{name}\0{file_digest(path)}\0".encode())
    h.update(b"params\0" + json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()
