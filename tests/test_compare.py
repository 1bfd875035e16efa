"""Comparing pipeline versions: key metrics declared once (tasks/keymetrics.py), the DVC adapter
(tasks/dvcrepo.py), `salve diff`, `salve exps` and `salve compare`.

Three layers: the declarations and text renderings on hand-made data (oracles written here); the
commands on a copy of the session's built project with a second, hand-edited revision (DVC reads
files, so the values written are the oracle); and the docs/OPERATIONS.md recipe verbatim, a real
`dvc exp run -S sae.width=128` (slow), whose page is also opened in headless Chromium.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salve.params_file import yaml_dump, yaml_load
from salve.present.compare.experiments import ExperimentRow, experiments_table
from salve.present.compare.metrics import KeyMetric, key_metric_changes
from salve.present.compare.text import metrics_diff_markdown, metrics_diff_text, text_table
from tasks import STAGE_ORDER, STAGES
from tests.conftest import REPO, copy_project, dvc, git
from tests.test_report import latent_data
from tests.test_report_browser import chromium  # noqa: F401 - the session fixture

WIDTH = 100


def salve(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
        cwd=REPO,  # this checkout's code, whatever the project holds
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------
# Key metrics: declared once, per stage, in a module no stage imports
# ------------------------------------------------------------------------------------------


def test_key_metrics_are_declared_per_stage_in_dag_order():
    from tasks import STUDY_ORDER
    from tasks.keymetrics import KEY_METRICS, KEY_METRICS_BY_STAGE, STUDY_KEY_METRICS_BY_STAGE

    assert list(KEY_METRICS_BY_STAGE) == list(STAGE_ORDER)
    assert list(STUDY_KEY_METRICS_BY_STAGE) == list(STUDY_ORDER)
    by_stage = KEY_METRICS_BY_STAGE | STUDY_KEY_METRICS_BY_STAGE
    flat = [km for s in (*STAGE_ORDER, *STUDY_ORDER) for km in by_stage[s]]
    assert list(KEY_METRICS) == flat
    for stage, kms in by_stage.items():
        assert len(kms) <= 4, f"{stage}: a headline is a few numbers"
        assert all(km.file == STAGES[stage].metrics_file for km in kms)
    keys = [(km.file, km.key) for km in KEY_METRICS]
    assert len(keys) == len(set(keys))
    names = [km.name for km in KEY_METRICS]
    assert len(names) == len(set(names)) and max(map(len, names)) <= 12
    ident = {km.key for km in KEY_METRICS if km.kind == "identifier"}
    assert ident == {"checkpoint_edit.feature"}


def test_no_stage_depends_on_the_declarations_or_the_adapter():
    from tasks.deps import code_deps

    for stage in STAGE_ORDER:
        deps = code_deps(stage)
        # The report opens with the key metrics (#28): it alone shows their declaration.
        assert ("tasks/keymetrics.py" in deps) == (stage == "report"), stage
        assert "tasks/dvcrepo.py" not in deps, stage


def _imports_dvc(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        if any(n == "dvc" or n.startswith("dvc.") for n in names):
            return True
    return False


def test_only_the_adapter_imports_dvc():
    importers = sorted(
        str(p.relative_to(REPO))
        for pkg in ("salve", "tasks", "flows")
        for p in (REPO / pkg).rglob("*.py")
        if _imports_dvc(p)
    )
    assert importers == ["tasks/dvcrepo.py"]


def test_noise_floors_are_half_a_val_sample_or_relative():
    from tasks.keymetrics import KEY_METRICS, UNKNOWN_VAL_FLOOR, key_metrics, val_samples

    n = 359
    kms = {km.key: km for km in key_metrics(n)}
    acc = kms["val_accuracy"]
    assert acc.noise_floor == pytest.approx(0.5 / n) and acc.better == "higher"
    assert kms["val_l0"].noise_floor == pytest.approx(0.5 / n)
    assert kms["val_dead_fraction"].noise_floor == 0.0 and kms["classes_selective"].noise_floor == 0
    assert kms["val_fvu"].relative_noise == 1e-4 and kms["val_fvu"].noise_floor == 0
    assert key_metrics(None) == KEY_METRICS
    assert {km.noise_floor for km in KEY_METRICS if km.key == "val_accuracy"} == {UNKNOWN_VAL_FLOOR}

    f = acc.file
    one_flip = {f: {"val_accuracy": {"old": 100 / n, "new": 101 / n}}}
    arithmetic = {f: {"val_accuracy": {"old": 0.5, "new": 0.5 + 8.8e-06}}}
    (c,) = key_metric_changes(one_flip, [acc])
    assert (c.judgement, c.arrow) == ("better", "▲")
    (c,) = key_metric_changes(arithmetic, [acc])
    assert (c.judgement, c.verdict) == ("noise", "within noise")
    fvu = kms["val_fvu"]
    tiny = {fvu.file: {"val_fvu": {"old": 0.1, "new": 0.1 - 5e-6}}}
    real = {fvu.file: {"val_fvu": {"old": 0.1, "new": 0.09}}}
    assert key_metric_changes(tiny, [fvu])[0].judgement == "noise"
    assert key_metric_changes(real, [fvu])[0].judgement == "better"

    fetch = STAGES["fetch"].metrics_file
    assert val_samples({fetch: {"val_samples": 400}}, {fetch: {"val_samples": 359}}) == 359
    assert val_samples(None, {fetch: {"val_samples": True}}, {fetch: {}}) is None


def test_relative_noise_floor_is_validated_and_strict():
    with pytest.raises(ValueError, match="relative_noise"):
        KeyMetric("m.json", "x", "x", relative_noise=math.inf)
    km = KeyMetric("m.json", "x", "x", "lower", relative_noise=0.1)
    at = key_metric_changes({"m.json": {"x": {"old": 10.0, "new": 9.0}}}, [km])[0]
    below = key_metric_changes({"m.json": {"x": {"old": 10.0, "new": 9.5}}}, [km])[0]
    assert (at.judgement, below.judgement) == ("better", "noise")  # |d| = 0.1 * max(|a|, |b|)


def test_headline_gives_a_stages_key_numbers():
    from tasks.keymetrics import headline

    fit = {
        "final_loss": 0.5,
        "val_fvu": 0.123456,
        "val_l0": 12.0,
        "val_dead_fraction": 0.0,
        "val_splice_accuracy": 0.9,
    }
    assert headline("fit_sae", fit) == "fvu=0.1235, L0=12, dead=0, splice=0.9"
    assert headline("fit_sae", {"val_l0": 3.25}) == "L0=3.25"  # what it lacks is left out
    edit = {"classes_selective": 7, "mean_score": 0.5, "checkpoint_edit": {"feature": 67}}
    assert headline("edit", edit) == "selective=7, score=0.5, edit_feat=67"
    fetch = {"source": "digits", "num_classes": 10, "train_samples": 120, "val_samples": 359}
    assert headline("fetch", fetch) == "classes=10, train=120, val=359"
    assert headline("report", {"figures": 7}) == ""
    assert headline("no_such_stage", fit) == ""


# ------------------------------------------------------------------------------------------
# Renderings: terminal text, Markdown, the experiment table
# ------------------------------------------------------------------------------------------


def width_diff() -> tuple[dict, dict]:
    """A `sae.width 64 -> 128` diff: two key metrics moved, 120 alpha_crit quantiles too."""
    params = {"params.yaml": {"sae.width": {"old": 64, "new": 128, "diff": 64}}}
    alpha = {
        f"per_class.c{c}.{e}.median": {"old": 10.0 + c, "new": 11.0 + c}
        for c in range(30)
        for e in ("linear", "exact", "brentq", "empirical")
    }
    alpha["median_exact"] = {"old": 30.0, "new": 33.0}
    metrics = {
        "metrics/alpha_crit.json": alpha,
        "metrics/fit_sae.json": {
            "val_fvu": {"old": 0.12, "new": 0.09},
            "train_fvu": {"old": 1, "new": 2},
        },
        "metrics/edit.json": {
            "checkpoint_edit.feature": {"old": 4, "new": 67},
            "per_class.c1.feature": {"old": 3, "new": 5},
        },
    }
    return params, metrics


def test_diff_text_leads_with_params_then_key_metrics_then_one_line_per_stage():
    from tasks.keymetrics import KEY_METRICS, metrics_files

    params, metrics = width_diff()
    kw = {"old_label": "HEAD", "new_label": "workspace", "file_order": metrics_files()}
    text = metrics_diff_text(params, metrics, KEY_METRICS, **kw)
    assert max(map(len, text.splitlines())) <= WIDTH
    p, k, o = (text.index(s) for s in ("Parameters", "Key metrics", "Other metric changes"))
    assert p < text.index("sae.width") < k < o
    lines = text[k:o].splitlines()[2:]
    # every pipeline key metric; the study's only where a revision has its file (none here)
    assert [ln.split("  ")[1].strip() for ln in lines if ln.strip()] == [
        km.label for km in KEY_METRICS if not km.optional
    ]
    assert any(km.optional for km in KEY_METRICS) and not any(
        km.file in metrics for km in KEY_METRICS if km.optional
    )
    with_study = dict(metrics) | {
        "metrics/study_adversarial.json": {"linf.spearman": {"old": 0.5, "new": 0.5}}
    }
    shown = metrics_diff_text(params, with_study, KEY_METRICS, **kw)
    assert "Spearman: alpha_crit vs L-inf flip size" in shown
    fvu = next(ln for ln in lines if "SAE val FVU" in ln)
    assert "▼" in fvu and fvu.rstrip().endswith("better")
    feat = next(ln for ln in lines if "saved edit's feature" in ln)
    assert "4 -> 67 (changed)" in feat and "+63" not in feat
    rest = text[o:]
    # Stages in DAG order, one line each; the 120 quantiles counted, not listed.
    assert rest.index("metrics/fit_sae.json: 1 changed") < rest.index("metrics/edit.json")
    assert rest.index("metrics/edit.json: 1 changed") < rest.index("metrics/alpha_crit.json")
    assert "metrics/alpha_crit.json: 120 changed" in rest and "per_class" not in rest
    full = metrics_diff_text(params, metrics, KEY_METRICS, **kw, show_all=True)
    assert "per_class.c29.empirical.median" in full and "3 -> 5 (changed)" in full
    assert "(changed) (changed)" not in full


def test_markdown_folds_each_stage_under_its_summary():
    from tasks.keymetrics import KEY_METRICS, metrics_files

    params, metrics = width_diff()
    md = metrics_diff_markdown(params, metrics, KEY_METRICS, file_order=metrics_files())
    other = md[md.index("### Other") :]
    assert other.count("<details>") == other.count("</details>") == 3
    for file, n in (("fit_sae", 1), ("edit", 1), ("alpha_crit", 120)):
        head = other.index(f"#### metrics/{file}.json: {n} changed")
        assert other.index("<details>", head) < other.index("| metric |", head)
    assert (
        "(changed) (changed)" not in md
        and "| per_class.c1.feature | 3 | 5 | 3 -> 5 (changed) |" in md
    )


def test_text_table_clips_the_widest_column_to_fit():
    rows = [("x" * 150, "1"), ("short", "2")]
    lines = text_table(("name", "v"), rows, width=40, shrink=0).splitlines()
    # indent 2 + name column + 2 spaces + "v" column: the name column gets 40 - 5 = 35
    assert [len(ln) for ln in lines] == [40, 40, 40]
    assert lines[1] == "  " + "x" * 34 + "…  1"
    assert lines[2] == "  short" + " " * 32 + "2"


def _exp(name: str, width: int, fvu: float, baseline: bool = False, **extra) -> ExperimentRow:
    params = {f"sae.p{i}": i for i in range(30)} | {"sae.width": width, "common.seed": 0}
    metrics = {
        "metrics/fetch.json": {"num_classes": 10, "train_samples": 120, "val_samples": 359},
        "metrics/fit_sae.json": {"val_fvu": fvu, "val_l0": 3.5, "val_dead_fraction": 0.0},
        "metrics/edit.json": {"checkpoint_edit": {"feature": width // 2}},
    }
    return ExperimentRow(
        name, hashlib.sha1(name.encode()).hexdigest(), params, metrics, baseline=baseline, **extra
    )


def test_experiment_table_shows_changed_params_and_key_metrics_within_100_columns():
    from tasks.keymetrics import KEY_METRICS

    rows = [
        _exp("main", 64, 0.12, baseline=True),
        _exp("sae-w128", 128, 0.09),
        _exp("sae-w256", 256, 0.07),
        ExperimentRow("sae-w512", "f" * 40, {}, {}, state="failed"),
    ]
    text = experiments_table(rows, KEY_METRICS)
    assert max(map(len, text.splitlines())) <= WIDTH
    header = text.splitlines()[0].split()
    assert header[:2] == ["run", "sae.width"]
    assert "common.seed" not in text and "sae.p3" not in text  # equal wherever recorded
    assert "fvu↓" in header and "edit_feat" in header and "L0" not in header
    rows_ = _table_rows(text.splitlines())
    col = header[1:].index("fvu↓")
    assert rows_["main"][0] == "64" and rows_["main"][col] == "0.12"
    assert rows_["sae-w128"][0] == "128" and rows_["sae-w128"][col] == "0.09"
    assert "SAE val L0 (active latents) 3.5" in text.replace("\n", " ")
    assert "[failed]" in text and "val_acc" not in text  # no run has it
    assert "fvu = SAE val FVU" in text
    md = experiments_table(rows, KEY_METRICS, markdown=True)
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(rows) and {ln.count("|") for ln in table} == {5}

    same = experiments_table(rows[:2], KEY_METRICS)
    assert "Same in every run: classes 10, train samples 120, val samples 359" in same
    assert "L0" not in same.splitlines()[0]


# ------------------------------------------------------------------------------------------
# The commands on a real repository: a second revision written by hand
# ------------------------------------------------------------------------------------------


def _edit(root: Path, width: int, fvu: float, feature: int) -> None:
    params = yaml_load((root / "params.yaml").read_text())
    params["sae"]["width"] = width
    (root / "params.yaml").write_text(yaml_dump(params))
    for name, change in (
        ("fit_sae", {"val_fvu": fvu}),
        ("edit", {"checkpoint_edit": {"feature": feature}}),
    ):
        path = root / "metrics" / f"{name}.json"
        values = json.loads(path.read_text())
        for k, v in change.items():
            values[k] = values[k] | v if isinstance(v, dict) else v
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def two_revisions(built_project_template: Path, tmp_path_factory) -> Path:
    """The built project plus a commit `sae.width -> 48` whose metrics were edited by hand (FVU
    halved, another saved feature) and a DVC experiment `hand-w96` saved on top of it."""
    root = copy_project(built_project_template, tmp_path_factory.mktemp("cmp") / "project")
    old = json.loads((root / "metrics" / "fit_sae.json").read_text())
    _edit(root, 48, old["val_fvu"] / 2, 1)
    git(root, "commit", "-qam", "sae.width=48")
    _edit(root, 96, old["val_fvu"] / 4, 2)
    dvc(root, "exp", "save", "-n", "hand-w96")
    git(root, "checkout", "-q", "--", ".")
    return root


def test_salve_diff_between_two_commits(two_revisions: Path):
    from flows.compare import diff_text

    root = two_revisions
    width = yaml_load(git(root, "show", "HEAD~1:params.yaml"))["sae"]["width"]
    fvu = [
        json.loads(git(root, "show", f"{r}:metrics/fit_sae.json"))["val_fvu"]
        for r in ("HEAD~1", "HEAD")
    ]
    out = diff_text(root, "HEAD~1")
    assert out.startswith("HEAD~1 (")
    param = next(ln for ln in out.splitlines() if "sae.width" in ln).split()
    assert param[:3] == ["sae.width", str(width), "48"]
    line = next(ln for ln in out.splitlines() if "SAE val FVU" in ln)
    assert f"{fvu[0]:.4g}" in line and f"{fvu[1]:.4g}" in line and line.endswith("better")
    assert "-50 %" in line
    assert "changed" in next(ln for ln in out.splitlines() if "saved edit's feature" in ln)
    unchanged = next(ln for ln in out.splitlines() if "fine-tuned val accuracy" in ln)
    assert unchanged.split()[-1] == "unchanged" and "–" not in unchanged  # values shown

    proc = salve(root, "diff", "HEAD~1", "--md")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("### Parameters") < proc.stdout.index("### Key metrics")
    assert "| params.yaml | sae.width | " in proc.stdout


def test_salve_compare_page_is_written_where_git_ignores_it(two_revisions: Path):
    from flows.compare import compare

    root = two_revisions
    page = compare(root, "HEAD~1", "hand-w96")
    assert page == root / "reports" / "compare" / "HEAD_1_vs_hand-w96.html"
    text = page.read_text(encoding="utf-8")
    params = text[text.index('id="params-diff"') : text.index('id="key-metrics"')]
    assert 'data-key="sae.width"' in params and ">96</td>" in params
    from tasks.keymetrics import KEY_METRICS

    keys = text[text.index('id="key-metrics"') : text.index('id="other-metrics"')]
    # the pipeline's key metrics; the study's are not there (neither revision ran the study)
    assert [k for k in KEY_METRICS if (f'data-key="{k.file}:{k.key}"' in keys) == k.optional] == []
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""


def _table_rows(lines: list[str]) -> dict[str, list[str]]:
    """First block of a `salve exps` table: run name -> cells under the header's columns."""
    out = {}
    for ln in lines[1:]:
        if not ln.strip():
            break
        cells = ln.split()
        out[cells[0]] = cells[2:] if cells[1].startswith("(") else cells[1:]
    return out


def test_salve_exps_lists_the_experiment(two_revisions: Path):
    root = two_revisions
    proc = salve(root, "exps", "-n", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= WIDTH
    header = lines[0].split()[1:]
    assert header[0] == "sae.width" and "fvu↓" in header
    rows = _table_rows(lines)
    base = git(root, "rev-parse", "--short=7", "HEAD~1").strip()
    assert list(rows) == ["main", "hand-w96", base]  # workspace = HEAD: not listed
    base_width = yaml_load(git(root, "show", "HEAD~1:params.yaml"))["sae"]["width"]
    assert [r[0] for r in rows.values()] == ["48", "96", str(base_width)]
    fvu = [
        json.loads(git(root, "show", f"{r}:metrics/fit_sae.json"))["val_fvu"]
        for r in ("HEAD", "HEAD~1")
    ]
    col = header.index("fvu↓")
    assert [rows["main"][col], rows[base][col]] == [f"{v:.4g}" for v in fvu]
    assert rows["hand-w96"][col] == f"{fvu[1] / 4:.4g}"
    md = salve(root, "exps", "--md")
    assert md.returncode == 0 and md.stdout.startswith("| run | sae.width |")


def test_unknown_revision_and_busy_repository_are_one_line_errors(two_revisions: Path):
    root = two_revisions
    proc = salve(root, "diff", "no-such-rev")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "unknown revision 'no-such-rev'" in proc.stderr

    lock = root / ".salve" / "run.lock"
    lock.parent.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = salve(root, "diff")
        assert proc.returncode == 1 and "another salve run is in progress" in proc.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert salve(root, "diff").returncode == 0


def test_adapter_push_pull_and_status(built_project_template: Path, tmp_path: Path):
    from tasks import dvcrepo

    a = copy_project(built_project_template, tmp_path / "A")
    assert dvcrepo.configured_remote(a) is None
    dvc(a, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    assert dvcrepo.configured_remote(a) == "shared"
    with pytest.raises(dvcrepo.DvcError, match="'nope' is not configured"):
        dvcrepo.configured_remote(a, "nope")
    assert dvcrepo.push(a, "shared") > 0
    assert dvcrepo.push(a, "shared") == 0  # everything is there already
    git(a, "commit", "-qam", "shared remote")

    b = tmp_path / "B"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True, timeout=60)
    assert dvcrepo.stale_stages(b, STAGE_ORDER)  # outputs missing
    stats = dvcrepo.pull(b, "shared")
    assert stats["fetched"] > 0 and stats["added"] > 0
    assert dvcrepo.stale_stages(b, STAGE_ORDER) == []
    sae = "results/fit_sae/sae.safetensors"
    assert (a / sae).read_bytes() == (b / sae).read_bytes()

    params = yaml_load((b / "params.yaml").read_text())
    params["rank"]["top_n"] += 1
    (b / "params.yaml").write_text(yaml_dump(params))
    # `dvc status` names the stage whose own dependency changed; those below it follow once
    # its outputs do.
    assert dvcrepo.stale_stages(b, STAGE_ORDER) == ["rank"]
    assert dvcrepo.params_diff(b, "HEAD") == {
        "params.yaml": {
            "rank.top_n": {
                "old": params["rank"]["top_n"] - 1,
                "new": params["rank"]["top_n"],
                "diff": 1,
            }
        }
    }


# ------------------------------------------------------------------------------------------
# The docs/OPERATIONS.md recipe, verbatim: a real experiment
# ------------------------------------------------------------------------------------------

DOWNSTREAM_OF_SAE = ["fit_sae", "rank", "edit", "alpha_crit", "gradfam", "evaluate", "report"]


@pytest.fixture(scope="module")
def width_experiment(built_project_template: Path, tmp_path_factory) -> dict:
    """The recipe's commands up to the page, on a copy of the built project (sae.width 32)."""
    root = copy_project(built_project_template, tmp_path_factory.mktemp("exp") / "project")
    t0 = time.perf_counter()
    run = dvc(root, "exp", "run", "-n", "sae-w128", "-S", "sae.width=128")
    seconds = time.perf_counter() - t0
    out = {"root": root, "log": run.stdout, "seconds": seconds}
    for name, args in (
        ("exps", ("exps",)),
        ("diff", ("diff",)),
        ("compare", ("compare", "HEAD", "sae-w128")),
    ):
        out[name] = salve(root, *args)
    out["page"] = root / "reports" / "compare" / "HEAD_vs_sae-w128.html"
    return out


@pytest.mark.slow
def test_width_experiment_recipe(width_experiment):
    root, log, seconds = (width_experiment[k] for k in ("root", "log", "seconds"))
    ran = [s for s in STAGE_ORDER if f"Running stage '{s}'" in log]
    assert ran == DOWNSTREAM_OF_SAE, log
    assert yaml_load((root / "params.yaml").read_text())["sae"]["width"] == 128

    exps, diff, page = (width_experiment[k] for k in ("exps", "diff", "compare"))
    assert exps.returncode == 0, exps.stderr
    rows = _table_rows(exps.stdout.splitlines())
    assert exps.stdout.split()[1] == "sae.width" and rows["sae-w128"][0] == "128"
    assert diff.returncode == 0, diff.stderr
    assert diff.stdout.index("sae.width") < diff.stdout.index("Key metrics")
    assert page.returncode == 0, page.stderr
    assert page.stdout.strip() == f"wrote {width_experiment['page']}"

    sae = (root / "results/fit_sae/sae.safetensors").read_bytes()
    git(root, "checkout", "--", ".")
    dvc(root, "checkout", "--force")
    assert (root / "results/fit_sae/sae.safetensors").read_bytes() != sae
    dvc(root, "exp", "apply", "sae-w128")
    assert (root / "results/fit_sae/sae.safetensors").read_bytes() == sae
    git(root, "add", "-A")
    git(root, "commit", "-qm", "SAE width 128")
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."
    assert "reports/compare" not in git(root, "show", "--stat", "HEAD")
    print(f"\n[exp] dvc exp run -S sae.width=128 reran {', '.join(ran)} in {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_compare_page_first_screen_in_chromium(width_experiment, chromium, tmp_path: Path):  # noqa: F811
    """At 1400x1000 the parameter change and every key metric are on the first screen."""
    from selenium.webdriver.common.by import By

    from tasks.keymetrics import KEY_METRICS
    from tests.test_report_browser import assert_quiet_and_offline, open_offline, start_driver

    page = width_experiment["page"]
    width, height = 1400, 1000
    profile = tmp_path / "profile"
    profile.mkdir()
    driver = start_driver(profile)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        open_offline(driver, page.resolve().as_uri())
        # the study's key metrics are not there: neither revision ran the study
        optional = [f"{k.file}:{k.key}" for k in KEY_METRICS if k.optional]
        assert optional and not any(
            driver.find_elements(By.CSS_SELECTOR, f'tr[data-key="{key}"]') for key in optional
        )
        for key in ["sae.width"] + [f"{k.file}:{k.key}" for k in KEY_METRICS if not k.optional]:
            el = driver.find_element(By.CSS_SELECTOR, f'tr[data-key="{key}"]')
            box = driver.execute_script(
                "const r = arguments[0].getBoundingClientRect();"
                "return [r.left, r.top, r.right, r.bottom];",
                el,
            )
            assert box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height, key
            assert el.is_displayed()
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-key="sae.width"]')
        assert "32" in row.text and "128" in row.text
        shot = driver.get_screenshot_as_png()
        (tmp_path / "first_screen.png").write_bytes(shot)
        Path("/tmp/salve_compare_width_first_screen.png").write_bytes(shot)
        assert_quiet_and_offline(driver, page.resolve().as_uri())
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------
# Feature matches (#28): the latents of two runs, matched (salve/matching.py)
# ------------------------------------------------------------------------------------------


def feature_section(text: str) -> str:
    return text[text.index('id="feature-matches"') : text.index('id="other-metrics"')]


def feature_rows(section: str) -> list[dict]:
    """The class rows of the feature-matches section, their attributes and links."""
    from tests.test_report import parse_tags

    table = section[section.index('id="class-matches"') :]
    rows: list[dict] = []
    for tag, attrs in parse_tags(table[: table.index("</table>")]):
        if tag == "tr" and "feature-match" in (attrs.get("class") or ""):
            rows.append(dict(attrs) | {"links": []})
        elif tag == "a" and rows:
            rows[-1]["links"].append(attrs["href"])
    return rows


def latent_pairs(section: str) -> set[tuple[int, int]]:
    from tests.test_report import parse_tags

    pairs = [a["data-pair"] for t, a in parse_tags(section) if t == "tr" and "data-pair" in a]
    return {(int(x), int(y)) for x, y in (p.split(":") for p in pairs)}


def _decoder(root: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(root / "results/fit_sae/sae.safetensors")["decoder.weight"].double()


def test_compare_head_with_itself_matches_every_feature_with_cosine_1(two_revisions: Path):
    from flows.compare import compare

    root = two_revisions
    page = compare(root, "HEAD", "HEAD", root / "reports" / "compare" / "self.html")
    section = feature_section(page.read_text(encoding="utf-8"))
    ranking = json.loads((root / "results/rank/ranking.json").read_text())
    rows = feature_rows(section)
    assert [int(r["data-class"]) for r in rows] == [d["class"] for d in ranking["dominant"]]
    for r, d in zip(rows, ranking["dominant"], strict=True):
        assert r["data-a"] == r["data-b"] == r["data-match"] == str(d["feature"])
        assert r["data-verdict"] == "same" and r["data-score"] == "1.000000"
        # Both runs' latent-browser entries: here both are the workspace's own browser.
        assert r["links"] == [f"../latest/latents.html#latent-{d['feature']}"] * 2
    width = _decoder(root).shape[1]  # params.yaml says 48 at HEAD: edited by hand, not run
    assert f"{width} latent pairs matched (|decoder cosine| &gt; 0.5)" in section
    assert f"{len(rows)} of {len(rows)} classes keep their dominant feature" in section
    assert "A and B read the same activations" in section
    assert section.count("<img") == 2 * len(rows)  # both Grad-FAM strips of every pair
    assert latent_pairs(section) == {(j, j) for j in range(width)}


@pytest.fixture(scope="module")
def width_revisions(built_project_template: Path, tmp_path_factory) -> dict:
    """The built project, then a commit with sae.width 32 -> 16: fit_sae, rank, gradfam and
    report rerun (what the page reads; the other stages are not needed for it)."""
    from salve.config import load
    from salve.params_file import apply_overrides
    from tasks.runner import run_stage

    root = copy_project(built_project_template, tmp_path_factory.mktemp("width") / "project")
    old = _decoder(root)
    apply_overrides(root / "params.yaml", ["sae.width=16"])
    cfg = load(root / "params.yaml")
    for stage in ("fit_sae", "rank", "gradfam", "report"):
        assert run_stage(stage, cfg, root, progress=False).status == "ran", stage
    git(root, "add", "-A")
    git(root, "commit", "-qm", "sae.width=16")
    return {"root": root, "old": old, "new": _decoder(root)}


def test_compare_a_width_change_pairs_latents_as_scipy_does(width_revisions: dict):
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from flows.compare import compare

    root, old, new = (width_revisions[k] for k in ("root", "old", "new"))
    assert (old.shape[1], new.shape[1]) == (32, 16)
    page = compare(root, "HEAD~1", "HEAD")
    text = page.read_text(encoding="utf-8")
    section = feature_section(text)
    # The pairs are an independent Hungarian assignment of the two decoders' |cosine|.
    unit = [(w / w.norm(dim=0).clamp_min(1e-300)).numpy() for w in (old, new)]
    cos = np.abs(unit[0].T @ unit[1])
    rows_, cols = linear_sum_assignment(cos, maximize=True)
    assert latent_pairs(section) == set(zip(rows_.tolist(), cols.tolist(), strict=True))
    # A row per class, its cosine in [0, 1] and equal to the pair's.
    rows = feature_rows(section)
    classes = json.loads((root / "results/fetch/meta.json").read_text())["classes"]
    assert len(rows) == len(classes)
    sha_a = git(root, "rev-parse", "HEAD~1").strip()
    for r in rows:
        assert r["data-verdict"] in {"same", "renumbered", "split", "merge", "different"}
        a = int(r["data-a"])
        if r["data-score"]:
            assert 0.0 <= float(r["data-score"]) <= 1.0
        if r["data-match"]:
            b = int(r["data-match"])
            assert float(r["data-score"]) == pytest.approx(min(1.0, cos[a, b]), abs=1e-6)
            assert (a, b) in latent_pairs(section) and cos[a, b] > 0.5
        # A's browser, read from DVC's cache beside the page; B's is the workspace's.
        assert r["links"][0] == f"revisions/{sha_a[:12]}/latents.html#latent-{a}"
        assert r["links"][1] == f"../latest/latents.html#latent-{r['data-b']}"
    copy = page.parent / "revisions" / sha_a[:12]
    browser = (copy / "latents.html").read_text(encoding="utf-8")
    entries = latent_data(browser)["entries"]
    assert len(entries) == 32 and (copy / "index.html").is_file()
    pictures = {x[k] for x in entries for k in ("overlay", "am") if x[k]}
    assert pictures and all((copy / src).is_file() for src in pictures)  # copied with it
    assert "of A&#39;s 32 and B&#39;s 16 latents" in section and "<img" in section


def _side(decoder, codes=None, dominant=(0, 1), outputs=None):
    from salve.present.compare.features import FeatureSide

    return FeatureSide(
        decoder_ml=decoder,
        val_codes_nl=codes,
        classes=["zero", "one"],
        dominant=list(dominant),
        cross_class=[],
        stage_outputs=outputs or {"fetch": "f", "finetune": "t", "extract": "x"},
        browser="../latest/latents.html",
    )


def _orthonormal(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]


def test_a_retrained_backbone_is_matched_by_its_codes_or_not_at_all():
    """Decoder cosines of SAEs on two backbones compare two spaces: never printed. The codes on
    the same val images are correlated instead; without them the page says no match is
    possible and prints none."""
    from salve.present.compare.features import features_markdown, match_features
    from salve.present.compare.page import RevisionData, build_compare_page

    g = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(60, 4, generator=g, dtype=torch.float64))
    perm = [2, 0, 3, 1]  # B's latent j is A's latent perm[j]
    retrained = {"fetch": "f", "finetune": "t2", "extract": "x2"}
    a = RevisionData("old", "a" * 40, features=_side(_orthonormal(12, 4, 1), codes))
    b = RevisionData(
        "new",
        "b" * 40,
        features=_side(_orthonormal(12, 4, 2), codes[:, perm] * 3 + 1, (1, 3), retrained),
    )
    fm = match_features(a, b, shared_val_images=True)
    assert (fm.status, fm.basis) == ("matched", "code correlation")
    assert "finetune output t -> t2 (a retrained backbone)" in fm.note
    assert [(c.a, c.b, c.verdict.kind) for c in fm.classes] == [
        (0, 1, "renumbered"),
        (1, 3, "renumbered"),
    ]
    assert all(c.verdict.score == pytest.approx(1.0) for c in fm.classes)
    section = feature_section(build_compare_page(a, b, {}, {}, features=fm))
    assert "|code correlation|" in section and "|decoder cosine|" not in section
    assert "Decoder cosines would compare two different spaces" in section
    assert features_markdown(fm, "HEAD").startswith(
        "2 of 2 classes' dominant features survived since HEAD (by code correlation > 0.5"
    )

    for codes_b, shared, why in (
        (None, None, "B kept no val activations"),
        (codes[:, perm], False, "the two runs' val images differ"),
    ):
        b.features = _side(_orthonormal(12, 4, 2), codes_b, (1, 3), retrained)
        fm = match_features(a, b, shared_val_images=shared)
        assert fm.status == "impossible" and fm.matching is None
        assert f"No match is possible: {why}" in fm.note
        section = feature_section(build_compare_page(a, b, {}, {}, features=fm))
        rows = feature_rows(section)
        assert [(r["data-a"], r["data-b"]) for r in rows] == [("0", "1"), ("1", "3")]
        assert {(r["data-match"], r["data-score"], r["data-verdict"]) for r in rows} == {
            ("", "", "none")
        }
        assert "no match possible" in section and "latent-pair" not in section
        assert "|decoder cosine|" not in section and "cosine</th>" not in section
        assert features_markdown(fm, "HEAD").startswith("Dominant features since HEAD: not")


def test_same_activations_match_by_decoder_and_check_by_codes():
    from salve.present.compare.features import features_markdown, match_features
    from salve.present.compare.page import RevisionData

    dec = _orthonormal(12, 4, 3)
    g = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(60, 4, generator=g, dtype=torch.float64))
    a = RevisionData("A", "a" * 40, features=_side(dec, codes, (0, 1)))
    # B: latent 0 kept; class one's feature (A's 1) is gone, replaced by a new direction.
    dec_b = dec.clone()
    dec_b[:, 1] = _orthonormal(12, 5, 4)[:, 4]
    b = RevisionData("B", "b" * 40, features=_side(dec_b, codes, (0, 1)))
    fm = match_features(a, b)
    assert (fm.status, fm.basis) == ("matched", "decoder cosine") and fm.codes is not None
    assert [c.verdict.kind for c in fm.classes] == ["same", "different"]
    assert fm.classes[0].code_corr == pytest.approx(1.0)
    assert fm.survived == 1
    line = features_markdown(fm, "HEAD")
    assert line.startswith("1 of 2 classes' dominant features survived since HEAD")
    assert "1 same feature, 1 different feature" in line
    # Without dvc.lock records the activations may differ: decoders are not trusted then.
    a.features.stage_outputs, b.features.stage_outputs = {}, {}
    fm = match_features(a, b, shared_val_images=True)
    assert fm.basis == "code correlation" and "not recorded in dvc.lock" in fm.note


def test_nightly_says_how_many_dominant_features_survived(two_revisions: Path):
    from flows.compare import dominant_survival
    from flows.nightly import render_report

    k = len(json.loads((two_revisions / "results/rank/ranking.json").read_text())["dominant"])
    line = dominant_survival(two_revisions, "HEAD")
    assert line == (
        f"{k} of {k} classes' dominant features survived since HEAD "
        f"(by decoder cosine > 0.5: {k} same feature)."
    )
    diff = {"head": "abc1234", "metrics": {}, "params": {}, "errors": {}, "features": line}
    text, _, _ = render_report(Path("/r"), diff, [], None, None)
    assert text.splitlines()[4] == line
