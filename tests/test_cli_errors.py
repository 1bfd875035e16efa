"""`salve run` keeps its promises under bad input: one line on stderr, the documented exit code,
no traceback, and nothing already produced is lost.

Table-driven: each case generates its input in a fresh tiny image-folder project, runs the real
`salve run` command in a subprocess (as users do; against one running Prefect server, so the
cases do not each pay for a temporary API), and checks the one line and the exit code. Exit
codes: 2 for a bad parameter, 1 for bad data, files or a weak model (README, "Using it").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_PARAMS, copy_project, make_project

pytest_plugins = ["tests.prefect_server"]
pytestmark = pytest.mark.slow

SALVE = str(Path(sys.executable).parent / "salve")
CLASSES = ("circle", "square", "stripes")


def write_images(folder: Path, per_class: int = 10, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")


def folder_params() -> dict:
    params = {s: dict(v) for s, v in TINY_PARAMS.items()}
    params["data"] |= {
        "source": "imagefolder",
        "path": "data/shapes",
        "image_size": 16,
        "min_val_per_class": 1,
    }
    params["finetune"] |= {"epochs": 1}
    params["edit"] |= {"checkpoint_class": 1}
    return params


def save_weights(path: Path, num_classes: int, *, nan: bool = False, drop: str = "") -> None:
    from safetensors.torch import save_file

    from salve.models import build_model

    state = build_model("resnet18", num_classes, image_size=16).state_dict()
    if nan:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    if drop:
        state.pop(drop)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@dataclass
class Case:
    name: str
    setup: Callable[[Path], None]
    args: tuple[str, ...]
    code: int
    needles: tuple[str, ...]
    before_any_stage: bool = False  # refused before the first stage: no results/ at all
    extra: dict = field(default_factory=dict)


def _truncate(root: Path) -> None:
    image = root / "data/shapes/square/3.png"
    image.write_bytes(image.read_bytes()[:60])


def _empty_val(root: Path) -> None:
    for p in list((root / "data/shapes/stripes").iterdir())[1:]:
        p.unlink()  # one image left: it stays in train, the class has no val image


def _weights(root: Path, **kw) -> None:
    save_weights(root / "weights" / "model.safetensors", **kw)


def _prepend_to_params(text: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        p = root / "params.yaml"
        p.write_text(text + p.read_text())

    return setup


def _empty_params(root: Path) -> None:
    (root / "params.yaml").write_text("# every section deleted\n")


CASES = [
    Case("truncated PNG", _truncate, (), 1, ("square/3.png", "cannot read this image")),
    Case(
        "params.yaml with a YAML syntax error",
        _prepend_to_params("sae:\n  width: 8\n   k: 3\n"),
        (),
        2,
        ("params.yaml:3:5: not valid YAML", "indentation"),
        before_any_stage=True,
    ),
    Case(
        "params.yaml with a duplicated section",
        _prepend_to_params("sae:\n  width: 8\n"),
        (),
        2,
        ("section 'sae' appears twice (first at line 1)", "merge the two into one"),
        before_any_stage=True,
    ),
    Case(
        "empty params.yaml",
        _empty_params,
        ("--set", "sae.width=8"),
        2,
        ("params.yaml is empty", "git checkout params.yaml"),
        before_any_stage=True,
    ),
    Case(
        "checkpoint class out of range",
        lambda r: None,
        ("--set", "edit.checkpoint_class=5"),
        2,
        ("edit.checkpoint_class=5", "3 classes"),
        before_any_stage=True,
    ),
    Case(
        "class without val images",
        _empty_val,
        (),
        1,
        ("stripes", "data.val_fraction", "data.min_val_per_class"),
        before_any_stage=True,
    ),
    Case(
        "missing data folder",
        lambda r: None,
        ("--set", "data.path=data/nowhere"),
        1,
        ("data.path=", "no such folder"),
        before_any_stage=True,
    ),
    Case(
        "unknown architecture",
        lambda r: None,
        ("--set", "finetune.arch=resnet19"),
        2,
        ("finetune.arch='resnet19'", "Did you mean"),
        before_any_stage=True,
    ),
    Case(
        "gradfam layer that is not a module",
        lambda r: None,
        ("--set", "gradfam.layer=nolayer"),
        2,
        ("gradfam.layer='nolayer' is not a module of resnet18", "choose auto or one of layer1"),
        before_any_stage=True,
    ),
    Case(
        "batch of one",
        lambda r: None,
        ("--set", "finetune.batch_size=1"),
        2,
        ("finetune.batch_size", ">= 2"),
        before_any_stage=True,
    ),
    Case(
        "missing weights file",
        lambda r: None,
        ("--set", "finetune.weights=weights/missing.safetensors"),
        1,
        ("finetune.weights", "does not exist"),
        before_any_stage=True,
    ),
    Case(
        "weights head with the wrong K",
        lambda r: _weights(r, num_classes=5),
        ("--set", "finetune.weights=weights/model.safetensors", "--set", "finetune.epochs=0"),
        1,
        ("finetune.weights", "5 outputs", "3 classes"),
        before_any_stage=True,
    ),
    Case(
        "weights keys of another architecture",
        lambda r: _weights(r, num_classes=3, drop="layer4.1.bn2.weight"),
        ("--set", "finetune.weights=weights/model.safetensors"),
        1,
        ("finetune.weights", "does not match resnet18", "layer4.1.bn2.weight"),
        before_any_stage=True,
    ),
    Case(
        "weights holding a NaN",
        lambda r: _weights(r, num_classes=3, nan=True),
        ("--set", "finetune.weights=weights/model.safetensors"),
        1,
        ("finetune.weights", "NaN or infinite", "export the model again"),
    ),
    Case(
        "quality gate",
        lambda r: None,
        ("--set", "finetune.min_val_accuracy=0.99"),
        1,
        ("quality gate", "finetune.min_val_accuracy", "kept in results/finetune"),
    ),
]


def salve_run(
    root: Path, env: dict, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SALVE, "run", "--no-progress", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert [line for line in lines if not line.startswith(("error:", "warning:"))] == [], lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def folder_template(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("errors") / "project", folder_params())
    write_images(root / "data" / "shapes")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_under_salve_run_gives_one_line(
    case: Case, folder_template, prefect_server, tmp_path
):
    root = copy_project(folder_template, tmp_path / "project")
    case.setup(root)
    params_before = (root / "params.yaml").read_bytes()
    proc = salve_run(root, prefect_server.env(), *case.args)
    assert proc.returncode == case.code, (proc.returncode, proc.stderr[-2000:])
    line = assert_one_error_line(proc, *case.needles)
    if case.before_any_stage:
        assert not (root / "results").exists(), line
        assert (root / "params.yaml").read_bytes() == params_before  # a failed start writes nothing


def test_a_deleted_upstream_output_names_the_stage_to_run(
    built_project_template, tmp_path, prefect_server
):
    root = copy_project(built_project_template, tmp_path / "project")
    (root / "results/extract/val.safetensors").unlink()
    proc = salve_run(root, prefect_server.env(), "--stages", "rank", "edit")
    assert proc.returncode == 1
    assert_one_error_line(proc, "results/extract/val.safetensors is missing", "stage extract")


def test_skipped_hidden_and_nested_images_are_reported_in_one_line(
    folder_template, tmp_path, prefect_server
):
    root = copy_project(folder_template, tmp_path / "project")
    shapes = root / "data" / "shapes"
    (shapes / ".cache").mkdir()
    shutil.copy2(shapes / "circle/0.png", shapes / ".cache/0.png")
    (shapes / "square/extra").mkdir()
    shutil.copy2(shapes / "square/0.png", shapes / "square/extra/nested.png")
    proc = salve_run(root, prefect_server.env(), "--stages", "fetch")
    assert proc.returncode == 0, proc.stderr
    warnings = [
        line for line in proc.stderr.splitlines() if line.startswith("warning: imagefolder")
    ]  # (a busy machine adds its own warning line)
    assert len(warnings) == 1 and "1 hidden folder" in warnings[0], proc.stderr
    assert "1 image in nested sub-folders" in warnings[0] or "nested" in warnings[0]
    import json

    fetch = json.loads((root / "metrics/fetch.json").read_text())
    assert fetch["skipped_hidden"] >= 1 and fetch["nested_images"] == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_salve_run_at_once_with_one_line(signum, folder_template, tmp_path):
    """No server configured: the run starts Prefect's temporary API, which must not outlive it."""
    import psutil

    root = copy_project(folder_template, tmp_path / "project")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            SALVE,
            "run",
            "--no-progress",
            "--set",
            "finetune.epochs=200",
            "--set",
            "finetune.patience=0",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for fetch to finish: finetune is running
            line = proc.stdout.readline()
            if line.startswith("fetch"):
                break
            assert proc.poll() is None, proc.stderr.read()
        # finetune is running once it has written its first resume point (after epoch 1)
        resume = root / ".salve" / "resume"
        while time.monotonic() < deadline and not (resume.is_dir() and any(resume.iterdir())):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        t0 = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum
    assert stopped_after < 15, stopped_after
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted" in lines[0] and "finetune" in lines[0] and "rerun" in lines[0], lines[0]
    time.sleep(1.0)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [], "orphaned processes after the interrupt"
    # dvc status is truthful: fetch finished (fresh), finetune did not record anything (stale)
    from tasks.dvcrepo import stale_stages

    assert stale_stages(root, ["fetch", "finetune"]) == ["finetune"]


BROKEN_PARAMS = {
    "syntax error": (
        "common:\n  seed: 0\n device: cpu\n",
        ":3:2: not valid YAML: expected <block end>, but found '<block mapping start>' (while "
        "parsing a block mapping); check the indentation: the keys of a section line up under "
        "each other",
    ),
    "duplicated section": (
        "common:\n  seed: 0\nsae:\n  width: 8\ncommon:\n  seed: 1\n",
        ":5:1: not valid YAML: section 'common' appears twice (first at line 1); merge the two "
        "into one",
    ),
    "duplicated key": (
        "sae:\n  width: 8\n  k: 3\n  width: 8\n",
        ":4:3: not valid YAML: key 'width' appears twice in its section (first at line 2); "
        "keep one of them",
    ),
    "empty": (
        "\n# nothing but comments\n",
        " is empty (no section, only comments or blank lines), so every stage would silently "
        "run the defaults; restore it with `git checkout params.yaml`, or start from the "
        "defaults by naming one section in it (`echo 'data:' > params.yaml`): salve run then "
        "writes every key with its default",
    ),
    "not a mapping": (
        "- sae\n",
        ":1:1: expected a mapping of sections (`sae:` with its keys indented below), got a "
        "list; restore it with `git checkout params.yaml`",
    ),
}


@pytest.mark.parametrize("case", BROKEN_PARAMS, ids=list(BROKEN_PARAMS))
@pytest.mark.parametrize("args", [(), ("--set", "sae.width=16")], ids=["plain", "with --set"])
def test_a_broken_params_file_is_one_line_under_salve_stage(
    case: str, args: tuple[str, ...], tmp_path, capsys, monkeypatch
):
    """`salve stage` in this process (the checks run before any stage: no project needed):
    exactly the one line on stderr, exit code 2, params.yaml untouched byte for byte."""
    import signal as signals

    from flows import logs
    from flows.cli import main

    text, says = BROKEN_PARAMS[case]
    params = tmp_path / "params.yaml"
    params.write_text(text)
    for name in (logs.LOG_ENV, "PREFECT_LOGGING_SETTINGS_PATH"):  # set by the CLI: restored
        monkeypatch.setenv(name, os.environ.get(name, ""))
    handlers = {s: signals.getsignal(s) for s in (signals.SIGINT, signals.SIGTERM)}
    capsys.readouterr()
    try:
        rc = main(["--root", str(tmp_path), "stage", "fetch", *args])
    finally:
        for signum, handler in handlers.items():
            signals.signal(signum, handler)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err == f"error: {params}{says}\n"
    assert out == "" and params.read_bytes() == text.encode()
