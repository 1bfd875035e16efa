"""The usual ReLU SAE; l1 on codes."""

from __future__ import annotations

from typing import Any

import torch

from salve.sae.base import SparseAutoencoder


class ReluSAE(SparseAutoencoder):
    kind = "relu"

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return pre_nl > 0

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"activation": "relu", "codes": "z = pre * (pre > 0)"}
