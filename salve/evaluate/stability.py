"""Feature stability across SAE seeds: decoder columns matched to a reference seed's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from salve.matching import DECODER_COSINE, decoder_cosines, match_latents


def feature_stability(
    w_dec_ref_ml: torch.Tensor,
    w_dec_ml: torch.Tensor,
    dominant_ref_k: Sequence[int] | torch.Tensor,
    dominant_k: Sequence[int] | torch.Tensor,
    threshold: float = 0.9,
) -> dict:
    """Match one seed's decoder columns to a reference seed's (Hungarian, on |cosine|).

    Sign-blind (a latent and its negation are the same feature for a signed SAE), one-to-one.
    ``matched_fraction``: reference latents whose match has |cosine| > ``threshold``.
    ``dominant_match[k]``: class k's dominant latent in this seed is the match of its dominant
    latent in the reference. Zero columns (dead latents) have cosine 0 with everything.
    """
    # salve.matching: the one matching of compare, nightly and study too (same assignment).
    matching = match_latents(decoder_cosines(w_dec_ref_ml, w_dec_ml), threshold, DECODER_COSINE)
    cos_abs, match, matched_cos = matching.abs_similarity, matching.match_a, matching.scores_a
    dom_ref = [int(v) for v in torch.as_tensor(dominant_ref_k).reshape(-1).tolist()]
    dom = [int(v) for v in torch.as_tensor(dominant_k).reshape(-1).tolist()]
    if len(dom_ref) != len(dom):
        raise ValueError("dominant_ref_k and dominant_k need one latent per class each")
    dominant_match = [bool(match[r] == d) for r, d in zip(dom_ref, dom, strict=True)]
    return {
        "threshold": threshold,
        "matched_fraction": float((matched_cos > threshold).mean()),
        "mean_matched_abs_cosine": float(matched_cos.mean()),
        "dominant_match": dominant_match,
        "dominant_match_fraction": float(np.mean(dominant_match)) if dominant_match else math.nan,
        "dominant_abs_cosine": [float(cos_abs[r, d]) for r, d in zip(dom_ref, dom, strict=True)],
        "match": [int(v) for v in match.tolist()],
    }
