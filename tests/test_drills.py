"""Failure drills: the pipeline under the failures it will meet in real use.

1. `kill -9` during `finetune` (resumes, bit-identical to an uninterrupted run) and `fit_sae`, and
   while an artifact is being written: only complete files under final names, `dvc status` true.
2. Truncated / corrupted safetensors (checkpoint, activations): one clear error naming the file,
   exit 1, no traceback; `salve stage NAME --force` recomputes it.
3. A dataset archive with a wrong checksum (retried, then a clear error) or with members escaping
   the target folder (rejected, nothing written anywhere), through the fetch stage.
4. Two runs at once in one repository: the second refuses; workspace and DVC cache stay sound.
5. Divergence (huge learning rate, injected NaN) in fine-tuning and SAE fitting: the stage fails
   with a message and the previous good outputs stay byte-identical.
6. Nothing in the project's code loads pickles.
7. Every parameter's wrong type / out-of-range value at the command line (`--set`) and at the
   `python -m tasks` entry point DVC calls (from_dict itself: tests/test_config.py).

"`dvc status` tells the truth" is checked against an independent reading of dvc.lock: the
parameters in params.yaml and the md5 of every dependency and output file (directory manifests
read from the DVC cache) must match the lock exactly when, and only when, DVC says the stage is
up to date.

Every wait has a timeout and every process started here is killed (with its process group) on
the way out.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import csv
import functools
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from salve.config import load
from salve.io import TEMP_NAME, load_tensors, read_json, save_tensors
from salve.params_file import apply_overrides
from tasks.runner import dvc_repo, run_stage
from tests.conftest import REPO, TINY_PARAMS, dvc, make_project
from tests.test_config import FIELD_IDS, FIELDS, _out_of_range, _wrong_types
from tests.test_download import COLOURS, WNIDS, Server, _add_bytes, _evil_tar, _png

STAGES_TO_SAE = ("fetch", "finetune", "extract", "fit_sae")


def _overlay(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


# The tiny project, smaller still: 16 px images, ~90 val images, 3 epochs of 4 batches.
DRILL_PARAMS = _overlay(
    TINY_PARAMS,
    {
        "data": {"image_size": 16, "val_fraction": 0.05},
        "finetune": {"epochs": 3, "batch_size": 32},
    },
)


# --------------------------------------------------------------------------------------------
# Projects
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drill_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch -> finetune -> extract -> fit_sae run once (in-process): the 'earlier good run'."""
    root = make_project(tmp_path_factory.mktemp("drills") / "project", DRILL_PARAMS)
    cfg = load(root / "params.yaml")
    for name in STAGES_TO_SAE:
        assert run_stage(name, cfg, root, progress=False).status == "ran"
    return root


@pytest.fixture
def project(drill_template: Path, tmp_path: Path) -> Path:
    """A private copy of the template (workspace, git, DVC cache)."""
    dest = tmp_path / "project"
    shutil.copytree(drill_template, dest, symlinks=True, ignore=shutil.ignore_patterns(".salve"))
    return dest


# --------------------------------------------------------------------------------------------
# Helpers: the CLI, processes, files, and an independent reading of dvc.lock
# --------------------------------------------------------------------------------------------


def cli(root: Path, *args: str, timeout: float = 300, env: dict | None = None):
    """`salve --root ROOT ARGS` in a fresh interpreter (as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def cli_here(root: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The same CLI entry point in this process (cheap; lets a test monkeypatch faults in)."""
    from flows.cli import main

    capsys.readouterr()
    rc = main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(stderr: str, *needles: str) -> str:
    """Exactly one non-empty stderr line, `error: ...`, holding every needle; no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def start_cli(root: Path, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start the CLI in its own process group, stdout and stderr into `log`."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
            cwd=root,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL the process and everything it started; return its exit status."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


@contextlib.contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_group(proc)


def wait_for(
    cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"no sign of {what} within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, *folders: str, temps: bool = False) -> dict[str, str]:
    """md5 of every file under the folders (temp files only when `temps`)."""
    out = {}
    for folder in folders:
        base = root / folder
        paths = [base] if base.is_file() else sorted(base.rglob("*"))
        for p in paths:
            if p.is_file() and (temps or not TEMP_NAME.match(p.name)):
                out[str(p.relative_to(root))] = _md5(p)
    return out


def temp_files(root: Path, *folders: str) -> list[Path]:
    return [p for f in folders for p in (root / f).rglob(".*") if TEMP_NAME.match(p.name)]


def assert_final_files_sound(root: Path, *folders: str) -> None:
    """Under final names only complete, loadable files; anything else is a dot-prefixed temp."""
    for folder in folders:
        for p in sorted((root / folder).rglob("*")):
            if not p.is_file() or p.name == ".gitignore":
                continue
            if p.name.startswith("."):
                assert TEMP_NAME.match(p.name), f"{p}: unexpected hidden file"
            elif p.suffix == ".safetensors":
                load_tensors(p)
            elif p.suffix == ".json":
                read_json(p)
            elif p.suffix == ".csv":
                rows = list(csv.reader(p.read_text(encoding="utf-8").splitlines()))
                assert rows and all(len(r) == len(rows[0]) for r in rows), p


def _yaml_load(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))  # as DVC reads it


def _entry_matches(root: Path, entry: dict) -> bool:
    path = root / entry["path"]
    digest = entry.get("md5", "")
    if digest.endswith(".dir"):
        if not path.is_dir():
            return False
        # A folder's hash is the md5 of its manifest: the sorted (relpath, md5) list as JSON.
        files = sorted(p for p in path.rglob("*") if p.is_file())
        manifest = [{"md5": _md5(p), "relpath": p.relative_to(path).as_posix()} for p in files]
        manifest.sort(key=lambda e: e["relpath"])
        text = json.dumps(manifest, sort_keys=True).encode()
        return hashlib.md5(text).hexdigest() == digest.removesuffix(".dir")
    return path.is_file() and _md5(path) == digest


def lock_matches_workspace(root: Path, stage: str) -> bool:
    """The truth, read independently of DVC: params and every dep/out file as dvc.lock says."""
    lock_path = root / "dvc.lock"
    if not lock_path.exists():
        return False
    lock = (_yaml_load(lock_path) or {}).get("stages", {}).get(stage)
    if lock is None:
        return False
    params = _yaml_load(root / "params.yaml") or {}
    for key, value in lock.get("params", {}).get("params.yaml", {}).items():
        current = params
        for part in key.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if current != value:
            return False
    return all(_entry_matches(root, e) for e in lock.get("deps", []) + lock.get("outs", []))


def dvc_fresh(root: Path, stage: str) -> bool:
    with dvc_repo(root) as repo:
        return not repo.status(targets=[stage])


def assert_status_truthful(root: Path, *stages: str) -> dict[str, bool]:
    """DVC's verdict for each stage equals the independent reading; returns {stage: fresh}."""
    verdicts = {}
    for stage in stages:
        fresh, truth = dvc_fresh(root, stage), lock_matches_workspace(root, stage)
        assert fresh == truth, f"dvc status says {stage} is {'' if fresh else 'not '}up to date"
        verdicts[stage] = fresh
    return verdicts


def assert_cache_sound(root: Path) -> None:
    """Every object in the DVC cache still hashes to its name and is read-only."""
    objects = list((root / ".dvc" / "cache" / "files" / "md5").glob("*/*"))
    assert objects
    for p in objects:
        name = (p.parent.name + p.name).removesuffix(".dir")
        assert _md5(p) == name, f"corrupted cache object {p}"
        assert not p.stat().st_mode & 0o222, f"writable cache object {p}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_bytes(path: Path, data: bytes) -> None:
    """Write a new file (new inode: never through a link into the DVC cache)."""
    path.unlink()
    path.write_bytes(data)


# --------------------------------------------------------------------------------------------
# 1. kill -9
# --------------------------------------------------------------------------------------------

FINETUNE_OUTS = ("results/finetune", "metrics/finetune.json", "plots/finetune")
FIT_SAE_OUTS = ("results/fit_sae", "metrics/fit_sae.json", "plots/fit_sae")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill9_during_finetune_resumes_to_bit_identical_weights(project, tmp_path, capsys):
    """The template's finetune ran uninterrupted with these very parameters: the reference."""
    before = snapshot(project, *FINETUNE_OUTS)
    rows_before = _epoch_rows(project)
    resume = project / ".salve" / "resume" / "finetune.safetensors"
    log = tmp_path / "killed.log"
    with running(start_cli(project, "stage", "finetune", "--force", "--no-progress", log=log)) as p:
        wait_for(resume.exists, p, 300, "the first epoch's resume point", log)
        rc = kill_group(p)
    assert rc == -signal.SIGKILL, _tail(log)
    from safetensors import safe_open

    with safe_open(str(resume), "pt") as fh:
        killed_after = len(json.loads(fh.metadata()["history"]))  # epochs finished
    assert 1 <= killed_after < DRILL_PARAMS["finetune"]["epochs"]

    # Only complete files under final names: the previous run's, untouched; and since neither
    # they nor the parameters changed, DVC rightly calls the stage up to date.
    assert_final_files_sound(project, *FINETUNE_OUTS)
    assert snapshot(project, *FINETUNE_OUTS) == before
    assert assert_status_truthful(project, "finetune") == {"finetune": True}

    rc, _, err = cli_here(project, capsys, "stage", "finetune", "--force", "--no-progress")
    assert rc == 0, err
    # Where it resumed is a fact of this run (its run record), not of the result.
    record = read_json(project / ".salve" / "runs" / "finetune.json")
    assert record["resumed_from_epoch"] == killed_after
    assert not resume.exists()
    # Resumed from the last finished epoch, the weights equal the uninterrupted run's, bit for
    # bit (CPU, fixed thread count), and so do the per-epoch losses and accuracies: every output
    # is the uninterrupted run's, byte for byte, so DVC records the same hashes.
    weights = "results/finetune/model.safetensors"
    assert snapshot(project, weights)[weights] == before[weights], (
        "resumed run's weights differ from an uninterrupted run's"
    )
    assert _epoch_rows(project) == rows_before
    assert snapshot(project, *FINETUNE_OUTS) == before
    assert assert_status_truthful(project, "finetune") == {"finetune": True}


def _epoch_rows(root: Path) -> list[dict]:
    """plots/finetune/epochs.csv, row by row."""
    text = (root / "plots" / "finetune" / "epochs.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill9_during_fit_sae_keeps_previous_outputs_and_rerun_completes(project, tmp_path, capsys):
    before = snapshot(project, *FIT_SAE_OUTS)
    apply_overrides(project / "params.yaml", ["sae.epochs=300", "sae.width=24"])
    log = tmp_path / "killed.log"
    # Progress bars on: tqdm's "fit_sae (relu)" line says the fitting loop has started.
    with running(start_cli(project, "stage", "fit_sae", "--force", "--progress", log=log)) as p:
        wait_for(lambda: "fit_sae (relu)" in _tail(log), p, 180, "the SAE fitting loop", log)
        rc = kill_group(p)
    assert rc == -signal.SIGKILL, _tail(log)
    assert_final_files_sound(project, *FIT_SAE_OUTS)
    assert snapshot(project, *FIT_SAE_OUTS) == before
    assert assert_status_truthful(project, "fit_sae") == {"fit_sae": False}  # params changed

    rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress")
    assert rc == 0, err
    assert assert_status_truthful(project, "fit_sae") == {"fit_sae": True}
    sae = load_tensors(project / "results" / "fit_sae" / "sae.safetensors")
    assert sae["encoder.weight"].shape[0] == 24


# Loaded at interpreter start through PYTHONPATH: a real SIGKILL in the middle of writing an
# artifact (the temp file half written), at a point no timer could hit reliably.
KILL_WHILE_WRITING = """
import os
_target = os.environ.get("SALVE_DRILL_KILL_WRITING")
if _target:
    import signal
    import safetensors.torch as _st
    _save_file = _st.save_file
    def save_file(tensors, filename, metadata=None):
        _save_file(tensors, filename, metadata=metadata)
        if _target in os.path.basename(str(filename)):
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    _st.save_file = save_file
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("stage", "artifact"), [("fit_sae", "sae.safetensors"), ("extract", "val.safetensors")]
)
def test_kill9_while_writing_an_artifact(project, tmp_path, capsys, stage, artifact):
    outs = (f"results/{stage}", f"metrics/{stage}.json", f"plots/{stage}")
    before = snapshot(project, *outs)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_WHILE_WRITING)
    env = dict(os.environ, PYTHONPATH=str(inject), SALVE_DRILL_KILL_WRITING=artifact)
    proc = cli(project, "stage", stage, "--force", "--no-progress", env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    left = temp_files(project, *outs)
    assert [p.name.split(".")[1:3] for p in left] == [artifact.split(".")], left
    assert_final_files_sound(project, *outs)
    assert snapshot(project, *outs) == before  # every final name: the previous run's bytes
    # The half-written temp file is an unknown file in a DVC output folder: stale, truthfully.
    assert assert_status_truthful(project, stage) == {stage: False}

    rc, _, err = cli_here(project, capsys, "stage", stage, "--no-progress")
    assert rc == 0, err
    assert temp_files(project, *outs) == []
    assert snapshot(project, *outs) == before
    assert assert_status_truthful(project, stage) == {stage: True}
    # and a forced rerun does not commit any junk either
    rc, _, err = cli_here(project, capsys, "stage", stage, "--force", "--no-progress")
    assert rc == 0, err
    lock = _yaml_load(project / "dvc.lock")["stages"][stage]
    for out in lock["outs"]:
        assert _entry_matches(project, out)
    assert temp_files(project, *outs) == []


# --------------------------------------------------------------------------------------------
# 2. Truncated and corrupted safetensors
# --------------------------------------------------------------------------------------------

CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda b: b[: len(b) // 2],
    "header-garbage": lambda b: b[:8] + b"\xff" * 24 + b[32:],
}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_truncated_checkpoint_fails_next_stage_clearly_then_force_recomputes(project, capsys):
    ckpt = project / "results" / "finetune" / "model.safetensors"
    good = ckpt.read_bytes()
    extract_before = snapshot(project, "results/extract")
    replace_bytes(ckpt, CORRUPTIONS["truncated"](good))

    proc = cli(project, "stage", "extract", "--no-progress")  # the next stage to read it
    assert proc.returncode == 1, proc.stderr
    assert_one_error(proc.stderr, "results/finetune/model.safetensors", "--force")
    assert snapshot(project, "results/extract") == extract_before
    assert assert_status_truthful(project, "finetune", "extract") == {
        "finetune": False,
        "extract": False,
    }

    rc, _, err = cli_here(project, capsys, "stage", "finetune", "--force", "--no-progress")
    assert rc == 0, err
    assert ckpt.read_bytes() == good  # recomputed, deterministically
    rc, out, err = cli_here(project, capsys, "stage", "extract", "--no-progress")
    assert rc == 0 and "skipped" in out, err
    assert assert_status_truthful(project, "finetune", "extract") == {
        "finetune": True,
        "extract": True,
    }


def test_corrupted_checkpoint_fails_clearly_and_plain_rerun_restores_it(project, capsys):
    """Without --force, DVC's run-cache puts the recorded checkpoint back (no training)."""
    ckpt = project / "results" / "finetune" / "model.safetensors"
    good = ckpt.read_bytes()
    replace_bytes(ckpt, CORRUPTIONS["header-garbage"](good))

    rc, _, err = cli_here(project, capsys, "stage", "extract", "--no-progress")
    assert rc == 1
    assert_one_error(err, "results/finetune/model.safetensors", "truncated or corrupted")

    rc, out, err = cli_here(project, capsys, "stage", "finetune", "--no-progress")
    assert rc == 0 and "restored" in out, err
    assert ckpt.read_bytes() == good
    assert assert_status_truthful(project, "finetune", "extract") == {
        "finetune": True,
        "extract": True,
    }


def test_an_edited_uncached_output_is_restored_with_the_rest(project, capsys):
    """An output DVC keeps out of its cache (a plot) edited by hand, or rewritten by running the
    stage's command outside DVC: a plain rerun restores the recorded versions of all outputs.
    Before, only the cached ones were cleared: the restore then refused to replace the plot and
    left the stage without its checkpoint."""
    plot = project / "plots" / "finetune" / "epochs.csv"
    ckpt = project / "results" / "finetune" / "model.safetensors"
    good_plot, good_ckpt = plot.read_bytes(), ckpt.read_bytes()
    replace_bytes(plot, good_plot.replace(b"epoch", b"EPOCH", 1))

    rc, out, err = cli_here(project, capsys, "stage", "finetune", "--no-progress")
    assert rc == 0 and "restored" in out, err
    assert plot.read_bytes() == good_plot and ckpt.read_bytes() == good_ckpt
    assert assert_status_truthful(project, "finetune", "extract") == {
        "finetune": True,
        "extract": True,
    }


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_activations_fail_next_stage_clearly_then_force_recomputes(project, capsys, how):
    acts = project / "results" / "extract" / "train.safetensors"
    good = acts.read_bytes()
    sae_before = snapshot(project, *FIT_SAE_OUTS)
    replace_bytes(acts, CORRUPTIONS[how](good))

    rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress")
    assert rc == 1
    assert_one_error(err, "results/extract/train.safetensors", "truncated or corrupted")
    assert snapshot(project, *FIT_SAE_OUTS) == sae_before

    rc, _, err = cli_here(project, capsys, "stage", "extract", "--force", "--no-progress")
    assert rc == 0, err
    assert acts.read_bytes() == good
    rc, out, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress")
    assert rc == 0 and "skipped" in out, err
    assert assert_status_truthful(project, "extract", "fit_sae") == {
        "extract": True,
        "fit_sae": True,
    }


# --------------------------------------------------------------------------------------------
# 3. Hostile dataset archives, through the fetch stage
# --------------------------------------------------------------------------------------------


def _imagenette_tgz() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for split in ("train", "val"):
            for wnid, colour in zip(WNIDS, COLOURS, strict=True):
                _add_bytes(tf, f"imagenette2-160/{split}/{wnid}/img0.png", _png(colour))
    return buf.getvalue()


@pytest.fixture
def archive_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bytes, str], Server]]:
    """serve(payload, md5): the Imagenette 160px archive comes from a local server."""
    import salve.data.folders
    from salve.download import download_file

    monkeypatch.setattr(
        salve.data.folders, "download_file", functools.partial(download_file, backoff=0)
    )
    servers = []

    def serve(payload: bytes, md5: str) -> Server:
        srv = Server(payload)
        servers.append(srv)
        monkeypatch.setitem(salve.data.IMAGENETTE_ARCHIVES, "160px", (srv.url, md5))
        return srv

    yield serve
    for srv in servers:
        srv.close()


def _all_paths(base: Path) -> set[str]:
    return {str(p.relative_to(base)) for p in base.rglob("*")}


def test_archive_with_wrong_checksum_is_retried_then_fails_clearly(
    tmp_path, capsys, archive_server
):
    root = make_project(tmp_path / "project", DRILL_PARAMS)
    srv = archive_server(_imagenette_tgz(), "0" * 32)
    rc, _, err = cli_here(
        root, capsys, "stage", "fetch", "--set", "data.source=imagenette", "--no-progress"
    )
    assert rc == 1
    actual = hashlib.md5(srv.payload, usedforsecurity=False).hexdigest()
    assert_one_error(err, "after 3 attempt(s)", "checksum mismatch", "0" * 32, actual, srv.url)
    assert len(srv.requests) == 3
    raw = root / "data"  # data.path: the download folder, holding only its README before
    assert sorted(p.name for p in raw.iterdir()) == ["README.md"]  # no .part, no archive
    assert not (root / "results" / "fetch").exists()
    assert assert_status_truthful(root, "fetch") == {"fetch": False}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_archive_escaping_the_target_is_rejected_and_writes_nothing(
    tmp_path, capsys, archive_server, kind
):
    root = make_project(tmp_path / "project", DRILL_PARAMS)
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tmp_path / "evil.tgz"
    _evil_tar(evil, kind, outside)
    payload = evil.read_bytes()
    evil.unlink()
    archive_server(payload, hashlib.md5(payload, usedforsecurity=False).hexdigest())
    before = _all_paths(tmp_path)

    rc, _, err = cli_here(
        root, capsys, "stage", "fetch", "--set", "data.source=imagenette", "--no-progress"
    )
    assert rc == 1
    assert_one_error(err, "refusing to extract")
    raw = root / "data"
    # The verified archive was kept for a later attempt; nothing was extracted, anywhere.
    assert sorted(p.name for p in raw.iterdir()) == ["README.md", "imagenette2-160.tgz"]
    new = _all_paths(tmp_path) - before
    allowed = ("project/data", "project/.salve", "project/.dvc/tmp")
    assert [p for p in new if not p.startswith(allowed)] == []
    assert not list(tmp_path.rglob("sentinel.txt"))
    assert not (root / "results" / "fetch").exists()


# --------------------------------------------------------------------------------------------
# 4. Two runs at once
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_run_refuses_while_the_first_runs_and_nothing_is_corrupted(tmp_path):
    root = make_project(tmp_path / "project", DRILL_PARAMS)
    params_before = (root / "params.yaml").read_bytes()
    lock = root / ".salve" / "run.lock"
    log = tmp_path / "first.log"
    first = start_cli(root, "run", "--stages", "fetch", "finetune", "--no-progress", log=log)
    with running(first):
        wait_for(
            lambda: lock.exists() and lock.read_text().strip() == f"pid {first.pid}",
            first,
            120,
            "the first run to take the lock",
            log,
        )
        # Both at once (in parallel, to keep the drill short): a run and a single stage.
        seconds = [
            subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for args in (
                ("run", "--set", "sae.width=16", "--no-progress"),
                ("stage", "fetch", "--force", "--no-progress"),
            )
        ]
        # What `dvc repro` runs, by hand: it takes the same lock.
        seconds.append(
            subprocess.Popen(
                [sys.executable, "-m", "tasks", "fetch", "--no-progress"],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        for second in seconds:
            with running(second):
                _, stderr = second.communicate(timeout=120)
            assert second.returncode == 1, stderr
            assert_one_error(stderr, "another salve run is in progress", f"pid {first.pid}")
        # Plain `dvc repro` meanwhile: refused by DVC's own lock, which the run holds, before
        # it can delete the outputs of a stage it finds stale (it did, then ran beside salve).
        repro = dvc(root, "repro", check=False)
        assert repro.returncode != 0 and "Unable to acquire lock" in repro.stderr, repro.stderr
        assert first.poll() is None, "the first run ended before the others were refused"
        assert (root / "params.yaml").read_bytes() == params_before  # --set was not applied
        rc = first.wait(timeout=540)
    assert rc == 0, _tail(log)

    status = dvc(root, "status", "fetch", "finetune")
    assert "up to date" in status.stdout, status.stdout
    assert assert_status_truthful(root, "fetch", "finetune") == {"fetch": True, "finetune": True}
    assert_cache_sound(root)
    assert_final_files_sound(root, "results", "metrics", "plots")
    from salve.models import load_checkpoint

    load_checkpoint(root / "results" / "finetune" / "model.safetensors")
    assert temp_files(root, "results", "metrics", "plots") == []


def test_a_refused_dvc_repro_loses_nothing(project):
    """`dvc repro` deletes a stage's outputs before it runs the stage's command; when the
    command refuses (here a negative SAE width), the recorded outputs are put back, the
    uncached metrics and plot too (before, only `dvc checkout` could bring back the folder)."""
    before = snapshot(project, *FIT_SAE_OUTS)
    params = project / "params.yaml"
    data = YAML().load(params)
    data["sae"]["width"] = -5
    YAML().dump(data, params)
    repro = dvc(project, "repro", "fit_sae", check=False)
    assert repro.returncode != 0, repro.stdout
    assert "sae.width" in repro.stderr, repro.stderr
    assert "Traceback" not in repro.stderr, repro.stderr
    assert snapshot(project, *FIT_SAE_OUTS) == before
    assert temp_files(project, *FIT_SAE_OUTS) == []


def test_salve_refuses_while_a_dvc_command_holds_the_repository(project, capsys):
    """A DVC command at work (it holds .dvc/tmp/lock): salve says so in one line, at once,
    without touching anything."""
    import zc.lockfile

    before = snapshot(project, *FIT_SAE_OUTS)
    held = zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))
    try:
        rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--force", "--no-progress")
    finally:
        held.close()
    assert rc == 1
    assert_one_error(err, "another DVC command is running", "wait for it to finish")
    assert snapshot(project, *FIT_SAE_OUTS) == before


def test_temp_files_of_a_killed_run_go_when_the_next_run_starts(project, capsys):
    """A `kill -9` leaves temp files in places no stage of the next run may touch (the resume
    state, a skipped stage's folder): the next run, holding the lock, removes them all."""
    left = [
        project / ".salve" / "resume" / ".finetune.safetensors.0123456789ab.tmp",
        project / "results" / "finetune" / ".model.safetensors.ba9876543210.tmp",
        project / "metrics" / ".finetune.json.00112233aabb.tmp",
    ]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    rc, out, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress")
    assert rc == 0 and "skipped" in out, err
    assert [p for p in left if p.exists()] == []


@pytest.mark.parametrize(("code", "fix"), [(28, "no space left"), (30, "read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(
    project, capsys, monkeypatch, code, fix
):
    """OS failures no rerun mends: one line with the artifact's name (not the temp file's) and
    the fix, instead of "unexpected OSError" and a retry."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "sae.safetensors":
            raise OSError(code, os.strerror(code), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    before = snapshot(project, *FIT_SAE_OUTS)
    rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--force", "--no-progress")
    assert rc == 1
    line = assert_one_error(err, "results/fit_sae/sae.safetensors", fix)
    assert ".tmp" not in line and "unexpected" not in line
    assert snapshot(project, *FIT_SAE_OUTS) == before


def test_a_corrupt_dvc_lock_is_one_line_naming_it_and_the_fix(project, capsys):
    lock = project / "dvc.lock"
    lock.write_text(lock.read_text()[:200] + "\n  : [\n")
    rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress")
    assert rc == 1
    assert_one_error(err, "dvc.lock", "git checkout dvc.lock")


def test_only_a_lost_connection_is_retried():
    """The flow retries a stage only where a second try can succeed."""
    from flows.pipeline import _retry_transient
    from salve.config import ConfigError

    class Failed:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self):
            raise self.exc

    assert _retry_transient(None, None, Failed(ConnectionError("reset by peer")))
    for exc in (
        OSError(28, "No space left on device", "results/x"),
        RuntimeError("Torch not compiled with CUDA enabled"),
        ConfigError("params.yaml: sae.width=-5"),
        ValueError("a bug"),
    ):
        assert not _retry_transient(None, None, Failed(exc)), exc


# --------------------------------------------------------------------------------------------
# 5. Divergence
# --------------------------------------------------------------------------------------------


def _nan_on_call(n: int, fn: Callable) -> Callable:
    """fn, except that its n-th call returns NaN (same shape) instead."""
    calls = {"n": 0}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        out = fn(*args, **kwargs)
        if calls["n"] == n:
            if isinstance(out, tuple):
                return (out[0] * math.nan, *out[1:])
            return out * math.nan
        return out

    return wrapper


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["huge-lr", "nan-loss"])
def test_finetune_divergence_fails_and_keeps_the_previous_checkpoint(
    project, capsys, monkeypatch, fault
):
    before = snapshot(project, *FINETUNE_OUTS)
    if fault == "huge-lr":
        args = ("--set", "finetune.lr=10")
    else:
        import torch.nn.functional as tnf

        monkeypatch.setattr(tnf, "cross_entropy", _nan_on_call(3, tnf.cross_entropy))
        args = ("--force",)
    rc, _, err = cli_here(project, capsys, "stage", "finetune", "--no-progress", *args)
    assert rc == 1
    assert_one_error(err, "fine-tuning diverged", "finetune.lr", "previous checkpoint")
    assert snapshot(project, *FINETUNE_OUTS) == before
    fresh = assert_status_truthful(project, "finetune")
    assert fresh == {"finetune": fault == "nan-loss"}  # only the lr change makes it stale


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["huge-lr", "nan-loss", "nan-activations"])
def test_fit_sae_divergence_fails_and_keeps_the_previous_sae(project, capsys, monkeypatch, fault):
    before = snapshot(project, *FIT_SAE_OUTS)
    args: tuple[str, ...] = ("--force",)
    needles: tuple[str, ...] = ("SAE fitting diverged", "sae.lr")
    if fault == "huge-lr":
        args = ("--set", "sae.lr=10")
    elif fault == "nan-loss":
        import salve.sae

        monkeypatch.setattr(salve.sae, "sae_loss", _nan_on_call(5, salve.sae.sae_loss))
    else:  # a valid file holding a NaN: the stage must blame the file, not the learning rate
        path = project / "results" / "extract" / "train.safetensors"
        t = load_tensors(path)
        t["acts"][3, 7] = math.nan
        path.unlink()
        save_tensors(path, t)
        needles = ("results/extract/train.safetensors", "NaN", "extract")
    rc, _, err = cli_here(project, capsys, "stage", "fit_sae", "--no-progress", *args)
    assert rc == 1
    assert_one_error(err, *needles)
    assert snapshot(project, *FIT_SAE_OUTS) == before
    assert assert_status_truthful(project, "fit_sae") == {"fit_sae": fault == "nan-loss"}


# --------------------------------------------------------------------------------------------
# 6. No pickles
# --------------------------------------------------------------------------------------------

PICKLE_CALLS = {
    f"{mod}.{fn}"
    for mod in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    for fn in ("load", "loads", "Unpickler")
} | {"joblib.load", "pandas.read_pickle", "torch.serialization.load", "numpy.lib.format.read_array"}


def pickle_offenders(source: str, filename: str = "<string>") -> list[str]:
    """Calls in `source` that may unpickle: pickle & co, torch.load without weights_only=True,
    numpy.load with allow_pickle other than False. Import aliases are followed."""
    tree = ast.parse(source, filename)
    names: dict[str, str] = {}  # local name -> dotted origin
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return names.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def kwarg(call: ast.Call, key: str) -> ast.expr | None:
        return next((k.value for k in call.keywords if k.arg == key), None)

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func) or ""
        bad = name in PICKLE_CALLS
        if name == "torch.load":
            w = kwarg(node, "weights_only")
            bad = not (isinstance(w, ast.Constant) and w.value is True)
        if name == "numpy.load":
            a = kwarg(node, "allow_pickle")
            bad = a is not None and not (isinstance(a, ast.Constant) and a.value is False)
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_pickle_scanner_catches_what_it_should() -> None:
    # Built from pieces so that a plain text grep of this file finds no pickle loading.
    torch_load = "torch." + "load"
    src = f"""
import pickle as pk
import numpy as np
import torch
from torch import load as tload
from pickle import loads
pk.load(f)
loads(b)
{torch_load}(p)
{torch_load}(p, weights_only=False)
tload(p)
np.load(p, allow_pickle=True)
{torch_load}(p, weights_only=True)
np.load(p)
np.load(p, allow_pickle=False)
json.loads(s)
"""
    lines = [o.split(":")[1] for o in pickle_offenders(src)]
    assert lines == ["7", "8", "9", "10", "11", "12"]


def test_nothing_in_the_project_loads_pickles() -> None:
    files = [p for d in ("salve", "tasks", "flows", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    offenders = [
        o for p in files for o in pickle_offenders(p.read_text(), str(p.relative_to(REPO)))
    ]
    assert offenders == [], "code that can load pickles:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------------------------
# 7. Bad parameters at the entry points (the values tests/test_config.py generates)
# --------------------------------------------------------------------------------------------


def _yaml_text(value) -> str:
    """The YAML a user would type for `value` (JSON is YAML 1.2, except NaN and infinities)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


@pytest.mark.parametrize(("section", "key", "typ", "fld"), FIELDS, ids=FIELD_IDS)
def test_every_bad_value_is_refused_by_set_and_by_python_m_tasks(
    tmp_path, capsys, section, key, typ, fld
):
    from tasks.__main__ import main as tasks_main

    params = tmp_path / "params.yaml"
    good = (REPO / "params.yaml").read_bytes()
    params.write_bytes(good)
    for value in _wrong_types(typ) + _out_of_range(fld, typ):
        text = f"{section}.{key}={_yaml_text(value)}"
        rc, _, err = cli_here(tmp_path, capsys, "stage", "fetch", "--set", text)
        assert rc == 2, (text, err)
        assert_one_error(err, f"{section}.{key}")
        assert params.read_bytes() == good, text

        # The same value in params.yaml, read by `python -m tasks STAGE` (dvc repro's command).
        raw = _yaml_load(params)
        raw[section][key] = value
        bad = tmp_path / "bad" / "params.yaml"
        bad.parent.mkdir(exist_ok=True)
        buf = io.StringIO()
        YAML(typ="safe").dump(raw, buf)
        bad.write_text(buf.getvalue())
        capsys.readouterr()
        assert tasks_main(["fetch", "--params", str(bad)]) == 2, text
        assert_one_error(capsys.readouterr().err, f"{section}.{key}")
