"""Team sharing and comparing pipeline versions, with DVC as a user drives it.

- Sharing: clone A runs the pipeline and pushes to a local-directory DVC remote; a fresh `git
  clone` B pulls and then finds nothing to do (`dvc status` clean, `salve run` skips every stage),
  holding byte-identical checkpoints.
- Comparing versions: `dvc exp run -S section.key=value` reruns what the parameter feeds;
  `dvc exp show`, `dvc metrics diff` and `dvc params diff` show the change; `dvc exp apply` brings
  an experiment back into the workspace (the docs/OPERATIONS.md recipe).

Run 1 of the pipeline is the session's template project (tests/prefect_server.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, dvc, git

pytest_plugins = ["tests.prefect_server"]

CLEAN = "Data and pipelines are up to date."
CHECKPOINTS = ("results/finetune/model.safetensors", "results/fit_sae/sae.safetensors")


def stage_names(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


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


@pytest.mark.slow
def test_push_clone_pull_then_nothing_to_do(built_project_template: Path, tmp_path: Path) -> None:
    a = copy_project(built_project_template, tmp_path / "A")
    remote = tmp_path / "dvc-remote"
    assert git(a, "status", "--porcelain") == "", "A should hold its run committed (dvc.lock)"
    dvc(a, "remote", "add", "--local", "-d", "shared", str(remote))
    push_s, push_out = timed_dvc(a, "push")
    assert "pushed" in push_out
    assert "in sync" in dvc(a, "status", "--cloud").stdout

    b = tmp_path / "B"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True, timeout=60)
    assert (b / "dvc.lock").exists() and not (b / CHECKPOINTS[0]).exists()
    dvc(b, "remote", "add", "--local", "-d", "shared", str(remote))
    pull_s, _ = timed_dvc(b, "pull")
    assert dvc(b, "status").stdout.strip() == CLEAN

    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(b), "run", "--no-progress"],
        cwd=b,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = {
        parts[0]: parts[1]
        for parts in (line.split() for line in out.stdout.splitlines())
        if len(parts) > 1 and parts[0] in stage_names(b)
    }
    assert statuses == dict.fromkeys(stage_names(b), "skipped"), out.stdout

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
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    declared = {
        p.split(".")[0]
        for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
        for entry in stage.get("params", [])
        for p in (entry if isinstance(entry, dict) else {entry: None})
    }
    assert sorted(set(params) - declared) == []


@pytest.mark.slow
def test_dvc_exp_compares_and_applies_a_param_change(
    built_project_template: Path, tmp_path: Path
) -> None:
    root = copy_project(built_project_template, tmp_path / "project")
    base = yaml.safe_load((root / "params.yaml").read_text())["sae"]["width"]
    assert base != 16
    baseline_sae = (root / CHECKPOINTS[1]).read_bytes()

    # Target fit_sae (the stage the parameter feeds) to keep the test short; without a target
    # `dvc exp run` also reruns everything downstream, as in the docs recipe.
    exp_s, out = timed_dvc(root, "exp", "run", "-n", "sae-w16", "-S", "sae.width=16", "fit_sae")
    assert "Running stage 'fit_sae'" in out
    assert "Running stage 'finetune'" not in out  # upstream of the change: untouched
    assert yaml.safe_load((root / "params.yaml").read_text())["sae"]["width"] == 16

    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = {
        e["name"]: e
        for rev in shown
        for exp in (rev.get("experiments") or [])
        for e in exp.get("revs", [])
    }
    assert "sae-w16" in exps
    exp_params = exps["sae-w16"]["data"]["params"]["params.yaml"]["data"]
    assert exp_params["sae"]["width"] == 16
    (baseline,) = [r for r in shown if r["rev"] != "workspace"]
    assert baseline["rev"] == git(root, "rev-parse", "HEAD").strip()
    assert baseline["data"]["params"]["params.yaml"]["data"]["sae"]["width"] == base
    workspace = next(r for r in shown if r["rev"] == "workspace")
    assert workspace["data"]["params"]["params.yaml"]["data"]["sae"]["width"] == 16

    pdiff = json.loads(dvc(root, "params", "diff", "--json").stdout)
    assert pdiff["params.yaml"]["sae.width"] == {"old": base, "new": 16, "diff": 16 - base}
    mdiff = json.loads(dvc(root, "metrics", "diff", "--json").stdout)
    assert "metrics/fit_sae.json" in mdiff, mdiff
    assert "metrics/finetune.json" not in mdiff  # finetune did not rerun
    exp_sae = (root / CHECKPOINTS[1]).read_bytes()
    assert exp_sae != baseline_sae

    # Back to the baseline, then apply the experiment as the recipe does.
    git(root, "checkout", "--", ".")
    dvc(root, "checkout", "--force")
    assert (root / CHECKPOINTS[1]).read_bytes() == baseline_sae
    dvc(root, "exp", "apply", "sae-w16")
    assert yaml.safe_load((root / "params.yaml").read_text())["sae"]["width"] == 16
    assert (root / CHECKPOINTS[1]).read_bytes() == exp_sae
    assert dvc(root, "status", "fit_sae").stdout.strip() == CLEAN
    print(f"\n[exp] dvc exp run -S sae.width=16 {exp_s:.1f} s")
