"""What every edit method yields: the edited head and its effect on the head's input.

Every method suppresses one target class k and gives both

- the edited head ``(W', b')``, what a shipped checkpoint holds, and
- the representation the edited model uses, a map ``a' = r(a)`` of the head input, together with
  the head that reads it: the original head for representation edits (the paper rule
  ``a' = f * a``, the centred projections ``a' = (I - alpha d d^T)(a - c) + c``, LEACE
  ``a' = eraser(a)``, steering), the edited head itself for head-only edits (``zero_row``).

So ``reader(a') == W' a + b'`` for every affine method (tested). Steering is not affine: no head
can be folded from it, and its logits are ``head(a')`` (:class:`SteerEdit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from salve.editing import edit_head
from salve.linalg import unit_vector
from salve.steering import LatentSteer

F64 = torch.float64
# One independent stream per use of a seed (salve.methods' random baselines, the image shifts).
_RNG_SALT = {"random_direction": 1, "random_latent": 2, "noise": 3, "jitter": 4}


def seeded_rng(seed: int, target: int, what: str) -> np.random.Generator:
    """The stream of ``what`` for ``(seed, target)``: the same draws on every run."""
    return np.random.default_rng([int(seed), int(target), _RNG_SALT[what]])


@dataclass(frozen=True, eq=False)
class AffineMap:
    """``a' = a @ matrix_mm.T + shift_m`` (float64); ``is_identity`` marks the untouched input.

    A diagonal map (``diag_m``) or a rank-one update of the identity (``rank_one``: ``(coef,
    d)`` for ``I - coef d d^T``) is applied in O(N M) instead of a dense [N, M] x [M, M]
    product: the probes apply these maps to every train and val row, per class and seed.
    ``matrix_mm`` always holds the dense matrix.
    """

    matrix_mm: torch.Tensor
    shift_m: torch.Tensor
    is_identity: bool = False
    diag_m: torch.Tensor | None = None
    rank_one: tuple[float, torch.Tensor] | None = None

    @staticmethod
    def identity(m: int) -> AffineMap:
        return AffineMap(torch.eye(m, dtype=F64), torch.zeros(m, dtype=F64), is_identity=True)

    @staticmethod
    def diagonal(diag_m: torch.Tensor) -> AffineMap:
        d = diag_m.detach().to(F64)
        return AffineMap(torch.diag(d), torch.zeros_like(d), diag_m=d)

    @staticmethod
    def identity_minus_rank_one(coef: float, d_m: torch.Tensor, shift_m: torch.Tensor) -> AffineMap:
        d = d_m.detach().to(F64)
        matrix = torch.eye(d.shape[0], dtype=F64) - coef * torch.outer(d, d)
        return AffineMap(matrix, shift_m.detach().to(F64), rank_one=(float(coef), d))

    def __call__(self, acts_nm: torch.Tensor) -> torch.Tensor:
        x = acts_nm.detach().to(F64)
        if self.is_identity:
            return x
        if self.diag_m is not None:
            return x * self.diag_m + self.shift_m
        if self.rank_one is not None:
            coef, d = self.rank_one
            return x - torch.outer(coef * (x @ d), d) + self.shift_m
        return x @ self.matrix_mm.T + self.shift_m


@dataclass(frozen=True, eq=False)
class MethodEdit:
    """One method's edit: the edited head, and the representation plus the head that reads it."""

    method: str
    weight_km: torch.Tensor
    bias_k: torch.Tensor
    representation: AffineMap
    reader_weight_km: torch.Tensor
    reader_bias_k: torch.Tensor

    def logits(self, acts_nm: torch.Tensor) -> torch.Tensor:
        """The edited head on the original activations, ``W' a + b'``."""
        return acts_nm.detach().to(F64) @ self.weight_km.T + self.bias_k

    def represent(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.representation(acts_nm)

    def reader_logits(self, reps_nm: torch.Tensor) -> torch.Tensor:
        return reps_nm.to(F64) @ self.reader_weight_km.T + self.reader_bias_k


@dataclass(frozen=True, eq=False)
class SteeredMap:
    """``a' = steer(a)`` (float64), the steering rule of salve/steering.py: not affine."""

    steer: LatentSteer
    is_identity: bool = False

    def __call__(self, acts_nm: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.steer(acts_nm.detach().to(F64))


@dataclass(frozen=True, eq=False)
class SteerEdit(MethodEdit):
    """Steering: the head is the original one and reads ``a' = steer(a)``; its logits are
    ``head(a')`` (``weight_km``/``bias_k`` are that head: nothing is folded into it)."""

    def logits(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.reader_logits(self.represent(acts_nm))


def head64(weight_km: torch.Tensor, bias_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head as float64 ``(W [K, M], b [K])``, shapes checked."""
    if weight_km.dim() != 2 or tuple(bias_k.shape) != (weight_km.shape[0],):
        raise ValueError(
            f"need weight_km [K, M] and bias_k [K], got {tuple(weight_km.shape)} and "
            f"{tuple(bias_k.shape)}"
        )
    return weight_km.detach().to(F64), bias_k.detach().to(F64)


def representation_edit(
    method: str, weight_km: torch.Tensor, bias_k: torch.Tensor, rep: AffineMap
) -> MethodEdit:
    """Fold a representation map into the head: ``W' = W A``, ``b' = b + W t``."""
    w, b = head64(weight_km, bias_k)
    return MethodEdit(method, w @ rep.matrix_mm, b + w @ rep.shift_m, rep, w, b)


def centred_projection_edit(
    method: str,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    direction_m: torch.Tensor,
    centre_m: torch.Tensor,
    alpha: float,
) -> MethodEdit:
    """Suppress ``d = direction / ||direction||`` around ``centre``, strength ``alpha``.

    The head comes from :func:`salve.editing.edit_head` (the same numbers the edit stage ships);
    the representation is ``a' = a - alpha d d.(a - c)``.
    """
    w, b = head64(weight_km, bias_k)
    c = centre_m.detach().to(F64)
    edited = edit_head(
        w, direction_m.detach().to(F64), alpha, -1, "projection", bias_k=b, centre_m=c
    )
    d = unit_vector(direction_m)
    rep = AffineMap.identity_minus_rank_one(alpha, d, alpha * d * torch.dot(d, c))
    return MethodEdit(method, edited.weight, edited.bias, rep, w, b)


@dataclass(frozen=True, eq=False)
class EditInputs:
    """What the methods read to suppress a class: the head (float64), the SAE's decoder and
    centre, the train activations the data-driven baselines fit on, and the strengths.
    ``leace_basis``: ``LeaceBasis.fit(train_acts_nm)``, shared by the classes of one run;
    ``sae``: the SAE of ``w_dec_ml`` (its encode rule), for steering."""

    weight_km: torch.Tensor
    bias_k: torch.Tensor
    w_dec_ml: torch.Tensor
    b_dec_m: torch.Tensor
    train_acts_nm: torch.Tensor
    train_labels_n: torch.Tensor
    projection_alpha: float
    paper_alpha: float
    seed: int
    steer_alpha: float
    leace_basis: Any = None
    sae: Any = None


class EditMethod:
    """One suppression method, registered by ``name`` in ``salve.methods.EDIT_METHODS``.

    ``edit`` gives its edit of class ``target`` whose dominant SAE latent is ``latent``.
    ``needs_sae``: the method reads the SAE's encode rule, not only its decoder.
    """

    name: ClassVar[str]
    needs_sae: ClassVar[bool] = False

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        raise NotImplementedError
