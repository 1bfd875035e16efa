"""The docs describe the code: generated parts are current, hand-written parts cannot drift.

Generated: docs/RESULTS.md, README.md's results block and docs/PARAMETERS.md's reference
(`salve docs`), dvc.yaml (`salve dvc-yaml`). Hand-written (README.md, docs/*.md): every
`section.key` exists in the parameter schema, every relative link resolves inside the
repository, every fenced shell command names a real `salve` subcommand and flags, a real make
target and real scripts. Each checker is also fed planted errors, so a checker that finds nothing
cannot pass unnoticed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows import docs, docs_drift, docs_study
from salve.config import load, params_markdown
from tasks.dvcfile import render_dvc_yaml

REPO = Path(__file__).resolve().parents[1]


def test_parameter_reference_matches_the_schema():
    text = (REPO / docs.PARAMETERS_MD).read_text(encoding="utf-8")
    assert params_markdown() in text, "stale: run `salve docs` (or `salve params-doc --write`)"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci/run").read_text()


def test_readme_stays_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail into docs/"


def test_committed_dvc_yaml_is_generated_from_the_stage_registry():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml(), "run `salve dvc-yaml`"


def test_repository_params_yaml_is_valid_and_complete():
    from salve.config import Config
    from salve.params_file import yaml_load

    load(REPO / "params.yaml")
    raw = yaml_load((REPO / "params.yaml").read_text())
    for section, values in Config().to_dict().items():
        assert set(raw[section]) == set(values), f"params.yaml section {section} is incomplete"


# ------------------------------------------------------------------------------------------
# Generated results
# ------------------------------------------------------------------------------------------


def test_results_and_readme_block_equal_what_salve_docs_renders():
    expected = docs.rendered(REPO)
    assert set(expected) == {docs.RESULTS_MD, "README.md", docs.PARAMETERS_MD}
    for rel, text in expected.items():
        assert (REPO / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: `salve docs`"


def test_results_page_shows_the_metrics_it_is_rendered_from():
    """The rendered numbers are the metrics files' numbers, through the report's formatter."""
    import json

    from salve.present.kit import fmt

    d = docs.load_inputs(REPO)
    page = docs.results_markdown(d)
    fit = json.loads((REPO / "metrics/fit_sae.json").read_text())
    assert fmt(fit["val_fvu"], 3) in page
    proj = json.loads((REPO / "metrics/evaluate.json").read_text())["methods"]["salve_projection"]
    lo, hi = proj["efficacy"]["ci95"]
    assert f"{fmt(proj['efficacy']['mean'], 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]" in page
    assert "|---|" in docs.readme_block(d)


def _copy_docs_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for rel in ("README.md", "Makefile", "dvc.lock", docs.BENCH_JSON):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copytree(REPO / "metrics", root / "metrics")
    return root


def test_salve_docs_check_names_the_stale_file_and_salve_docs_fixes_it(tmp_path, capsys):
    from flows.cli import main

    root = _copy_docs_project(tmp_path)
    results = root / docs.RESULTS_MD
    results.write_text(results.read_text().replace("## SAE quality", "## SAE qualities"))
    readme = root / "README.md"
    start, end = docs.RESULTS_BLOCK
    head, rest = readme.read_text().split(start, 1)
    readme.write_text(f"{head}{start}\nstale numbers\n{end}{rest.split(end, 1)[1]}")

    assert main(["--root", str(root), "docs", "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{docs.RESULTS_MD} is out of date: run `salve docs`" in err
    assert "README.md is out of date" in err
    assert f"{docs.PARAMETERS_MD} is out of date" not in err

    assert main(["--root", str(root), "docs"]) == 0
    assert docs.stale_files(root) == []


def test_salve_docs_refuses_a_page_without_its_block(tmp_path, capsys):
    from flows.cli import main

    root = _copy_docs_project(tmp_path)
    (root / "README.md").write_text("# a README without the results block\n")
    assert main(["--root", str(root), "docs"]) == 1
    assert "README.md has no <!-- results:start -->" in capsys.readouterr().err


def test_rendering_without_a_run_says_how_to_make_one():
    empty = docs.DocInputs()
    assert "`make run`" in docs.results_markdown(empty)
    assert "`make run`" in docs.readme_block(empty)


def test_replace_block_keeps_the_rest_and_is_idempotent():
    doc = "intro\n<!-- a -->\nold\n<!-- b -->\noutro\n"
    once = docs.replace_block(doc, "<!-- a -->", "<!-- b -->", "new")
    assert once == "intro\n<!-- a -->\nnew\n<!-- b -->\noutro\n"
    assert docs.replace_block(once, "<!-- a -->", "<!-- b -->", "new") == once
    with pytest.raises(docs.DocsError, match="no <!-- a -->"):
        docs.replace_block("no markers", "<!-- a -->", "<!-- b -->", "new")


def test_a_study_older_than_the_pipeline_is_flagged():
    study = {
        "parts": {
            "sae_variants": {
                "settings": {"target_l0": 11.2, "target_l0_source": "the pipeline SAE's val L0"}
            }
        }
    }
    assert "older than the pipeline" in docs_study.study_staleness(study, {"val_l0": 11.7})
    assert docs_study.study_staleness(study, {"val_l0": 11.2}) is None


# ------------------------------------------------------------------------------------------
# Drift: the hand-written pages against the code
# ------------------------------------------------------------------------------------------


def test_hand_written_docs_have_not_drifted():
    pages = docs_drift.hand_written_pages(REPO)
    assert REPO / "README.md" in pages and REPO / "docs/OPERATIONS.md" in pages
    problems = docs_drift.drift(REPO)
    assert problems == [], "\n".join(problems)


def test_wrong_parameter_keys_are_found():
    schema = docs_drift.schema_keys()
    planted = (
        "Cross-class needs `rank.min_class_mean`.\n"
        "The ViT tap is `gradfam.vit_tap`.\n"
        "```bash\nsalve run --set sae.widht=128\n```\n"
        "Saved edits: `edit.nothing_*`.\n"
    )
    found = docs_drift.wrong_keys(planted, schema)
    assert [p.split(":", 1)[0] for p in found] == ["1", "2", "4", "6"], found
    assert "`rank.min_class_mean` is not a parameter" in found[0]
    assert "min_mean_fraction" in found[0]  # names what the section has


def test_right_keys_and_look_alikes_pass():
    schema = docs_drift.schema_keys()
    fine = (
        "`sae.width`, `-S edit.mode=paper`, `edit.checkpoint_*`, --set common.num_threads=1, "
        "rank.min_mean_fraction. Files: `metrics/rank.json`, `sae.json`, tasks/evaluate.py. "
        "Dotted code: cfg.sae.anything, salve.evaluate.shift_images, flows.study. "
        "Sentences end with data. Next."
    )
    assert docs_drift.wrong_keys(fine, schema) == []


def test_broken_links_are_found():
    doc = REPO / "README.md"
    planted = "\n".join(
        [
            "[method](../shared/METHOD.md)",  # 1: outside the repository
            "[gone](docs/NO_SUCH_PAGE.md)",  # 2: missing file
            "[anchor](docs/METHOD.md#no-such-heading)",  # 3: missing heading
            "[absolute](/docs/METHOD.md)",  # 4: absolute path
            "The method is written up in `../shared/METHOD.md`.",  # 5: a path outside, as code
            "[ok](docs/METHOD.md#method-choices) [web](https://example.org/x.md) [dir](tasks/)",
            "```",
            "[not a link](inside/a/code/block.md)",
            "```",
            "`[not a link either](nowhere.md)`",
        ]
    )
    found = docs_drift.broken_links(planted, doc, REPO)
    assert [p.split(":", 1)[0] for p in found] == ["1", "2", "3", "4", "5"], found
    assert "outside the repository" in found[0] and "does not exist" in found[1]
    assert "has no heading #no-such-heading" in found[2]


def test_links_to_git_ignored_files_are_found():
    doc = REPO / "README.md"
    found = docs_drift.broken_links("[page](docs/METHOD.md)", doc, REPO, ignored=lambda p: True)
    assert len(found) == 1 and "ignored by git" in found[0]
    ignored = docs_drift.git_ignored(REPO)
    assert not ignored(REPO / "README.md")
    assert ignored(REPO / ".salve" / "logs" / "run.log")  # .gitignore: .salve/


def test_same_page_anchors_and_heading_slugs():
    page = (
        "# Top\n\n## The study (`salve study`)\n\n## Top\n\n[up](#top) [again](#top-1) [x](#nope)"
    )
    found = docs_drift.broken_links(page, REPO / "README.md", REPO)
    assert len(found) == 1 and "#nope" in found[0]
    assert docs_drift.slug("Beyond one machine: work pools and workers") == (
        "beyond-one-machine-work-pools-and-workers"
    )
    assert docs_drift.slug("The study (`salve study`)") == "the-study-salve-study"


def test_wrong_shell_commands_are_found():
    from flows.cli import build_parser

    targets = docs_drift.makefile_targets((REPO / "Makefile").read_text())
    planted = "\n".join(
        [
            "```bash",
            "salve runn                               # 2: no such subcommand",
            "salve run --stagez fit_sae               # 3: no such flag",
            "make tests                               # 4: no such target",
            "salve stage no_such_stage                # 5: not a stage",
            "python benchmarks/no_such_script.py      # 6: no such script",
            "salve run --set sae.width=128 && make test",
            "(cd project-a && salve run --set common.num_threads=1) &",
            "salve run --progress > run.log 2>&1",
            'salve schedule --cron "0 3 * * *"',
            "export PATH=$PWD/.venv/bin:$PATH; .venv/bin/salve diff | less",
            "salve run --set data.source=imagefolder \\",
            "  --set finetune.epochs=0",
            "make INSTALLER=pip run && make .venv/.installed",
            "python benchmarks/fingerprint.py --check",
            "```",
            "```python",
            "salve runn  # not a shell block",
            "```",
        ]
    )
    found = docs_drift.wrong_commands(planted, build_parser(), targets, REPO)
    assert [p.split(":", 1)[0] for p in found] == ["2", "3", "4", "5", "6"], found
    assert "invalid choice: 'runn'" in found[0]
    assert "--stagez" in found[1]
    assert "no target `tests`" in found[2]
    assert "no_such_script.py" in found[4]


def test_shell_lines_split_into_simple_commands():
    assert docs_drift.simple_commands("A=1 salve run && (cd x; make test) | tee log 2>&1 &") == [
        ["salve", "run"],
        ["cd", "x"],
        ["make", "test"],
        ["tee", "log"],
    ]
    with pytest.raises(ValueError):
        docs_drift.simple_commands('salve run --set "unclosed')


def test_makefile_targets_expand_variables():
    targets = docs_drift.makefile_targets((REPO / "Makefile").read_text())
    assert {"run", "test", "lint", "study", "bench", ".venv/.installed"} <= targets
    assert ".PHONY" not in targets


# ------------------------------------------------------------------------------------------
# The README's loading snippet, verbatim
# ------------------------------------------------------------------------------------------


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
