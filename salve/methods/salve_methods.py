"""SALVE's own controls, one class each: the paper's head rule, the centred projection and
activation steering (docs/METHOD.md).

Each is an :class:`~salve.methods.base.EditMethod` (its suppression edit, for evaluate) and a
control the edit stage sweeps (``mode``): accuracy curves along an alpha grid from cached
activations, every latent's effect at full strength, and the checkpoint a user ships.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from salve.editing import accuracy_curves, edit_head, head_unchanged, why_unchanged
from salve.head_rules import head_rule, paper_factors
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
)
from salve.models import head_of, save_checkpoint
from salve.steering import (
    LatentSteer,
    Steer,
    ablation_class_changes,
    save_steered,
    steered_accuracy_curves,
    steered_classifier,
)

STEER_ALPHA = 1.0  # salve_steer's strength in evaluate: g = 0, the latent's share removed


@dataclass(frozen=True, eq=False)
class SweepData:
    """What the edit stage's controls read: val activations and labels, the head, the SAE's
    decoder, the centre (``b_dec`` when ``edit.centre``, else None), every latent's codes
    (steering's ``z(a)``, float64) and the SAE."""

    acts_nm: torch.Tensor
    labels_n: torch.Tensor
    weight_km: torch.Tensor
    bias_k: torch.Tensor
    w_dec_ml: torch.Tensor
    centre_m: torch.Tensor | None
    codes_nl: torch.Tensor
    num_classes: int
    sae: Any


@dataclass(frozen=True)
class Checkpoint:
    """The configured edit made shippable: ``save(path, sidecar)`` writes it; ``record`` adds to
    the checkpoint's edit record; ``unchanged``: why it gives the input model's logits, or None."""

    save: Callable[[Path, dict], None]
    record: dict
    unchanged: str | None


class SalveMethod(EditMethod):
    """A SALVE control, swept by the edit stage under ``edit.mode = mode``."""

    mode: ClassVar[str]
    # The other kind of control, measured beside this one by the edit stage.
    companion: ClassVar[str]
    # How the edit stage's warning names the saved model and says it equals the input model.
    same_as_input: ClassVar[tuple[str, str, str]]

    def alpha_scale(self, col_m: torch.Tensor, unit: str) -> float:
        """Multiplier from configured alpha to this control's alpha."""
        return 1.0

    def centred(self, data: SweepData) -> bool:
        return False

    def curves(
        self, data: SweepData, latent: int, alphas: torch.Tensor, sign: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class accuracy [A, K] and overall accuracy [A] along ``alphas``."""
        raise NotImplementedError

    def latent_changes(self, data: SweepData, alpha_max: float, unit: str) -> torch.Tensor:
        """Each latent suppressed alone at full strength: class accuracy changes [L, K]."""
        out = []
        for latent in range(data.w_dec_ml.shape[1]):
            scale = self.alpha_scale(data.w_dec_ml[:, latent], unit)
            full = torch.tensor([0.0, alpha_max * scale], dtype=torch.float64)
            acc = self.curves(data, latent, full, "suppress")[0]
            out.append(acc[1] - acc[0])
        return torch.stack(out)

    def checkpoint(
        self, model: torch.nn.Module, data: SweepData, feature: int, alpha_abs: float, sign: str
    ) -> Checkpoint:
        raise NotImplementedError


class _HeadRuleMethod(SalveMethod):
    """A permanent head edit (salve.head_rules): the checkpoint is the model with its head
    edited."""

    companion = "steer"
    same_as_input = ("edited checkpoint", "equals the input model", "changed nothing in its head")

    def alpha_scale(self, col_m: torch.Tensor, unit: str) -> float:
        return head_rule(self.mode).alpha_scale(col_m, unit)

    def _centre(self, data: SweepData) -> torch.Tensor | None:
        return data.centre_m if head_rule(self.mode).centred else None

    def centred(self, data: SweepData) -> bool:
        return self._centre(data) is not None

    def curves(self, data, latent, alphas, sign):
        col = data.w_dec_ml[:, latent]
        return accuracy_curves(
            data.acts_nm, data.labels_n, data.weight_km, data.bias_k, col, alphas, sign,
            self.mode, data.num_classes, centre_m=self._centre(data),
        )  # fmt: skip

    def checkpoint(self, model, data, feature, alpha_abs, sign):
        weight, bias, col = data.weight_km, data.bias_k, data.w_dec_ml[:, feature]
        new_head = edit_head(
            weight.clone(), col, alpha_abs, sign, self.mode, bias_k=bias,
            centre_m=self._centre(data),
        )  # fmt: skip
        changed = not head_unchanged(weight, bias, new_head)  # before the copy below
        reason = None if changed else why_unchanged(weight, col, self.mode)
        with torch.no_grad():
            head_of(model).weight.copy_(new_head.weight)
            head_of(model).bias.copy_(new_head.bias)
        return Checkpoint(
            lambda path, sidecar: save_checkpoint(path, model, sidecar),
            {"head_changed": changed},  # False: the checkpoint equals the input model
            reason,
        )


class PaperMethod(_HeadRuleMethod):
    """The paper's rule, suppress; evaluate's alpha is in per-feature units."""

    name = "salve_paper"
    mode = "paper"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        col = inputs.w_dec_ml.detach().to(F64)[:, latent]
        return paper_rule_edit(inputs.weight_km, inputs.bias_k, col, inputs.paper_alpha)


class ProjectionMethod(_HeadRuleMethod):
    """The centred projection along the latent's decoder direction."""

    name = "salve_projection"
    mode = "projection"

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        direction = inputs.w_dec_ml.detach().to(F64)[:, latent]
        return centred_projection_edit(
            self.name, inputs.weight_km, inputs.bias_k, direction, inputs.b_dec_m,
            inputs.projection_alpha,
        )  # fmt: skip


class SteerMethod(SalveMethod):
    """Activation steering (salve/steering.py): the head reads ``a' = steer(a)``; the
    checkpoint is the classifier plus the steering of its head input."""

    name = "salve_steer"
    mode = "steer"
    needs_sae = True
    companion = "projection"
    same_as_input = ("steered model", "gives the input model's logits", "cannot move them")

    def edit(self, inputs: EditInputs, target: int, latent: int) -> MethodEdit:
        if inputs.sae is None:
            raise ValueError("salve_steer needs the SAE (its encode rule): pass sae=")
        return steer_edit(inputs.weight_km, inputs.bias_k, inputs.sae, latent, inputs.steer_alpha)

    def curves(self, data, latent, alphas, sign):
        return steered_accuracy_curves(
            data.acts_nm, data.labels_n, data.weight_km, data.bias_k, data.codes_nl[:, latent],
            data.w_dec_ml[:, latent], alphas, sign, data.num_classes,
        )  # fmt: skip

    def latent_changes(self, data, alpha_max, unit):
        return ablation_class_changes(
            data.acts_nm, data.labels_n, data.weight_km, data.bias_k, data.codes_nl,
            data.w_dec_ml, alpha_max, data.num_classes,
        )  # fmt: skip

    def checkpoint(self, model, data, feature, alpha_abs, sign):
        weight, col = data.weight_km, data.w_dec_ml[:, feature]
        steer = Steer(feature, alpha_abs, sign)
        # The head is not edited; the saved model steers its input. It gives the input model's
        # logits when the step is skipped (g = 1) or cannot reach the logits (W c = 0).
        reaches = bool((weight.double() @ col.double()).any())
        changed = not steer.is_identity and reaches
        steered = steered_classifier(model, data.sae, steer)
        return Checkpoint(
            lambda path, sidecar: save_steered(path, steered, sidecar),
            {"gain": steer.gain, "head_changed": False, "steered": True, "logits_changed": changed},
            None if changed else why_unchanged(weight, col, "projection"),
        )


def paper_rule_edit(
    weight_km: torch.Tensor, bias_k: torch.Tensor, col_m: torch.Tensor, alpha_per_feature: float
) -> MethodEdit:
    """The paper's rule, suppress, with alpha in per-feature units (``alpha / max_j |c_j|``,
    as ``alpha_scale`` in the edit stage): ``a' = f * a`` read by the original head."""
    w, b = head64(weight_km, bias_k)
    col = col_m.detach().to(F64)
    peak = float(col.abs().max()) if col.numel() else 0.0
    if not peak > 0:
        raise ValueError("the paper rule needs a non-zero decoder column")
    alpha_abs = alpha_per_feature / peak
    factor_m = paper_factors(col, alpha_abs, -1)
    edited = edit_head(w, col, alpha_abs, -1, "paper")
    rep = AffineMap.diagonal(factor_m)
    return MethodEdit("salve_paper", edited, b.clone(), rep, w, b)


def steer_edit(
    weight_km: torch.Tensor, bias_k: torch.Tensor, sae, latent: int, alpha: float = STEER_ALPHA
) -> SteerEdit:
    """Suppress ``latent`` by steering at strength ``alpha`` (1: ablate), float64."""
    w, b = head64(weight_km, bias_k)
    steer = LatentSteer.from_sae(sae, Steer(int(latent), float(alpha), "suppress")).to(F64)
    return SteerEdit("salve_steer", w, b, SteeredMap(steer), w, b)  # type: ignore[arg-type]
