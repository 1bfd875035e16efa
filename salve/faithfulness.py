"""Which val images show a latent, and whether its Grad-FAM maps are faithful.

Faithfulness (docs/METHOD.md, "Faithfulness"): ``deletion_test`` replaces pixels by the
image's mean colour in order of decreasing saliency, in ``steps`` equal steps, records the
feature's code normalised by its unmasked value, and integrates that curve over the fraction
deleted (trapezoid rule on [0, 1]); the same with a seeded random order. A faithful map has a
clearly lower AUC.

Cost bounded by what is shown: each latent's top images come from the cached codes in one sort,
and the deletion test runs on the dominant and cross-class features and a fixed-size seeded
sample of the other live latents (``deletion_latents``), so it does not grow with the SAE width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from salve.activations import channels_last
from salve.gradfam import check_images, upsample_normalise
from salve.models import penultimate
from salve.modes import eval_mode
from salve.sae import SparseAutoencoder


def top_activating(
    codes_nl: torch.Tensor, feature: int, k: int, *, by: str = "value"
) -> torch.Tensor:
    """Indices of the ``k`` samples with the largest code of ``feature``, best first.

    ``by="value"`` ranks by the signed code, largest first: for a ReLU/top-k SAE these are the
    strongest activations; for the signed codes of the paper's linear SAE it is the positive
    direction only (pass ``-codes`` for the negative one). ``by="abs"`` ranks by magnitude.
    ``k`` larger than the number of samples returns all of them.
    """
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
    col = codes_nl[:, feature]
    if by == "abs":
        col = col.abs()
    k = min(int(k), col.shape[0])
    # stable tie-break by index: sort descending with a stable sort
    order = torch.sort(col, descending=True, stable=True).indices
    return order[:k]


def saliency_order(saliency_nhw: torch.Tensor) -> torch.Tensor:
    """Pixel indices [N, h*w] by decreasing saliency; ties in row-major pixel order."""
    flat = saliency_nhw.flatten(1)
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def random_order(n: int, num_pixels: int, *, seed: int) -> torch.Tensor:
    """[n, num_pixels] independent random pixel orders from a private seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(num_pixels, generator=gen) for _ in range(n)])


def deletion_counts(num_pixels: int, steps: int) -> torch.Tensor:
    """Pixels deleted after each of ``steps`` equal steps, 0 first: round(k * P / steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    k = torch.arange(steps + 1)
    return (2 * k * num_pixels + steps) // (2 * steps)


def deletion_curves(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features_n: Sequence[int] | torch.Tensor,
    order_np: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Feature code of each image as its pixels are replaced by its mean colour in ``order_np``,
    divided by the unmasked code: [N, steps + 1], float64, first column 1. A row is NaN when the
    unmasked code is not positive (nothing to delete)."""
    feats = _check_deletion_inputs(images_nchw, features_n, order_np)
    counts = deletion_counts(images_nchw.shape[2] * images_nchw.shape[3], steps)
    raw = _deletion_codes(model, sae, images_nchw, feats, order_np, counts, batch_size)
    return _relative_to_unmasked(raw)


def _check_deletion_inputs(
    images_nchw: torch.Tensor, features_n: Sequence[int] | torch.Tensor, order_np: torch.Tensor
) -> torch.Tensor:
    check_images(images_nchw)
    n, _, height, width = images_nchw.shape
    num_pixels = height * width
    feats = torch.as_tensor(features_n, dtype=torch.long).flatten()
    if feats.shape[0] != n or tuple(order_np.shape) != (n, num_pixels):
        raise ValueError(
            f"need one feature and one order of {num_pixels} pixels per image: got "
            f"{feats.shape[0]} features and orders {tuple(order_np.shape)} for {n} images"
        )
    return feats


@torch.no_grad()
def _deletion_codes(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    feats_n: torch.Tensor,
    order_np: torch.Tensor,
    counts_k: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Each image's own feature code after its first counts_k[k] pixels in ``order_np`` are
    replaced by its mean colour: [N, K], float64."""
    n, _, height, width = images_nchw.shape
    num_pixels = height * width
    steps = len(counts_k)
    device = images_nchw.device
    feats = feats_n.to(device)
    ranks = torch.empty_like(order_np)
    ranks.scatter_(1, order_np, torch.arange(num_pixels).expand(n, num_pixels).contiguous())
    ranks = ranks.to(device)
    counts = counts_k.to(device)
    fill = images_nchw.mean(dim=(2, 3), keepdim=True)  # the mean colour, per image
    total = n * steps
    values = torch.empty(total, dtype=torch.float64)
    with eval_mode(model, sae), channels_last(model):  # as extract's passes (salve.activations)
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=device)
            i, k = j // steps, j % steps
            deleted = (ranks[i] < counts[k][:, None]).view(-1, 1, height, width)
            x = torch.where(deleted, fill[i], images_nchw[i])
            codes = sae.encode(penultimate(model, x.contiguous(memory_format=torch.channels_last)))
            own = codes[torch.arange(len(j), device=device), feats[i]]
            values[start : start + len(j)] = own.double().cpu()
    return values.view(n, steps)


def _relative_to_unmasked(raw_nk: torch.Tensor) -> torch.Tensor:
    z0 = raw_nk[:, :1]
    return torch.where(z0 > 0, raw_nk / torch.where(z0 > 0, z0, 1.0), torch.nan)


def deletion_auc(curves_ns: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """Trapezoid area under each curve over the fraction of pixels deleted, [0, 1]: [N]."""
    steps = curves_ns.shape[1] - 1
    fractions = deletion_counts(num_pixels, steps).double() / num_pixels
    return torch.trapezoid(curves_ns, fractions, dim=1)


@dataclass(frozen=True)
class DeletionResult:
    auc: torch.Tensor  # [N], saliency order; NaN where the unmasked code is not positive
    auc_random: torch.Tensor  # [N], seeded random order
    curves: torch.Tensor  # [N, steps + 1]
    curves_random: torch.Tensor  # [N, steps + 1]


def deletion_test(
    model: nn.Module,
    sae: SparseAutoencoder,
    images_nchw: torch.Tensor,
    features_n: Sequence[int] | torch.Tensor,
    saliency_nhw: torch.Tensor,
    *,
    steps: int,
    seed: int,
    batch_size: int = 64,
    random_orders: torch.Tensor | None = None,
) -> DeletionResult:
    """Deletion AUC of each image's saliency map for its own feature, and of a random order
    (``random_orders`` [N, H*W] if given, else drawn by ``random_order`` from ``seed``)."""
    check_images(images_nchw)
    n, _, height, width = images_nchw.shape
    if tuple(saliency_nhw.shape) != (n, height, width):
        raise ValueError(
            f"saliency must be [N, H, W] = {(n, height, width)}, got {tuple(saliency_nhw.shape)}"
        )
    num_pixels = height * width
    order = saliency_order(saliency_nhw.cpu())
    feats = _check_deletion_inputs(images_nchw, features_n, order)
    counts = deletion_counts(num_pixels, steps)
    codes = partial(_deletion_codes, model, sae, images_nchw, feats, batch_size=batch_size)
    raw = codes(order, counts)
    # Nothing deleted and everything deleted are the same images in any order: only the
    # steps between are run for the random order (2 of every 2 * (steps + 1) passes saved).
    if random_orders is None:
        random_orders = random_order(n, num_pixels, seed=seed)
    _check_deletion_inputs(images_nchw, feats, random_orders)
    inner = codes(random_orders, counts[1:-1])
    raw_random = torch.cat([raw[:, :1], inner, raw[:, -1:]], dim=1)
    curves = [_relative_to_unmasked(raw), _relative_to_unmasked(raw_random)]
    return DeletionResult(
        auc=deletion_auc(curves[0], num_pixels),
        auc_random=deletion_auc(curves[1], num_pixels),
        curves=curves[0],
        curves_random=curves[1],
    )


def top_images(codes_nl: torch.Tensor, k: int) -> torch.Tensor:
    """Each latent's ``k`` rows with the largest code, best first, ties by index: [L, k]
    (``top_activating`` for every latent in one sort)."""
    k = min(int(k), codes_nl.shape[0])
    return torch.sort(codes_nl, dim=0, descending=True, stable=True).indices[:k].T.contiguous()


def deletion_latents(
    dominant: Sequence[int],
    cross_class: Sequence[int],
    live_l: torch.Tensor,
    sample: int,
    seed: int,
) -> list[int]:
    """The latents the deletion test runs on: every dominant feature, ``sample`` of the
    cross-class features and ``sample`` of the other latents, each drawn (seeded) where there are
    more; only latents active on val (``live_l``). Bounded whatever the SAE's width: the
    cross-class features grow with it (14 at width 64, 51 at 4096 on a 6-class folder)."""
    keep = {lat for lat in dominant if live_l[lat]}
    cross = [lat for lat in dict.fromkeys(cross_class) if live_l[lat] and lat not in keep]
    taken = keep | set(cross)
    others = [lat for lat in torch.nonzero(live_l).flatten().tolist() if lat not in taken]
    for offset, pool in enumerate((cross, others)):
        gen = torch.Generator().manual_seed(int(seed) + offset)
        drawn = torch.randperm(len(pool), generator=gen)[: max(0, int(sample))]
        keep |= {pool[i] for i in drawn.tolist()}
    return sorted(keep)


def latent_deletion_aucs(
    model: nn.Module,
    sae: SparseAutoencoder,
    images: torch.Tensor,
    codes_nl: torch.Tensor,
    top_lk: torch.Tensor,
    maps_lkhw: torch.Tensor,
    latents: Sequence[int],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    seed: int,
    batch_size: int = 64,
    pairs_per_chunk: int = 256,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion AUCs (saliency order, random order) of each of ``latents``' top images: two
    [L, k] float64 tensors, NaN for latents not tested and images where the latent is off
    (nothing to delete). ``images`` is the split the rows of ``top_lk`` index (raw, before
    ``transform``); each latent's random orders come from its own seed, so its AUC does not
    depend on which other latents are tested."""
    n_latents, k = top_lk.shape
    size = int(images.shape[-1])
    auc_lk = torch.full((n_latents, k), math.nan, dtype=torch.float64)
    auc_random_lk = torch.full_like(auc_lk, math.nan)
    per_chunk = max(1, pairs_per_chunk // k)
    chunks = range(0, len(latents), per_chunk)
    for c0 in tqdm(chunks, desc="gradfam deletion", disable=not progress, leave=False):
        lats = torch.tensor(list(latents[c0 : c0 + per_chunk]), dtype=torch.long)
        idx, feats = top_lk[lats].flatten(), lats.repeat_interleave(k)
        on = torch.nonzero(codes_nl[idx, feats] > 0).flatten()
        if on.numel() == 0:
            continue
        saliency = upsample_normalise(maps_lkhw[lats].flatten(0, 1)[on, None], size)[:, 0]
        orders = [
            random_order(k, size * size, seed=seed * 1_000_003 + lat) for lat in lats.tolist()
        ]
        faith = deletion_test(
            model,
            sae,
            transform(images[idx[on]]),
            feats[on],
            saliency,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            random_orders=torch.cat(orders)[on],
        )
        flat = (lats[:, None] * k + torch.arange(k)).flatten()[on]
        auc_lk.view(-1)[flat] = faith.auc
        auc_random_lk.view(-1)[flat] = faith.auc_random
    return auc_lk, auc_random_lk
