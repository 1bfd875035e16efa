"""Reproducibility: two runs from a clean state with the same parameters give the same bytes.

Run 1 is the session's template project (tests/prefect_server.py: a fresh tiny project, every
stage run once through tasks.runner.run_stage); run 2 is another fresh tiny project run the same
way here. No Prefect: the point is the stages' determinism, not orchestration.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, cpu_flags, git, make_project, run_pipeline

pytest_plugins = ["tests.prefect_server"]
pytestmark = pytest.mark.slow

CHECKPOINTS = ("results/finetune/model.safetensors", "results/fit_sae/sae.safetensors")
SIDECARS = {
    "results/finetune/model.json": ("finetune", "common", "data"),
    "results/fit_sae/sae.json": ("sae", "common"),
}


@pytest.fixture(scope="module")
def two_runs(built_project_template: Path, tmp_path_factory: pytest.TempPathFactory):
    second = make_project(tmp_path_factory.mktemp("repro") / "project")
    statuses = run_pipeline(second)
    assert set(statuses.values()) == {"ran"}, statuses
    return built_project_template, second


def files(root: Path, folder: str, pattern: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted((root / folder).rglob(pattern))
    }


def test_metrics_json_identical(two_runs) -> None:
    a, b = two_runs
    ma, mb = files(a, "metrics", "*.json"), files(b, "metrics", "*.json")
    assert ma and sorted(ma) == sorted(mb)
    for name in ma:
        assert ma[name] == mb[name], f"{name} differs:\n{ma[name][:400]}\n{mb[name][:400]}"


def test_checkpoints_byte_identical(two_runs) -> None:
    a, b = two_runs
    for rel in CHECKPOINTS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # Every other tensor file too (datasets, activations, edited heads...).
    ta, tb = files(a, "results", "*.safetensors"), files(b, "results", "*.safetensors")
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []


def test_every_dvc_output_identical(two_runs) -> None:
    """Sidecars, plots and the report too: nothing in a DVC-tracked output records where or when
    it was made (that is the run record's, .salve/runs/), so dvc.lock records the same hashes."""
    from salve.params_file import yaml_load

    a, b = two_runs
    for folder in ("results", "metrics", "plots", "reports"):
        fa, fb = files(a, folder, "*.*"), files(b, folder, "*.*")
        assert fa and sorted(fa) == sorted(fb), folder
        assert [k for k in fa if fa[k] != fb[k]] == []
    la, lb = (yaml_load((r / "dvc.lock").read_text())["stages"] for r in (a, b))
    assert la == lb


@pytest.mark.parametrize("sidecar", sorted(SIDECARS))
def test_sidecar_records_provenance(two_runs, sidecar: str) -> None:
    for root in two_runs:
        meta = json.loads((root / sidecar).read_text())
        for section in SIDECARS[sidecar]:
            for key, value in TINY_PARAMS[section].items():
                assert meta["params"][section][key] == value, (section, key)
        libs = meta["libraries"]
        for name in ("torch", "safetensors", "numpy"):  # the release, not the build (+cpu)
            assert libs[name] == importlib.metadata.version(name).split("+")[0], name
        assert libs["salve"] and libs["python"]
        assert meta["device"] == "cpu"
        assert meta["kernels"] == "cross-CPU pin"  # TINY_PARAMS: common.reproducible true
        assert meta["schema_version"] >= 3
    report = (two_runs[0] / "reports/latest/index.html").read_text()
    assert "<th>kernels</th>" in report and "cross-CPU pin" in report


@pytest.mark.parametrize("stage", ["finetune", "fit_sae", "edit"])
def test_run_record_keeps_what_varies(two_runs, stage: str) -> None:
    """The facts of one run (revision, host, threads, orchestration versions) are kept, in the
    run record beside the outputs rather than in them."""
    from tasks.common import run_record_path

    for root in two_runs:
        record = json.loads(run_record_path(root, stage).read_text())
        # The revision the run started from (+dirty once DVC has staged dvc.lock mid-run).
        first_commit = git(root, "rev-list", "--max-parents=0", "HEAD").strip()
        assert record["git_revision"].removesuffix("+dirty") == first_commit
        assert record["torch_threads"] == TINY_PARAMS["common"]["num_threads"]
        for name in ("dvc", "prefect", "torch"):
            assert record["libraries"][name] == importlib.metadata.version(name), name


def test_dvc_stage_command_matches_the_in_process_run(
    built_project_template: Path, tmp_path: Path
) -> None:
    """`python -m tasks fit_sae` (what dvc.yaml runs), started from a shell that sets none of the
    kernel variables, pins the kernels before its start-up checks and refits the SAE byte for byte.
    Its start-up checks once ran first, leaving ATen on AVX-512 kernels on such CPUs."""
    import os
    import subprocess
    import sys

    from salve.runtime import OPENBLAS_ENV, PINNED_ENV
    from tests.conftest import copy_project

    root = copy_project(built_project_template, tmp_path / "project")
    sae = root / "results/fit_sae/sae.safetensors"
    before = sae.read_bytes()
    sae.unlink()
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV.keys() | OPENBLAS_ENV.keys()}
    subprocess.run(
        [sys.executable, "-m", "tasks", "fit_sae", "--no-progress"],
        cwd=root, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    from tasks.common import run_record_path

    kernels = json.loads(run_record_path(root, "fit_sae").read_text())["cpu_kernels"]
    assert kernels["reproducible"] == "true"
    assert kernels["ATEN_CPU_CAPABILITY"] == "avx2"
    if "avx2" in cpu_flags():
        assert kernels["aten_capability"] == "AVX2"
        assert kernels["OPENBLAS_CORETYPE"] == "Haswell"
    assert sae.read_bytes() == before
