"""Sparse autoencoders on penultimate activations: one class per kind, fitting, quality metrics.

Kinds (docs/METHOD.md, "SAE"), one module each, registered by name in ``SAE_KINDS``:
- ``linear``: the paper's two linear layers with no nonlinearity (signed codes), l1 on codes.
- ``relu``: the usual ReLU SAE, l1 on codes.
- ``topk``: keep the k largest pre-activations per sample (after ReLU); optional ``aux_l1`` and
  ``l1_l2_ratio`` regularisers on the pre-activations before the selection.
- ``batchtopk``: top k*N over the batch while fitting, a saved threshold at inference.
- ``jumprelu``: a learned per-latent threshold (straight-through gradient).
Each kind's ``describe()`` states its exact encode rule as JSON, for the checkpoint's sidecar.
Fitting normalises the activations and folds the scale back (``fit.input_scale``), so a fitted
SAE reads raw activations and its codes are in their units.
"""

from salve.sae.base import SparseAutoencoder
from salve.sae.batchtopk import BatchTopKSAE
from salve.sae.fit import (
    EXPLOSION_FVU,
    data_scale_sq,
    fit_sae,
    init_sae,
    input_scale,
    loss_weights,
    sae_loss,
)
from salve.sae.jumprelu import JumpReluSAE
from salve.sae.linear import LinearSAE
from salve.sae.metrics import quality_metrics
from salve.sae.registry import (
    SAE_KINDS,
    build_sae,
    sae_class,
    sae_from_tensors,
    sae_tensors,
)
from salve.sae.relu import ReluSAE
from salve.sae.topk import TopKSAE

__all__ = [
    "EXPLOSION_FVU",
    "SAE_KINDS",
    "BatchTopKSAE",
    "JumpReluSAE",
    "LinearSAE",
    "ReluSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "build_sae",
    "data_scale_sq",
    "fit_sae",
    "init_sae",
    "input_scale",
    "loss_weights",
    "quality_metrics",
    "sae_class",
    "sae_from_tensors",
    "sae_loss",
    "sae_tensors",
]
