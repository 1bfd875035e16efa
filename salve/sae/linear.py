"""The paper's SAE: two linear layers, no nonlinearity, so codes are signed; l1 on codes."""

from __future__ import annotations

from typing import Any

import torch

from salve.sae.base import SparseAutoencoder


class LinearSAE(SparseAutoencoder):
    kind = "linear"

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(pre_nl, dtype=torch.bool)

    def codes_from_pre(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return pre_nl

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "activation": "identity",
            "codes": "z = pre (signed codes, no nonlinearity)",
        }
