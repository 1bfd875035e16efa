"""Fitting an SAE on activations: initialisation, the scale-free loss, the Adam loop.

The loss is scale-free, but Adam's steps, the initialisation and JumpReLU's threshold are not:
on a backbone whose head inputs have norm 1e-8 one step of lr = 1e-3 on b_dec is 1e5 times the
data. So the fit runs on ``a / input_scale(a)`` (mean squared deviation d_in, as SAE libraries
normalise) and folds the scale back into the saved biases and thresholds: activations times s
give the same fit, with codes and reconstructions times s (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

import salve.sae as _package
from salve.sae.base import SparseAutoencoder
from salve.sae.registry import build_sae

if TYPE_CHECKING:
    from salve.config import SaeConfig

# fit_sae fails when an epoch's reconstruction error exceeds this multiple of the data variance.
EXPLOSION_FVU = 100.0


def init_sae(acts_nm: torch.Tensor, cfg: SaeConfig, *, seed: int) -> SparseAutoencoder:
    """Unit-norm random decoder, tied-transpose encoder, decoder bias at the data mean."""
    gen = torch.Generator().manual_seed(seed)
    d_in = acts_nm.shape[1]
    sae = build_sae(cfg.kind, d_in, cfg.width, k=cfg.k)
    with torch.no_grad():
        w_dec = torch.randn(d_in, cfg.width, generator=gen)
        w_dec /= w_dec.norm(dim=0, keepdim=True)
        sae.decoder.weight.copy_(w_dec)
        sae.encoder.weight.copy_(w_dec.T)
        sae.encoder.bias.zero_()
        sae.decoder.bias.copy_(acts_nm.double().mean(dim=0).float())
    return sae


def data_scale_sq(acts_nm: torch.Tensor) -> float:
    """Mean squared distance to the mean (1.0 for constant data): the loss's unit."""
    scale_sq = float((acts_nm.double() - acts_nm.double().mean(0)).pow(2).sum(1).mean())
    return scale_sq if scale_sq > 0 else 1.0


def input_scale(acts_nm: torch.Tensor) -> float:
    """The fit's unit of activation, sqrt(data_scale_sq / d_in): ``a / input_scale`` has mean
    squared deviation d_in (variance 1 per dimension on average). Centred, since b_dec takes the
    mean: the spread is what the weights must resolve. Deterministic, no sampling."""
    return math.sqrt(data_scale_sq(acts_nm) / acts_nm.shape[1])


def loss_weights(cfg: SaeConfig, scale_sq: float) -> dict[str, float]:
    """The config's scale-free sparsity weights in the units of the raw loss.

    The fit divides the whole loss by scale_sq, so the reconstruction error counts relative to
    the data's variance and an l1 term relative to its root: lambda_1 means the same across
    backbones and datasets. The l1/l2 ratio is scale-free already."""
    return {
        "l1": cfg.l1 / math.sqrt(scale_sq) * scale_sq,
        "aux_l1": cfg.aux_l1 / math.sqrt(scale_sq) * scale_sq,
        "l1_l2_ratio": cfg.l1_l2_ratio * scale_sq,
    }


def sae_loss(
    sae: SparseAutoencoder, acts_nm: torch.Tensor, weights: Mapping[str, float]
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mean_n ||a - a_hat||^2 + the kind's weighted sparsity terms; parts holds the
    unweighted values (keys ``mse`` and the terms' names)."""
    recon, codes, pre = sae(acts_nm)
    mse = (recon - acts_nm).pow(2).sum(dim=1).mean()
    loss = mse
    parts = {"mse": float(mse.detach())}
    for name, weight, penalty in sae.sparsity_terms(codes, pre, weights):
        loss = loss + weight * penalty
        parts[name] = float(penalty.detach())
    return loss, parts


def fit_epochs(n: int, cfg: SaeConfig) -> int:
    """``cfg.epochs``, lowered so that the fit takes at most ``cfg.max_steps`` optimiser steps
    (at least one epoch; 0: no cap). The digits default (6 steps an epoch) keeps its 300; 4,000
    activations get 125 epochs, 16,000 get 31: about the same number of updates."""
    per_epoch = -(-n // cfg.batch_size)
    if cfg.max_steps == 0 or per_epoch == 0:
        return cfg.epochs
    return max(1, min(cfg.epochs, cfg.max_steps // per_epoch))


def fit_sae(
    acts_nm: torch.Tensor,
    cfg: SaeConfig,
    *,
    seed: int,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Fit on ``acts_nm / input_scale`` with Adam (loss in the units of ``loss_weights``),
    fold the scale back (``fold_input_scale_``: the SAE returned reads raw activations, codes
    in their units), then calibrate the kind's inference statistics on the raw activations.
    Raises DivergenceError on a non-finite or exploding loss."""
    from tqdm.auto import tqdm

    from salve.train import DivergenceError

    device = device or torch.device("cpu")
    scale = input_scale(acts_nm)
    normalised = acts_nm / scale  # mean squared deviation d_in
    sae = init_sae(normalised, cfg, seed=seed).to(device)
    acts = normalised.to(device)
    scale_sq = float(acts_nm.shape[1])  # data_scale_sq of the normalised activations
    weights = loss_weights(cfg, scale_sq)
    # fused: one kernel per update step for all four tensors (CPU defaults to a Python loop
    # over them): the default fit took 7.8 s instead of 8.6 s (foreach) on one thread here.
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=fused or None)
    gen = torch.Generator().manual_seed(seed + 1)
    n = acts.shape[0]
    history = []
    sae.train()
    epochs = fit_epochs(n, cfg)
    bar = tqdm(range(epochs), desc=f"fit_sae ({cfg.kind})", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=gen).to(device)
        sums = {"loss": 0.0, "mse": 0.0, "l1": 0.0}
        for start in range(0, n, cfg.batch_size):
            # index_select: the same rows as acts[idx], copied by a faster kernel
            batch = acts.index_select(0, order[start : start + cfg.batch_size])
            # Looked up on the package at call time, so a fault drill can substitute it.
            loss, parts = _package.sae_loss(sae, batch, weights)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"SAE fitting diverged at epoch {epoch + 1} (loss {float(loss.detach())}). "
                    f"Lower sae.lr (now {cfg.lr}) or sae.l1 (now {cfg.l1})."
                )
            opt.zero_grad(set_to_none=True)
            (loss / scale_sq).backward()
            opt.step()
            if cfg.normalise_decoder:
                with torch.no_grad():
                    sae.decoder.weight.div_(sae.decoder.weight.norm(dim=0).clamp_min(1e-12))
            m = len(batch)
            # logged in the scale-free units: loss and mse / scale_sq, l1 / sqrt(scale_sq)
            sums["loss"] += float(loss.detach()) / scale_sq * m
            sums["mse"] += parts["mse"] / scale_sq * m
            sums["l1"] += parts.get("l1", 0.0) / math.sqrt(scale_sq) * m
        record = {"epoch": epoch + 1} | {k: v / n for k, v in sums.items()}
        # mse is relative to the data's variance (predicting the mean gives 1): far above it,
        # the fit has exploded (a huge lr gives finite but useless weights, not NaN).
        if record["mse"] > EXPLOSION_FVU or not all(
            bool(torch.isfinite(p).all()) for p in sae.parameters()
        ):
            raise DivergenceError(
                f"SAE fitting diverged at epoch {epoch + 1}: reconstruction error "
                f"{record['mse']:.4g} x the data variance (over {EXPLOSION_FVU:g}), or the "
                f"weights are no longer finite. Lower sae.lr (now {cfg.lr})."
            )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    del acts, normalised
    sae.eval()
    sae.fold_input_scale_(scale)
    # On the raw activations, after the fold: a threshold set at a kept pre-activation then
    # excludes that sample at inference exactly as the pre-activations will be computed there,
    # not by the rounding of scale * threshold.
    sae.calibrate_(acts_nm.to(device))
    return sae.cpu(), history
