"""benchmarks/fingerprint.py: the cross-machine byte check finds a changed, missing or new file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fingerprint", REPO / "benchmarks/fingerprint.py")
fingerprint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fingerprint)


def _run(root: Path) -> None:
    (root / "results/fit_sae").mkdir(parents=True)
    (root / "metrics").mkdir()
    (root / "results/fit_sae/sae.safetensors").write_bytes(b"\x00\x01weights")
    (root / "results/fit_sae/sae.json").write_text('{"git_revision": "abc"}')  # provenance
    (root / "metrics/fit_sae.json").write_text('{"fvu": 0.016}')


def test_check_passes_on_the_same_bytes_and_ignores_sidecars(tmp_path: Path, capsys) -> None:
    _run(tmp_path)
    record = tmp_path / "record.json"
    assert fingerprint.main(["--write", "--root", str(tmp_path), "--record", str(record)]) == 0
    files = json.loads(record.read_text())["files"]
    assert sorted(files) == ["metrics/fit_sae.json", "results/fit_sae/sae.safetensors"]
    (tmp_path / "results/fit_sae/sae.json").write_text('{"git_revision": "def"}')
    assert fingerprint.main(["--check", "--root", str(tmp_path), "--record", str(record)]) == 0
    assert "all 2 files identical" in capsys.readouterr().out


def test_check_names_each_changed_missing_and_new_file(tmp_path: Path, capsys) -> None:
    _run(tmp_path)
    record = tmp_path / "record.json"
    fingerprint.main(["--write", "--root", str(tmp_path), "--record", str(record)])
    (tmp_path / "results/fit_sae/sae.safetensors").write_bytes(b"\x00\x02weights")  # one bit
    (tmp_path / "metrics/fit_sae.json").unlink()
    (tmp_path / "metrics/edit.json").write_text("{}")
    capsys.readouterr()
    assert fingerprint.main(["--check", "--root", str(tmp_path), "--record", str(record)]) == 1
    out = capsys.readouterr().out
    assert "differs: results/fit_sae/sae.safetensors" in out
    assert "missing here: metrics/fit_sae.json" in out
    assert "not in the record: metrics/edit.json" in out
