"""SAE kinds by name, and the state round trip (safetensors tensors + the kind's description)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from salve.sae.base import WEIGHT_TENSORS, SparseAutoencoder
from salve.sae.batchtopk import BatchTopKSAE
from salve.sae.jumprelu import JumpReluSAE
from salve.sae.linear import LinearSAE
from salve.sae.relu import ReluSAE
from salve.sae.topk import TopKSAE

SAE_KINDS: Mapping[str, type[SparseAutoencoder]] = MappingProxyType(
    {cls.kind: cls for cls in (LinearSAE, ReluSAE, TopKSAE, BatchTopKSAE, JumpReluSAE)}
)

# The parts of describe() that fix the computation; they must match the rebuilt module on load.
RULE_KEYS = ("kind", "tensors", "shapes", "activation", "k", "threshold")


def sae_class(kind: str) -> type[SparseAutoencoder]:
    try:
        return SAE_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown SAE kind {kind!r}; allowed: {', '.join(SAE_KINDS)}") from None


def build_sae(kind: str, d_in: int, width: int, *, k: int = 0, **options: Any) -> SparseAutoencoder:
    """A freshly initialised SAE of `kind`; k is used by the kinds that keep k latents only."""
    return sae_class(kind).build(d_in, width, k=k, **options)


def sae_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sae.state_dict().items()}


def sae_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    description_or_kind: Mapping[str, Any] | str,
    k: int = 0,
) -> SparseAutoencoder:
    """Rebuild an SAE in eval mode from its tensors and either its ``describe()`` dict (which
    fixes kind and k, and must agree with the rebuilt module) or, for sidecars written before
    the description existed, a bare kind name plus k."""
    if isinstance(description_or_kind, str):
        kind, description = description_or_kind, None
    else:
        description = dict(description_or_kind)
        kind, k = description.get("kind"), description.get("k", k)
    missing = [name for name in WEIGHT_TENSORS.values() if name not in tensors]
    if missing:
        raise ValueError(f"SAE tensors lack {', '.join(missing)}: not a salve SAE state dict")
    d_latent, d_in = tensors[WEIGHT_TENSORS["W_enc"]].shape
    sae = build_sae(kind, d_in, d_latent, k=k)
    if description is not None:
        rule = sae.describe()
        differ = [key for key in RULE_KEYS if description.get(key) != rule.get(key)]
        if differ:
            raise ValueError(
                f"the stored encode rule disagrees with salve's {kind} SAE on "
                f"{', '.join(differ)} (stored {[description.get(key) for key in differ]}, "
                f"expected {[rule.get(key) for key in differ]}): the weights and their sidecar "
                "do not belong together, or another salve version wrote them; refit the SAE"
            )
    sae.load_state_dict(dict(tensors))
    if description is not None:  # already folded into the tensors: a record, not a rule
        sae.input_scale = description.get("input_scale")
    return sae.eval()
