"""Robust downloads and safe archive extraction.

Datasets arrive as large archives over flaky networks: a download must resume, retry, verify its
checksum and never leave a half-written file under its final name. Archives come from the internet:
extraction must refuse members that would land outside the target folder, and must never leave a
half-extracted folder that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from salve.errors import SalveUserError

CHUNK = 1 << 20
USER_AGENT = "salve-download/0.1 (+python urllib)"
# HTTP statuses worth retrying; any other 4xx is the caller's mistake and fails at once.
_RETRY_STATUSES = {408, 425, 429}


class DownloadError(SalveUserError, RuntimeError):
    """A download failed after every attempt (network error or checksum mismatch)."""


class UnsafeArchiveError(SalveUserError, RuntimeError):
    """An archive member would escape the target folder or is not a plain file/dir/link."""


class _Truncated(OSError):
    """The server closed the connection before sending the announced number of bytes."""


class _PermanentHTTPError(Exception):
    def __init__(self, exc: urllib.error.HTTPError) -> None:
        super().__init__(str(exc))
        self.exc = exc


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _hashers(md5: str | None, sha256: str | None) -> dict[str, hashlib._Hash]:
    out: dict[str, hashlib._Hash] = {}
    if md5:
        out["md5"] = hashlib.md5(usedforsecurity=False)
    if sha256:
        out["sha256"] = hashlib.sha256()
    return out


def _hash_file(path: Path, hashers: dict[str, hashlib._Hash]) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)


def file_checksums(path: Path, *, md5: bool = False, sha256: bool = False) -> dict[str, str]:
    """Hex digests of a file (only the requested algorithms)."""
    hashers = _hashers("x" if md5 else None, "x" if sha256 else None)
    _hash_file(Path(path), hashers)
    return {name: h.hexdigest() for name, h in hashers.items()}


def _mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    return [
        f"{name} expected {want}, got {actual[name]}"
        for name, want in expected.items()
        if actual[name] != want
    ]


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None)."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _fetch(
    url: str,
    part: Path,
    hashers: dict[str, hashlib._Hash],
    *,
    timeout: float,
    progress: bool,
    desc: str,
) -> None:
    """Stream `url` into `part`, resuming from its current size when the server allows it.

    `hashers` are fresh; they are fed the whole file (existing prefix included).
    Raises OSError/HTTPException subclasses on network trouble, _PermanentHTTPError on 4xx.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The partial file is as long as (or longer than) the resource: start over.
            exc.close()
            part.unlink(missing_ok=True)
            return _fetch(url, part, hashers, timeout=timeout, progress=progress, desc=desc)
        if 400 <= exc.code < 500 and exc.code not in _RETRY_STATUSES:
            raise _PermanentHTTPError(exc) from exc
        raise
    with response:
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        crange = _parse_content_range(response.headers.get("Content-Range"))
        if offset and status == 206 and crange is not None and crange[0] == offset:
            mode = "ab"
            _hash_file(part, hashers)
            total = crange[1]
        elif status == 206:
            part.unlink(missing_ok=True)
            raise _Truncated(f"server answered an unexpected range ({crange}); restarting")
        else:
            # No range support (200) or an odd answer: restart from byte 0.
            mode, offset = "wb", 0
            total = length
        expected_body = length
        received = 0
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
        if expected_body is not None and received < expected_body:
            raise _Truncated(
                f"connection closed after {received} of {expected_body} bytes (partial file kept "
                "for resuming)"
            )


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 30,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Download `url` to `dest` atomically, resuming, retrying and verifying the checksum.

    Data goes to `dest.part` first (resumed with an HTTP Range request where the server supports
    it) and is renamed onto `dest` only once complete and verified. `retries` is the number of
    attempts in all; attempt k waits `backoff * 2**(k-1)` seconds before retrying. A checksum
    mismatch deletes the partial file and counts as a failed attempt. If `dest` already exists
    with the right checksum (or no checksum is given) nothing is downloaded.

    Raises DownloadError after the last failed attempt.
    """
    dest = Path(dest)
    expected = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if dest.exists():
        if not expected:
            return dest
        actual = file_checksums(dest, md5="md5" in expected, sha256="sha256" in expected)
        if not _mismatches(expected, actual):
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempts = max(1, int(retries))
    last_error: str = ""
    last_actual: dict[str, str] = {}
    for attempt in range(1, attempts + 1):
        hashers = _hashers(md5, sha256)
        try:
            _fetch(url, part, hashers, timeout=timeout, progress=progress, desc=dest.name)
        except _PermanentHTTPError as exc:
            raise DownloadError(
                f"Download of {url} failed: the server answered HTTP {exc.exc.code} "
                f"({exc.exc.reason}). Check the URL, or download the file manually and put it "
                f"at {dest.absolute()}" + (f" (expected {_fmt(expected)})." if expected else ".")
            ) from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            actual = {name: h.hexdigest() for name, h in hashers.items()}
            if not _mismatches(expected, actual):
                os.replace(part, dest)
                return dest
            last_actual = actual
            last_error = "checksum mismatch"
            part.unlink(missing_ok=True)
        if attempt < attempts and backoff > 0:
            time.sleep(backoff * 2 ** (attempt - 1))
    checks = ""
    if expected:
        got = _fmt(last_actual) if last_actual else "no complete file received"
        checks = f" Expected {_fmt(expected)}; actual {got}."
    raise DownloadError(
        f"Download of {url} failed after {attempts} attempt(s); last error: {last_error}.{checks} "
        f"Fix: check the URL and your network (proxy, firewall, disk space), then rerun; or "
        f"download the file manually and put it at {dest.absolute()} (it is used as-is when its "
        "checksum matches)."
    )


def _fmt(sums: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sums.items())


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def _walk(start: list[str], rel: str, links: set[str], member: str, what: str) -> list[str]:
    """Resolve `rel` lexically from the folder `start` (parts below the target root).

    Refuses to climb above the root, and to go *through* a symlink defined in the archive (the
    OS would follow it, so the lexical path would lie).
    """
    stack = list(start)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for part in parts:
        if stack and "/".join(stack) in links:
            raise UnsafeArchiveError(
                f"archive member {member!r}: {what} {rel!r} passes through the archive symlink "
                f"{'/'.join(stack)!r}; refusing to extract"
            )
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(
                    f"archive member {member!r}: {what} {rel!r} escapes the target folder "
                    "('..'); refusing to extract"
                )
            stack.pop()
        else:
            stack.append(part)
    return stack


def _lexical(rel: str) -> list[str]:
    """Parts of `rel` with '.' and '..' folded (escapes are caught later by _walk)."""
    stack: list[str] = []
    for part in rel.split("/"):
        if part == "..":
            if stack:
                stack.pop()
        elif part not in ("", "."):
            stack.append(part)
    return stack


def _check_name(name: str) -> None:
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise UnsafeArchiveError(
            f"archive member {name!r} has an absolute path; refusing to extract"
        )
    if "\x00" in name:
        raise UnsafeArchiveError(f"archive member {name!r} has a NUL byte in its name")


def _validate(entries: list[tuple[str, str, str | None]]) -> list[list[str]]:
    """entries: (name, kind, link) with kind in file/dir/symlink/hardlink.

    Every check runs before anything is written, so a bad archive writes nothing at all.
    Returns each member's normalised path parts below the target.
    """
    links = set()
    for name, kind, _ in entries:
        _check_name(name)
        if kind == "symlink":
            links.add("/".join(_lexical(name)))
    resolved = []
    for name, kind, link in entries:
        # Checks every proper prefix: the path must not run through an archive symlink.
        parts = _walk([], name, links, name, "path")
        resolved.append(parts)
        if not parts:
            if kind != "dir":
                raise UnsafeArchiveError(
                    f"archive member {name!r} is a {kind} at the target folder itself; "
                    "refusing to extract"
                )
            continue  # the root itself ("./")
        parent = parts[:-1]
        if kind in ("symlink", "hardlink"):
            assert link is not None
            if not link or link.startswith(("/", "\\")) or _DRIVE.match(link):
                raise UnsafeArchiveError(
                    f"archive member {name!r} is a {kind} to the absolute path {link!r}; "
                    "refusing to extract"
                )
            base = parent if kind == "symlink" else []  # tar hardlinks are relative to the root
            _walk(base, link, links, name, f"{kind} target")
    return resolved


def _tar_entries(tf: tarfile.TarFile) -> list[tuple[str, str, str | None]]:
    entries = []
    for m in tf.getmembers():
        if m.isdir():
            kind, link = "dir", None
        elif m.issym():
            kind, link = "symlink", m.linkname
        elif m.islnk():
            kind, link = "hardlink", m.linkname
        elif m.isreg():
            kind, link = "file", None
        else:
            what = (
                "character device"
                if m.ischr()
                else "block device"
                if m.isblk()
                else "fifo"
                if m.isfifo()
                else f"special file (type {m.type!r})"
            )
            raise UnsafeArchiveError(f"archive member {m.name!r} is a {what}; refusing to extract")
        entries.append((m.name, kind, link))
    return entries


def _zip_entries(zf: zipfile.ZipFile) -> list[tuple[str, str, str | None]]:
    entries = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        ftype = stat.S_IFMT(mode)  # 0 when the zip carries no Unix file type
        if info.is_dir():
            kind, link = "dir", None
        elif ftype == stat.S_IFLNK:
            kind, link = "symlink", zf.read(info).decode("utf-8", "replace")
        elif ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"archive member {info.filename!r} is a special file (mode {oct(mode)}); "
                "refusing to extract"
            )
        else:
            kind, link = "file", None
        entries.append((info.filename, kind, link))
    return entries


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise ValueError(f"{archive}: unknown archive type (expected .tar, .tgz, .tar.gz or .zip)")


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a tar/zip archive into the folder `target`, refusing unsafe members.

    All members are validated before anything is written (absolute paths, `..` escapes, links
    pointing outside, paths through archive symlinks, devices/fifos raise UnsafeArchiveError).
    Extraction goes to a temp folder next to `target` that is renamed into place at the end
    (replacing an existing `target`), so a crash never leaves a folder that looks complete.
    Returns the extracted non-directory paths (under `target`), in archive order.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    kind = _archive_kind(archive)
    opener = tarfile.open if kind == "tar" else zipfile.ZipFile
    try:
        with opener(archive) as arc:
            entries = _tar_entries(arc) if kind == "tar" else _zip_entries(arc)
            resolved = _validate(entries)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent)
            )
            try:
                if kind == "tar":
                    # The 'data' filter is defence in depth; our own checks already passed.
                    arc.extractall(tmp, filter="data")
                else:
                    arc.extractall(tmp)
                _replace_dir(tmp, target)
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(f"{archive}: {exc}; refusing to extract") from exc
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.ReadError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(
            f"{archive}: not a readable {kind} archive ({exc}). It is truncated or corrupted: "
            "delete it and download it again."
        ) from exc
    return [
        target.joinpath(*parts)
        for (_, k, _), parts in zip(entries, resolved, strict=True)
        if k != "dir" and parts
    ]


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; an existing `target` is moved aside first, then removed."""
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
