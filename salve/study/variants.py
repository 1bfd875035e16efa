"""SAE variants for open question 2 (do other SAE kinds give more precise edits?), at one L0.

A fair comparison holds sparsity fixed. What each kind allows:

- ``topk``, ``batchtopk`` and the two regularised top-k variants: ``k = round(target_l0)``, so the
  L0 matches by construction (batchtopk on average, through its calibrated inference threshold).
- ``relu`` and ``jumprelu``: sparsity comes from ``l1``; :func:`sae_variants` keeps the base
  ``l1`` and the study reports the achieved L0. :func:`match_l0_by_l1` matches it instead, by a
  bisection on ``log l1`` that refits the SAE at each step (opt-in: ``fits`` full fits).
- ``linear``: signed, never exactly zero codes (L0 = width whatever ``l1``); reported, not matched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from salve.config import SaeConfig
from salve.sae import SparseAutoencoder, fit_sae, quality_metrics

SAE_VARIANTS = (
    "linear",
    "relu",
    "topk",
    "batchtopk",
    "jumprelu",
    "topk_aux_l1",
    "topk_l1_l2_ratio",
)
# name -> (kind, L0 rule)
_VARIANT_KIND = {
    "linear": ("linear", "achieved"),
    "relu": ("relu", "achieved"),
    "topk": ("topk", "k"),
    "batchtopk": ("batchtopk", "k"),
    "jumprelu": ("jumprelu", "achieved"),
    "topk_aux_l1": ("topk", "k"),
    "topk_l1_l2_ratio": ("topk", "k"),
}


def sae_variants(
    base: SaeConfig,
    target_l0: float,
    *,
    names: tuple[str, ...] = SAE_VARIANTS,
    aux_l1: float = 0.03,
    l1_l2_ratio: float = 0.01,
) -> list[dict[str, Any]]:
    """Named SAE configurations derived from ``base`` (width, lr, epochs, ... kept).

    Each entry: ``{"name", "sae": SaeConfig, "l0_rule": "k" | "achieved"}``. Top-k kinds get
    ``k = round(target_l0)`` (clipped to [1, width]); only the two regularised variants carry a
    non-zero ``aux_l1`` / ``l1_l2_ratio`` (the given strengths, in fit_sae's scale-free units), so
    plain topk and batchtopk are unregularised whatever ``base`` says.
    """
    if not (math.isfinite(target_l0) and target_l0 > 0):
        raise ValueError(f"target_l0 must be a finite number > 0, got {target_l0}")
    if ("topk_aux_l1" in names and aux_l1 <= 0) or (
        "topk_l1_l2_ratio" in names and l1_l2_ratio <= 0
    ):
        raise ValueError("aux_l1 and l1_l2_ratio must be > 0 (else the variant is plain topk)")
    unknown = [n for n in names if n not in _VARIANT_KIND]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"variant names must be distinct and among {', '.join(SAE_VARIANTS)}; got {names}"
        )
    k = min(base.width, max(1, round(target_l0)))
    out = []
    for name in names:
        kind, rule = _VARIANT_KIND[name]
        cfg = dataclasses.replace(
            base,
            kind=kind,
            k=k if rule == "k" else base.k,
            aux_l1=aux_l1 if name == "topk_aux_l1" else 0.0,
            l1_l2_ratio=l1_l2_ratio if name == "topk_l1_l2_ratio" else 0.0,
        )
        out.append({"name": name, "sae": cfg, "l0_rule": rule})
    return out


def fit_variant(
    acts_nm: torch.Tensor, sae: SaeConfig, *, seed: int, device: torch.device | None = None
) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """The one call into salve.sae's fitting loop (kept here so a signature change is one line)."""
    return fit_sae(acts_nm, sae, seed=seed, device=device, progress=False)


def match_l0_by_l1(
    acts_nm: torch.Tensor,
    sae: SaeConfig,
    target_l0: float,
    *,
    seed: int,
    fits: int = 6,
    l1_range: tuple[float, float] | None = None,
    eval_acts_nm: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[SaeConfig, SparseAutoencoder, list[dict[str, float]]]:
    """Bisect ``log l1`` so a relu or jumprelu SAE reaches ``target_l0``; returns the closest fit.

    L0 falls as l1 grows. Each of the ``fits`` steps fits at the geometric midpoint of the bracket
    ``l1_range`` (default ``base l1 / 30 .. base l1 * 30``) and keeps the half whose L0 straddles
    the target. L0 is measured on ``eval_acts_nm`` (default: the fitting activations). Returns
    the configuration and SAE with the L0 closest to the target, and the trace
    ``[{"l1", "l0"}]`` of every fit.
    """
    if sae.kind not in ("relu", "jumprelu"):
        raise ValueError(
            f"match_l0_by_l1 needs an l1-sparse kind (relu, jumprelu), got {sae.kind!r}: top-k "
            "kinds set k instead, and linear codes are dense"
        )
    if fits < 1 or not (math.isfinite(target_l0) and target_l0 > 0):
        raise ValueError("fits must be >= 1 and target_l0 a finite number > 0")
    if l1_range is None:
        if sae.l1 <= 0:
            raise ValueError("sae.l1 is 0: give l1_range=(low, high) for the bisection")
        l1_range = (sae.l1 / 30, sae.l1 * 30)
    lo, hi = (math.log(v) for v in l1_range)
    if not lo < hi:
        raise ValueError(f"l1_range must be (low, high) with 0 < low < high, got {l1_range}")
    eval_acts = acts_nm if eval_acts_nm is None else eval_acts_nm
    best: tuple[float, SaeConfig, SparseAutoencoder] | None = None
    trace = []
    for _ in range(fits):
        cfg = dataclasses.replace(sae, l1=math.exp((lo + hi) / 2))
        fitted, _ = fit_variant(acts_nm, cfg, seed=seed, device=device)
        l0 = quality_metrics(fitted, eval_acts)["l0"]
        trace.append({"l1": cfg.l1, "l0": l0})
        if best is None or abs(l0 - target_l0) < best[0]:
            best = (abs(l0 - target_l0), cfg, fitted)
        if l0 > target_l0:
            lo = math.log(cfg.l1)  # too dense: more l1
        else:
            hi = math.log(cfg.l1)
    assert best is not None
    return best[1], best[2], trace
