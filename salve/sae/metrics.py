"""SAE quality metrics (docs/METHOD.md): FVU, explained variance, L0, dead fraction, splice."""

from __future__ import annotations

import torch
from torch import nn

from salve.modes import eval_mode
from salve.sae.base import SparseAutoencoder


@torch.no_grad()
def quality_metrics(
    sae: SparseAutoencoder,
    acts_nm: torch.Tensor,
    *,
    head: nn.Linear | None = None,
    labels_n: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> dict[str, float]:
    """FVU, explained variance, L0, dead fraction and splice metrics, as docs/METHOD.md defines.

    Sums are accumulated in float64 over the whole set (never an average of per-batch ratios).
    """
    with eval_mode(sae):
        return _metrics(sae, acts_nm, head, labels_n, batch_size)


def _metrics(sae, acts_nm, head, labels_n, batch_size) -> dict[str, float]:
    n = acts_nm.shape[0]
    mean_m = acts_nm.double().mean(dim=0)
    sse = torch.zeros((), dtype=torch.float64)
    sst = torch.zeros((), dtype=torch.float64)
    nonzero = torch.zeros((), dtype=torch.float64)
    ever_active = torch.zeros(sae.d_latent, dtype=torch.bool)
    correct_orig = correct_splice = agree = 0
    for start in range(0, n, batch_size):
        a = acts_nm[start : start + batch_size]
        recon, codes, _ = sae(a)
        sse += (a.double() - recon.double()).pow(2).sum()
        sst += (a.double() - mean_m).pow(2).sum()
        active = codes != 0
        nonzero += active.sum(dtype=torch.float64)
        ever_active |= active.any(dim=0)
        if head is not None and labels_n is not None:
            y = labels_n[start : start + batch_size]
            pred_orig = head(a).argmax(dim=1)
            pred_splice = head(recon).argmax(dim=1)
            correct_orig += int((pred_orig == y).sum())
            correct_splice += int((pred_splice == y).sum())
            agree += int((pred_orig == pred_splice).sum())
    fvu = float(sse / sst) if sst > 0 else float("nan")
    metrics = {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(nonzero / n),
        "dead_fraction": float((~ever_active).double().mean()),
        "n_samples": n,
    }
    if head is not None and labels_n is not None:
        metrics |= {
            "accuracy_original": correct_orig / n,
            "splice_accuracy": correct_splice / n,
            "splice_agreement": agree / n,
        }
    return metrics
