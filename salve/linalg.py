"""Small float64 vector helpers shared by the edit rules and their baselines."""

from __future__ import annotations

import torch


def unit_vector(v_m: torch.Tensor, what: str = "an edit direction") -> torch.Tensor:
    """``v / ||v||`` in float64; the edits read a direction, so a zero vector is an error."""
    v = v_m.detach().to(torch.float64)
    norm = torch.linalg.vector_norm(v)
    if not bool(norm > 0):
        raise ValueError(f"{what} must be non-zero")
    return v / norm
