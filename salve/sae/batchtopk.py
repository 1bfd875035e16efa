"""BatchTopK SAE: while fitting, keep the k*N largest pre-activations of a batch of N (those
above zero); at inference a single threshold, estimated on the training set after fitting and
saved with the weights, replaces the batch rule (so a sample's codes do not depend on its batch).
"""

from __future__ import annotations

from typing import Any

import torch

from salve.modes import train_mode
from salve.sae.topk import TopKSAE

THRESHOLD_TENSOR = "batchtopk_threshold"


class BatchTopKSAE(TopKSAE):
    kind = "batchtopk"

    def __init__(self, d_in: int, d_latent: int, *, k: int) -> None:
        super().__init__(d_in, d_latent, k=k)
        self.register_buffer(THRESHOLD_TENSOR, torch.zeros(()))

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        if self.training:
            n_keep = min(self.k * pre_nl.shape[0], pre_nl.numel())
            flat = pre_nl.flatten()
            idx = flat.topk(n_keep).indices
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True)
            return mask.view_as(pre_nl) & (pre_nl > 0)
        return pre_nl > self.batchtopk_threshold

    @torch.no_grad()
    def calibrate_(self, acts_nm: torch.Tensor, batch_size: int = 4096) -> None:
        """Threshold = mean over batches of the smallest pre-activation the batch rule keeps.

        normalise_decoder_ rescales latents one by one, so recalibrate after it."""
        mins = []
        with train_mode(self):  # the batch rule, as while fitting
            for start in range(0, acts_nm.shape[0], batch_size):
                pre = self.pre_activation(acts_nm[start : start + batch_size])
                mask = self.support(pre)
                if mask.any():
                    mins.append(pre[mask].min())
        self.batchtopk_threshold.fill_(torch.stack(mins).mean() if mins else 0.0)

    def _pre_activation_scaled_(self, scale: float) -> None:
        # One threshold for all latents: a common factor carries over (a per-latent one does
        # not, hence no _latents_rescaled_ and the recalibration after normalise_decoder_).
        self.batchtopk_threshold.mul_(scale)

    def describe(self) -> dict[str, Any]:
        rule = super().describe()
        return rule | {
            "activation": "threshold",
            "tensors": rule["tensors"] | {"threshold": THRESHOLD_TENSOR},
            "shapes": rule["shapes"] | {"threshold": []},
            "threshold": {
                "tensor": THRESHOLD_TENSOR,
                "per_latent": False,
                "log_parameterised": False,
            },
            "codes": (
                f"z = pre * (pre > t), t = {THRESHOLD_TENSOR} (a scalar, strict comparison); "
                "k applies only while fitting"
            ),
            "training_rule": (
                "while fitting: keep the k * N largest pre-activations of a batch of N samples "
                f"that are > 0; after fitting {THRESHOLD_TENSOR} = mean over batches of 4096 of "
                "the smallest value kept"
            ),
        }
