"""salve.io: atomic writes, bit-exact safetensors round trips, clear errors on bad artifacts,
streamed tensor files byte-identical to safetensors' own."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import salve.io as sio
from salve.io import (
    ArtifactError,
    TensorFileWriter,
    TensorRows,
    _file_stamp,
    atomic_path,
    load_tensors,
    read_json,
    read_rows,
    save_tensors,
    tensor_info,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern (NaN payloads and -0.0 included)."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_replaces_on_success_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "out.txt"  # parents are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing under the final name until the block succeeds
    assert target.read_text() == "new"
    assert _listing(target.parent) == ["out.txt"]


def test_atomic_path_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.txt"]


def test_atomic_write_gives_the_mode_a_plain_write_would(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # mode 0o666 less the umask
    write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    existing = tmp_path / "params.yaml"
    existing.write_text("a: 1\n")
    for mode in (0o640, 0o604, 0o444):
        existing.chmod(mode)
        write_text(existing, "a: 2\n")  # replacing a file keeps its permissions
        assert stat.S_IMODE(existing.stat().st_mode) == mode
        save_tensors(existing, {"a": torch.ones(1)})
        assert stat.S_IMODE(existing.stat().st_mode) == mode


def test_failed_save_tensors_keeps_old_artifact(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "acts.safetensors"
    save_tensors(target, {"acts": torch.arange(6.0)})
    before = target.read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)  # partial output, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(sio, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(target, {"acts": torch.zeros(3)})
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["acts.safetensors"]


def test_failed_write_csv_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    write_csv(target, ["a", "b"], [[1, 2]])
    before = target.read_bytes()

    def rows():
        yield [3, 4]
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        write_csv(target, ["a", "b"], rows())
    assert target.read_bytes() == before == b"a,b\r\n1,2\r\n"
    assert _listing(tmp_path) == ["t.csv"]


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(4, 5, generator=g)
    f32[0, 0], f32[0, 1], f32[0, 2], f32[0, 3] = math.nan, -0.0, math.inf, 1e-45  # subnormal
    return {
        "f32": f32,
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 1]),
        "u8": torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=g),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 5),
        "transposed": torch.randn(3, 4, generator=g).T,  # not contiguous
    }


def test_save_load_round_trip_is_bit_exact(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    p = tmp_path / "t.safetensors"
    save_tensors(p, tensors, metadata={"who": "test"})
    back = load_tensors(p, required=tensors)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t.contiguous())), name
    assert torch.signbit(back["f32"][0, 1])  # -0.0 kept
    from safetensors import safe_open

    with safe_open(str(p), "pt") as fh:
        assert fh.metadata() == {"who": "test"}


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_safetensors_is_artifact_error_naming_file(tmp_path: Path, keep: int) -> None:
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"a": torch.arange(100.0), "b": torch.ones(3, dtype=torch.int64)})
    data = good.read_bytes()
    bad = tmp_path / "activations_train.safetensors"
    bad.write_bytes(data[:keep])
    with pytest.raises(ArtifactError) as info:
        load_tensors(bad)
    msg = str(info.value)
    assert str(bad) in msg and "truncated or corrupted" in msg


def test_garbage_and_missing_files_are_artifact_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="g.safetensors"):
        load_tensors(garbage)
    with pytest.raises(ArtifactError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_missing_required_key_is_artifact_error(tmp_path: Path) -> None:
    p = tmp_path / "acts.safetensors"
    save_tensors(p, {"acts": torch.zeros(2, 3)})
    assert set(load_tensors(p, required=["acts"])) == {"acts"}
    with pytest.raises(ArtifactError) as info:
        load_tensors(p, required=["acts", "labels"])
    msg = str(info.value)
    assert "labels" in msg and str(p) in msg and "'acts'" in msg


def test_json_text_bytes_round_trips(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None], "a": {"nan": math.nan, "s": "ü"}}
    write_json(tmp_path / "o.json", obj)
    back = read_json(tmp_path / "o.json")
    assert back["b"] == [1, 2.5, None] and back["a"]["s"] == "ü" and math.isnan(back["a"]["nan"])
    assert (tmp_path / "o.json").read_text().endswith("\n")
    assert list(json.loads((tmp_path / "o.json").read_text())) == ["a", "b"]  # sorted keys
    write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_bytes() == "héllo".encode()
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_read_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        read_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(ArtifactError, match="bad.json.*not valid JSON"):
        read_json(bad)


# --------------------------------------------------------------------------------------------
# Streamed tensor files
# --------------------------------------------------------------------------------------------


def _stream(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    chunks: list[int],
) -> None:
    """Write `tensors` through TensorFileWriter, interleaving tensors, uneven chunk sizes."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with TensorFileWriter(path, specs, metadata) as w:
        cursors = dict.fromkeys(tensors, 0)
        step = 0
        while any(cursors[k] < len(v) for k, v in tensors.items() if v.dim()):
            for name in reversed(list(tensors)):  # not the file's data order
                t = tensors[name]
                if t.dim() == 0 or cursors[name] >= len(t):
                    continue
                size = chunks[step % len(chunks)]
                w.write(name, t[cursors[name] : cursors[name] + size])
                cursors[name] += size
                step += 1
        for name, t in tensors.items():
            if t.dim() == 0:
                w.write(name, t)


def _fetch_like(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 256, (n, 3, 5, 5), dtype=torch.uint8, generator=g),
        "labels": torch.randint(0, 10, (n,), generator=g),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"kind": "relu"}])
@pytest.mark.parametrize(
    "make",
    [
        lambda: _fetch_like(11, 0),
        lambda: {"acts": torch.randn(9, 7), "labels": torch.arange(9)},
        lambda: {k: v.contiguous() for k, v in _sample_tensors().items()},
        lambda: {"a": torch.zeros(0, 3, dtype=torch.uint8), "b": torch.ones(2, dtype=torch.int8)},
        lambda: {},
        lambda: {
            str(dt).split(".")[-1]: torch.arange(6).reshape(3, 2).to(dt)
            for dt in (torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32)
            + (torch.uint64, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2)
        },
    ],
    ids=["fetch", "acts", "sample-dtypes", "empty", "no-tensors", "more-dtypes"],
)
def test_streamed_file_is_byte_identical_to_save_file(tmp_path: Path, make, metadata) -> None:
    tensors = make()
    if not tensors and metadata == {}:
        # save_file writes invalid JSON here ('{},"__metadata__":{}}'); ours stays valid.
        _stream(tmp_path / "x.safetensors", tensors, metadata, [1])
        assert (tmp_path / "x.safetensors").read_bytes()[8:].rstrip() == b'{"__metadata__":{}}'
        return
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    for chunks in ([1], [4, 1, 3], [1000]):
        out = tmp_path / f"streamed{len(chunks)}.safetensors"
        _stream(out, tensors, metadata, chunks)
        assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), chunks
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "ref.safetensors"  # no temp files


def test_streamed_metadata_keys_are_sorted_and_round_trip(tmp_path: Path) -> None:
    # save_file orders two or more metadata keys differently from run to run; we sort them.
    meta = {f"k{i}": str(i) for i in (3, 1, 2)} | {"é": 'q"uote'}
    p = tmp_path / "m.safetensors"
    _stream(p, _fetch_like(3, 1), meta, [2])
    n = int.from_bytes(p.read_bytes()[:8], "little")
    header = json.loads(p.read_bytes()[8 : 8 + n])
    assert list(header["__metadata__"]) == ["k1", "k2", "k3", "é"]
    from safetensors import safe_open

    with safe_open(str(p), "pt") as fh:
        assert fh.metadata() == meta
    back = load_file(str(p))
    want = _fetch_like(3, 1)
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_streamed_file_appears_only_when_every_row_is_written(tmp_path: Path) -> None:
    target = tmp_path / "train.safetensors"
    save_tensors(target, {"old": torch.ones(1)})
    target.chmod(0o640)
    before = target.read_bytes()
    t = _fetch_like(6, 2)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}
    # Rows that do not add up: refused at close, nothing replaces the old file.
    short = r"do not add up \(labels 0 of 6, images 4 of 6"
    with pytest.raises(ValueError, match=short), TensorFileWriter(target, specs) as w:
        w.write("images", t["images"][:4])
    assert target.read_bytes() == before and _listing(tmp_path) == ["train.safetensors"]
    # An exception inside the block (an interrupted run): the same.
    with pytest.raises(RuntimeError, match="decoder died"), TensorFileWriter(target, specs) as w:
        w.write("labels", t["labels"])
        raise RuntimeError("decoder died")
    assert target.read_bytes() == before and _listing(tmp_path) == ["train.safetensors"]
    # Until close, the final name still holds the old file.
    w = TensorFileWriter(target, specs)
    w.write("images", t["images"])
    w.write("labels", t["labels"])
    assert target.read_bytes() == before
    w.close()
    assert all(torch.equal(load_tensors(target)[k], t[k]) for k in t)
    assert _listing(tmp_path) == ["train.safetensors"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # a replaced file keeps its mode
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    fresh = tmp_path / "fresh.safetensors"
    _stream(fresh, t, None, [6])
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


@pytest.mark.parametrize(
    ("name", "chunk", "pattern"),
    [
        ("labels", torch.arange(7), r"0 \+ 7 rows exceed the declared 6"),
        ("labels", torch.arange(3, dtype=torch.int32), "got dtype torch.int32"),
        ("images", torch.zeros(2, 3, 5, 4, dtype=torch.uint8), r"want \[r, 3, 5, 5\]"),
        ("images", torch.zeros(3, 5, 5, dtype=torch.uint8), r"want \[r, 3, 5, 5\]"),
        ("acts", torch.zeros(1), r"no tensor 'acts'; declared \['labels', 'images'\]"),
    ],
)
def test_writer_refuses_bad_chunks(tmp_path: Path, name, chunk, pattern) -> None:
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in _fetch_like(6, 0).items()}
    with pytest.raises(ValueError, match=pattern), TensorFileWriter(tmp_path / "x", specs) as w:
        w.write(name, chunk)
    assert _listing(tmp_path) == []


def test_writer_refuses_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative size"):
        TensorFileWriter(tmp_path / "x", {"a": (torch.float32, (-1, 2))})
    with pytest.raises(ValueError, match="not a valid tensor name"):
        TensorFileWriter(tmp_path / "x", {"__metadata__": (torch.float32, (1,))})
    with pytest.raises(ValueError, match="metadata must map str to str"):
        TensorFileWriter(tmp_path / "x", {}, metadata={"n": 3})
    assert _listing(tmp_path) == []


def test_read_rows_equals_slicing_and_tensor_info(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in _sample_tensors().items()} | _fetch_like(13, 3)
    p = tmp_path / "t.safetensors"
    save_file(tensors, str(p))
    info = tensor_info(p)
    assert info == {k: (tensors[k].dtype, tuple(tensors[k].shape)) for k in info}
    assert set(info) == set(tensors)
    rng = np.random.default_rng(0)
    for name, t in tensors.items():
        if t.dim() == 0:
            with pytest.raises(ValueError, match="0-dim"):
                read_rows(p, name, 0, 1)
            continue
        n = len(t)
        ranges = [(0, n), (0, 0), (n, n + 5), (-3, n), (2, 1)]
        ranges += [tuple(sorted(rng.integers(0, n + 1, 2).tolist())) for _ in range(5)]
        for start, stop in ranges:
            got = read_rows(p, name, start, stop)
            want = t[start:stop]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, start, stop)
            assert torch.equal(_bits(got), _bits(want)), (name, start, stop)


def test_read_rows_reads_only_the_requested_bytes(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "t.safetensors"
    t = _fetch_like(50, 4)
    save_file(t, str(p))
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, n=-1):
            data = self.fh.read(n)
            reads.append(len(data))
            return data

        def readinto(self, buf):
            got = self.fh.readinto(buf)
            reads.append(got)
            return got

        def seek(self, *a):
            return self.fh.seek(*a)

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    got = read_rows(p, "images", 10, 12)
    monkeypatch.undo()
    assert torch.equal(got, t["images"][10:12])
    n_header = int.from_bytes(p.read_bytes()[:8], "little")
    assert sum(reads) == 8 + n_header + 2 * 3 * 5 * 5  # the header and two images, no more


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -75])
def test_truncated_file_is_artifact_error_for_read_rows(tmp_path: Path, keep: int) -> None:
    good = tmp_path / "good.safetensors"
    save_tensors(good, _fetch_like(4, 5))
    bad = tmp_path / "train.safetensors"
    bad.write_bytes(good.read_bytes()[:keep])
    for call in (lambda: read_rows(bad, "images", 0, 1), lambda: tensor_info(bad)):
        with pytest.raises(ArtifactError) as info:
            call()
        msg = str(info.value)
        assert str(bad) in msg and "truncated or corrupted" in msg and "rerun the stage" in msg


def test_read_rows_missing_file_garbage_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        read_rows(tmp_path / "none.safetensors", "x", 0, 1)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    with pytest.raises(ArtifactError, match="g.safetensors.*header is not JSON"):
        tensor_info(garbage)
    p = tmp_path / "acts.safetensors"
    save_tensors(p, {"acts": torch.zeros(2, 3)})
    with pytest.raises(ArtifactError) as info:
        read_rows(p, "labels", 0, 1)
    msg = str(info.value)
    assert "labels" in msg and str(p) in msg and "'acts'" in msg and "rerun the stage" in msg


def test_tensor_rows_slice_like_the_tensor(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    t = _fetch_like(11, 6)
    save_file(t, str(p))
    rows = TensorRows(p, "images")
    assert (len(rows), rows.shape, rows.dtype) == (11, (11, 3, 5, 5), torch.uint8)
    for index in (slice(None), slice(3, 7), slice(-2, None), slice(8, 30), slice(5, 2)):
        assert torch.equal(rows[index], t["images"][index]), index
    assert torch.equal(TensorRows(p, "labels")[:], t["labels"])
    for bad in (3, torch.tensor(3), slice(0, 4, 2), [[1, 2]], [1.0, 2.0]):
        with pytest.raises(TypeError, match="TensorRows"):
            rows[bad]
    # (read_rows is TensorRows(...)[a:b]: its byte-count test above covers what is read)


def test_tensor_rows_gather_like_the_tensor(tmp_path: Path) -> None:
    """Shuffled batches (fine-tuning) and top-k rows (gradfam): rows[idx] in idx's order."""
    p = tmp_path / "t.safetensors"
    t = _fetch_like(11, 6)
    save_file(t, str(p))
    rows = TensorRows(p, "images")
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    for index in (
        order,
        order[:4],
        [10, 0, 10, 3],
        (-1, -11, 5),
        torch.tensor([], dtype=torch.long),
    ):
        want = t["images"][torch.as_tensor(index, dtype=torch.long)]
        got = rows[index]
        assert got.shape == want.shape and torch.equal(got, want), index
    for bad in ([11], [-12], torch.tensor([0, 99])):
        with pytest.raises(IndexError, match="11 rows"):
            rows[bad]
    truncated = tmp_path / "short.safetensors"
    save_file(t, str(truncated))
    short = TensorRows(truncated, "images")  # stored last (safetensors puts int64 first)
    truncated.write_bytes(p.read_bytes()[:-8])  # the last image's bytes are cut short
    short._stamp = _file_stamp(truncated)  # as if opened after the damage
    with pytest.raises(ArtifactError, match="rows 10:11 end past the end of the file"):
        short[[0, 10]]


def test_tensor_rows_refuse_a_file_replaced_under_them(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    save_tensors(p, _fetch_like(6, 1))
    rows = TensorRows(p, "images")
    save_tensors(p, _fetch_like(9, 2))  # another run rewrote it: other shapes, other offsets
    with pytest.raises(ArtifactError, match="replaced, changed or removed while it was being read"):
        rows[0:2]
    p.unlink()
    with pytest.raises(ArtifactError, match="replaced, changed or removed"):
        rows[0:2]
    with pytest.raises(ArtifactError, match="not found"):
        TensorRows(p, "images")
    save_tensors(p, {"acts": torch.zeros(2, 3), "scalar": torch.tensor(1.0)})
    with pytest.raises(
        ArtifactError, match=r"missing tensors \['images'\]; found \['acts', 'scalar'\]"
    ):
        TensorRows(p, "images")
    with pytest.raises(ValueError, match="0-dim"):
        TensorRows(p, "scalar")


def test_metadata_comes_out_in_one_order(tmp_path):
    """safetensors writes metadata from a hash map: the same tensors and metadata gave other
    bytes from run to run (the steered model's file). Saved in key order, they are identical."""
    from safetensors import safe_open

    from salve.io import load_tensors, save_tensors

    tensors = {"w": torch.arange(6.0).view(2, 3)}
    meta = {f"key_{i:02d}": f"value {i} ü" for i in range(16)}
    blobs = set()
    for i in range(6):
        path = tmp_path / f"m{i}.safetensors"
        shuffled = dict(sorted(meta.items(), key=lambda kv: (hash((i, kv[0])), kv[0])))
        save_tensors(path, tensors, metadata=shuffled)
        blobs.add(path.read_bytes())
        assert torch.equal(load_tensors(path)["w"], tensors["w"])
        with safe_open(str(path), "pt") as fh:
            assert fh.metadata() == meta
    assert len(blobs) == 1
