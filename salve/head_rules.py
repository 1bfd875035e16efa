"""The permanent head-edit rules, one class each, registered by mode name (``HEAD_RULES``).

A rule is the weight algebra of one edit (``salve.editing`` states both and their exactness):
the edit itself, its inverse and a whole alpha grid at once, in float64 with one rounding.
``salve.editing`` checks the arguments and dispatches here by ``mode``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, Literal, NamedTuple

import torch

from salve.linalg import unit_vector

Sign = int | Literal["suppress", "enhance"]
Mode = Literal["paper", "projection"]
Alpha = float | Sequence[float] | torch.Tensor

_SIGN_NAMES = {"suppress": -1, "enhance": 1}


class EditedHead(NamedTuple):
    """An edited linear head: ``weight`` [K, M] (or [A, K, M]) and ``bias`` [K] (or [A, K])."""

    weight: torch.Tensor
    bias: torch.Tensor


def resolve_sign(sign: Sign) -> int:
    """Map ``-1``/``"suppress"`` to -1 and ``+1``/``"enhance"`` to +1; anything else is an error."""
    if isinstance(sign, str):
        key = sign.strip().lower()
        if key not in _SIGN_NAMES:
            raise ValueError(f"sign must be 'suppress' or 'enhance', got {sign!r}")
        return _SIGN_NAMES[key]
    if isinstance(sign, bool) or sign not in (-1, 1):
        raise ValueError(f"sign must be -1, +1, 'suppress' or 'enhance', got {sign!r}")
    return int(sign)


def alphas64(alpha: Alpha) -> torch.Tensor:
    """Alpha(s) as float64; strengths are finite and >= 0 (the sign gives the direction)."""
    out = torch.as_tensor(alpha, dtype=torch.float64)
    if not bool(torch.isfinite(out).all()) or bool((out < 0).any()):
        raise ValueError("alpha must be finite and >= 0 (use sign for the direction)")
    return out


def paper_factors(col_m: torch.Tensor, alpha: Alpha, sign: Sign) -> torch.Tensor:
    """Per-dimension column factors ``max(0, 1 + s * alpha * |c_j|)`` in float64.

    ``alpha`` may be a scalar (returns [M]) or a 1-D grid [A] (returns [A, M]). At alpha = 0 every
    factor is exactly 1.0, so multiplying by it is the identity bit for bit.
    """
    s = resolve_sign(sign)
    abs_m = col_m.detach().to(torch.float64).abs()
    alpha_t = alphas64(alpha)
    if alpha_t.dim() > 1:
        raise ValueError("alpha must be a scalar or a 1-D grid")
    scaled = alpha_t.unsqueeze(-1) * abs_m if alpha_t.dim() == 1 else alpha_t * abs_m
    return (1.0 + s * scaled).clamp_min(0.0)


def _unchanged_bias(bias_k: torch.Tensor | None, edited: torch.Tensor) -> torch.Tensor | EditedHead:
    return edited if bias_k is None else EditedHead(edited, bias_k.detach().clone())


def _bias_grid(bias_k: torch.Tensor | None, n_alpha: int) -> torch.Tensor | None:
    return None if bias_k is None else bias_k.detach().unsqueeze(0).expand(n_alpha, -1).clone()


def _moved_bias(
    edited: torch.Tensor, bias_k: torch.Tensor | None, b64: torch.Tensor | None
) -> torch.Tensor | EditedHead:
    """The edited weight alone, or with the bias: moved (``b64``) or untouched."""
    if bias_k is None:
        return edited
    return EditedHead(edited, b64.to(bias_k.dtype) if b64 is not None else bias_k.detach().clone())


class HeadRule:
    """One permanent head-edit rule: the weight algebra of edit, inverse and alpha grid, in
    float64 with one rounding. ``centred``: whether the rule reads the SAE's centre."""

    mode: ClassVar[str]
    centred: ClassVar[bool] = False

    def edit(self, weight_km, cols_fm, alphas_f, s, bias_k, centre64) -> torch.Tensor | EditedHead:
        raise NotImplementedError

    def invert(
        self, weight_km, cols_fm, alphas_f, s, bias_k, centre64
    ) -> torch.Tensor | EditedHead:
        raise NotImplementedError

    def grid(self, weight_km, col64, alphas, s, bias_k, centre64) -> torch.Tensor | EditedHead:
        raise NotImplementedError

    def unchanged_reason(self, w64: torch.Tensor, c64: torch.Tensor) -> str | None:
        """Why this rule leaves a non-zero head unchanged along a non-zero column, if it can."""
        return None

    def alpha_scale(self, col_m: torch.Tensor, unit: str) -> float:
        """Multiplier from configured alpha to this rule's alpha (see :func:`alpha_scale`)."""
        return 1.0


class PaperRule(HeadRule):
    """``w'_ij = w_ij * max(0, 1 + s * alpha * |c_j|)``; the bias never moves."""

    mode = "paper"

    @staticmethod
    def _factors(cols_fm: torch.Tensor, alphas_f: torch.Tensor, s: int, m: int) -> torch.Tensor:
        factor_m = torch.ones(m, dtype=torch.float64)
        for col_m, a in zip(cols_fm, alphas_f, strict=True):
            factor_m = factor_m * paper_factors(col_m, a, s)
        return factor_m

    def edit(self, weight_km, cols_fm, alphas_f, s, bias_k, centre64):
        w64 = weight_km.detach().to(torch.float64)
        factor_m = self._factors(cols_fm, alphas_f, s, weight_km.shape[1])
        return _unchanged_bias(bias_k, (w64 * factor_m).to(weight_km.dtype))

    def invert(self, weight_km, cols_fm, alphas_f, s, bias_k, centre64):
        w64 = weight_km.detach().to(torch.float64)
        factor_m = self._factors(cols_fm, alphas_f, s, weight_km.shape[1])
        if bool((factor_m == 0).any()):
            raise ValueError("edit clamped some factors to 0: it cannot be inverted")
        return _unchanged_bias(bias_k, (w64 / factor_m).to(weight_km.dtype))

    def grid(self, weight_km, col64, alphas, s, bias_k, centre64):
        biases_ak = _bias_grid(bias_k, len(alphas))
        w64 = weight_km.detach().to(torch.float64)
        factor_am = paper_factors(col64, alphas, s)
        edited = (w64.unsqueeze(0) * factor_am.unsqueeze(1)).to(weight_km.dtype)
        return edited if biases_ak is None else EditedHead(edited, biases_ak)

    def unchanged_reason(self, w64, c64):
        if not bool(w64[:, c64 != 0].any()):
            return "the head's weight is zero in every dimension the feature's decoder column uses"
        return None

    def alpha_scale(self, col_m, unit):
        if unit == "per_feature":
            return 1.0 / float(col_m.abs().max())
        return 1.0


_DIRECTION = "a projection edit's decoder column"


class ProjectionRule(HeadRule):
    """``W' = W (I + s * alpha * d d^T)``, centred on ``b_dec`` when given one."""

    mode = "projection"
    centred = True

    def edit(self, weight_km, cols_fm, alphas_f, s, bias_k, centre64):
        w64 = weight_km.detach().to(torch.float64)
        b64 = None if bias_k is None else bias_k.detach().to(torch.float64)
        moved = False
        for col_m, a in zip(cols_fm, alphas_f, strict=True):
            if a == 0:  # skip: adding +0.0 would turn -0.0 weights into +0.0
                continue
            d_m = unit_vector(col_m, _DIRECTION)
            wd_k = w64 @ d_m
            if centre64 is not None and b64 is not None:
                # (W_t - W_{t+1}) c = -s a (W_t d)(d . c); summed over steps: (W - W') c.
                b64 = b64 - (s * a) * (wd_k * torch.dot(d_m, centre64))
                moved = True
            w64 = w64 + (s * a) * torch.outer(wd_k, d_m)
        return _moved_bias(w64.to(weight_km.dtype), bias_k, b64 if moved else None)

    def invert(self, weight_km, cols_fm, alphas_f, s, bias_k, centre64):
        w64 = weight_km.detach().to(torch.float64)
        b64 = None if bias_k is None else bias_k.detach().to(torch.float64)
        moved = False
        for col_m, a in zip(reversed(cols_fm), reversed(alphas_f), strict=True):
            if a == 0:
                continue
            denom = 1.0 + s * a
            if denom == 0:
                raise ValueError("projection edit with 1 + s*alpha == 0 is singular")
            d_m = unit_vector(col_m, _DIRECTION)
            w64 = w64 - (s * a / denom) * torch.outer(w64 @ d_m, d_m)
            if centre64 is not None and b64 is not None:
                # b_t = b_{t+1} - (W_t - W_{t+1}) c = b_{t+1} + s a (W_t d)(d . c)
                b64 = b64 + (s * a) * ((w64 @ d_m) * torch.dot(d_m, centre64))
                moved = True
        return _moved_bias(w64.to(weight_km.dtype), bias_k, b64 if moved else None)

    def grid(self, weight_km, col64, alphas, s, bias_k, centre64):
        n_alpha = len(alphas)
        biases_ak = _bias_grid(bias_k, n_alpha)
        if bool((alphas == 0).all()):
            edited = weight_km.detach().unsqueeze(0).expand(n_alpha, -1, -1).clone()
            return edited if biases_ak is None else EditedHead(edited, biases_ak)
        w64 = weight_km.detach().to(torch.float64)
        d_m = unit_vector(col64, _DIRECTION)
        wd_k = w64 @ d_m
        is_zero_a11 = (alphas == 0).view(-1, 1, 1)
        step_a11 = (s * alphas).view(-1, 1, 1)
        edited64 = w64.unsqueeze(0) + step_a11 * torch.outer(wd_k, d_m).unsqueeze(0)
        edited = torch.where(is_zero_a11, w64.unsqueeze(0), edited64).to(weight_km.dtype)
        if biases_ak is None or bias_k is None:
            return edited
        if centre64 is not None:
            b64 = bias_k.detach().to(torch.float64)
            moved_ak = b64 - step_a11[:, :, 0] * (wd_k * torch.dot(d_m, centre64))
            biases_ak = torch.where(is_zero_a11[:, :, 0], biases_ak, moved_ak.to(bias_k.dtype))
        return EditedHead(edited, biases_ak)

    def unchanged_reason(self, w64, c64):
        if not bool((w64 @ c64).any()):
            return "the head's weight is orthogonal to the feature's decoder direction (W d = 0)"
        return None


HEAD_RULES: Mapping[str, HeadRule] = MappingProxyType(
    {rule.mode: rule for rule in (PaperRule(), ProjectionRule())}
)


def head_rule(mode: str) -> HeadRule:
    """The registered head-edit rule named ``mode``."""
    try:
        return HEAD_RULES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode must be one of {tuple(HEAD_RULES)}, got {mode!r}") from None
