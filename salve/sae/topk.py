"""TopK SAE: keep the k largest pre-activations of each sample (those above zero).

Its optional regularisers act on the pre-activations before the selection (docs/METHOD.md, "SAE"):
``aux_l1``, l1 on the positive pre-activations outside the top-k support, and ``l1_l2_ratio``,
the scale-invariant ||relu(pre)||_1 / ||relu(pre)||_2. There is no l1 on the codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from salve.sae.base import SparseAutoencoder


class TopKSAE(SparseAutoencoder):
    kind = "topk"
    takes_k = True

    def __init__(self, d_in: int, d_latent: int, *, k: int) -> None:
        if not 0 < k <= d_latent:
            raise ValueError(f"{self.kind} SAE needs 0 < k <= d_latent, got k={k}")
        super().__init__(d_in, d_latent)
        self.k = k

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        idx = pre_nl.topk(self.k, dim=-1).indices
        mask = torch.zeros_like(pre_nl, dtype=torch.bool).scatter_(-1, idx, True)
        return mask & (pre_nl > 0)

    def sparsity_terms(
        self, codes_nl: torch.Tensor, pre_nl: torch.Tensor, weights: Mapping[str, float]
    ) -> list[tuple[str, float, torch.Tensor]]:
        aux, ratio = weights.get("aux_l1", 0.0), weights.get("l1_l2_ratio", 0.0)
        terms = []
        if aux > 0 or ratio > 0:
            relu_pre = torch.relu(pre_nl)
            if aux > 0:
                outside = relu_pre * (codes_nl == 0)
                terms.append(("aux_l1", aux, outside.sum(dim=1).mean()))
            if ratio > 0:
                l1_over_l2 = relu_pre.sum(dim=1) / relu_pre.norm(dim=1).clamp_min(1e-8)
                terms.append(("l1_l2_ratio", ratio, l1_over_l2.mean()))
        return terms

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "activation": "topk",
            "k": self.k,
            "codes": (
                "z = pre * (m & (pre > 0)), m marking the k largest entries of each row of pre "
                "(torch.topk(pre, k, dim=-1).indices): at most k non-zero codes per sample"
            ),
        }
