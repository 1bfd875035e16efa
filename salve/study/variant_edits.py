"""Question 2: do other SAE kinds give more precise edits? One fit, and one row per kind.

Each fit is scored twice: its quality (FVU, L0, dead fraction on val, docs/METHOD.md's definitions)
and the edits it enables, with :func:`salve.evaluate.evaluate_seed` on the three SALVE methods
along each class's dominant latent (ranked on the train split as the rank stage does): the
centred projection and the paper's rule (head edits), and activation steering
(``salve_steer``, salve/steering.py: the latent ablated with the fitted kind's own encode rule,
as the evaluate stage measures it for the pipeline's SAE). Rows aggregate a kind's seeds with
95 % t-intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from salve.config import SaeConfig
from salve.evaluate import evaluate_seed, mean_ci95, summarise_methods
from salve.ranking import class_mean_codes, dominant_features
from salve.sae import quality_metrics
from salve.study.variants import fit_variant

EDIT_METHODS = ("salve_projection", "salve_paper", "salve_steer")
QUALITY = ("fvu", "l0", "dead_fraction")


def fit_and_evaluate(
    train_acts_nm: torch.Tensor,
    train_labels_n: torch.Tensor,
    val_acts_nm: torch.Tensor,
    val_labels_n: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    sae: SaeConfig,
    *,
    seed: int,
    projection_alpha: float,
    paper_alpha: float,
    min_base_accuracy: float,
) -> dict[str, Any]:
    """Fit one SAE on train activations, then its val quality and edit metrics (JSON-able)."""
    fitted, _ = fit_variant(train_acts_nm, sae, seed=seed)
    quality = quality_metrics(fitted, val_acts_nm)
    num_classes = weight_km.shape[0]
    labels = torch.as_tensor(train_labels_n).to(torch.int64)
    mu_kl = class_mean_codes(fitted.encode_batched(train_acts_nm), labels, num_classes)
    dominant = dominant_features(mu_kl)
    evaluation = evaluate_seed(
        weight_km,
        bias_k,
        train_acts_nm,
        labels,
        val_acts_nm,
        val_labels_n,
        fitted.W_dec.detach(),
        fitted.b_dec.detach(),
        dominant,
        projection_alpha=projection_alpha,
        paper_alpha=paper_alpha,
        min_base_accuracy=min_base_accuracy,
        seed=seed,
        methods=EDIT_METHODS,
        probe=False,
        sae=fitted,
    )
    return {
        "seed": seed,
        **{key: float(quality[key]) for key in QUALITY},
        "dominant": [int(v) for v in dominant.tolist()],
        "evaluated_classes": evaluation["evaluated_classes"],
        "methods": evaluation["methods"],
    }


def variant_row(
    name: str,
    sae: SaeConfig,
    l0_rule: str,
    fits: Sequence[Mapping[str, Any]],
    *,
    target_l0: float,
    l1_trace: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """One kind's row: settings, quality and edit metrics as mean with 95 % CI over seeds.

    A fit that failed carries ``{"seed", "error"}``: it is listed in ``failed`` and left out of
    the means (``n`` in each interval says how many seeds count).
    """
    good = [f for f in fits if "error" not in f]
    row: dict[str, Any] = {
        "name": name,
        "kind": sae.kind,
        "l0_rule": l0_rule,
        "k": sae.k if l0_rule == "k" else None,
        "l1": sae.l1 if l0_rule == "achieved" else None,
        "aux_l1": sae.aux_l1,
        "l1_l2_ratio": sae.l1_l2_ratio,
        "target_l0": target_l0,
        "seeds": [int(f["seed"]) for f in good],
        "failed": [
            {"seed": int(f["seed"]), "error": str(f["error"])} for f in fits if "error" in f
        ],
        **{key: mean_ci95([f[key] for f in good] or [math.nan]) for key in QUALITY},
        "methods": summarise_methods([f["methods"] for f in good]),
    }
    if l1_trace is not None:
        row["l1_trace"] = [dict(t) for t in l1_trace]
    return row
