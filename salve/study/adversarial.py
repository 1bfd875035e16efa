"""Minimal adversarial perturbation per sample: PGD inside a per-sample bisection on its size.

Open question 1 (docs/METHOD.md) asks whether a sample with a low alpha_crit (a small head edit
kills its class) is also easy to attack in input space. This module measures the input-space
side: the smallest perturbation size eps (L-inf or L2) at which projected gradient descent
(PGD) finds an input whose prediction leaves the true label.

Units: eps is measured in the space of the tensor passed in. Passing the model's normalised inputs
measures it in normalised units (per-channel std); to measure in pixel units ([0, 1] images, the
usual 8/255 scale), wrap the model with :func:`pixel_space` and pass ``images_u8 / 255`` with
``clamp=(0, 1)``. :func:`input_box` gives the valid box of normalised inputs.

PGD (per sample, eps fixed): start at 0 (or, seeded, uniformly in the ball), step ``rel_step * eps``
along the sign of the gradient (L-inf) or the unit gradient (L2) of a loss that falls as the true
class loses, project onto the ball and then the input box. Losses: ``margin`` (``z_y - max_{j!=y}
z_j``, or ``z_y - z_t`` for a target t) and ``ce`` (minus the cross-entropy of y, or the
cross-entropy of t). A sample counts as flipped as soon as any iterate flips it. With ``n_targets``
> 0 the untargeted run is followed by targeted runs on the highest-scoring wrong classes at the
clean input (as targeted APGD does): the untargeted margin is concave in the input, so its PGD can
settle on the wrong runner-up, while each targeted margin of a linear model is linear, which PGD
solves exactly.

Bisection: every sample keeps its own bracket ``[lo, hi]``; ``hi`` is always an eps at which PGD
flipped the sample, ``lo`` one at which it did not (or 0), and ``hi - lo = eps_max /
2**bisection_steps`` at the end. PGD is a heuristic (its success need not be monotone in eps), so
``hi`` is an upper bound on the true minimal perturbation for the attack family, exact for linear
models with targeted runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["linf", "l2"]
Loss = Literal["margin", "ce"]
Box = tuple[float | torch.Tensor, float | torch.Tensor]

NORMS = ("linf", "l2")
LOSSES = ("margin", "ce")


def input_box(
    mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds [1, C, 1, 1] of normalised images: pixel values 0 and 1 normalised.

    Computed with the same operations as :func:`salve.data.normalise`, so normalised uint8 images
    lie inside the box exactly.
    """
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


class _Normalise(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)


def pixel_space(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """The model reading [0, 1] images (normalisation in front), sharing the model's weights."""
    wrapped = nn.Sequential(_Normalise(mean, std), model)
    wrapped.train(model.training)
    return wrapped


def _check_common(norm: str, loss: str, steps: int, n_targets: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if n_targets < 0:
        raise ValueError(f"n_targets must be >= 0, got {n_targets}")


def _check_inputs(images_nchw: torch.Tensor, labels_n: torch.Tensor) -> None:
    if images_nchw.dim() != 4 or not images_nchw.is_floating_point():
        raise ValueError(
            f"images must be a float [N, C, H, W] tensor (normalised inputs), got "
            f"{images_nchw.dtype} {tuple(images_nchw.shape)}; normalise uint8 images first"
        )
    if labels_n.shape != (images_nchw.shape[0],):
        raise ValueError(f"labels must be [N={images_nchw.shape[0]}], got {tuple(labels_n.shape)}")


def _box_on(clamp: Box | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if clamp is None:
        return None
    lo, hi = (torch.as_tensor(b, dtype=like.dtype, device=like.device) for b in clamp)
    want = (1, like.shape[1], 1, 1)
    for bound in (lo, hi):
        try:
            ok = torch.broadcast_shapes(bound.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"clamp bounds must be scalars or broadcastable to [1, C, 1, 1] = {list(want)}, "
                f"got shape {tuple(bound.shape)}"
            )
    if bool((lo >= hi).any()):
        raise ValueError("clamp: every lower bound must be below its upper bound")
    return lo, hi


def _objective(
    logits_nk: torch.Tensor, labels_n: torch.Tensor, target_n: torch.Tensor | None, loss: str
) -> torch.Tensor:
    """Per-sample quantity PGD minimises: it falls as the true class loses."""
    if loss == "ce":
        if target_n is None:
            return -F.cross_entropy(logits_nk, labels_n, reduction="none")
        return F.cross_entropy(logits_nk, target_n, reduction="none")
    true = logits_nk.gather(1, labels_n[:, None])[:, 0]
    if target_n is not None:
        return true - logits_nk.gather(1, target_n[:, None])[:, 0]
    others = logits_nk.scatter(1, labels_n[:, None], -math.inf)
    return true - others.amax(dim=1)


def _project(
    delta: torch.Tensor,
    x: torch.Tensor,
    eps_n: torch.Tensor,
    norm: str,
    box: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Onto the eps ball, then the input box (which, x being inside it, only shrinks |delta|)."""
    eps = eps_n.view(-1, 1, 1, 1)
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        length = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.where(length > eps, eps / length.clamp_min(1e-30), 1.0)
    if box is not None:
        delta = torch.clamp(x + delta, box[0], box[1]) - x
    return delta


def _random_start(
    x: torch.Tensor, eps_n: torch.Tensor, norm: str, generator: torch.Generator
) -> torch.Tensor:
    """Uniform in the ball; drawn on the CPU so a seed gives the same start on any device."""
    shape = tuple(x.shape)
    eps = eps_n.detach().cpu().to(torch.float64).view(-1, 1, 1, 1)
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
        start = u * eps
    else:
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
        dim = g[0].numel()
        r = torch.rand(shape[0], generator=generator, dtype=torch.float64) ** (1.0 / dim)
        start = g * r.view(-1, 1, 1, 1) * eps
    return start.to(dtype=x.dtype, device=x.device)


def _pgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_n: torch.Tensor,
    target_n: torch.Tensor | None,
    *,
    norm: str,
    steps: int,
    rel_step: float,
    loss: str,
    box: tuple[torch.Tensor, torch.Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD run (model already in eval mode): (flipped [N], first flipping delta or last)."""
    if generator is not None:
        delta = _project(_random_start(x, eps_n, norm, generator), x, eps_n, norm, box)
    else:
        delta = _project(torch.zeros_like(x), x, eps_n, norm, box)
    step = (rel_step * eps_n).view(-1, 1, 1, 1)
    flipped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for it in range(steps + 1):
        delta = delta.detach().requires_grad_(it < steps)
        with torch.set_grad_enabled(it < steps):
            logits = model(x + delta)
            flipped = flipped | (logits.argmax(dim=1) != y)
            if it == steps or bool(flipped.all()):
                break
            objective = _objective(logits, y, target_n, loss)
            (grad,) = torch.autograd.grad(objective.sum(), delta)
        if norm == "linf":
            direction = grad.sign()
        else:
            gnorm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            direction = grad / gnorm.clamp_min(1e-30)
        moved = _project(delta.detach() - step * direction, x, eps_n, norm, box)
        # Flipped samples keep their flipping perturbation.
        delta = torch.where(flipped.view(-1, 1, 1, 1), delta.detach(), moved)
    return flipped, delta.detach()


def _targets(logits_nk: torch.Tensor, labels_n: torch.Tensor, n_targets: int) -> torch.Tensor:
    """The n highest-scoring wrong classes per sample at the clean input, [N, n]."""
    n = min(n_targets, logits_nk.shape[1] - 1)
    others = logits_nk.scatter(1, labels_n[:, None], -math.inf)
    return others.topk(n, dim=1).indices


def _attack_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_n: torch.Tensor,
    targets_nt: torch.Tensor,
    *,
    norm: str,
    steps: int,
    rel_step: float,
    loss: str,
    box: tuple[torch.Tensor, torch.Tensor] | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Untargeted PGD, then targeted PGD on the samples still standing, one target at a time."""
    kw = dict(norm=norm, steps=steps, rel_step=rel_step, loss=loss, box=box, generator=generator)
    flipped, delta = _pgd_run(model, x, y, eps_n, None, **kw)
    for t in range(targets_nt.shape[1]):
        todo = ~flipped
        if not bool(todo.any()):
            break
        f, d = _pgd_run(model, x[todo], y[todo], eps_n[todo], targets_nt[todo, t], **kw)
        delta[todo] = d
        flipped[todo] = f
    return flipped, delta


class _EvalMode:
    """Eval mode inside, the model's previous mode restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _default_rel_step(steps: int, rel_step: float | None) -> float:
    if rel_step is None:
        return 2.5 / steps  # the usual PGD rule: the iterate can cross the ball ~1.25 times
    if not rel_step > 0:
        raise ValueError(f"rel_step must be > 0 (a fraction of eps), got {rel_step}")
    return float(rel_step)


def pgd_attack(
    model: nn.Module,
    images_nchw: torch.Tensor,
    labels_n: torch.Tensor,
    eps_n: float | torch.Tensor,
    *,
    norm: Norm = "linf",
    steps: int = 20,
    rel_step: float | None = None,
    loss: Loss = "margin",
    n_targets: int = 0,
    clamp: Box | None = None,
    random_start: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD at a fixed size per sample on one batch: ``(flipped [N] bool, delta [N, C, H, W])``.

    ``delta`` is the first flipping perturbation where ``flipped``, else the last iterate; it
    satisfies the norm bound and ``clamp``. Eval mode inside (the previous mode restored); the
    gradient is taken with respect to the input only, so no parameter's ``.grad`` is written.
    """
    _check_common(norm, loss, steps, n_targets)
    _check_inputs(images_nchw, labels_n)
    device = _device_of(model)
    x = images_nchw.detach().to(device)
    y = labels_n.to(device=device, dtype=torch.int64)
    eps = torch.as_tensor(eps_n, dtype=x.dtype, device=device).expand(x.shape[0]).clone()
    if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
        raise ValueError("eps must be finite and >= 0")
    box = _box_on(clamp, x)
    if box is not None:
        _check_inside(x, box)
    gen = torch.Generator().manual_seed(seed) if random_start else None
    with _EvalMode(model):
        with torch.no_grad():
            targets = _targets(model(x), y, n_targets)
        return _attack_batch(
            model,
            x,
            y,
            eps,
            targets,
            norm=norm,
            steps=steps,
            rel_step=_default_rel_step(steps, rel_step),
            loss=loss,
            box=box,
            generator=gen,
        )


def perturbation_bracket(
    model: nn.Module,
    images_nchw: torch.Tensor,
    labels_n: torch.Tensor,
    *,
    norm: Norm,
    eps_max: float,
    steps: int = 20,
    bisection_steps: int = 10,
    clamp: Box | None = None,
    batch_size: int = 128,
    rel_step: float | None = None,
    loss: Loss = "margin",
    n_targets: int = 0,
    random_start: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bisection brackets ``(lo [N], hi [N])`` (float64, CPU) of the flip size.

    ``hi``: an eps at which PGD flipped the sample (``inf`` if even ``eps_max`` did not; 0 if the
    clean prediction is already wrong). ``lo``: one at which it did not (``eps_max`` for the
    unflippable, 0 for the misclassified). ``hi - lo == eps_max / 2**bisection_steps`` otherwise.
    """
    _check_common(norm, loss, steps, n_targets)
    _check_inputs(images_nchw, labels_n)
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise ValueError(f"eps_max must be finite and > 0, got {eps_max}")
    if bisection_steps < 0 or batch_size < 1:
        raise ValueError("bisection_steps must be >= 0 and batch_size >= 1")
    rel = _default_rel_step(steps, rel_step)
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed) if random_start else None
    n = images_nchw.shape[0]
    lo_all = torch.zeros(n, dtype=torch.float64)
    hi_all = torch.zeros(n, dtype=torch.float64)
    with _EvalMode(model):
        for start in range(0, n, batch_size):
            x = images_nchw[start : start + batch_size].detach().to(device)
            y = labels_n[start : start + batch_size].to(device=device, dtype=torch.int64)
            box = _box_on(clamp, x)
            if box is not None:
                _check_inside(x, box)
            lo, hi = _bisect_batch(
                model, x, y, eps_max, bisection_steps, norm, steps, rel, loss, n_targets, box, gen
            )
            lo_all[start : start + len(y)] = lo
            hi_all[start : start + len(y)] = hi
    return lo_all, hi_all


def _check_inside(x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> None:
    tol = 1e-5 * float((box[1] - box[0]).abs().max())
    if bool((x < box[0] - tol).any()) or bool((x > box[1] + tol).any()):
        raise ValueError(
            "images lie outside the clamp box: pass inputs normalised with the same mean/std "
            "as input_box, or clamp=None"
        )


def _bisect_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_max: float,
    bisection_steps: int,
    norm: str,
    steps: int,
    rel_step: float,
    loss: str,
    n_targets: int,
    box: tuple[torch.Tensor, torch.Tensor] | None,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    kw = dict(norm=norm, steps=steps, rel_step=rel_step, loss=loss, box=box, generator=gen)
    with torch.no_grad():
        logits = model(x)
    wrong = (logits.argmax(dim=1) != y).cpu()
    targets = _targets(logits, y, n_targets)
    m = x.shape[0]
    lo = torch.zeros(m, dtype=torch.float64)
    hi = torch.full((m,), float(eps_max), dtype=torch.float64)
    hi[wrong] = 0.0
    active = ~wrong
    if bool(active.any()):
        idx = active.nonzero()[:, 0]
        eps = hi[idx].to(dtype=x.dtype, device=x.device)
        flipped, _ = _attack_batch(model, x[idx], y[idx], eps, targets[idx], **kw)
        never = idx[~flipped.cpu()]
        lo[never], hi[never] = float(eps_max), math.inf
        active[never] = False
    idx = active.nonzero()[:, 0]
    for _ in range(bisection_steps if len(idx) else 0):
        mid = (lo[idx] + hi[idx]) / 2
        eps = mid.to(dtype=x.dtype, device=x.device)
        flipped, _ = _attack_batch(model, x[idx], y[idx], eps, targets[idx], **kw)
        flipped = flipped.cpu()
        hi[idx] = torch.where(flipped, mid, hi[idx])
        lo[idx] = torch.where(flipped, lo[idx], mid)
    return lo, hi


def minimal_perturbation(
    model: nn.Module,
    images_nchw: torch.Tensor,
    labels_n: torch.Tensor,
    *,
    norm: Norm,
    eps_max: float,
    steps: int = 20,
    bisection_steps: int = 10,
    clamp: Box | None = None,
    batch_size: int = 128,
    rel_step: float | None = None,
    loss: Loss = "margin",
    n_targets: int = 0,
    random_start: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Smallest PGD flip size per sample [N] (float64): the ``hi`` of :func:`perturbation_bracket`.

    0 where the clean prediction is already wrong, ``inf`` where ``eps_max`` does not flip it;
    otherwise within ``eps_max / 2**bisection_steps`` above the smallest size PGD flips.
    Deterministic for a seed; the model's mode is restored and no parameter gradient is written.
    """
    return perturbation_bracket(
        model,
        images_nchw,
        labels_n,
        norm=norm,
        eps_max=eps_max,
        steps=steps,
        bisection_steps=bisection_steps,
        clamp=clamp,
        batch_size=batch_size,
        rel_step=rel_step,
        loss=loss,
        n_targets=n_targets,
        random_start=random_start,
        seed=seed,
    )[1]
