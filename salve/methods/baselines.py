"""The baselines SALVE's edits are measured against, one class each (docs/METHOD.md).

Seeds make the random baselines reproducible: the same (seed, class) always draws the same
direction or latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salve.linalg import unit_vector
from salve.methods.base import (
    F64,
    AffineMap,
    EditInputs,
    EditMethod,
    MethodEdit,
    centred_projection_edit,
    head64,
    representation_edit,
    seeded_rng,
)


def zero_row_edit(weight_km: torch.Tensor, bias_k: torch.Tensor, target: int) -> MethodEdit:
    """Class ``target``'s head row and bias set to 0: a head-only edit, the input is untouched."""
    w, b = head64(weight_km, bias_k)
    w2, b2 = w.clone(), b.clone()
    w2[target] = 0.0
    b2[target] = 0.0
    return MethodEdit("zero_row", w2, b2, AffineMap.identity(w.shape[1]), w2, b2)


@dataclass(frozen=True, eq=False)
class LeaceBasis:
    """What LEACE needs of the activations alone (mean, whitening and its inverse), shared by
    every concept erased from the same activations: one eigendecomposition per activation set
    instead of one per class."""

    acts_nm: torch.Tensor  # float64, centred
    mean_m: torch.Tensor
    whiten_mm: torch.Tensor
    unwhiten_mm: torch.Tensor

    @staticmethod
    def fit(acts_nm: torch.Tensor) -> LeaceBasis:
        x = acts_nm.detach().to(F64)
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError("fit_leace needs acts_nm [N >= 2, M]")
        mean_m = x.mean(0)
        xc = x - mean_m
        n, m = x.shape
        cov_mm = xc.T @ xc / (n - 1)
        cov_mm = (cov_mm + cov_mm.T) / 2
        evals, evecs = torch.linalg.eigh(cov_mm)
        keep = evals > evals[-1].clamp_min(0) * m * torch.finfo(F64).eps
        root = evals.clamp_min(0).sqrt()
        inv_root = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
        whiten = (evecs * inv_root) @ evecs.T
        unwhiten = (evecs * torch.where(keep, root, 0.0)) @ evecs.T
        return LeaceBasis(xc, mean_m, whiten, unwhiten)


def fit_leace(
    acts_nm: torch.Tensor, concept_n: torch.Tensor, basis: LeaceBasis | None = None
) -> AffineMap:
    """LEACE (least-squares concept erasure, Belrose et al. 2023) fitted on ``acts_nm``.

    ``r(a) = a - W^+ U U^T W (a - mean)`` with ``W`` the whitening of the sample covariance
    (pseudo-inverse square root) and ``U`` an orthonormal basis of ``W Cov(a, z)``. Afterwards
    ``Cov(r(a), z) = 0``: for a class indicator the class-conditional means are equal, so no
    linear predictor beats a constant under any convex loss; ``r`` is idempotent. Sample
    covariance without shrinkage, float64, eigenvalues below ``max * M * eps`` treated as 0.
    ``concept_n`` is [N] (one concept) or [N, C]. ``basis``: ``LeaceBasis.fit(acts_nm)``, when
    several concepts are erased from the same activations.
    """
    if basis is None:
        basis = LeaceBasis.fit(acts_nm)
    xc = basis.acts_nm
    if concept_n.shape[0] != xc.shape[0]:
        raise ValueError("fit_leace needs a concept with the same N rows as acts_nm")
    z = concept_n.detach().to(F64).reshape(xc.shape[0], -1)
    zc = z - z.mean(0)
    n, m = xc.shape
    cross_mc = xc.T @ zc / (n - 1)
    u, s, _ = torch.linalg.svd(basis.whiten_mm @ cross_mc, full_matrices=False)
    rank = int((s > s.max().clamp_min(0) * max(m, z.shape[1]) * torch.finfo(F64).eps).sum())
    if rank == 0 or not bool(s.max() > 0):
        return AffineMap.identity(m)
    u = u[:, :rank]
    removed = basis.unwhiten_mm @ u @ u.T @ basis.whiten_mm
    matrix = torch.eye(m, dtype=F64) - removed
    return AffineMap(matrix, removed @ basis.mean_m)


def random_unit_direction(m: int, seed: int, target: int) -> torch.Tensor:
    """A uniformly random unit vector [M]: unit norm like the normalised decoder column."""
    v = torch.from_numpy(seeded_rng(seed, target, "random_direction").standard_normal(m))
    return unit_vector(v)


def random_other_latent(w_dec_ml: torch.Tensor, latent: int, seed: int, target: int) -> int:
    """A random latent other than ``latent`` whose decoder column is non-zero."""
    norms = torch.linalg.vector_norm(w_dec_ml.detach().to(F64), dim=0)
    pool = [j for j in torch.nonzero(norms > 0).flatten().tolist() if j != latent]
    if not pool:
        raise ValueError("random_latent needs another latent with a non-zero decoder column")
    return int(pool[int(seeded_rng(seed, target, "random_latent").integers(len(pool)))])


def mean_difference_direction(
    acts_nm: torch.Tensor, labels_n: torch.Tensor, target: int
) -> torch.Tensor:
    """Mean of class ``target``'s activations minus the mean of the rest (not normalised)."""
    x = acts_nm.detach().to(F64)
    is_target = torch.as_tensor(labels_n).reshape(-1) == target
    if not bool(is_target.any()) or bool(is_target.all()):
        raise ValueError(f"mean_difference needs samples of class {target} and of other classes")
    return x[is_target].mean(0) - x[~is_target].mean(0)


class ZeroRow(EditMethod):
    """The target's head row and bias zeroed: the class can no longer win, features untouched."""

    name = "zero_row"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        return zero_row_edit(inputs.weight_km, inputs.bias_k, target)


def _projection(inputs: EditInputs, name: str, direction_m: torch.Tensor, centre_m) -> MethodEdit:
    return centred_projection_edit(
        name, inputs.weight_km, inputs.bias_k, direction_m, centre_m, inputs.projection_alpha
    )


class RandomDirection(EditMethod):
    """SALVE's centred projection along a random unit direction: is the feature what matters?"""

    name = "random_direction"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        m = inputs.w_dec_ml.shape[0]
        direction = random_unit_direction(m, inputs.seed, target)
        return _projection(inputs, self.name, direction, inputs.b_dec_m)


class RandomLatent(EditMethod):
    """SALVE's centred projection along another latent of the same SAE, drawn at random."""

    name = "random_latent"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        w_dec = inputs.w_dec_ml.detach().to(F64)
        other = random_other_latent(w_dec, latent, inputs.seed, target)
        return _projection(inputs, self.name, w_dec[:, other], inputs.b_dec_m)


class MeanDifference(EditMethod):
    """Projection along the class-mean difference, centred on the overall train mean: the
    supervised direction an SAE is not needed for."""

    name = "mean_difference"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        direction = mean_difference_direction(inputs.train_acts_nm, inputs.train_labels_n, target)
        centre = inputs.train_acts_nm.detach().to(F64).mean(0)
        return _projection(inputs, self.name, direction, centre)


class Leace(EditMethod):
    """LEACE's least-squares erasure of the class indicator, folded into the head."""

    name = "leace"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        labels = torch.as_tensor(inputs.train_labels_n).reshape(-1)
        concept = (labels == target).to(F64)
        rep = fit_leace(inputs.train_acts_nm, concept, inputs.leace_basis)
        return representation_edit(self.name, inputs.weight_km, inputs.bias_k, rep)
