"""salve.io: atomic writes, bit-exact safetensors round trips, clear errors on bad artifacts."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import pytest
import torch

import salve.io as sio
from salve.io import (
    ArtifactError,
    atomic_path,
    load_tensors,
    read_json,
    save_tensors,
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
