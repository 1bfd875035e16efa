"""alpha_crit: per val sample, the suppression strength (of its class's dominant feature) at
which it loses its class: analytic, exact, brentq and empirical, plus a check on the real model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from salve.alpha_crit import (
    ESTIMATORS,
    all_terms_nonnegative,
    alpha_brentq,
    alpha_empirical,
    alpha_exact,
    alpha_linear,
    check_flips_on_real_model,
    class_rows,
    empirical_grid,
    sign_changes,
    summarise,
)
from salve.config import Config
from salve.io import ArtifactError, save_tensors
from salve.models import head_of
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
    open_split,
)
from tasks.common import write_metrics, write_plot
from tasks.records import AlphaCritMetrics


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    a_cfg = cfg.alpha_crit
    classes = load_dataset_meta(root)["classes"]
    num_classes = len(classes)
    ranking = load_ranking(root)
    dominant = torch.tensor([d["feature"] for d in ranking["dominant"]])
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    head = head_of(model)
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    acts, labels = load_activations(root, "val")
    acts64 = acts.double()
    w_dec = sae.W_dec.detach().double()
    cols_nm = w_dec[:, dominant[labels]].T  # each sample's class's dominant decoder column
    w_nm, b_n = class_rows(weight, bias, labels)

    est = {
        "linear": alpha_linear(acts64, w_nm, b_n, cols_nm),
        "exact": alpha_exact(acts64, w_nm, b_n, cols_nm),
        "brentq": alpha_brentq(acts64, w_nm, b_n, cols_nm),
        "empirical": torch.full((len(labels),), math.nan, dtype=torch.float64),
    }
    grid = empirical_grid(a_cfg)
    verify = {"checked": 0, "agree": 0}
    images, image_labels = open_split(root, "val")  # a few rows are read
    if not torch.equal(image_labels, labels):
        raise ArtifactError(
            "results/extract and results/fetch disagree on the val labels: they come from "
            "different runs; rerun extract (`salve stage extract --force`)."
        )
    per_class_verify = max(1, math.ceil(a_cfg.verify_samples / num_classes))
    for k in range(num_classes):
        idx = torch.nonzero(labels == k).flatten()
        if not len(idx):
            continue
        col = w_dec[:, dominant[k]]
        est["empirical"][idx] = alpha_empirical(
            acts64[idx], labels[idx], weight, bias, col, grid, "paper"
        )
        if a_cfg.verify_samples:
            chosen = idx[:per_class_verify]
            ok = check_flips_on_real_model(
                model,
                images[chosen],
                labels[chosen],
                col.float(),
                grid,
                est["empirical"][chosen],
                sidecar["normalisation"],
            )
            verify["checked"] += len(chosen)
            verify["agree"] += int(ok.sum())

    nonneg = all_terms_nonnegative(acts64, w_nm)
    roots = sign_changes(acts64, w_nm, b_n, cols_nm)
    single = (roots == 1) & torch.isfinite(est["brentq"])
    lin_le_exact = est["linear"] <= est["exact"] + 1e-9
    rows = [
        {"index": i, "class": classes[int(labels[i])], "feature": int(dominant[labels[i]])}
        | {f"alpha_{name}": float(est[name][i]) for name in ESTIMATORS}
        | {"all_terms_nonnegative": bool(nonneg[i])}
        for i in range(len(labels))
    ]
    write_plot(root, "alpha_crit", "samples", rows)
    save_tensors(
        STAGES["alpha_crit"].path(root, "values"),
        {f"alpha_{name}": est[name] for name in ESTIMATORS}
        | {"labels": labels, "features": dominant[labels], "all_terms_nonnegative": nonneg},
    )
    summaries = {name: summarise(est[name], labels, num_classes) for name in ESTIMATORS}
    metrics = {
        "units": "absolute alpha of the paper's rule (decoder columns as fitted)",
        "empirical_grid": {
            "min": a_cfg.grid_min,
            "max": a_cfg.grid_max,
            "steps": a_cfg.grid_steps,
            "spacing": a_cfg.grid_spacing,
        },
        "per_class": {
            classes[k]: {name: summaries[name][k] for name in ESTIMATORS}
            for k in range(num_classes)
        },
        "median_exact": _median(est["exact"]),
        "fraction_all_terms_nonnegative": float(nonneg.double().mean()),
        "linear_le_exact_when_nonnegative": _fraction(lin_le_exact[nonneg]),
        "linear_le_exact_overall": _fraction(lin_le_exact),
        "fraction_single_root": float((roots == 1).double().mean()),
        "fraction_multiple_roots": float((roots > 1).double().mean()),
        "exact_vs_brentq_max_abs_diff_single_root": (
            float((est["exact"][single] - est["brentq"][single]).abs().max())
            if single.any()
            else None
        ),
        "real_model_checked": verify["checked"],
        "real_model_agree": verify["agree"],
    }
    write_metrics(root, "alpha_crit", AlphaCritMetrics, metrics)
    return {
        k: metrics[k]
        for k in (
            "median_exact",
            "fraction_all_terms_nonnegative",
            "real_model_checked",
            "real_model_agree",
        )
    }


def _median(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if len(finite) else None


def _fraction(mask: torch.Tensor) -> float | None:
    return float(mask.double().mean()) if len(mask) else None
