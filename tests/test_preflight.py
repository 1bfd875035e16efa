"""tasks.preflight: parameters whose validity depends on the machine, the data or the model are
refused before any stage runs (exit 2, one line, params.yaml untouched), and a model explained as
it is whose head cannot tell classes apart is one warning up front."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from salve.config import ConfigError, load
from tasks.preflight import degenerate_head, preflight
from tests.conftest import TINY_PARAMS, write_params

OUTPUTS = ("results", "metrics", "plots", "reports")


def _project(root: Path, **sections: dict) -> Path:
    """A folder the start-up checks accept: params.yaml (digits, resnet18, 32 px), data/."""
    params = {s: dict(v) for s, v in TINY_PARAMS.items()}
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("data", "weights"):
        (root / folder).mkdir(exist_ok=True)
    write_params(root, params)
    return root


def _with(cfg, **changes: dict):
    for section, values in changes.items():
        cfg = dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)}
        )
    return cfg


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _project(tmp_path / "project")


@pytest.fixture
def cli(monkeypatch, capsys):
    """`salve ...` in this process: exit code, stdout, stderr (no Prefect server is started)."""
    from flows import logs
    from flows.cli import main

    for name in (logs.LOG_ENV, "PREFECT_LOGGING_SETTINGS_PATH"):  # set by the CLI: restored
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    log = logging.getLogger("salve")  # the CLI adds its console handler: removed after
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "level", log.level)

    def run(root: Path, *args: str) -> tuple[int, str, str]:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            rc = main(["--root", str(root), *args])
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _refused_before_any_stage(root: Path, before: bytes, rc: int, out: str, err: str) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: "), err
    assert "Traceback" not in err and out == ""
    assert (root / "params.yaml").read_bytes() == before
    assert [d for d in OUTPUTS if (root / d).exists()] == []
    return lines[0]


# -- machine and model, through the command line -----------------------------------------------


@pytest.mark.parametrize("command", [("run", "--no-progress"), ("stage", "gradfam")])
def test_a_layer_that_is_not_a_module_is_refused_before_any_stage(project, cli, command):
    before = (project / "params.yaml").read_bytes()
    rc, out, err = cli(project, *command, "--set", "gradfam.layer=nolayer")
    line = _refused_before_any_stage(project, before, rc, out, err)
    assert "gradfam.layer='nolayer' is not a module of resnet18; choose auto or one of" in line
    # the feature maps a 32 px ResNet-18 offers (layer4 is 1x1 there), and auto's choice
    assert "layer1 (8x8), layer2 (4x4), layer3 (2x2)" in line and "layer4" not in line
    assert "auto picks layer2 at 32 px" in line


def test_cuda_on_a_machine_without_it_is_refused_before_any_stage(project, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = (project / "params.yaml").read_bytes()
    rc, out, err = cli(project, "run", "--no-progress", "--set", "common.device=cuda")
    line = _refused_before_any_stage(project, before, rc, out, err)
    assert line.startswith("error: params.yaml: common.device='cuda' but this machine has no ")
    assert f"torch {torch.__version__}" in line
    assert line.endswith("set common.device=cpu or auto")


def test_a_bad_value_already_in_params_yaml_is_refused_too(tmp_path, cli):
    root = _project(tmp_path / "project", study={"deeper_layer": "conv1"})
    before = (root / "params.yaml").read_bytes()
    rc, out, err = cli(root, "stage", "fetch")
    line = _refused_before_any_stage(root, before, rc, out, err)
    assert "study.deeper_layer='conv1' is not a residual block or stage of resnet18" in line


def test_cuda_passes_where_there_is_a_device(project, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _with(load(project / "params.yaml"), common={"device": "cuda"})
    preflight(cfg, project)


# -- gradfam.layer and study.deeper_layer, as the stages resolve them --------------------------


@pytest.mark.parametrize(
    ("layer", "size", "says"),
    [
        ("layr3", 32, "is not a module of resnet18; did you mean layer3? choose auto"),
        ("fc", 32, "gradfam.layer='fc' is the head of resnet18, not a feature map"),
        ("layer4", 32, "gives no usable feature map of resnet18 at 32 px"),  # 1x1 at 32 px
        ("avgpool", 64, "gives no usable feature map of resnet18 at 64 px"),
        ("pooled", 32, "no feature map of resnet18 is read directly by a global average pool"),
    ],
)
def test_gradfam_layers_the_stage_would_refuse(project, layer, size, says):
    cfg = _with(load(project / "params.yaml"), gradfam={"layer": layer}, data={"image_size": size})
    with pytest.raises(ConfigError, match="^params.yaml: gradfam.layer=") as err:
        preflight(cfg, project)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("layer", "size"), [("layer3", 32), ("layer2.1", 32), ("layer4", 64), ("pooled", 64)]
)
def test_gradfam_layers_the_stage_accepts(project, layer, size):
    from salve.feature_layers import select_layer
    from salve.models import skeleton

    cfg = _with(load(project / "params.yaml"), gradfam={"layer": layer}, data={"image_size": size})
    preflight(cfg, project)
    select_layer(skeleton("resnet18", size), size, layer)  # the stage's own resolution


def test_the_last_vit_block_is_refused_the_one_before_accepted(project):
    """The head reads the class token after a per-token LayerNorm: the last block's patch tokens
    get no gradient (salve/gradfam.py)."""
    cfg = _with(load(project / "params.yaml"), finetune={"arch": "vit_b_16"})
    last = "encoder.layers.encoder_layer_11"
    with pytest.raises(ConfigError, match=f"gradfam.layer='{last}' gives no usable feature map"):
        preflight(_with(cfg, gradfam={"layer": last}), project)
    preflight(_with(cfg, gradfam={"layer": "encoder.layers.encoder_layer_10"}), project)


@pytest.mark.parametrize(
    ("layer", "says"),
    [
        ("nolayer", "study.deeper_layer='nolayer' is not a module of resnet18; choose auto or "),
        ("layr3", "is not a module of resnet18; did you mean layer3? choose auto or one of layer1"),
        ("fc", "study.deeper_layer='fc' is not a residual block or stage of resnet18"),
    ],
)
def test_deeper_layers_the_study_would_refuse(project, layer, says):
    cfg = _with(load(project / "params.yaml"), study={"deeper_layer": layer})
    with pytest.raises(ConfigError, match="^params.yaml: study.deeper_layer=") as err:
        preflight(cfg, project)
    assert says in str(err.value)


@pytest.mark.parametrize("layer", ["layer3", "layer2.0"])
def test_deeper_layers_the_study_accepts(project, layer):
    preflight(_with(load(project / "params.yaml"), study={"deeper_layer": layer}), project)


def test_auto_layers_build_no_model(project, monkeypatch):
    """The default (auto) costs nothing beyond the architecture check."""
    import salve.models

    def refuse(*_args, **_kw):
        raise AssertionError("a skeleton was built for auto layers")

    monkeypatch.setattr(salve.models, "skeleton", refuse)
    preflight(load(project / "params.yaml"), project)


# -- a degenerate head, explained as it is -----------------------------------------------------


def _weights(root: Path, head: str, num_classes: int = 10, size: int = 16) -> None:
    from salve.models import build_model

    state = build_model("resnet18", num_classes, image_size=size).state_dict()
    if head == "zero":
        state["fc.weight"].zero_()
    elif head == "rows":
        state["fc.weight"][:] = state["fc.weight"][0]
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(root / "weights" / "m.safetensors")
    )


def _as_is(root: Path) -> Path:
    return _project(
        root,
        data={"image_size": 16, "max_per_class": 6},
        finetune={"epochs": 0, "weights": "weights/m.safetensors"},
        sae={"width": 16, "epochs": 5},
    )


@pytest.mark.parametrize(
    ("head", "says"),
    [("zero", "fc.weight is all zero: every logit is its bias"), ("rows", "has identical rows")],
)
def test_a_degenerate_head_is_one_warning(tmp_path, caplog, head, says):
    root = _as_is(tmp_path / "project")
    _weights(root, head)
    with caplog.at_level(logging.WARNING, logger="salve"):
        preflight(load(root / "params.yaml"), root)
    (text,) = [r.getMessage() for r in caplog.records if r.name.startswith("salve")]
    assert text.startswith("finetune.weights=weights/m.safetensors: the head's weight ")
    assert says in text and "predicts the same class for every image" in text
    assert "set finetune.epochs > 0" in text


def test_a_trained_head_or_a_head_to_be_trained_gives_no_warning(tmp_path, caplog):
    root = _as_is(tmp_path / "project")
    _weights(root, "random")
    cfg = load(root / "params.yaml")
    with caplog.at_level(logging.WARNING, logger="salve"):
        preflight(cfg, root)
        _weights(root, "zero")
        preflight(_with(cfg, finetune={"epochs": 1}), root)  # a new head is trained: no matter
    assert caplog.records == []


def test_degenerate_head_cases():
    w = torch.randn(3, 5)
    assert degenerate_head(w) is None
    assert "all zero" in degenerate_head(torch.zeros(3, 5))
    assert "identical rows" in degenerate_head(w[:1].expand(3, 5))
    assert degenerate_head(torch.zeros(1, 5)) is None  # one class: nothing to tell apart


@pytest.mark.slow
def test_a_zero_head_explained_as_it_is_warns_up_front_and_at_the_edit(tmp_path, caplog):
    """The issue's case: quality gate off, a head of zeros. One warning before any stage, one
    when the saved edit equals the input, and the edit metrics record it."""
    from salve.io import load_tensors, read_json

    root = _as_is(tmp_path / "project")
    _weights(root, "zero")
    cfg = load(root / "params.yaml")
    with caplog.at_level(logging.WARNING, logger="salve"):
        preflight(cfg, root)
        assert [r.name for r in caplog.records] == ["salve"] and "all zero" in caplog.text
        caplog.clear()
        for stage in ("fetch", "finetune", "extract", "fit_sae", "rank", "edit"):
            importlib.import_module(f"tasks.{stage}").run(cfg, root, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("salve")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        "edit: the saved edited checkpoint results/edit/model.safetensors equals the input model"
    )
    assert "because the head's weight is all zero" in warnings[0]
    edit = read_json(root / "metrics" / "edit.json")["checkpoint_edit"]
    assert edit["head_changed"] is False and edit["alpha"] > 0
    before = load_tensors(root / "results" / "finetune" / "model.safetensors")
    after = load_tensors(root / "results" / "edit" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_edit_stage_refuses_a_class_out_of_range_when_called_directly(project):
    from salve.io import write_json
    from tasks import STAGES
    from tasks.edit import run

    write_json(STAGES["fetch"].path(project, "meta"), {"classes": ["a", "b"], "info": {}})
    cfg = _with(load(project / "params.yaml"), edit={"checkpoint_class": 2})
    with pytest.raises(ConfigError, match=r"edit.checkpoint_class=2 is out of range; .* 2 classes"):
        run(cfg, project, progress=False)
