"""JumpReLU SAE: z = pre * [pre > theta] with a learned per-latent threshold theta = exp(log
theta); the threshold's gradient is a straight-through estimate with a rectangle kernel."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from salve.sae.base import SparseAutoencoder

THRESHOLD_TENSOR = "log_threshold"


class JumpReluSAE(SparseAutoencoder):
    """``initial_threshold`` and ``bandwidth`` are in the fit's units (activations of mean
    squared deviation d_in), so they mean the same for every backbone; the saved threshold is
    folded into the activations' units like the biases."""

    kind = "jumprelu"

    def __init__(
        self, d_in: int, d_latent: int, *, initial_threshold: float = 0.01, bandwidth: float = 0.05
    ) -> None:
        super().__init__(d_in, d_latent)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_latent,), math.log(initial_threshold)))

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return pre_nl > self.log_threshold.exp()

    def codes_from_pre(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre_nl, self.log_threshold, self.bandwidth)

    def _latents_rescaled_(self, scale_l: torch.Tensor) -> None:
        self.log_threshold.add_(scale_l.log())

    def describe(self) -> dict[str, Any]:
        rule = super().describe()
        return rule | {
            "activation": "threshold",
            "tensors": rule["tensors"] | {"threshold": THRESHOLD_TENSOR},
            "shapes": rule["shapes"] | {"threshold": [self.d_latent]},
            "threshold": {
                "tensor": THRESHOLD_TENSOR,
                "per_latent": True,
                "log_parameterised": True,
            },
            "codes": (
                f"z = pre * (pre > exp({THRESHOLD_TENSOR})), one threshold per latent "
                "(broadcast over rows, strict comparison)"
            ),
            "training_rule": (
                f"straight-through threshold gradient, rectangle kernel of width {self.bandwidth}"
                " (in the fit's units, a / input_scale)"
            ),
        }


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); straight-through rectangle-kernel gradient for theta."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):  # noqa: ANN001
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        # d/dtheta of pre*H(pre-theta) ~ -theta/bw * rect((pre-theta)/bw); chain rule to log theta.
        grad_theta = -(threshold / bw) * near * grad_out
        grad_log = (grad_theta * threshold).sum(dim=0)
        return grad_pre, grad_log, None
