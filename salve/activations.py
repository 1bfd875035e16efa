"""Penultimate activations: the exact input of the classification head."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from salve.data import normalise
from salve.models import penultimate


@torch.inference_mode()
def extract_activations(
    model: nn.Module,
    images_u8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "extract",
) -> torch.Tensor:
    """[N, M] float32 activations on CPU, computed in eval mode, batch by batch."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    chunks = []
    try:
        for start in tqdm(
            range(0, images_u8.shape[0], batch_size), desc=desc, disable=not progress, leave=False
        ):
            x = normalise(images_u8[start : start + batch_size], mean, std).to(device)
            chunks.append(penultimate(model, x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)
