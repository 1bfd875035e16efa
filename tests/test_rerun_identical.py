"""A rerun with identical inputs is recognised as one (issue #30): it writes byte-identical
outputs, so dvc.lock and DVC's run-cache see the same hashes.

The rerun happens in a copy of the session's built project after a new commit, as in a
teammate's fresh clone, whose HEAD is the commit that holds dvc.lock and never the revision the
first run started from. What differs between identical runs (git revision and working-tree
state, host, thread count, times) belongs in the run record (.salve/runs/) and the run log,
never in a DVC-tracked output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from salve.config import load
from salve.params_file import yaml_load
from tasks import STAGE_ORDER, STAGES
from tasks.runner import run_stage
from tests.conftest import TINY_PARAMS, copy_project, git

pytestmark = pytest.mark.slow

# The stages whose outputs recorded run-varying facts: the checkpoint sidecars (finetune,
# fit_sae, edit), the epoch times (finetune's plot) and the report's provenance and times.
RERUN = ("finetune", "fit_sae", "edit", "report")
# Keys that describe a run rather than its result; none may appear in a DVC-tracked output.
RUN_VARYING = {
    "git_revision",
    "hostname",
    "host",
    "cpu",
    "cuda_device",
    "torch_threads",
    "cpu_kernels",
    "seconds",
    "elapsed",
    "started",
    "finished",
    "timestamp",
    "epoch_seconds",
    "resumed_from_epoch",
}


def tracked_files(root: Path, stage: str) -> dict[str, bytes]:
    """Every file of the stage's DVC outputs: its folder, metrics file and plots."""
    spec = STAGES[stage]
    paths = [p for p in sorted(spec.folder(root).rglob("*")) if p.is_file()]
    paths += [spec.metrics_path(root), *(root / p for p in spec.plot_files)]
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def lock_entry(root: Path, stage: str) -> dict:
    return yaml_load((root / "dvc.lock").read_text())["stages"][stage]


def keys(obj) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in keys(v)}
    return set()


@pytest.fixture(scope="module")
def rerun(built_project_template: Path, tmp_path_factory: pytest.TempPathFactory):
    root = copy_project(built_project_template, tmp_path_factory.mktemp("rerun") / "project")
    before = {s: tracked_files(root, s) for s in RERUN}
    locks = {s: lock_entry(root, s) for s in RERUN}
    git(root, "commit", "-q", "--allow-empty", "-m", "a later commit, as a fresh clone has")
    cfg = load(root / "params.yaml")
    statuses = {s: run_stage(s, cfg, root, force=True, progress=False).status for s in RERUN}
    assert set(statuses.values()) == {"ran"}, statuses
    return root, before, locks


@pytest.mark.parametrize("stage", RERUN)
def test_rerun_writes_the_same_bytes_and_dvc_hashes(rerun, stage: str) -> None:
    root, before, locks = rerun
    after = tracked_files(root, stage)
    assert sorted(after) == sorted(before[stage])
    assert [p for p in after if after[p] != before[stage][p]] == []
    assert lock_entry(root, stage) == locks[stage]  # deps, params and outs: md5s and sizes


def test_no_dvc_output_records_a_run_varying_value(rerun) -> None:
    root = rerun[0]
    for stage in STAGE_ORDER:  # the pipeline's (the study's stages are not run here)
        for rel, data in tracked_files(root, stage).items():
            if rel.endswith(".json"):
                found = keys(json.loads(data)) & RUN_VARYING
            elif rel.endswith(".csv"):
                found = set(next(csv.reader(data.decode().splitlines()), [])) & RUN_VARYING
            else:
                continue
            assert not found, f"{rel} records {sorted(found)}"


def test_the_run_record_keeps_what_varies(rerun) -> None:
    """Out of the outputs, not lost: this run's revision, host and times are in its record."""
    from tasks.common import run_record_path

    root = rerun[0]
    head = git(root, "rev-parse", "HEAD").strip()
    for stage in RERUN:
        record = json.loads(run_record_path(root, stage).read_text())
        assert record["stage"] == stage
        assert record["git_revision"].removesuffix("+dirty") == head
        assert record["hostname"] and record["finished"]
        assert record["torch_threads"] == TINY_PARAMS["common"]["num_threads"]
        assert record["cpu_kernels"]["reproducible"] == "true"
        assert {"dvc", "prefect"} <= set(record["libraries"])
    finetune = json.loads(run_record_path(root, "finetune").read_text())
    assert len(finetune["epoch_seconds"]) == TINY_PARAMS["finetune"]["epochs"]
    assert all(s > 0 for s in finetune["epoch_seconds"])
    assert finetune["resumed_from_epoch"] == 0
