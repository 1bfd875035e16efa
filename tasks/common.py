"""What every stage shares: user paths, provenance metadata, metrics and plots writing.

Two kinds of provenance, kept apart so that identical results have identical DVC hashes:

- `run_metadata`, written into DVC-tracked outputs (checkpoint sidecars): only what the result
  is a function of (parameters, library versions, device type). The code that made an output is
  pinned by DVC already (the stage's code deps in dvc.lock).
- `run_environment`, written by `record_run` to `.salve/runs/<stage>.json` (git-ignored, not a
  DVC output) and the run log: what varies from run to run for the same result (git revision
  and working-tree state, host, CPU kernels, thread count, GPU model, times). A fresh clone's
  HEAD is never the revision a committed run recorded, so even a clean revision would change
  every hash.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from salve import __version__
from salve.config import Config
from salve.io import write_csv, write_json
from salve.runtime import aten_capability, kernel_mode, kernel_settings
from tasks import STAGES
from tasks.records import write_record

log = logging.getLogger("salve")

# 2: the run-varying fields (git_revision, cuda_device, torch_threads, cpu_kernels, prefect's
# and dvc's versions, libraries' build labels) moved from the sidecars to the run record.
# 3: `kernels`, the kernel mode that made the numbers (salve.runtime.kernel_mode).
SCHEMA_VERSION = 3
# Libraries that compute or serialise the results: their versions go into the sidecars. The
# orchestration (prefect, dvc) cannot change a byte of them: run record only.
RESULT_LIBRARIES = ("torch", "torchvision", "safetensors", "numpy", "scikit-learn")
RUN_LIBRARIES = ("prefect", "dvc")


def resolve_user_path(root: Path, value: str) -> Path:
    """A path from params.yaml (data.path, finetune.weights): relative paths are relative to the
    repository root, as DVC resolves them, wherever the stage is started from."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def git_revision(root: Path) -> str:
    """HEAD, +dirty when tracked files differ from it. `status` takes no optional lock on the
    index: a concurrent stage's DVC bookkeeping (`git add dvc.lock`) would fail on it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        rev = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty and rev != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions(names: tuple[str, ...], *, build: bool = False) -> dict[str, str]:
    """Installed versions, without the local build label (torch's `+cpu`, `+cu128`: which
    build of one release a host installed) unless ``build``."""
    out = {"salve": __version__, "python": platform.python_version()}
    for name in names:
        try:
            version = importlib.metadata.version(name)
            out[name] = version if build else version.split("+", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_metadata(root: Path, cfg: Config, device: torch.device, sections: tuple[str, ...]) -> dict:
    """Provenance recorded next to every checkpoint (and in the report): a function of the
    stage's inputs only, so that a rerun with the same inputs writes the same bytes."""
    params = cfg.to_dict()
    return {
        "schema_version": SCHEMA_VERSION,
        "libraries": library_versions(RESULT_LIBRARIES),
        "device": str(device),
        "kernels": kernel_mode(cfg.common.reproducible, device.type),
        "params": {s: params[s] for s in sections},
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def run_environment(root: Path) -> dict[str, Any]:
    """Where and when this run happened: the facts that differ between identical runs."""
    return {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(root),
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": kernel_settings() | {"aten_capability": aten_capability()},
        "libraries": library_versions(RESULT_LIBRARIES + RUN_LIBRARIES, build=True),
    }


def run_record_path(root: Path, stage: str) -> Path:
    return Path(root) / ".salve" / "runs" / f"{stage}.json"


def record_run(root: Path, stage: str, **details: Any) -> None:
    """This run's environment and ``details`` (timings and the like) to .salve/runs/<stage>.json
    and the run log. Informational: a failure to write it is logged, never fails the stage."""
    record = {"stage": stage} | run_environment(root) | details
    log.info(
        "stage %s: git %s on %s, %d torch threads",
        stage,
        record["git_revision"],
        record["hostname"],
        record["torch_threads"],
    )
    try:
        write_json(run_record_path(root, stage), record)
    except OSError as exc:
        log.warning("stage %s: run record not written (%s)", stage, exc)


class PartTimes:
    """Seconds spent in each part of a stage, for its run record (``write_metrics(run=...)``):
    what dominates a stage at a user's scale, without a profiler."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """The time since the previous lap (or the start) is ``part``'s."""
        now = time.perf_counter()
        self.seconds[part] = round(self.seconds.get(part, 0.0) + now - self._last, 3)
        self._last = now

    def record(self) -> dict[str, dict[str, float]]:
        return {"part_seconds": dict(self.seconds)}


def write_metrics(
    root: Path, stage: str, record: type, metrics: dict[str, Any], *, run: dict | None = None
) -> None:
    """metrics/<stage>.json, checked against the stage's metrics record (tasks/records.py).

    Every stage writes its metrics once, last: the run record (`record_run`, with ``run``'s
    entries) is written here too, so each stage's run-varying facts have one place whichever
    entry point ran it (`salve`, `python -m tasks` under `dvc repro`)."""
    write_record(STAGES[stage].metrics_path(root), record, metrics)
    record_run(root, stage, **(run or {}))


def write_plot(root: Path, stage: str, role: str, rows: list[dict[str, Any]]) -> None:
    header = list(rows[0]) if rows else []
    write_csv(STAGES[stage].plot(root, role), header, ([r[h] for h in header] for r in rows))
