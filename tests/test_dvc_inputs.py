"""DVC sees every input: the user's data and weights, and every module a stage's code imports.

Code dependencies are derived from imports by tasks/deps.py (AST). The oracle here is an
independent analysis, the standard library's bytecode-based `modulefinder`, plus DVC itself:
editing a module must make exactly the stages that declare it stale.
"""

from __future__ import annotations

import modulefinder
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import STAGE_ORDER, STAGES
from tasks.deps import code_deps, imported_names
from tests.conftest import REPO, copy_project, dvc, git, make_project, write_params

pytestmark = pytest.mark.slow


def dvc_yaml_stages(root: Path) -> dict:
    from salve.params_file import yaml_load

    stages = {}
    for name in ("dvc.yaml", "study/dvc.yaml"):  # the pipeline's and the study's
        if (root / name).exists():
            stages |= yaml_load((root / name).read_text())["stages"]
    return stages


def project_modules_found_by_modulefinder(stage: str) -> set[str]:
    """Project files the bytecode of tasks/<stage>.py (and what it imports) can load."""
    finder = modulefinder.ModuleFinder(path=[str(REPO)])
    finder.run_script(str(REPO / "tasks" / f"{stage}.py"))
    found = {str(REPO / "tasks" / f"{stage}.py")}
    for module in finder.modules.values():
        if module.__file__ and Path(module.__file__).resolve().is_relative_to(REPO):
            found.add(str(Path(module.__file__).resolve()))
    # modulefinder records `tasks.x` as a submodule of `tasks` and loads the package itself
    return {str(Path(p).relative_to(REPO)) for p in found}


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_code_deps_match_an_independent_import_analysis(stage: str) -> None:
    declared = set(code_deps(stage))
    found = project_modules_found_by_modulefinder(stage)
    # package data (template folders) is declared beside the code that reads it
    data = {p for p in declared if (REPO / p).is_dir()}
    assert all(f"{p.rsplit('/', 1)[0]}/__init__.py" in found for p in data), data
    assert declared - data == found, (sorted(declared - data - found), sorted(found - declared))
    assert f"tasks/{stage}.py" in declared and "salve/config.py" in declared


def test_imports_inside_functions_and_relative_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "salve"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "def f():\n    from salve import b\n    import salve.c as c\n    return b, c\n"
        "from . import d\n"
    )
    for name in "bcd":
        (pkg / f"{name}.py").write_text("")
    names = imported_names(pkg / "a.py", tmp_path)
    assert {"salve.b", "salve.c", "salve.d"} <= names


def test_committed_dvc_yaml_declares_derived_deps_and_user_inputs() -> None:
    stages = dvc_yaml_stages(REPO)
    for name, spec in STAGES.items():
        deps = stages[name]["deps"]
        assert deps == spec.data_deps + code_deps(name)
    assert "${data.path}" in stages["fetch"]["deps"]
    assert "weights" in stages["finetune"]["deps"]


@pytest.fixture(scope="module")
def edited_project(built_project_template, tmp_path_factory) -> Path:
    return copy_project(built_project_template, tmp_path_factory.mktemp("deps") / "project")


def stale_stages(root: Path) -> set[str]:
    from tasks.runner import dvc_repo

    with dvc_repo(root) as repo:
        return set(repo.status(targets=list(STAGE_ORDER)))


def test_editing_any_module_makes_exactly_its_importing_stages_stale(edited_project: Path):
    root = edited_project
    assert stale_stages(root) == set()
    declared = {name: set(spec["deps"]) for name, spec in dvc_yaml_stages(root).items()}
    modules = sorted(
        str(p.relative_to(root)) for pkg in ("salve", "tasks") for p in (root / pkg).rglob("*.py")
    )
    assert len(modules) > 20
    # Which stages depend on which module is checked against modulefinder above; here DVC must
    # honour the declaration: one module for each distinct set of importing stages (the empty
    # set included) is enough, at a fraction of the dvc status calls.
    by_stages: dict[frozenset, str] = {}
    for module in modules:
        importers = frozenset(name for name, deps in declared.items() if module in deps)
        by_stages.setdefault(importers, module)
    assert len(by_stages) >= 5, by_stages
    for expected, module in sorted(by_stages.items(), key=lambda kv: kv[1]):
        path = root / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            assert stale_stages(root) == set(expected), module
        finally:
            path.write_bytes(original)
    assert stale_stages(root) == set()


# -- the user's data and weights ----------------------------------------------------------------


def write_image_folder(folder: Path, per_class: int = 8, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(("circle", "square", "stripes")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + 64 * k
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


@pytest.fixture
def folder_project(tmp_path: Path) -> Path:
    from tests.conftest import TINY_PARAMS

    params = {s: dict(v) for s, v in TINY_PARAMS.items()}
    params["data"] = params["data"] | {
        "source": "imagefolder",
        "path": "data/shapes",
        "image_size": 16,
        "min_val_per_class": 1,
    }
    params["edit"] = params["edit"] | {"checkpoint_class": 1}
    root = make_project(tmp_path / "project", params)
    write_image_folder(root / "data" / "shapes")
    return root


def run_fetch(root: Path) -> dict:
    import json

    from salve.config import load
    from tasks.runner import run_stage

    status = run_stage("fetch", load(root / "params.yaml"), root, progress=False).status
    return {"status": status} | json.loads((root / "metrics" / "fetch.json").read_text())


@pytest.mark.parametrize("change", ["modify", "remove", "add"])
def test_changing_one_image_makes_fetch_stale_and_reruns_it(folder_project: Path, change: str):
    root = folder_project
    first = run_fetch(root)
    assert first["status"] == "ran"
    assert run_fetch(root)["status"] == "skipped"
    total = first["train_samples"] + first["val_samples"]
    image = root / "data" / "shapes" / "square" / "3.png"
    if change == "modify":
        pixels = np.array(Image.open(image))
        pixels[0, 0] = 255 - pixels[0, 0]
        Image.fromarray(pixels).save(image)
    elif change == "remove":
        image.unlink()
    else:
        shutil.copy2(image, image.with_name("extra.png"))
    assert "fetch" in stale_stages(root)
    assert "changed deps" in dvc(root, "status", "fetch").stdout
    again = run_fetch(root)
    assert again["status"] == "ran"
    expected = {"modify": total, "remove": total - 1, "add": total + 1}[change]
    assert again["train_samples"] + again["val_samples"] == expected


def test_overwriting_the_weights_file_makes_finetune_stale(folder_project: Path) -> None:
    from safetensors.torch import save_file

    from salve.config import load
    from salve.models import build_model
    from tasks.runner import run_stage

    root = folder_project
    weights = root / "weights" / "start.safetensors"
    model = build_model("resnet18", 3, image_size=16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    params = load(root / "params.yaml").to_dict()
    params["finetune"] |= {"weights": "weights/start.safetensors", "epochs": 1}
    write_params(root, params)
    git(root, "add", "-A")
    cfg = load(root / "params.yaml")
    for stage in ("fetch", "finetune"):
        assert run_stage(stage, cfg, root, progress=False).status == "ran"
    assert not {"fetch", "finetune"} & stale_stages(root)
    state = model.state_dict()
    state["fc.bias"] = state["fc.bias"] + 1.0
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    assert "finetune" in stale_stages(root)
    assert "fetch" not in stale_stages(root)
