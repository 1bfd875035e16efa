"""Edit methods by name, as the SAE kinds are (salve.sae): one small class per method, one
interface (:class:`~salve.methods.base.EditMethod`: the edited head and its effect on the
head's input, for one target class).

``EDIT_METHODS`` holds them in evaluate's table order: SALVE's paper rule and centred
projection, the baselines, then the methods that need the SAE itself (``needs_sae``: steering
reads its encode rule). ``CONTROLS`` holds SALVE's own three by ``edit.mode`` (paper,
projection, steer): the controls the edit stage sweeps and ships.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from salve.methods.base import (
    F64,
    AffineMap,
    EditInputs,
    EditMethod,
    MethodEdit,
    SteerEdit,
    SteeredMap,
    centred_projection_edit,
    head64,
    representation_edit,
    seeded_rng,
)
from salve.methods.baselines import (
    Leace,
    LeaceBasis,
    MeanDifference,
    RandomDirection,
    RandomLatent,
    ZeroRow,
    fit_leace,
    mean_difference_direction,
    random_other_latent,
    random_unit_direction,
    zero_row_edit,
)
from salve.methods.salve_methods import (
    STEER_ALPHA,
    Checkpoint,
    PaperMethod,
    ProjectionMethod,
    SalveMethod,
    SteerMethod,
    SweepData,
    paper_rule_edit,
    steer_edit,
)

EDIT_METHODS: Mapping[str, EditMethod] = MappingProxyType(
    {
        method.name: method
        for method in (
            PaperMethod(),
            ProjectionMethod(),
            ZeroRow(),
            RandomDirection(),
            RandomLatent(),
            MeanDifference(),
            Leace(),
            SteerMethod(),
        )
    }
)
# The methods evaluate runs on decoder columns alone, and those that need the SAE as well.
METHODS = tuple(name for name, m in EDIT_METHODS.items() if not m.needs_sae)
SAE_METHODS = tuple(name for name, m in EDIT_METHODS.items() if m.needs_sae)
CONTROLS: Mapping[str, SalveMethod] = MappingProxyType(
    {m.mode: m for m in EDIT_METHODS.values() if isinstance(m, SalveMethod)}
)


def edit_method(name: str) -> EditMethod:
    """The registered method ``name``."""
    try:
        return EDIT_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose from {tuple(EDIT_METHODS)}") from None


def control(mode: str) -> SalveMethod:
    """SALVE's control for ``edit.mode``."""
    try:
        return CONTROLS[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown edit mode {mode!r}; choose from {tuple(CONTROLS)}") from None


def build_edit(
    method: str,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    target: int,
    latent: int,
    w_dec_ml: torch.Tensor,
    b_dec_m: torch.Tensor,
    train_acts_nm: torch.Tensor,
    train_labels_n: torch.Tensor,
    *,
    projection_alpha: float,
    paper_alpha: float,
    seed: int,
    leace_basis: LeaceBasis | None = None,
    sae=None,
    steer_alpha: float = STEER_ALPHA,
) -> MethodEdit:
    """One method's suppression edit of class ``target`` (``latent``: its dominant SAE latent).
    ``leace_basis``: ``LeaceBasis.fit(train_acts_nm)``, shared by the classes of one run.
    ``sae``: the SAE whose ``W_dec`` is given, needed by ``salve_steer`` (its encode rule)."""
    inputs = EditInputs(
        weight_km, bias_k, w_dec_ml, b_dec_m, train_acts_nm, train_labels_n,
        projection_alpha=projection_alpha, paper_alpha=paper_alpha, seed=seed,
        steer_alpha=steer_alpha, leace_basis=leace_basis, sae=sae,
    )  # fmt: skip
    return edit_method(method).edit(inputs, target, latent)


__all__ = [
    "CONTROLS",
    "EDIT_METHODS",
    "F64",
    "METHODS",
    "SAE_METHODS",
    "STEER_ALPHA",
    "AffineMap",
    "Checkpoint",
    "EditInputs",
    "EditMethod",
    "Leace",
    "LeaceBasis",
    "MeanDifference",
    "MethodEdit",
    "PaperMethod",
    "ProjectionMethod",
    "RandomDirection",
    "RandomLatent",
    "SalveMethod",
    "SteerEdit",
    "SteerMethod",
    "SteeredMap",
    "SweepData",
    "ZeroRow",
    "build_edit",
    "centred_projection_edit",
    "control",
    "edit_method",
    "fit_leace",
    "head64",
    "mean_difference_direction",
    "paper_rule_edit",
    "random_other_latent",
    "random_unit_direction",
    "representation_edit",
    "seeded_rng",
    "steer_edit",
    "zero_row_edit",
]
