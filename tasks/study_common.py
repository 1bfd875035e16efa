"""What the study's stages share: how their jobs run, and how a part's record is written.

Each study stage (tasks/study_*.py) reads the pipeline's outputs, maps a job function over
independent jobs (attacks per class and norm, SAE fits per kind and seed, backbone edits per
class) with ``map_fn``, and writes its outputs. Under `salve study` the map runs on Dask
(flows/fanout.py: a local cluster, or `SALVE_DASK_ADDRESS`); under `dvc repro` / `python -m
tasks` it runs here, one job after the other. Every job starts with :func:`worker_setup` (one
torch thread, the pipeline's CPU kernels, the seed), so its numbers do not depend on where or
when it runs. Jobs carry paths and small parameters, never tensors.

A part writes ``results/<stage>/record.json`` (everything the study page shows) and
``metrics/<stage>.json`` (what `dvc metrics`, `salve diff` and `salve compare` read: the record
without its per-sample lists, and the settings).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from salve.io import ArtifactError, write_json
from tasks import STAGES

Mapper = Callable[[Callable[[dict], Any], Sequence[dict]], list]
RECORD_SCHEMA = 1


def serial_map(fn: Callable[[dict], Any], jobs: Sequence[dict]) -> list:
    return [fn(job) for job in jobs]


def worker_setup(reproducible: bool, seed: int) -> None:
    """Before a job's first tensor operation: the pipeline's kernels, one thread, the seed."""
    from salve.runtime import pin_cpu_kernels, seed_everything

    pin_cpu_kernels(reproducible)
    seed_everything(seed, num_threads=1)


def worker_root(path: str) -> Path:
    """The repository on the machine a job runs on (an existing cluster's worker needs it at the
    same path as the salve process)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(
            f"{root}: no such folder on the Dask worker {socket.gethostname()}: a worker of an "
            "existing cluster ($SALVE_DASK_ADDRESS) needs this repository, with its results, at "
            "the same path as the salve process (docs/OPERATIONS.md)."
        )
    return root


def normalisation(sidecar: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    norm = sidecar["normalisation"]
    return tuple(norm["mean"]), tuple(norm["std"])


def common_job(cfg) -> dict[str, Any]:
    """The settings every job of a study stage carries."""
    return {"seed": cfg.common.seed, "reproducible": cfg.common.reproducible}


def write_part(
    root: Path, stage: str, record: Any, settings: Mapping[str, Any], metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """Write a part's record (its out folder) and metrics file; returns the metrics."""
    spec = STAGES[stage]
    write_json(
        spec.path(root, "record"),
        {"schema_version": RECORD_SCHEMA, "settings": dict(settings), "record": record},
    )
    out = {"settings": dict(settings), **metrics}
    write_json(spec.metrics_path(root), out)
    return out
