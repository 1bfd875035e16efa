"""What every stage shares: user paths, provenance metadata, metrics and plots writing."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from salve import __version__
from salve.config import Config
from salve.io import write_csv
from salve.runtime import aten_capability, kernel_settings
from tasks import STAGES
from tasks.records import write_record

SCHEMA_VERSION = 1


def resolve_user_path(root: Path, value: str) -> Path:
    """A path from params.yaml (data.path, finetune.weights): relative paths are relative to the
    repository root, as DVC resolves them, wherever the stage is started from."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def git_revision(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        rev = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty and rev != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "safetensors", "numpy", "prefect", "dvc", "scikit-learn")
    out = {"salve": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_metadata(root: Path, cfg: Config, device: torch.device, sections: tuple[str, ...]) -> dict:
    """Provenance recorded next to every checkpoint (and in the report)."""
    params = cfg.to_dict()
    return {
        "schema_version": SCHEMA_VERSION,
        "git_revision": git_revision(root),
        "libraries": library_versions(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": kernel_settings() | {"aten_capability": aten_capability()},
        "params": {s: params[s] for s in sections},
    }


def write_metrics(root: Path, stage: str, record: type, metrics: dict[str, Any]) -> None:
    """metrics/<stage>.json, checked against the stage's metrics record (tasks/records.py)."""
    write_record(STAGES[stage].metrics_path(root), record, metrics)


def write_plot(root: Path, stage: str, role: str, rows: list[dict[str, Any]]) -> None:
    header = list(rows[0]) if rows else []
    write_csv(STAGES[stage].plot(root, role), header, ([r[h] for h in header] for r in rows))
