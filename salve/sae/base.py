"""What every SAE kind shares: weights, the centred pre-activation, decoding, unit-norm columns.

Every kind encodes ``pre = (a - b_dec) @ W_enc.T + b_enc`` and differs only in how codes follow
from ``pre`` (``support`` / ``codes_from_pre``), in its sparsity penalty and in the inference
statistics it saves with the weights. So the encoder gradient with respect to the activations is
``W_enc`` scaled by ``code_derivative`` for every kind (Grad-FAM's closed form relies on it).

Units: the fit works on ``a / input_scale`` (``salve.sae.fit``) and then folds that scale into
the biases and thresholds (``fold_input_scale_``), so a saved SAE reads raw activations and its
pre-activations, codes and reconstructions are in the activations' units; the weight matrices
are unitless (decoder columns keep unit norm, which sets alpha's scale).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

# Names of the four weight tensors in the state dict (and so in the safetensors file).
WEIGHT_TENSORS = {
    "W_enc": "encoder.weight",
    "b_enc": "encoder.bias",
    "W_dec": "decoder.weight",
    "b_dec": "decoder.bias",
}


class SparseAutoencoder(nn.Module):
    """Base of the SAE kinds; build one with ``salve.sae.build_sae`` (or a kind's class)."""

    kind: ClassVar[str | None] = None
    takes_k: ClassVar[bool] = False  # True for kinds that keep k latents (config's sae.k)

    def __init__(self, d_in: int, d_latent: int) -> None:
        if self.kind is None:
            raise TypeError(
                f"{type(self).__name__} is the base of the SAE kinds and needs one: "
                "build_sae(kind, d_in, width, k=...) or a kind's class"
            )
        super().__init__()
        self.encoder = nn.Linear(d_in, d_latent)
        self.decoder = nn.Linear(d_latent, d_in)
        # The activation unit the fit worked in (fold_input_scale_); None for an unfitted SAE.
        self.input_scale: float | None = None

    @classmethod
    def build(cls, d_in: int, d_latent: int, *, k: int = 0, **options: Any) -> SparseAutoencoder:
        """Construct from config-shaped options: a config always carries a k; only some kinds
        use it."""
        if cls.takes_k:
            options["k"] = k
        return cls(d_in, d_latent, **options)

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 - the method's notation
        return self.encoder.weight

    @property
    def b_enc(self) -> torch.Tensor:
        return self.encoder.bias

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        return self.decoder.weight

    @property
    def b_dec(self) -> torch.Tensor:
        return self.decoder.bias

    @property
    def d_in(self) -> int:
        return self.encoder.in_features

    @property
    def d_latent(self) -> int:
        return self.encoder.out_features

    # ---- the kind's encode rule -------------------------------------------------------------

    def support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the latents that are on, [N, L]."""
        raise NotImplementedError(f"{type(self).__name__} defines no encode rule")

    def codes_from_pre(self, pre_nl: torch.Tensor) -> torch.Tensor:
        return pre_nl * self.support(pre_nl)

    # ---- shared ------------------------------------------------------------------------------

    def pre_activation(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.encoder(acts_nm - self.b_dec)

    def encode(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.codes_from_pre(self.pre_activation(acts_nm))

    @torch.no_grad()
    def encode_batched(self, acts_nm: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Codes of a whole activation matrix, in batches (bounded memory), no autograd."""
        return torch.cat(
            [self.encode(acts_nm[i : i + batch_size]) for i in range(0, len(acts_nm), batch_size)]
        )

    def code_derivative(self, acts_nm: torch.Tensor) -> torch.Tensor:
        """Diagonal of d codes / d pre (selection and thresholds held fixed), [N, L]."""
        pre = self.pre_activation(acts_nm)
        return self.support(pre).to(pre.dtype)

    def decode(self, codes_nl: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes_nl)

    def forward(self, acts_nm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre_activation(acts_nm)
        codes = self.codes_from_pre(pre)
        return self.decode(codes), codes, pre

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Scale decoder columns to unit norm and encoder rows inversely: the same function.

        With unit columns, alpha in the head edit has one scale across features (docs/METHOD.md).
        """
        norms = self.W_dec.norm(dim=0).clamp_min(1e-12)
        self.decoder.weight.div_(norms)
        self.encoder.weight.mul_(norms[:, None])
        self.encoder.bias.mul_(norms)
        self._latents_rescaled_(norms)

    def _latents_rescaled_(self, scale_l: torch.Tensor) -> None:
        """Latent l's pre-activation was multiplied by scale_l[l]: rescale thresholds to match."""

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Turn this SAE of ``x = a / scale`` into the same SAE of ``a``, in a's units.

        Afterwards ``pre(a) = scale * pre_before(a / scale)``, so ``encode(a) = scale *
        encode_before(a / scale)`` and ``forward(a)[0] = scale * forward_before(a / scale)[0]``:
        every kind's rule commutes with a positive factor once its thresholds carry it too.
        Biases and thresholds are in activation units and are multiplied; W_enc and W_dec map
        units to units and stay, so decoder columns keep their norm and Grad-FAM's
        ``f'(pre) W_enc`` is unchanged. Records the scale (``input_scale``) for the sidecar.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the input scale must be finite and > 0, got {scale}")
        self.encoder.bias.mul_(scale)
        self.decoder.bias.mul_(scale)
        self._pre_activation_scaled_(scale)
        self.input_scale = scale * (self.input_scale or 1.0)

    def _pre_activation_scaled_(self, scale: float) -> None:
        """Every pre-activation was multiplied by ``scale``: rescale thresholds to match."""
        ones = torch.ones(self.d_latent, dtype=torch.float64, device=self.b_enc.device)
        self._latents_rescaled_(ones * scale)

    def sparsity_terms(
        self, codes_nl: torch.Tensor, pre_nl: torch.Tensor, weights: Mapping[str, float]
    ) -> list[tuple[str, float, torch.Tensor]]:
        """(name, weight, per-sample mean penalty) of each active sparsity term; the loss adds
        weight * penalty in this order. Default: the paper's l1 on codes (weights["l1"])."""
        weight = weights.get("l1", 0.0)
        return [("l1", weight, codes_nl.abs().sum(dim=1).mean())] if weight > 0 else []

    @torch.no_grad()
    def calibrate_(self, acts_nm: torch.Tensor, batch_size: int = 4096) -> None:
        """Estimate the inference statistics on the training activations (after fitting)."""

    def describe(self) -> dict[str, Any]:
        """The exact encode rule as JSON: with the safetensors file alone, plain torch recomputes
        the codes (``pre``, then the kind's ``codes`` formula); ``activation`` is a machine tag."""
        latent, d_in = self.d_latent, self.d_in
        return {
            "kind": self.kind,
            "tensors": dict(WEIGHT_TENSORS),
            "shapes": {
                "W_enc": [latent, d_in],
                "b_enc": [latent],
                "W_dec": [d_in, latent],
                "b_dec": [d_in],
            },
            "pre_activation": (
                "pre = torch.nn.functional.linear(a - b_dec, W_enc, b_enc), i.e. "
                "(a - b_dec) @ W_enc.T + b_enc: the input is first centred on the decoder bias"
            ),
            "decode": (
                "a_hat = torch.nn.functional.linear(z, W_dec, b_dec), i.e. z @ W_dec.T + b_dec"
            ),
        } | self._units()

    def _units(self) -> dict[str, Any]:
        if self.input_scale is None:
            return {}
        return {
            "input_scale": self.input_scale,
            "units": (
                "fitted on a / input_scale, input_scale = sqrt(mean_n ||a_n - mean(a)||^2 / "
                "d_in) (mean squared deviation d_in), then b_enc, b_dec and any threshold "
                "multiplied by input_scale: the tensors read raw activations, and pre, codes "
                "and a_hat are in the activations' units"
            ),
        }
