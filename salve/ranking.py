"""Per-class feature ranking: class-mean codes, dominant features, cross-class features."""

from __future__ import annotations

import torch


def class_mean_codes(
    codes_nl: torch.Tensor, labels_n: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """mu[k, l] = mean of codes[n, l] over samples n of class k (float64); NaN for empty classes."""
    codes = codes_nl.double()
    sums = torch.zeros(num_classes, codes.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels_n, codes)
    counts = torch.bincount(labels_n, minlength=num_classes).double()
    return sums / counts[:, None]


def dominant_features(mu_kl: torch.Tensor) -> torch.Tensor:
    """Dominant feature of class k: argmax_l |mu[k, l]| (docs/METHOD.md)."""
    return mu_kl.abs().argmax(dim=1)


def top_features(mu_kl: torch.Tensor, n: int) -> torch.Tensor:
    """The n features with the largest |mu[k, l]| per class, strongest first, [K, n]."""
    return mu_kl.abs().topk(min(n, mu_kl.shape[1]), dim=1).indices


def cross_class_features(
    mu_kl: torch.Tensor, fraction: float, min_class_mean: float = 0.0
) -> list[dict]:
    """Features that matter for more than one class.

    Rule (the paper gives none): with m_1 >= m_2 the two largest |mu[k, l]| over classes k,
    feature l is cross-class when m_1 > min_class_mean and m_2 >= fraction * m_1. Its classes are
    all k with |mu[k, l]| >= fraction * m_1, strongest first. Sorted by m_2 descending.
    """
    strength = mu_kl.abs()
    if strength.shape[0] < 2:
        return []
    top2 = strength.topk(2, dim=0).values  # [2, L]
    m1, m2 = top2[0], top2[1]
    found = []
    for feature in torch.nonzero((m1 > min_class_mean) & (m2 >= fraction * m1)).flatten().tolist():
        col = strength[:, feature]
        members = torch.nonzero(col >= fraction * m1[feature]).flatten()
        members = members[col[members].argsort(descending=True)]
        found.append(
            {
                "feature": feature,
                "classes": members.tolist(),
                "class_means": [float(mu_kl[k, feature]) for k in members],
                "ratio": float(m2[feature] / m1[feature]),
            }
        )
    found.sort(key=lambda item: -abs(item["class_means"][1]))
    return found
