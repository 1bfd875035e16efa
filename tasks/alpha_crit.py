"""alpha_crit: per val sample, the suppression strength (of its class's dominant feature) at
which it loses its class: analytic, exact, brentq and empirical, plus a check on the real model
(the analysis: salve/alpha_crit.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from salve.alpha_crit import (
    ESTIMATORS,
    all_terms_nonnegative,
    alpha_crit_metrics,
    class_rows,
    empirical_grid,
    estimate_all,
    sample_rows,
    sign_changes,
    verify_on_real_model,
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
    dominant = torch.tensor([d["feature"] for d in load_ranking(root)["dominant"]])
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    head = head_of(model)
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    acts, labels = load_activations(root, "val")
    w_dec = sae.W_dec.detach().double()
    grid = empirical_grid(a_cfg)
    est = estimate_all(acts, labels, weight, bias, w_dec, dominant, grid)
    images, image_labels = open_split(root, "val")  # a few rows are read
    if not torch.equal(image_labels, labels):
        raise ArtifactError(
            "results/extract and results/fetch disagree on the val labels: they come from "
            "different runs; rerun extract (`salve stage extract --force`)."
        )
    verify = verify_on_real_model(
        model, images, labels, w_dec, dominant, grid, est["empirical"], a_cfg.verify_samples,
        sidecar["normalisation"],
    )  # fmt: skip
    w_nm, b_n = class_rows(weight, bias, labels)
    acts64, cols_nm = acts.double(), w_dec[:, dominant[labels]].T
    nonneg = all_terms_nonnegative(acts64, w_nm)
    roots = sign_changes(acts64, w_nm, b_n, cols_nm)
    write_plot(root, "alpha_crit", "samples", sample_rows(est, labels, dominant, nonneg, classes))
    save_tensors(
        STAGES["alpha_crit"].path(root, "values"),
        {f"alpha_{name}": est[name] for name in ESTIMATORS}
        | {"labels": labels, "features": dominant[labels], "all_terms_nonnegative": nonneg},
    )
    metrics = alpha_crit_metrics(est, labels, nonneg, roots, a_cfg, classes, verify)
    write_metrics(root, "alpha_crit", AlphaCritMetrics, metrics)
    keys = ("median_exact", "fraction_all_terms_nonnegative", "real_model_checked")
    return {k: metrics[k] for k in (*keys, "real_model_agree")}
