"""Shared fixtures. Prefect state goes to a temp dir set before anything imports prefect."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_PREFECT_TMP = Path(tempfile.mkdtemp(prefix="salve-prefect-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_TMP)
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_PREFECT_TMP / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["DVC_NO_ANALYTICS"] = "1"
# No busy-CPU warning from `salve run`: tests run processes side by side (and pytest -n).
os.environ["SALVE_CPU_CHECK"] = "0"
os.environ.setdefault("GIT_AUTHOR_NAME", "salve-tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@salve.invalid")
os.environ.setdefault("GIT_COMMITTER_NAME", "salve-tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@salve.invalid")
# DVC stage commands call `python -m tasks`: make that the interpreter running the tests.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

# The tests run on the cross-CPU kernel pin (common.reproducible: true), chosen before any
# tensor operation of the session, as the salve entry points do (salve/runtime.py): what they
# assert holds on every CI machine.
from salve.runtime import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels(True)

from salve.params_file import yaml_dump  # noqa: E402

# Small enough to run the whole pipeline in well under a minute on 2 CPU cores.
TINY_PARAMS = {
    "common": {"seed": 0, "device": "cpu", "num_threads": 2, "reproducible": True},
    "data": {"source": "digits", "image_size": 32, "max_per_class": 12, "val_fraction": 0.2},
    "finetune": {
        "arch": "resnet18",
        "epochs": 2,
        "min_steps": 0,  # the epoch budget alone
        "batch_size": 16,
        "lr": 0.002,
        "min_val_accuracy": 0.0,  # a 2-epoch toy model: the gate is tested on its own
        "min_class_accuracy": 0.0,
    },
    "extract": {"batch_size": 256},
    "sae": {"kind": "relu", "width": 32, "epochs": 30, "batch_size": 64, "l1": 0.003},
    "rank": {"cross_class_fraction": 0.5, "top_n": 3},
    "edit": {"alpha_steps": 6},
    "alpha_crit": {"grid_steps": 11, "verify_samples": 8},
    "gradfam": {"top_k": 2, "am_steps": 3, "deletion_steps": 4},
    "evaluate": {"seeds": 2},
}

PROJECT_FILES = (
    "salve",
    "tasks",
    "flows",
    "dvc.yaml",
    "prefect.toml",
    "pyproject.toml",
    "Makefile",
)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty elsewhere): which kernel paths to expect."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


def git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return out.stdout


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def write_params(root: Path, params: dict) -> None:
    """A complete params.yaml: the defaults overlaid with `params` (DVC needs every key)."""
    from salve.config import Config

    full = Config().to_dict()
    for section, values in params.items():
        full[section] |= values
    (root / "params.yaml").write_text(yaml_dump(full))


def make_project(root: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repository holding this project's code and the given params."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    for folder in ("data", "weights"):  # the user-input folders DVC tracks, as a clone has them
        (root / folder).mkdir(exist_ok=True)
        shutil.copy2(REPO / folder / "README.md", root / folder / "README.md")
    write_params(root, params or TINY_PARAMS)
    git(root, "init", "-q", "-b", "main")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "true")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "test project")
    return root


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (about 9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def run_pipeline(root: Path) -> dict[str, str]:
    """Every stage through the DVC-aware runner (no Prefect); returns their statuses."""
    from salve.config import load
    from tasks import STAGE_ORDER
    from tasks.runner import run_stage

    cfg = load(root / "params.yaml")
    return {n: run_stage(n, cfg, root, progress=False).status for n in STAGE_ORDER}


def copy_project(template: Path, dest: Path) -> Path:
    """A private copy of a project: git history, DVC cache and workspace (not .salve state)."""
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns(".salve"))
    return dest


@pytest.fixture(scope="session")
def built_project_template(tmp_path_factory) -> Path:
    """The tiny project after one full pipeline run, committed (dvc.lock, metrics, plots).
    Shared read-only by the session: copy it with `built_project` or `copy_project`."""
    root = make_project(tmp_path_factory.mktemp("built") / "project")
    t0 = time.perf_counter()
    statuses = run_pipeline(root)
    if set(statuses.values()) != {"ran"}:
        raise RuntimeError(f"a fresh project should run every stage: {statuses}")
    print(f"\n[template] pipeline ran in {time.perf_counter() - t0:.1f} s")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline run")
    return root


@pytest.fixture
def built_project(built_project_template: Path, tmp_path: Path) -> Path:
    return copy_project(built_project_template, tmp_path / "project")
