"""`salve study`: the parts' assembly against oracles, fingerprints, the generated answers and
page, and the flow end to end on the tiny built project (skip on rerun, failures keep the rest)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from salve.config import ConfigError, SaeConfig, from_dict
from salve.params_file import apply_overrides, yaml_load
from salve.present.study_figures import deeper_figure, variants_figure, vulnerability_figure
from salve.present.study_page import (
    answer_adversarial,
    answer_deeper,
    answer_variants,
    build_study_page,
    rho_verdict,
)
from salve.study.concept import (
    auto_layer,
    backbone_edit_effect,
    compare_with_head,
    forward_probe,
    layer_features,
    mean_deviation_along,
    resolve_layer,
)
from salve.study.deeper import pooled_activations
from salve.study.vulnerability import select_attack_samples, vulnerability_summary
from salve.tv import import_torchvision
from tests.conftest import REPO, copy_project

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Question 1: sample choice and the correlation record
# --------------------------------------------------------------------------------------------


def test_select_attack_samples_correct_only_capped_seeded() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 1])  # class 2 never right
    out = select_attack_samples(preds, labels, per_class=2, seed=5)
    assert set(out) == {0, 1, 2}
    assert out[1] == [4, 5] and out[2] == []
    assert len(out[0]) == 2 and set(out[0]) <= {0, 2, 3} and out[0] == sorted(out[0])
    assert select_attack_samples(preds, labels, 2, seed=5) == out  # seeded
    # A class's draw does not depend on the others.
    assert select_attack_samples(preds[:4], labels[:4], 2, seed=5)[0] == out[0]
    assert select_attack_samples(preds, labels, 10, seed=0)[0] == [0, 2, 3]
    with pytest.raises(ValueError, match="per_class"):
        select_attack_samples(preds, labels, 0, seed=0)


def test_vulnerability_summary_matches_scipy_and_counts() -> None:
    rng = np.random.default_rng(0)
    n = 40
    labels = np.repeat([0, 1], n // 2)
    alpha = rng.lognormal(size=n)
    alpha[3] = math.inf
    eps_linf = alpha * 0.01 + rng.uniform(0, 0.005, n)
    eps_linf[3] = 0.5  # the infinite alpha's sample: the largest finite size
    eps_linf[5] = 0.0  # already wrong at the attack: left out
    eps_linf[7] = math.inf  # not flipped within eps_max
    eps_l2 = rng.uniform(0.1, 1.0, n)
    out = vulnerability_summary(
        alpha,
        {"linf": eps_linf, "l2": eps_l2},
        labels,
        ["a", "b"],
        n_boot=200,
        seed=3,
        alternatives={"empirical": alpha * 2},
    )
    keep = eps_linf > 0
    big = lambda v: np.where(np.isinf(v), 1e300, v)  # noqa: E731 - inf ranks last
    expect = spearmanr(big(alpha[keep]), big(eps_linf[keep])).statistic
    linf = out["linf"]
    assert linf["n"] == n - 1 and linf["n_already_wrong"] == 1
    assert linf["n_eps_infinite"] == 1 and linf["n_alpha_infinite"] == 1
    assert linf["spearman"] == pytest.approx(expect, abs=1e-12)
    assert linf["ci95"][0] < linf["spearman"] < linf["ci95"][1]
    assert linf["spearman"] > 0.8  # eps grows with alpha by construction
    assert [c["name"] for c in linf["per_class"]] == ["a", "b"]
    sel = keep & (labels == 1)
    assert linf["per_class"][1]["n"] == int(sel.sum())
    assert linf["per_class"][1]["spearman"] == pytest.approx(
        spearmanr(big(alpha[sel]), big(eps_linf[sel])).statistic, abs=1e-12
    )
    # a monotone transform of alpha has the same ranks
    assert linf["by_estimator"]["empirical"]["spearman"] == pytest.approx(linf["spearman"])
    assert out["l2"]["n"] == n and out["l2"]["n_already_wrong"] == 0
    assert linf["median_eps"] == pytest.approx(np.median(eps_linf[keep & np.isfinite(eps_linf)]))


# --------------------------------------------------------------------------------------------
# Question 3: building blocks on a real torchvision ResNet-18 (random weights, 32 px)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = import_torchvision().models.resnet18(num_classes=3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the edit's centring matters
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=_gen(i))
                m.running_var.uniform_(0.5, 1.5, generator=_gen(100 + i))
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (9, 3, 32, 32), generator=_gen(1), dtype=torch.uint8)


def test_auto_layer_and_resolve(resnet: nn.Module) -> None:
    assert auto_layer(resnet) == "layer3"
    assert resolve_layer(resnet, "auto") == ("layer3", "layer3.1")
    assert resolve_layer(resnet, "layer2.0") == ("layer2.0", "layer2.0")
    vit = import_torchvision().models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=4, num_heads=2, hidden_dim=8, mlp_dim=8,
        num_classes=3,
    )  # fmt: skip
    assert auto_layer(vit) == "encoder.layers.encoder_layer_2"
    with pytest.raises(ValueError, match="study.deeper_layer"):
        auto_layer(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no module"):
        resolve_layer(resnet, "layer9")


def test_forward_probe_matches_separate_passes(resnet: nn.Module, images: torch.Tensor) -> None:
    from salve.activations import extract_activations
    from salve.data import normalise

    preds, pooled, head_in = forward_probe(resnet, images, "layer3", MEAN, STD, batch_size=4)
    with torch.no_grad():
        expect_preds = resnet(normalise(images, MEAN, STD)).argmax(1)
    assert torch.equal(preds, expect_preds)
    ref_pooled = pooled_activations(resnet, images, "layer3", MEAN, STD, batch_size=4)
    assert torch.allclose(pooled, ref_pooled, atol=1e-5)
    ref_head = extract_activations(resnet, images, MEAN, STD, batch_size=4, progress=False)
    assert torch.allclose(head_in, ref_head, atol=1e-5)
    assert not resnet.layer3._forward_hooks and not resnet.fc._forward_pre_hooks


def test_mean_deviation_along_by_hand() -> None:
    pooled = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    # d = (3, 4) / 5; deviations from (1, 0): (0, 2) -> 1.6 and (2, 6) -> 6.0
    value = mean_deviation_along(pooled, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.0]))
    assert value == pytest.approx((1.6 + 6.0) / 2)


def test_backbone_edit_alpha_zero_changes_nothing(resnet: nn.Module, images: torch.Tensor) -> None:
    """alpha = 0 is the unedited model: no efficacy, no side effect, everything survives."""
    labels = torch.tensor([0, 1, 2] * 3)
    shifted = torch.flip(images, dims=[3])
    base = {
        kind: forward_probe(resnet, imgs, "layer3", MEAN, STD)[0]
        for kind, imgs in (("val", images), ("blur", shifted))
    }
    _, pooled, _ = forward_probe(resnet, images, "layer3", MEAN, STD)
    direction = torch.randn(256, generator=_gen(2), dtype=torch.float64)
    reference = pooled.double().mean(0)
    before = mean_deviation_along(pooled[labels == 1], reference, direction)
    common = dict(reference_c=reference, before_along=before)
    args = (direction, 0.0, {"val": images, "blur": shifted}, labels, base, 1, 3, MEAN, STD)
    out = backbone_edit_effect(resnet, "layer3", *args, **common)
    assert out["efficacy"] == 0.0 and out["specificity_mean"] == 0.0
    assert out["generalisation"] == 0.0 == out["generalisation_blur"]
    assert out["survival"] == pytest.approx(1.0, abs=1e-6)
    strong = backbone_edit_effect(resnet, "layer3", direction, 1.0, *args[2:], **common)
    assert strong["survival"] != pytest.approx(1.0, abs=1e-3)  # the edit reaches the output


def test_layer_features_directions_are_dominant_decoder_columns() -> None:
    g = _gen(0)
    labels = torch.arange(60) % 3
    pooled = (
        torch.relu(torch.randn(60, 12, generator=g))
        + 2.0 * torch.nn.functional.one_hot(labels, 12).float()
    )
    sae = SaeConfig(kind="relu", width=8, epochs=5, batch_size=16)
    out = layer_features(pooled, labels, pooled[:20], sae, seed=0, num_classes=3)
    assert len(out["dominant"]) == 3 and len(out["directions"]) == 3
    assert all(len(d) == 12 for d in out["directions"])
    from salve.study.variants import fit_variant

    fitted, _ = fit_variant(pooled, sae, seed=0)  # same seed, same SAE
    for k, latent in enumerate(out["dominant"]):
        assert out["directions"][k] == fitted.W_dec[:, latent].double().tolist()
    assert all(s >= 0 for s in out["feature_share"])
    assert set(out["quality"]) == {"fvu", "l0", "dead_fraction"}


def test_compare_with_head_is_paired() -> None:
    deeper = {0: {"efficacy": 0.2}, 1: {"efficacy": 0.5}, 3: {"efficacy": 0.9}}
    head = {0: {"efficacy": 0.9}, 1: {"efficacy": 1.0}, 2: {"efficacy": 1.0}}
    out = compare_with_head(deeper, head, metrics=("efficacy",))
    assert out["deeper"]["efficacy"]["n"] == 2  # only classes both evaluated
    assert out["difference"]["efficacy"]["mean"] == pytest.approx(((0.2 - 0.9) + (0.5 - 1.0)) / 2)
    lo, hi = out["difference"]["efficacy"]["ci95"]
    assert lo < -0.6 < hi  # t interval of [-0.7, -0.5] around -0.6


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def test_study_stages_are_generated_into_their_own_dvc_yaml() -> None:
    """Each part is a stage of study/dvc.yaml whose code deps are the salve/study modules its
    stage imports (and no other part's); the pipeline's dvc.yaml has none of them."""
    from tasks import STAGE_ORDER, STUDY_ORDER
    from tasks.dvcfile import render_all

    files = {k: yaml_load(v) for k, v in render_all().items()}
    assert set(files) == {"dvc.yaml", "study/dvc.yaml"}
    assert list(files["dvc.yaml"]["stages"]) == list(STAGE_ORDER)
    study = files["study/dvc.yaml"]["stages"]
    assert list(study) == list(STUDY_ORDER) and len(study) >= 4
    own = {
        "study_adversarial": {"adversarial.py", "vulnerability.py", "stats.py"},
        "study_sae_variants": {"variants.py", "variant_edits.py"},
        "study_deeper_layer": {"concept.py", "deeper.py", "variants.py"},
        "study_report": set(),  # its page and figures are presentation (salve/present/)
    }
    every = set().union(*own.values())
    for name, entry in study.items():
        assert entry["wdir"] == ".." and entry["cmd"] == f"python -m tasks {name} --no-progress"
        mods = {d.split("/")[-1] for d in entry["deps"] if d.startswith("salve/study/")}
        assert mods - {"__init__.py"} == own[name], name
        assert f"tasks/{name}.py" in entry["deps"]
        assert entry["metrics"] == [{f"metrics/{name}.json": {"cache": False}}]
        assert not (mods & every) - own[name]
    assert {"salve/present/study_page.py", "salve/present/study_figures.py"} <= set(
        study["study_report"]["deps"]
    )
    assert "salve/steering.py" in study["study_sae_variants"]["deps"]  # salve_steer per kind
    assert "results/alpha_crit" in study["study_adversarial"]["deps"]
    assert "study.attack_steps" in study["study_adversarial"]["params"]
    assert "study.workers" not in {p for e in study.values() for p in e.get("params", [])}
    assert not (REPO / "salve/study/fingerprint.py").exists()
    assert (REPO / "study/dvc.yaml").read_text() == render_all()["study/dvc.yaml"], (
        "run `salve dvc-yaml`"
    )


# --------------------------------------------------------------------------------------------
# Answers and the page
# --------------------------------------------------------------------------------------------


def ci_cell(mean: float, lo: float, hi: float, n: int = 3) -> dict:
    return {"mean": mean, "ci95": [lo, hi], "n": n}


def test_rho_verdict_follows_the_interval() -> None:
    assert rho_verdict({"spearman": 0.3, "ci95": [0.1, 0.5], "n": 90}).startswith("evidence that")
    assert "opposite" in rho_verdict({"spearman": -0.3, "ci95": [-0.5, -0.1], "n": 90})
    assert rho_verdict({"spearman": 0.1, "ci95": [-0.05, 0.2], "n": 90}).startswith("no evidence")
    assert "too few" in rho_verdict({"spearman": math.nan, "ci95": [math.nan] * 2, "n": 2})


def _adversarial_part() -> dict:
    per_class = [
        {"class": 0, "name": "zero", "spearman": 0.5, "ci95": [0.2, 0.7], "n": 10},
        {"class": 1, "name": "one", "spearman": 0.0, "ci95": [-0.4, 0.4], "n": 10},
    ]
    entry = {
        "spearman": -0.12,
        "ci95": [-0.25, 0.01],
        "n": 20,
        "per_class": per_class,
        "n_alpha_infinite": 4,
        "n_eps_infinite": 1,
        "n_already_wrong": 0,
        "median_eps": 0.01,
    }
    samples = {
        "index": list(range(4)),
        "label": [0, 0, 1, 1],
        "alpha_exact": [1.0, math.inf, 3.0, 0.5],
        "eps_linf": [0.01, 0.02, math.inf, 0.005],
        "eps_l2": [0.3, 0.5, 0.2, 0.0],
    }
    return {"linf": entry, "l2": dict(entry, spearman=0.4, ci95=[0.2, 0.6]), "samples": samples}


def _variant_rows() -> list[dict]:
    def row(name: str, spec: tuple, eff: tuple) -> dict:
        cells = {"efficacy": ci_cell(*eff), "specificity_mean": ci_cell(*spec)}
        return {
            "name": name, "kind": name, "l0_rule": "k", "k": 4, "l1": None,
            "fvu": ci_cell(0.1, 0.05, 0.15), "l0": ci_cell(4.0, 4.0, 4.0),
            "dead_fraction": ci_cell(0.0, 0.0, 0.0), "failed": [],
            "methods": {"salve_projection": cells, "salve_paper": cells},
        }  # fmt: skip

    return [
        row("relu", (-0.05, -0.07, -0.03), (0.9, 0.85, 0.95)),
        row("topk", (-0.01, -0.02, 0.0), (0.9, 0.85, 0.95)),
        row("linear", (-0.2, -0.3, -0.1), (0.5, 0.4, 0.6)),
    ]


def _deeper_part(gap: tuple) -> dict:
    head = {"efficacy": ci_cell(0.9, 0.8, 1.0), "specificity_mean": ci_cell(-0.01, -0.02, 0.0),
            "generalisation": ci_cell(0.8, 0.7, 0.9)}  # fmt: skip
    deeper = {
        "efficacy": ci_cell(0.9 + gap[0], 0.8 + gap[1], 1.0 + gap[2]),
        "specificity_mean": ci_cell(-0.05, -0.08, -0.02),
        "generalisation": ci_cell(0.1, 0.0, 0.2),
    }
    diff = {"efficacy": ci_cell(*gap), "specificity_mean": ci_cell(-0.04, -0.06, -0.02),
            "generalisation": ci_cell(-0.7, -0.8, -0.6)}  # fmt: skip
    per_class = [{"class": 0, "latent": 3, "feature_share": 0.8, "deeper": {"efficacy": 0.1},
                  "head": {"efficacy": 0.9}}]  # fmt: skip
    return {
        "layer": "layer3", "block": "layer3.1", "alpha": 1.0, "sae": {"fvu": 0.2},
        "per_class": per_class, "left_out_classes": [],
        "summary": {"deeper": deeper, "head": head, "difference": diff},
        "survival": ci_cell(0.85, 0.8, 0.9), "feature_share": ci_cell(0.7, 0.6, 0.8),
    }  # fmt: skip


def test_answers_are_written_from_the_numbers() -> None:
    text = answer_adversarial(_adversarial_part())
    assert "L-inf: rho = -0.12 [-0.25, 0.01], n = 20: no evidence that" in text
    assert "L2: rho = 0.4 [0.2, 0.6], n = 20: evidence that a low alpha_crit" in text
    assert "1 of 2 intervals exclude 0 (1 positive, 0 negative)" in text
    assert "4 of 20 samples have an infinite alpha_crit" in text

    rows = _variant_rows()
    text = answer_variants(rows, {"target_l0": 4.0, "seeds": 3, "num_classes": 10})
    assert "more precise than relu (specificity interval above its interval): topk" in text
    assert "less precise: linear" in text and "worse: linear" in text
    assert "Best mean specificity: topk" in text
    rows[1]["methods"]["salve_projection"]["specificity_mean"] = ci_cell(-0.05, -0.08, -0.02)
    rows[1]["methods"]["salve_paper"] = rows[1]["methods"]["salve_projection"]
    text = answer_variants(rows, {"target_l0": 4.0, "seeds": 3})
    assert "no evidence that another kind gives more precise centred projection edits" in text

    worse = answer_deeper(_deeper_part((-0.6, -0.7, -0.5)))
    assert "less well than the head edit, by 60 percentage points" in worse
    assert "keeps 85 [80, 90] %" in worse and "70 [60, 80] %" in worse
    assert "harms the other classes more than the head edit" in worse
    assert "carries over to shifted images worse" in worse
    same = answer_deeper(_deeper_part((-0.05, -0.2, 0.1)))
    assert "No evidence of a difference in efficacy" in same and "percentage" not in same
    better = answer_deeper(_deeper_part((0.05, 0.01, 0.09)))
    assert "better than the head edit, by 5 percentage points" in better
    single = _deeper_part((-0.6, -0.6, -0.6))  # one class: a zero-width interval is no evidence
    for group in single["summary"].values():
        for cell in group.values():
            cell["n"] = 1
    text = answer_deeper(single)
    assert "Too few evaluated classes (n = 1)" in text and "cannot be compared" in text


def test_page_renders_every_part_deterministically() -> None:
    rows = _variant_rows()
    study = {
        "schema_version": 1,
        "parts": {
            "adversarial": {
                "fingerprint": "ab" * 32,
                "finished": "now",
                "seconds": 1.0,
                "settings": {"per_class": 2, "eps_max": {"linf": 0.25, "l2": 8.0}},
            },
            "sae_variants": {"fingerprint": "cd" * 32, "settings": {"target_l0": 4.0}},
            "deeper_layer": {"fingerprint": "ef" * 32, "settings": {"layer": "layer3"}},
        },  # fmt: skip
        "adversarial": _adversarial_part(),
        "sae_variants": rows,
        "deeper_layer": _deeper_part((-0.6, -0.7, -0.5)),
    }
    page = build_study_page(study, ["zero", "one"], stale={"sae_variants": True})
    assert page == build_study_page(study, ["zero", "one"], stale={"sae_variants": True})
    assert page.count('src="data:image/png;base64,') == 3
    assert "no evidence that a low alpha_crit" in page
    assert "less well than the head edit, by 60 percentage points" in page
    assert page.count("Its inputs (artifacts, parameters or code) changed") == 1
    empty = build_study_page({"parts": {}}, ["zero"])
    assert empty.count("Not computed yet") == 3


def test_readme_study_table_is_generated_from_the_study_metrics(tmp_path: Path) -> None:
    """The README's study block and RESULTS.md's study section are rendered from
    metrics/study_*.json (as the study stages write them); a committed table that differs is
    what `salve docs --check` reports."""
    import shutil

    from flows import docs

    root = tmp_path / "project"
    for rel in ("README.md", "Makefile", "dvc.lock"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copytree(REPO / "metrics", root / "metrics")
    for p in (root / "metrics").glob("study_*.json"):
        p.unlink()
    assert "No study recorded yet" in docs.rendered(root)["README.md"]

    adv = _adversarial_part()
    metrics = {
        "study_adversarial": {"settings": {"per_class": 2}} | {k: adv[k] for k in ("linf", "l2")},
        "study_sae_variants": {
            "settings": {"target_l0": 4.0},
            "variants": {r["name"]: r for r in _variant_rows()},
        },
        "study_deeper_layer": {"settings": {"layer": "layer3"}} | _deeper_part((-0.6, -0.7, -0.5)),
    }
    for stage, m in metrics.items():
        (root / "metrics" / f"{stage}.json").write_text(json.dumps(m))
    readme = docs.rendered(root)["README.md"]
    block = readme.split(docs.STUDY_BLOCK[0])[1].split(docs.STUDY_BLOCK[1])[0]
    assert block.count("\n|") >= 4  # header, rule and one row per question
    assert "no evidence that a low alpha_crit" in block
    for row in _variant_rows():
        assert row["name"] in block
    results = docs.rendered(root)[docs.RESULTS_MD]
    assert "### 1. Does a low alpha_crit predict adversarial vulnerability?" in results
    assert "| norm | Spearman, exact alpha_crit |" in results
    # The README as committed does not hold this table: `salve docs --check` names it.
    assert block not in (root / "README.md").read_text()
    assert "README.md" in docs.stale_files(root)


def test_figures_are_deterministic_and_survive_infinities() -> None:
    samples = _adversarial_part()["samples"]
    png = vulnerability_figure(samples, ["zero", "one"])
    assert png is not None and png == vulnerability_figure(samples, ["zero", "one"])
    assert vulnerability_figure({}, ["zero"]) is None
    assert variants_figure(_variant_rows()) is not None
    part = _deeper_part((-0.6, -0.7, -0.5))
    assert deeper_figure(part["per_class"], ["zero"]) is not None
    assert deeper_figure([], ["zero"]) is None


def test_deeper_layer_must_be_auto_or_a_module_name() -> None:
    assert from_dict({"study": {"deeper_layer": "encoder.layers.encoder_layer_8"}})
    with pytest.raises(ConfigError, match="study.deeper_layer"):
        from_dict({"study": {"deeper_layer": "layer3; rm"}})


def test_cli_registers_study() -> None:
    from flows.study import add_study_parser, cmd_study

    parser = argparse.ArgumentParser()
    add_study_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "--parts", "adversarial", "--force", "adversarial"])
    assert args.func is cmd_study and args.parts == ["adversarial"]
    assert args.dask_address is None and not args.allow_stale
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "--parts", "q4"])
    # Registering the command must not slow every `salve` call down with Prefect's import.
    code = "import sys, flows.study; sys.exit('prefect' in sys.modules or 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------
# The flow end to end on the tiny built project
# --------------------------------------------------------------------------------------------

TINY_STUDY = [
    "study.workers=2",
    "study.attack_per_class=2",
    "study.attack_steps=2",
    "study.attack_bisection_steps=3",
    "study.bootstrap=50",
    "study.seeds=2",
    "study.match_l0_fits=1",
]


def _big(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isinf(v), 1e300, v)


def _records(root: Path) -> dict:
    from tasks import STAGES, STUDY_PARTS

    return {
        part: json.loads(STAGES[stage].path(root, "record").read_text())
        for part, stage in STUDY_PARTS.items()
        if STAGES[stage].path(root, "record").exists()
    }


def _study_status(root: Path) -> set[str]:
    """`dvc status study/dvc.yaml`: the study stages DVC finds out of date."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "study/dvc.yaml"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split(":")[1] for line in out.splitlines() if line.startswith("study/dvc.yaml:")}


def study_project(template: Path, dest: Path) -> Path:
    """A built project with the study's dvc.yaml and tiny study settings, committed."""
    from tasks.dvcfile import render_all
    from tests.conftest import git

    root = copy_project(template, dest)
    (root / "study").mkdir(exist_ok=True)
    (root / "study" / "dvc.yaml").write_text(render_all()["study/dvc.yaml"])
    apply_overrides(root / "params.yaml", [*TINY_STUDY, "study.deeper_layer=layer9"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "study")
    return root


@pytest.mark.timeout(1500)  # a shared 2-core machine: the template pipeline, then the study
def test_study_stages_end_to_end_dvc_decides(
    built_project_template: Path, tmp_path: Path, prefect_harness, monkeypatch, capsys
) -> None:
    from flows.study import STUDY_PAGE, StudyError, run_study
    from salve.io import ArtifactError
    from salve.sae import quality_metrics
    from tasks import STUDY_ORDER
    from tasks.artifacts import load_activations, load_sae

    root = study_project(built_project_template, tmp_path / "project")
    params = root / "params.yaml"
    assert _study_status(root) == set(STUDY_ORDER)  # never run

    # 1. The deeper part fails (no such layer): the other two are committed, no page.
    with pytest.raises(StudyError, match="study_deeper_layer failed.*layer9"):
        run_study(root)
    assert _study_status(root) == {"study_deeper_layer", "study_report"}
    study = _records(root)
    assert set(study) == {"adversarial", "sae_variants"}
    assert not (root / STUDY_PAGE).exists()

    adv, adv_settings = study["adversarial"]["record"], study["adversarial"]["settings"]
    samples = adv["samples"]
    labels = samples["label"]
    assert len(samples["index"]) == len(labels) == len(samples["eps_linf"])
    assert all(labels.count(k) <= 2 for k in set(labels))
    for norm in ("linf", "l2"):
        eps = np.asarray(samples[f"eps_{norm}"])
        keep = eps > 0
        assert adv[norm]["n"] == int(keep.sum())
        expect = spearmanr(_big(samples["alpha_exact"])[keep], _big(eps)[keep]).statistic
        if adv[norm]["n"] >= 3 and math.isfinite(adv[norm]["spearman"]):
            assert adv[norm]["spearman"] == pytest.approx(expect, abs=1e-12)
        resolution = adv_settings["resolution"][norm]
        finite = eps[np.isfinite(eps) & keep]
        assert np.allclose(finite / resolution, np.round(finite / resolution))  # bisection grid
    metrics = json.loads((root / "metrics/study_adversarial.json").read_text())
    assert "samples" not in metrics and metrics["linf"] == adv["linf"]

    rows = {r["name"]: r for r in study["sae_variants"]["record"]}
    assert list(rows) == [
        "linear", "relu", "topk", "batchtopk", "jumprelu", "topk_aux_l1", "topk_l1_l2_ratio"
    ]  # fmt: skip
    target = quality_metrics(load_sae(root)[0], load_activations(root, "val")[0])["l0"]
    assert study["sae_variants"]["settings"]["target_l0"] == pytest.approx(target)
    for name, row in rows.items():
        assert row["seeds"] == [0, 1] and not row["failed"], name
        assert row["l0"]["n"] == 2
        # head edits and activation steering with the kind's own encode rule
        assert set(row["methods"]) == {"salve_projection", "salve_paper", "salve_steer"}
        assert row["methods"]["salve_projection"]["efficacy"]["n"] == 2
        assert row["methods"]["salve_steer"]["efficacy"]["n"] == 2
    k = rows["topk"]["k"]
    assert k == min(32, max(1, round(target)))
    assert rows["topk"]["l0"]["mean"] <= k + 1e-9
    assert (
        len(rows["relu"]["l1_trace"]) == 1
        and rows["relu"]["l1"] == rows["relu"]["l1_trace"][0]["l1"]
    )
    assert rows["linear"]["l0"]["mean"] > 30  # signed codes are dense (width 32)

    # 2. Fixed: only the failed part runs, then the page; DVC skips the others.
    apply_overrides(params, ["study.deeper_layer=auto"])
    out = run_study(root)
    assert out["status"] == {
        "study_adversarial": "skipped", "study_sae_variants": "skipped",
        "study_deeper_layer": "ran", "study_report": "ran",
    }  # fmt: skip
    assert _study_status(root) == set()
    again = _records(root)
    for part in ("adversarial", "sae_variants"):
        assert again[part] == study[part]
    deeper = again["deeper_layer"]["record"]
    assert deeper["layer"] == "layer3" and deeper["block"] == "layer3.1"
    classes = {r["class"] for r in deeper["per_class"]}
    assert classes.isdisjoint(deeper["left_out_classes"])
    assert classes | set(deeper["left_out_classes"]) == set(range(10))
    for r in deeper["per_class"]:
        assert set(r["deeper"]) >= {"efficacy", "specificity_mean", "generalisation", "survival"}
        assert r["head"]["efficacy"] is not None
    summary = deeper["summary"]
    assert summary["deeper"]["efficacy"]["n"] == len(classes)
    assert summary["difference"]["efficacy"]["mean"] == pytest.approx(
        summary["deeper"]["efficacy"]["mean"] - summary["head"]["efficacy"]["mean"]
    )
    page = (root / STUDY_PAGE).read_text()
    assert "Not computed yet" not in page and page.count("data:image/png;base64,") == 3

    # 3. A second `salve study` recomputes nothing, and starts no flow.
    import flows.cli
    import flows.interrupt
    import flows.logs

    monkeypatch.setattr(flows.logs, "configure", lambda root, debug: None)
    monkeypatch.setattr(flows.interrupt, "install", lambda: None)
    before = {p: p.read_bytes() for p in (root / "metrics").glob("study_*.json")}
    code = flows.cli.main(["--root", str(root), "study", "--set", "study.bootstrap=50"])
    printed = capsys.readouterr().out
    assert code == 0 and "every study stage is up to date" in printed
    assert {p: p.read_bytes() for p in before} == before

    # 4. A comment in one part's method module makes exactly that stage stale; its rerun gives
    # the same bytes, so the page stays up to date; the comment reverted, DVC's run-cache
    # restores the recorded outputs.
    module = root / "salve/study/adversarial.py"
    original = module.read_text()
    module.write_text(original + "# a comment\n")
    assert _study_status(root) == {"study_adversarial"}
    out = run_study(root, check_fresh=False)
    assert out["status"]["study_adversarial"] == "ran"
    assert out["status"]["study_report"] == "skipped"
    assert _records(root)["adversarial"] == again["adversarial"]
    module.write_text(original)
    out = run_study(root, parts=["adversarial"], page=False, check_fresh=False)
    assert out["status"] == {"study_adversarial": "restored"}

    # 5. A parameter of one part makes that part stale only.
    apply_overrides(params, ["study.attack_steps=3"])
    assert _study_status(root) == {"study_adversarial"}

    # 6. Pipeline outputs out of date with params.yaml are refused before any work.
    apply_overrides(params, ["sae.l1=0.01"])
    with pytest.raises(ArtifactError, match="fit_sae.*salve run"):
        run_study(root)
