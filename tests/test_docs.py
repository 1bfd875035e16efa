"""The docs describe the code: parameter reference and dvc.yaml are generated, and current."""

from __future__ import annotations

from pathlib import Path

from salve.config import load, params_markdown
from tasks.dvcfile import render_dvc_yaml

REPO = Path(__file__).resolve().parents[1]


def test_readme_parameter_reference_matches_the_schema():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert params_markdown() in readme, "README is stale: run `salve params-doc --write README.md`"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci/run").read_text()


def test_committed_dvc_yaml_is_generated_from_the_stage_registry():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), "run `salve dvc-yaml`"


def test_repository_params_yaml_is_valid_and_complete():
    from salve.config import Config, yaml_load

    load(REPO / "params.yaml")
    raw = yaml_load((REPO / "params.yaml").read_text())
    for section, values in Config().to_dict().items():
        assert set(raw[section]) == set(values), f"params.yaml section {section} is incomplete"


def readme_snippet(marker: str) -> str:
    """The Python block right after ``<!-- readme-snippet: MARKER -->`` in the README."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    after = readme.split(f"<!-- readme-snippet: {marker} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_checkpoint_snippet_runs_verbatim(built_project_template, tmp_path):
    """The README's way to load a checkpoint, in this environment, in a fresh interpreter."""
    import subprocess
    import sys

    code = readme_snippet("load-classifier")
    code += (
        "\nimport torch\n"
        "x = torch.rand(2, 3, 32, 32)\n"
        "assert torch.equal(model(x), plain.eval()(x)), 'the two ways load different models'\n"
        "assert type(model).__module__.startswith('torchvision.')\n"
        "print('ok')\n"
    )
    (tmp_path / "snippet.py").write_text(code)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")],
        cwd=built_project_template,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
