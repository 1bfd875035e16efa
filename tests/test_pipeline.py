"""End-to-end: the stages under DVC's freshness rules, the Prefect flow, and the CLI.

One tiny project is shared by the tests of this module, which run in order (each builds on the
state the previous one left), to keep the suite within its time budget.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salve.config import load
from salve.params_file import apply_overrides
from tasks import STAGE_ORDER
from tasks.runner import run_stage
from tests.conftest import TINY_PARAMS, copy_project, dvc, make_project, write_params

pytestmark = pytest.mark.slow


def run_all(root: Path, force: bool = False) -> dict[str, str]:
    cfg = load(root / "params.yaml")
    return {
        name: run_stage(name, cfg, root, force=force, progress=False).status for name in STAGE_ORDER
    }


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every artifact, metric and plot file."""
    files = {}
    for folder in ("results", "metrics", "plots"):
        for p in sorted((root / folder).rglob("*")):
            if p.is_file() and p.name != ".gitignore":
                files[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def dvc_clean(root: Path) -> bool:
    out = dvc(root, "status").stdout
    return "up to date" in out


@pytest.fixture(scope="module")
def project(built_project_template, tmp_path_factory) -> Path:
    """A copy of the session's tiny project, whose cold run ran every stage (checked there)."""
    return copy_project(built_project_template, tmp_path_factory.mktemp("pipeline") / "project")


@pytest.fixture(scope="module")
def first_run(project: Path) -> dict:
    return {"snapshot": snapshot(project)}


def test_cold_run_leaves_dvc_clean_and_repro_idle(project, first_run):
    assert dvc_clean(project)
    repro = dvc(project, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout


def test_rerun_skips_every_stage_and_changes_nothing(project, first_run):
    assert run_all(project) == dict.fromkeys(STAGE_ORDER, "skipped")
    assert snapshot(project) == first_run["snapshot"]


def test_head_of_extracted_activations_equals_model_logits(project, first_run):
    from salve.data import normalise
    from salve.io import load_tensors
    from salve.models import head_of, load_checkpoint

    model, sidecar = load_checkpoint(project / "results/finetune/model.safetensors")
    images = load_tensors(project / "results/fetch/val.safetensors")["images"][:16]
    acts = load_tensors(project / "results/extract/val.safetensors")["acts"][:16]
    norm = sidecar["normalisation"]
    with torch.no_grad():
        logits = model(normalise(images, tuple(norm["mean"]), tuple(norm["std"])))
        from_acts = head_of(model)(acts)
    torch.testing.assert_close(from_acts, logits, rtol=0, atol=1e-5)


def test_changed_parameter_reruns_that_stage_and_dependents_only(project, first_run):
    apply_overrides(project / "params.yaml", ["edit.alpha_steps=4"])
    statuses = run_all(project)
    assert [s for s, v in statuses.items() if v != "skipped"] == ["edit", "report"]
    apply_overrides(project / "params.yaml", ["alpha_crit.grid_steps=7"])
    statuses = run_all(project)
    assert [s for s, v in statuses.items() if v != "skipped"] == ["alpha_crit", "report"]
    apply_overrides(project / "params.yaml", ["evaluate.seeds=3"])
    statuses = run_all(project)
    assert [s for s, v in statuses.items() if v != "skipped"] == ["evaluate", "report"]
    assert dvc_clean(project)


def test_a_b_a_restores_a_byte_for_byte(project, first_run):
    write_params(project, TINY_PARAMS)  # back to A (the first run's parameters)
    statuses_a = run_all(project)
    assert set(statuses_a.values()) <= {"skipped", "restored"}
    assert snapshot(project) == first_run["snapshot"]

    apply_overrides(project / "params.yaml", ["sae.width=16"])  # B
    statuses_b = run_all(project)
    assert statuses_b["fit_sae"] == "ran" and statuses_b["finetune"] == "skipped"
    b_metrics = json.loads((project / "metrics/fit_sae.json").read_text())
    assert snapshot(project) != first_run["snapshot"]

    write_params(project, TINY_PARAMS)  # A again
    statuses_a2 = run_all(project)
    assert statuses_a2["fit_sae"] == "restored"
    assert statuses_a2["finetune"] == "skipped"
    assert snapshot(project) == first_run["snapshot"]
    a_metrics = json.loads((project / "metrics/fit_sae.json").read_text())
    assert a_metrics != b_metrics
    assert dvc_clean(project)


def test_dvc_repro_then_flow_skips_everything(project, first_run, prefect_harness):
    apply_overrides(project / "params.yaml", ["rank.top_n=2"])
    repro = dvc(project, "repro")
    assert "Running stage 'rank'" in repro.stdout
    assert "Running stage 'fit_sae'" not in repro.stdout

    from prefect import get_client

    from flows.pipeline import pipeline

    rows = pipeline(root=str(project), progress=False)
    assert [r["stage"] for r in rows] == list(STAGE_ORDER)
    assert {r["status"] for r in rows} == {"skipped"}

    import asyncio

    async def artifacts_and_task_names():
        async with get_client() as client:
            arts = await client.read_artifacts()
            runs = await client.read_task_runs()
        return [a.key for a in arts], [r.name for r in runs]

    keys, task_names = asyncio.run(artifacts_and_task_names())
    assert "salve-stage-summaries" in keys
    for stage in STAGE_ORDER:
        assert any(name.startswith(stage) for name in task_names), (stage, task_names)


def test_flow_reruns_changed_stage_and_stores_no_pickles(project, first_run, prefect_harness):
    import os

    from flows.pipeline import pipeline

    storage = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])

    def stored() -> set[Path]:  # the storage is the session's: count only what this flow adds
        return {p for p in storage.rglob("*") if p.is_file()} if storage.exists() else set()

    before = stored()
    apply_overrides(project / "params.yaml", ["edit.alpha_max=0.5"])
    rows = {r["stage"]: r["status"] for r in pipeline(root=str(project), progress=False)}
    assert [s for s, v in rows.items() if v != "skipped"] == ["edit", "report"]
    assert dvc_clean(project)
    added = sorted(stored() - before)
    assert added == [], f"Prefect persisted results: {added[:3]}"


def test_edited_checkpoint_matches_closed_form_and_loads_into_torchvision(project, first_run):
    from salve.data import normalise
    from salve.editing import edit_head, resolve_sign
    from salve.io import load_tensors, read_json
    from salve.tv import import_torchvision

    edit = read_json(project / "results/edit/model.json")["edit"]
    state = load_tensors(project / "results/edit/model.safetensors")
    plain = import_torchvision().models.resnet18(num_classes=10)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    original = load_tensors(project / "results/finetune/model.safetensors")
    sae = load_tensors(project / "results/fit_sae/sae.safetensors")
    col = sae["decoder.weight"][:, edit["feature"]]
    centre = sae["decoder.bias"] if edit["centred"] else None
    expected_w, expected_b = edit_head(
        original["fc.weight"],
        col,
        edit["alpha_abs"],
        edit["sign"],
        edit["mode"],
        bias_k=original["fc.bias"],
        centre_m=centre,
    )
    assert torch.equal(state["fc.weight"], expected_w)
    assert torch.equal(state["fc.bias"], expected_b)
    if centre is not None and edit["alpha_abs"] != 0:  # the centred edit moves the bias
        # W' a + b' = W a + b - s alpha W d d.(a - b_dec): the head sees the SAE's centred input.
        d = col.double() / col.double().norm()
        a = torch.randn(3, d.numel(), dtype=torch.float64)
        w, b = original["fc.weight"].double(), original["fc.bias"].double()
        s = resolve_sign(edit["sign"])
        want = a @ w.T + b + s * edit["alpha_abs"] * ((a - centre.double()) @ d)[:, None] * (w @ d)
        got = a @ expected_w.double().T + expected_b.double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    images = load_tensors(project / "results/fetch/val.safetensors")["images"][:16]
    acts = load_tensors(project / "results/extract/val.safetensors")["acts"][:16]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        logits = plain(normalise(images, mean, std))
    torch.testing.assert_close(logits, acts @ expected_w.T + expected_b, rtol=0, atol=1e-4)


def test_alpha_zero_checkpoint_is_bit_identical(project, first_run):
    from salve.io import load_tensors

    apply_overrides(project / "params.yaml", ["edit.checkpoint_alpha=0.0"])
    statuses = run_all(project)
    assert [s for s, v in statuses.items() if v != "skipped"] == ["edit", "report"]
    edited = load_tensors(project / "results/edit/model.safetensors")
    original = load_tensors(project / "results/finetune/model.safetensors")
    assert edited.keys() == original.keys()
    assert all(torch.equal(edited[k], original[k]) for k in original)


def test_alpha_crit_estimators_agree_on_real_data(project, first_run):
    metrics = json.loads((project / "metrics/alpha_crit.json").read_text())
    assert metrics["real_model_checked"] > 0
    assert metrics["real_model_agree"] == metrics["real_model_checked"]
    if metrics["exact_vs_brentq_max_abs_diff_single_root"] is not None:
        assert metrics["exact_vs_brentq_max_abs_diff_single_root"] < 1e-6
    assert metrics["linear_le_exact_when_nonnegative"] in (None, 1.0)


def test_cli_rerun_starts_no_flow_when_everything_is_fresh(project, first_run):
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(project), "run", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "no flow started" in out.stdout
    assert out.stdout.count("skipped") == len(STAGE_ORDER)


def test_vit_path_on_a_tiny_input(tmp_path):
    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"] |= {"image_size": 32, "max_per_class": 2}
    params["finetune"] |= {"arch": "vit_b_16", "epochs": 1, "batch_size": 16}
    params["sae"] |= {"epochs": 5}
    root = make_project(tmp_path / "vit", params)
    cfg = load(root / "params.yaml")
    for name in ("fetch", "finetune", "extract", "fit_sae", "rank"):
        assert run_stage(name, cfg, root, progress=False).status == "ran"
    from salve.data import normalise
    from salve.io import load_tensors
    from salve.models import arch_of, head_of, load_checkpoint

    model, sidecar = load_checkpoint(root / "results/finetune/model.safetensors")
    assert arch_of(model) == "vit_b_16"
    acts = load_tensors(root / "results/extract/val.safetensors")["acts"][:4]
    assert acts.shape[1] == 768
    images = load_tensors(root / "results/fetch/val.safetensors")["images"][:4]
    norm = sidecar["normalisation"]
    with torch.no_grad():
        logits = model(normalise(images, tuple(norm["mean"]), tuple(norm["std"])))
    torch.testing.assert_close(head_of(model)(acts), logits, rtol=0, atol=1e-5)


def test_decision_flips_on_the_real_edited_model_match_cached_activations(project, first_run):
    """Scan a grid on the whole edited model (images in, paper rule) and compare with the
    closed-form flips computed from cached activations on the same grid."""
    from salve.alpha_crit import alpha_empirical
    from salve.data import normalise
    from salve.editing import edit_head
    from salve.io import load_tensors, read_json
    from salve.models import head_of, load_checkpoint

    model, sidecar = load_checkpoint(project / "results/finetune/model.safetensors")
    head = head_of(model)
    weight, bias = head.weight.detach().clone(), head.bias.detach()
    sae = load_tensors(project / "results/fit_sae/sae.safetensors")
    dominant = [d["feature"] for d in read_json(project / "results/rank/ranking.json")["dominant"]]
    val = load_tensors(project / "results/fetch/val.safetensors")
    acts, labels = (
        load_tensors(project / "results/extract/val.safetensors")[k] for k in ("acts", "labels")
    )
    grid = torch.cat([torch.zeros(1), torch.logspace(-1, 4, 30)]).double()
    norm = sidecar["normalisation"]
    checked = 0
    for k in range(3):
        idx = torch.nonzero(labels == k).flatten()[:3]
        col = sae["decoder.weight"][:, dominant[k]]
        cached = alpha_empirical(acts[idx], labels[idx], weight, bias, col, grid, "paper")
        x = normalise(val["images"][idx], tuple(norm["mean"]), tuple(norm["std"]))
        real = torch.full((len(idx),), float("inf"), dtype=torch.float64)
        with torch.no_grad():
            for alpha in grid.tolist():
                head.weight.copy_(edit_head(weight, col, alpha, "suppress", "paper"))
                lost = (model(x).argmax(1) != labels[idx]) & torch.isinf(real)
                real[lost] = alpha
            head.weight.copy_(weight)
        assert torch.equal(real, cached), (k, real, cached)
        checked += len(idx)
    assert checked > 0
