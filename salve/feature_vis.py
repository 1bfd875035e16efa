"""Activation maximisation for SAE latents (batched over latents): the image each latent wants.

docs/METHOD.md, "Activation maximisation": for latent l, by Adam,

    x* = argmax_x  z_l(T(x)) - l2 * ||x||^2 - tv * TV(x)

with the feature-visualisation recipe (Olah, Mordvintsev & Schubert 2017; lucid), because plain
pixel-space ascent from noise failed: on the digits default, 64 steps left 2 of the 10 dominant
features' images at code 0.

- Parameterisation (``_FourierImage``): the image is a 1/f-scaled Fourier spectrum with
  decorrelated colour and a sigmoid, so steps act at every spatial scale, not mostly on the
  highest frequencies (slow, and the direction of adversarial noise).
- Transformation robustness (``_transform``): T is a random small affine map (shift, scale,
  rotation) drawn every step, so the image must work at every nearby placement, not just on one
  pixel grid; only for the first ``1 - settle`` of the steps: the last steps fit the exact grid
  that is shown and scored.
- Restarts: a few seeded runs per latent; each latent keeps the one whose 8-bit image has the
  largest code.

``z_l`` is the SAE pre-activation: a ReLU code has no gradient until the latent fires, and once
it fires the two are equal. The penalties act on the normalised (model input) image ``x``.
Rendering the result as PNG is presentation: ``salve.present.images``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.models import penultimate
from salve.modes import eval_mode
from salve.sae import SparseAutoencoder


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: sum of |differences| of vertical and horizontal neighbours.

    ``x`` is [..., H, W] (e.g. [3, H, W] or [N, 3, H, W]); the sum runs over everything, so the
    value scales with the number of pixels and channels.
    """
    if x.ndim < 2:
        raise ValueError(f"total_variation needs at least [H, W], got shape {tuple(x.shape)}")
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().sum()
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().sum()
    return dv + dh


def activation_maximisation_batch(
    model: nn.Module,
    sae: SparseAutoencoder,
    features: Sequence[int],
    *,
    image_size: int = 224,
    steps: int = 64,
    lr: float = 0.1,
    l2: float = 1e-4,
    tv: float = 1e-3,
    jitter: float = 4,
    scale: float = 0.1,
    rotate: float = 10.0,
    settle: float = 0.25,
    restarts: int = 4,
    restart_steps: int | None = None,
    decay: float = 1.5,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    init_scale: float = 0.01,
    batch_size: int = 64,
) -> torch.Tensor:
    """One image [F, 3, S, S] in [0, 1] per latent, each maximising its own latent of ``sae`` on
    ``model``; the module docstring gives the method and why.

    ``restarts`` runs per latent: run r is exactly the single run of seed ``seed + r``. After
    ``restart_steps`` steps (default ``steps // 4``) each latent keeps the run whose 8-bit image
    has the largest code (the largest pre-activation when none fires) and only that one goes on;
    ``restart_steps >= steps`` picks at the end. ``batch_size`` counts images per forward pass
    (latents x restarts).

    The defaults were chosen on the digits default and a synthetic folder of textures, then
    checked on two other synthetic folders: lucid's lr of 0.05 goes with its 512 steps, 64 steps
    need 0.1; a decay of 1.5 (lucid: 1) and the untransformed last quarter (``settle``) raised the
    weakest features' codes (fine periodic textures do not survive a 10 % rescaling).

    A latent's image does not depend on which other latents share its batch: every image's start
    and transformations come from its own run's generator, the objective is a sum of per-image
    terms, and in eval mode samples are independent, so each image gets the gradient it would get
    alone (equal to rounding: CPU kernels round a batch differently).

    Deterministic for a fixed seed on CPU (private generators; the global RNG is untouched). The
    model and SAE are left as they were: training flags restored, gradients taken with respect to
    the image parameters only (no ``.grad`` on any parameter). ``steps=0`` returns the best
    starting image (mid-grey and faint noise).
    """
    feats = [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < sae.W_enc.shape[0]]
    if bad:
        raise ValueError(f"features {bad[:5]} out of range for an SAE with {sae.W_enc.shape[0]}")
    restart_steps = steps // 4 if restart_steps is None else restart_steps
    rules = {
        "image_size >= 2": image_size >= 2,
        "steps >= 0": steps >= 0,
        "lr > 0": lr > 0,
        "l2 >= 0": l2 >= 0,
        "tv >= 0": tv >= 0,
        "jitter >= 0": jitter >= 0,
        "0 <= scale < 1": 0 <= scale < 1,
        "0 <= rotate <= 180": 0 <= rotate <= 180,
        "0 <= settle <= 1": 0 <= settle <= 1,
        "restarts >= 1": restarts >= 1,
        "restart_steps >= 0": restart_steps >= 0,
        "decay >= 0": decay >= 0,
        "init_scale >= 0": init_scale >= 0,
        "batch_size >= 1": batch_size >= 1,
    }
    broken = [rule for rule, ok in rules.items() if not ok]
    if broken:
        raise ValueError(f"activation maximisation needs {', '.join(broken)}")
    model_size = getattr(model, "image_size", None)
    if isinstance(model_size, int) and model_size != image_size:
        raise ValueError(f"this model takes {model_size} px images, asked for {image_size}")
    per_chunk = max(1, batch_size // restarts)
    run = functools.partial(
        _maximise,
        model,
        sae,
        image_size=int(image_size),
        steps=int(steps),
        lr=lr,
        l2=l2,
        tv=tv,
        jitter=jitter,
        scale=scale,
        rotate=rotate,
        settle=settle,
        restarts=int(restarts),
        restart_steps=int(restart_steps),
        decay=decay,
        seed=int(seed),
        mean=mean,
        std=std,
        init_scale=init_scale,
    )
    with eval_mode(model, sae):
        chunks = [run(feats[i : i + per_chunk]) for i in range(0, len(feats), per_chunk)]
    if not chunks:
        return torch.empty(0, 3, image_size, image_size)
    return torch.cat(chunks)


# Square root of ImageNet's RGB covariance (lucid's color_correlation_svd_sqrt): the optimised
# channels are decorrelated and this mixes them into RGB.
_COLOUR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


class _FourierImage:
    """Images [B, 3, S, S] in (0, 1) from coefficients [B, 3, S, S//2+1, 2] of a spectrum whose
    frequency f is scaled by ``1 / max(f, 1/S) ** decay``.

    A unit step on every coefficient is then a step of similar visual size at every spatial scale,
    where a pixel-space step puts nearly all its energy into the highest frequencies (the
    direction of adversarial noise, and a slow climb for anything larger than a few pixels).
    Channels are decorrelated (ImageNet's colour correlation maps them to RGB) and a sigmoid keeps
    every pixel in range without clamping, so no gradient is lost at a bound."""

    def __init__(self, size: int, decay: float, device: torch.device, dtype: torch.dtype) -> None:
        fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
        freq = (fx.square() + fy.square()).sqrt().clamp_min(1.0 / size)
        self.size = size
        self.weight = freq.pow(-float(decay)).to(device=device, dtype=dtype)
        colour = torch.tensor(_COLOUR_SQRT, dtype=torch.float64)
        self.colour = (colour / colour.norm(dim=0).max()).to(device=device, dtype=dtype)
        self.shape = (3, size, size // 2 + 1, 2)

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        spectrum = torch.complex(coef[..., 0], coef[..., 1]) * self.weight
        # / 4: lucid's constant, a moderate contrast once the coefficients are of order one
        flat = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4
        return torch.sigmoid(torch.einsum("ij,bjhw->bihw", self.colour, flat))


def _transform(
    x: torch.Tensor, draws: torch.Tensor, *, jitter: float, scale: float, rotate: float
) -> torch.Tensor:
    """``x`` [B, 3, S, S] resampled (bilinear, reflected at the border) by one affine map per
    image from its ``draws`` [B, 4] in [-1, 1]: scale ``1 +- scale``, rotation ``+-rotate``
    degrees, shift ``+-jitter`` px in each direction."""
    if jitter == 0 and scale == 0 and rotate == 0:
        return x
    draws = draws.to(device=x.device, dtype=x.dtype)
    size = x.shape[-1]
    s = 1 + scale * draws[:, 0]
    angle = torch.deg2rad(rotate * draws[:, 1])
    shift = 2 * jitter * draws[:, 2:] / size  # affine_grid's units: the image spans [-1, 1]
    cos, sin = s * angle.cos(), s * angle.sin()
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _maximise(
    model: nn.Module,
    sae: SparseAutoencoder,
    feats: list[int],
    *,
    image_size: int,
    steps: int,
    lr: float,
    l2: float,
    tv: float,
    jitter: float,
    scale: float,
    rotate: float,
    settle: float,
    restarts: int,
    restart_steps: int,
    decay: float,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    init_scale: float,
) -> torch.Tensor:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    to_image = _FourierImage(image_size, decay, device, dtype)
    n = len(feats)
    gens = [torch.Generator(device="cpu").manual_seed(seed + r) for r in range(restarts)]
    starts = [torch.randn(to_image.shape, generator=g, dtype=torch.float64) for g in gens]
    # image i is latent i // restarts, run i % restarts, until each latent keeps one run
    run = torch.arange(restarts).repeat(n)
    lat = torch.tensor(feats, device=device).repeat_interleave(restarts)
    coef = (init_scale * torch.stack(starts)[run]).to(device=device, dtype=dtype)
    m, v = torch.zeros_like(coef), torch.zeros_like(coef)

    def judge() -> torch.Tensor:
        """Per latent, the row of its best run: the largest code of the 8-bit image, untransformed
        (what the PNG shows), else the largest pre-activation."""
        with torch.no_grad():
            shown = ((to_image(coef) * 255).round() / 255 - mean_t) / std_t
            pre = sae.pre_activation(penultimate(model, shown))
            rows = torch.arange(len(lat), device=device)
            code = sae.codes_from_pre(pre)[rows, lat].view(n, -1)
            pre = pre[rows, lat].view(n, -1)
            best = torch.where((code > 0).any(1), code.argmax(1), pre.argmax(1)).cpu()
        return torch.arange(n) * code.shape[1] + best

    betas, eps = (0.9, 0.999), 1e-8
    robust_steps = round((1 - settle) * steps)
    for t in range(1, steps + 1):
        # every run's generator draws at every step, kept or not: run r stays seed + r's run
        draws = torch.stack([torch.rand(4, generator=g, dtype=torch.float64) for g in gens]) * 2 - 1
        coef.requires_grad_(True)
        with torch.enable_grad():
            x = (to_image(coef) - mean_t) / std_t
            if t <= robust_steps:  # then the last steps fit the exact pixel grid the PNG shows
                x_in = _transform(x, draws[run], jitter=jitter, scale=scale, rotate=rotate)
            else:
                x_in = x
            # The pre-activation: a ReLU code has no gradient until the latent fires; where it
            # fires the two are equal, so this climbs the code itself from then on.
            z = sae.pre_activation(penultimate(model, x_in))[
                torch.arange(len(lat), device=device), lat
            ]
            objective = z.sum() - l2 * x.square().sum() - tv * total_variation(x)
            (grad,) = torch.autograd.grad(-objective, coef)
        coef = coef.detach()
        # Adam, written out so that each latent's state can be cut down to its kept run
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        denom = (v / (1 - betas[1] ** t)).sqrt_().add_(eps)
        coef.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** t))
        if t == restart_steps and len(run) > n:
            keep = judge()
            coef, m, v, run, lat = coef[keep], m[keep], v[keep], run[keep], lat[keep]
    if len(run) > n:
        coef = coef[judge()]
    with torch.no_grad():
        return to_image(coef)


def activation_maximisation(
    model: nn.Module, sae: SparseAutoencoder, feature: int, **kwargs
) -> torch.Tensor:
    """The image [3, S, S] for one latent; see ``activation_maximisation_batch`` (same keywords)."""
    return activation_maximisation_batch(model, sae, [feature], **kwargs)[0]
