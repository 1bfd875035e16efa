"""download_file (resume, retry, checksum) and safe_extract (malicious archives), against a
local HTTP server; then the whole Imagenette path of prepare_dataset on a tiny fake archive."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salve.data import prepare_dataset
from salve.download import DownloadError, UnsafeArchiveError, download_file, safe_extract

WNIDS = ["n01440764", "n02102040", "n02979186"]  # tench, English springer, cassette player
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
N_TRAIN, N_VAL = 3, 2


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny Imagenette-like archive and a controllable HTTP server
# --------------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def fake_tgz(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """imagenette2-160/{train,val}/<wnid>/*.png, plus some padding so the body is streamed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for split, n in (("train", N_TRAIN), ("val", N_VAL)):
            for wnid, colour in zip(WNIDS, COLOURS, strict=True):
                for i in range(n):
                    _add_bytes(tf, f"imagenette2-160/{split}/{wnid}/img{i}.png", _png(colour))
        # Incompressible padding: makes the archive big enough to cut mid-way meaningfully.
        _add_bytes(tf, "imagenette2-160/noise.bin", np.random.default_rng(0).bytes(64_000))
    data = buf.getvalue()
    return data, hashlib.md5(data).hexdigest()


class Server:
    """Serves `payload` at /<name>; records (path, Range header) per request.

    fail_first: answer the first n requests with HTTP 503.
    cut_first: for the first n requests, announce the full length but send only `cut_bytes`.
    support_range: honour Range requests with 206 (else always 200 with the full body).
    """

    def __init__(self, payload: bytes, name: str = "imagenette2-160.tgz") -> None:
        self.payload, self.name = payload, name
        self.requests: list[tuple[str, str | None]] = []
        self.fail_first = 0
        self.always_fail = False
        self.cut_first = 0
        self.cut_bytes = 1000
        self.support_range = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                n = len(server.requests)
                if server.always_fail or n <= server.fail_first:
                    self.send_error(503, "try again")
                    return
                if self.path != f"/{server.name}":
                    self.send_error(404, "no such file")
                    return
                body, start = server.payload, 0
                if rng and server.support_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes" if server.support_range else "none")
                self.end_headers()
                if n <= server.cut_first:
                    self.wfile.write(body[: server.cut_bytes])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(fake_tgz: tuple[bytes, str]) -> Iterator[Server]:
    srv = Server(fake_tgz[0])
    yield srv
    srv.close()


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------------------------


def test_download_verifies_and_skips_existing(server: Server, fake_tgz, tmp_path: Path) -> None:
    data, md5 = fake_tgz
    dest = tmp_path / "dl" / "a.tgz"
    out = download_file(server.url, dest, md5=md5, progress=False, backoff=0)
    assert out == dest and dest.read_bytes() == data
    assert not dest.with_name("a.tgz.part").exists()
    assert len(server.requests) == 1 and server.requests[0][1] is None
    # Present with the right checksum: no new request.
    download_file(server.url, dest, md5=md5, progress=False, backoff=0)
    sha = hashlib.sha256(data).hexdigest()
    download_file(server.url, dest, sha256=sha, progress=False, backoff=0)
    assert len(server.requests) == 1


def test_wrong_checksum_retries_then_fails_clearly(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "a.tgz"
    wrong = "0" * 32
    with pytest.raises(DownloadError) as err:
        download_file(server.url, dest, md5=wrong, retries=3, progress=False, backoff=0)
    msg = str(err.value)
    actual = hashlib.md5(server.payload).hexdigest()
    assert server.url in msg and wrong in msg and actual in msg
    assert "manually" in msg and str(dest) in msg
    assert len(server.requests) == 3
    # Each mismatch deleted the bad partial, so every attempt started from byte 0.
    assert all(rng is None for _, rng in server.requests)
    assert not dest.exists() and not dest.with_name("a.tgz.part").exists()


def test_network_error_is_retried(server: Server, fake_tgz, tmp_path: Path) -> None:
    server.fail_first = 2
    dest = tmp_path / "a.tgz"
    download_file(server.url, dest, md5=fake_tgz[1], retries=3, progress=False, backoff=0)
    assert dest.read_bytes() == fake_tgz[0] and len(server.requests) == 3


def test_network_error_after_all_attempts(server: Server, tmp_path: Path) -> None:
    server.always_fail = True
    dest = tmp_path / "a.tgz"
    with pytest.raises(DownloadError, match="after 2 attempt") as err:
        download_file(server.url, dest, md5="1" * 32, retries=2, progress=False, backoff=0)
    assert server.url in str(err.value) and "1" * 32 in str(err.value)
    assert "503" in str(err.value)
    assert len(server.requests) == 2 and not dest.exists()


def test_missing_file_fails_fast(server: Server, tmp_path: Path) -> None:
    url = server.url.replace("imagenette2-160.tgz", "nope.tgz")
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(url, tmp_path / "n.tgz", retries=5, progress=False, backoff=0)
    assert len(server.requests) == 1


def test_resume_partial_with_range(server: Server, fake_tgz, tmp_path: Path) -> None:
    data, md5 = fake_tgz
    dest = tmp_path / "a.tgz"
    dest.with_name("a.tgz.part").write_bytes(data[:5000])
    download_file(server.url, dest, md5=md5, progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert server.requests == [(server.requests[0][0], "bytes=5000-")]


def test_resume_falls_back_to_restart_without_range(
    server: Server, fake_tgz, tmp_path: Path
) -> None:
    data, md5 = fake_tgz
    server.support_range = False
    dest = tmp_path / "a.tgz"
    dest.with_name("a.tgz.part").write_bytes(b"garbage that must be discarded")
    download_file(server.url, dest, md5=md5, progress=False, backoff=0)
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_cut_connection_resumes_from_partial(server: Server, fake_tgz, tmp_path: Path) -> None:
    data, md5 = fake_tgz
    server.cut_first, server.cut_bytes = 1, 7000
    dest = tmp_path / "a.tgz"
    download_file(server.url, dest, md5=md5, retries=3, progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert [rng for _, rng in server.requests] == [None, "bytes=7000-"]


def test_complete_partial_gets_416_and_restarts(server: Server, fake_tgz, tmp_path: Path) -> None:
    data, md5 = fake_tgz
    dest = tmp_path / "a.tgz"
    dest.with_name("a.tgz.part").write_bytes(data)
    download_file(server.url, dest, md5=md5, progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert [rng for _, rng in server.requests] == [f"bytes={len(data)}-", None]


# --------------------------------------------------------------------------------------------
# safe_extract
# --------------------------------------------------------------------------------------------


def test_safe_extract_tar_and_zip_and_replace(fake_tgz, tmp_path: Path) -> None:
    tgz = tmp_path / "a.tgz"
    tgz.write_bytes(fake_tgz[0])
    target = tmp_path / "out"
    files = safe_extract(tgz, target)
    assert len(files) == 3 * (N_TRAIN + N_VAL) + 1
    assert all(f.is_file() and target in f.parents for f in files)
    assert (target / "imagenette2-160" / "train" / WNIDS[0] / "img0.png").is_file()
    # Re-extracting a different archive replaces the folder as a whole.
    zpath = tmp_path / "b.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("x/y.txt", "hello")
        zf.writestr("x/sub/", "")
    assert safe_extract(zpath, target) == [target / "x" / "y.txt"]
    assert (target / "x" / "y.txt").read_text() == "hello"
    assert not (target / "imagenette2-160").exists()
    # No temp folders left next to the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "b.zip", "out"]


def _evil_tar(path: Path, kind: str, outside: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        _add_bytes(tf, "good/first.txt", b"written before the bad member if not pre-validated")
        if kind == "absolute":
            _add_bytes(tf, str(outside / "sentinel.txt"), b"pwned")
        elif kind == "dotdot":
            _add_bytes(tf, "good/../../sentinel.txt", b"pwned")
        elif kind == "symlink":
            link = tarfile.TarInfo("esc")
            link.type, link.linkname = tarfile.SYMTYPE, "../outside"
            tf.addfile(link)
            _add_bytes(tf, "esc/sentinel.txt", b"pwned")
        elif kind == "symlink_abs":
            link = tarfile.TarInfo("esc")
            link.type, link.linkname = tarfile.SYMTYPE, str(outside)
            tf.addfile(link)
        elif kind == "symlink_chain":
            # 'a' -> '.' is inside, but 'a/../x' climbs out physically through the link.
            link = tarfile.TarInfo("a")
            link.type, link.linkname = tarfile.SYMTYPE, "."
            tf.addfile(link)
            _add_bytes(tf, "a/../sentinel.txt", b"pwned")
        elif kind == "symlink_dotted_name":
            # The link's own name hides behind '..': 'x/../d' is 'd'.
            link = tarfile.TarInfo("x/../d")
            link.type, link.linkname = tarfile.SYMTYPE, "."
            tf.addfile(link)
            _add_bytes(tf, "d/../sentinel.txt", b"pwned")
        elif kind == "hardlink":
            link = tarfile.TarInfo("hl")
            link.type, link.linkname = tarfile.LNKTYPE, "../outside/sentinel.txt"
            tf.addfile(link)
        elif kind == "fifo":
            fifo = tarfile.TarInfo("good/pipe")
            fifo.type = tarfile.FIFOTYPE
            tf.addfile(fifo)
        elif kind == "device":
            dev = tarfile.TarInfo("good/dev")
            dev.type = tarfile.CHRTYPE
            tf.addfile(dev)


@pytest.mark.parametrize(
    ("kind", "offender"),
    [
        ("absolute", "sentinel.txt"),
        ("dotdot", "good/../../sentinel.txt"),
        ("symlink", "esc"),
        ("symlink_abs", "esc"),
        ("symlink_chain", "a/../sentinel.txt"),
        ("symlink_dotted_name", "d/../sentinel.txt"),
        ("hardlink", "hl"),
        ("fifo", "good/pipe"),
        ("device", "good/dev"),
    ],
)
def test_safe_extract_rejects_malicious_tar(tmp_path: Path, kind: str, offender: str) -> None:
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    outside.mkdir()
    work.mkdir()
    archive = tmp_path / "evil.tgz"
    _evil_tar(archive, kind, outside)
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="refusing") as err:
        safe_extract(archive, work / "target")
    assert offender in str(err.value)
    # Nothing written anywhere: no target, no temp folder, no sentinel.
    assert _snapshot(tmp_path) == before
    assert not (work / "sentinel.txt").exists() and not (outside / "sentinel.txt").exists()


@pytest.mark.parametrize("name", ["../sentinel.txt", "/abs/sentinel.txt", "C:/x.txt"])
def test_safe_extract_rejects_malicious_zip(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "pwned")
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(archive, tmp_path / "target")
    assert _snapshot(tmp_path) == before


def test_safe_extract_allows_inside_links(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tf:
        _add_bytes(tf, "d/real.txt", b"data")
        link = tarfile.TarInfo("d/alias.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "real.txt"
        tf.addfile(link)
        _add_bytes(tf, "d/../top.txt", b"top")  # '..' that stays inside is fine
    files = safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "alias.txt").read_bytes() == b"data"
    assert tmp_path / "t" / "top.txt" in files


def test_safe_extract_corrupt_archive(tmp_path: Path, fake_tgz) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(fake_tgz[0][:2000])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        safe_extract(bad, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------
# The Imagenette path end to end
# --------------------------------------------------------------------------------------------


def test_imagenette_download_extract_prepare(server: Server, fake_tgz, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    data = prepare_dataset(
        "imagenette",
        image_size=8,
        raw_dir=raw,
        archive=(server.url, fake_tgz[1]),
        progress=False,
    )
    assert data.classes == ["tench", "English springer", "cassette player"]
    assert data.train_images.shape == (3 * N_TRAIN, 3, 8, 8)
    assert data.val_images.shape == (3 * N_VAL, 3, 8, 8)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Each image carries its class colour, so labels line up with pixels.
    for x, y in ((data.train_images, data.train_labels), (data.val_images, data.val_labels)):
        for img, label in zip(x, y, strict=True):
            expected = torch.tensor(COLOURS[int(label)], dtype=torch.uint8).view(3, 1, 1)
            assert torch.equal(img, expected.expand(3, 8, 8))
    assert data.info["wnids"] == WNIDS and data.info["md5"] == fake_tgz[1]
    assert data.info["counts"] == {"train": 9, "val": 6}
    assert (raw / "imagenette2-160.tgz").is_file()
    # A second call reuses the extracted folder: no new request.
    n = len(server.requests)
    again = prepare_dataset(
        "imagenette",
        image_size=8,
        raw_dir=raw,
        archive=(server.url, fake_tgz[1]),
        progress=False,
        max_per_class=1,
        seed=3,
    )
    assert len(server.requests) == n
    assert again.train_labels.tolist() == [0, 1, 2] and len(again.val_labels) == 6


def test_imagenette_url_override_checks_official_md5(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mirror base URL keeps the official file name and MD5: our fake archive must fail it.
    import salve.data.folders

    monkeypatch.setattr(
        salve.data.folders, "download_file", functools.partial(download_file, backoff=0)
    )
    base = server.url.rsplit("/", 1)[0]
    with pytest.raises(DownloadError, match="e793b78cc4c9e9a4ccc0c1155377a412"):
        prepare_dataset(
            "imagenette", image_size=8, raw_dir=tmp_path, url_override=base, progress=False
        )
    assert [path for path, _ in server.requests] == ["/imagenette2-160.tgz"] * 3
    assert not (tmp_path / "imagenette2-160").exists()
