"""Team sharing, as docs/OPERATIONS.md's recipe drives it: clone A commits the DVC remote's
configuration, runs the pipeline, commits (`git add -A`: a compare page lying in reports/compare/
stays out) and pushes to a local-directory DVC remote; a fresh `git clone` B runs `dvc pull`
with no configuration of its own, then finds nothing to do (`dvc status` clean, `salve run`
skips every stage), holding byte-identical checkpoints.

The pipeline run of A is the session's template project (tests/conftest.py). Comparing versions
(`dvc exp run`, `salve exps`, `salve diff`, `salve compare`) is tested in tests/test_compare.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from salve.params_file import yaml_load
from tests.conftest import REPO, copy_project, dvc, git

pytest_plugins = ["tests.prefect_server"]

CLEAN = "Data and pipelines are up to date."
CHECKPOINTS = ("results/finetune/model.safetensors", "results/fit_sae/sae.safetensors")


def stage_names(root: Path) -> list[str]:
    return list(yaml_load((root / "dvc.yaml").read_text())["stages"])


def tree_bytes(root: Path, folder: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / folder).rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


def timed_dvc(root: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = dvc(root, *args, check=False)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return time.perf_counter() - t0, out.stdout


def salve_run(root: Path) -> tuple[float, dict[str, str], str]:
    """`salve run` as a user types it; returns seconds, each stage's status, and the output."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), "run", "--no-progress"],
        cwd=REPO,  # this checkout's code
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = {
        parts[0]: parts[1]
        for parts in (line.split() for line in out.stdout.splitlines())
        if len(parts) > 1 and parts[0] in stage_names(root)
    }
    return seconds, statuses, out.stdout


@pytest.mark.slow
def test_push_clone_pull_then_nothing_to_do(built_project_template: Path, tmp_path: Path) -> None:
    a = copy_project(built_project_template, tmp_path / "A")
    remote = tmp_path / "dvc-remote"
    assert git(a, "status", "--porcelain") == "", "A should hold its run committed (dvc.lock)"
    # once, in the shared configuration
    dvc(a, "remote", "add", "-d", "shared", str(remote))
    git(a, "add", ".dvc/config")
    git(a, "commit", "-qm", "DVC remote: shared")
    # who ran the pipeline (A's run is the template's: every stage is fresh)
    (a / "reports" / "compare").mkdir(parents=True)
    (a / "reports" / "compare" / "HEAD_1_vs_HEAD.html").write_text("<html></html>")
    _, statuses, _ = salve_run(a)
    assert set(statuses.values()) == {"skipped"}
    git(a, "add", "-A")
    assert git(a, "status", "--porcelain") == "", "git add -A staged something"
    push_s, push_out = timed_dvc(a, "push")
    assert "pushed" in push_out
    assert "in sync" in dvc(a, "status", "--cloud").stdout

    # everyone else: clone, (install), dvc pull, dvc status, salve run
    b = tmp_path / "B"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True, timeout=60)
    assert (b / "dvc.lock").exists() and not (b / CHECKPOINTS[0]).exists()
    assert not (b / "reports" / "compare").exists()
    pull_s, _ = timed_dvc(b, "pull")
    assert dvc(b, "status").stdout.strip() == CLEAN
    run_s, statuses, out = salve_run(b)
    assert statuses == dict.fromkeys(stage_names(b), "skipped"), out

    for rel in CHECKPOINTS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert tree_bytes(a, "results") == tree_bytes(b, "results")
    assert tree_bytes(a, "metrics") == tree_bytes(b, "metrics")
    print(
        f"\n[sharing] dvc push {push_s:.1f} s + dvc pull {pull_s:.1f} s = round trip "
        f"{push_s + pull_s:.1f} s; `salve run` in the clone (all skipped) {run_s:.1f} s"
    )


def test_every_params_section_feeds_a_stage() -> None:
    """`dvc exp run -S section.key=value` only reruns something if a stage declares the param."""
    params = yaml_load((REPO / "params.yaml").read_text())
    declared = {
        p.split(".")[0]
        for stage in yaml_load((REPO / "dvc.yaml").read_text())["stages"].values()
        for entry in stage.get("params", [])
        for p in (entry if isinstance(entry, dict) else {entry: None})
    }
    from salve.config import STUDY_SECTIONS

    study = {
        p.split(".")[0]
        for stage in yaml_load((REPO / "study" / "dvc.yaml").read_text())["stages"].values()
        for entry in stage.get("params", [])
        for p in (entry if isinstance(entry, dict) else {entry: None})
    }
    assert sorted(set(params) - declared - set(STUDY_SECTIONS)) == []
    assert declared.isdisjoint(STUDY_SECTIONS)  # the pipeline reruns on no study parameter
    assert set(STUDY_SECTIONS) <= study
