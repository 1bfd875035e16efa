"""Device choice, seeding and determinism, shared by every stage that computes."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "common.device is 'cuda' but no CUDA device is available: set it to 'auto' or 'cpu'."
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, *, num_threads: int = 0) -> None:
    """Seed every RNG and ask torch for deterministic kernels.

    On CPU this makes runs bit-reproducible for a fixed thread count. On CUDA deterministic
    algorithms are requested too, but atomics in some backward kernels and autocast may still
    differ across GPUs and driver versions (see README, "Reproducibility").
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
