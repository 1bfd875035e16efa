"""Permanent head edits along an SAE feature's decoder column, and their closed-form evaluation.

The classifier head is linear: ``logits = a @ W.T + b`` with ``W`` [K, M], ``b`` [K] and ``a`` the
exact head input. A feature's decoder column ``c`` [M] edits ``W`` by one of two rules, each a
class registered by mode name in :mod:`salve.head_rules`:

- ``"paper"`` (SALVE): ``w'_ij = w_ij * max(0, 1 + s * alpha * |c_j|)``. One factor per activation
  dimension, shared by all classes, so no weight ever changes sign. The bias never moves.
- ``"projection"`` (beyond the paper): ``W' = W (I + s * alpha * d d^T)``, ``d = c / ||c||``.

``s = -1`` suppresses, ``s = +1`` enhances.

Centring (projection only). The SAE reads ``a - b_dec``, so its features describe deviations from
the centre ``b_dec``, not the raw activation. The raw projection also rescales the centre's own
component ``d . b_dec``, which can be large and of either sign: suppressing a feature can then
*raise* its own class's logit. Given ``centre_m`` (the SAE's ``b_dec``), the edit acts on
``a - b_dec`` only::

    logits' = W' (a - b_dec) + W b_dec + b,   i.e.   b' = b + (W - W') b_dec,

so the head's output at ``a = b_dec`` is unchanged. The paper rule ignores the centre: it is
defined on the raw activation (one factor per dimension, bias unchanged), and the alpha_crit
formulas (``salve.alpha_crit``) are derived for exactly that form; a centred variant would be a
different method.

API: the weight-level functions (:func:`edit_head`, :func:`edited_weights`, :func:`invert_edit`)
return the weight alone when called without ``bias_k`` and an :class:`EditedHead`
``(weight, bias)`` when ``bias_k`` is given. A centre needs the bias (the edit moves it). The
logit-level functions take the bias anyway and accept ``centre_m`` as a keyword.

Because the head is linear and ``a`` is its exact input, the edited model's logits for any alpha
follow from cached activations, without re-running the backbone (:func:`edited_logits`,
:func:`accuracy_curves`).

Exactness: factors, edited weights and biases are computed in float64 and rounded once to the
input's dtype. A factor of exactly 1.0 (alpha = 0) therefore returns the original weight bit for
bit, and ``alpha = 0`` projection edits are skipped rather than added as ``+0.0`` (which would
turn ``-0.0`` into ``+0.0``); the bias is returned untouched in that case too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import torch

from salve.head_rules import (
    Alpha,
    EditedHead,
    HeadRule,
    Mode,
    Sign,
    alphas64,
    head_rule,
    resolve_sign,
)

# Elements of the [A, n, K] logit block (plus [A, K, M] edited weights) per chunk over samples.
_CHUNK_BUDGET = 1 << 22


def _cols_and_alphas(
    cols: torch.Tensor, alpha: Alpha, weight_km: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise ``cols`` to [F, M] float64 and ``alpha`` to [F] float64."""
    cols_fm = cols.detach().to(torch.float64)
    if cols_fm.dim() == 1:
        cols_fm = cols_fm.unsqueeze(0)
    if cols_fm.dim() != 2 or cols_fm.shape[1] != weight_km.shape[1]:
        raise ValueError(
            f"cols must be [M] or [F, M] with M={weight_km.shape[1]}, got {tuple(cols.shape)}"
        )
    alphas_f = alphas64(alpha)
    if alphas_f.dim() == 0:
        alphas_f = alphas_f.expand(cols_fm.shape[0])
    if alphas_f.shape != (cols_fm.shape[0],):
        raise ValueError(f"need one alpha or one per feature ({cols_fm.shape[0]})")
    return cols_fm, alphas_f


def _centre64(
    centre_m: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    weight_km: torch.Tensor,
    rule: HeadRule,
) -> torch.Tensor | None:
    """The centre as float64 [M] where the rule uses one (projection), None otherwise; checks
    shapes."""
    if bias_k is not None and tuple(bias_k.shape) != (weight_km.shape[0],):
        raise ValueError(f"bias_k must be [K={weight_km.shape[0]}], got {tuple(bias_k.shape)}")
    if centre_m is None:
        return None
    if bias_k is None:
        raise ValueError("a centred edit moves the bias: pass bias_k together with centre_m")
    if tuple(centre_m.shape) != (weight_km.shape[1],):
        raise ValueError(
            f"centre_m must be [M={weight_km.shape[1]}] (the SAE's b_dec), "
            f"got {tuple(centre_m.shape)}"
        )
    centre64 = centre_m.detach().to(torch.float64)
    if not bool(torch.isfinite(centre64).all()):
        raise ValueError("centre_m must be finite")
    return centre64 if rule.centred else None


@overload
def edit_head(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: None = ...,
    centre_m: None = ...,
) -> torch.Tensor: ...


@overload
def edit_head(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: torch.Tensor,
    centre_m: torch.Tensor | None = ...,
) -> EditedHead: ...


def edit_head(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    *,
    bias_k: torch.Tensor | None = None,
    centre_m: torch.Tensor | None = None,
) -> torch.Tensor | EditedHead:
    """Return the edited head weight (a new tensor, same dtype), or ``(weight, bias)``.

    ``cols`` is one decoder column [M] or several [F, M]; ``alpha`` is one strength or one per
    feature. Several features:

    - paper: the per-dimension factors multiply (float64 product, one rounding), i.e. the
      sequential edits, which commute (up to the rounding of intermediate steps);
    - projection: ``W (I + s a_1 d_1 d_1^T)(I + s a_2 d_2 d_2^T)...`` in the order given; these
      commute only when the directions are parallel or orthogonal.

    With ``bias_k`` the result is an :class:`EditedHead`. With ``centre_m`` as well (projection),
    the bias moves to ``b + (W - W') centre``, the composite of the sequential centred edits; the
    paper rule returns the bias unchanged (see the module docstring).
    """
    rule = head_rule(mode)
    s = resolve_sign(sign)
    cols_fm, alphas_f = _cols_and_alphas(cols, alpha, weight_km)
    centre64 = _centre64(centre_m, bias_k, weight_km, rule)
    return rule.edit(weight_km, cols_fm, alphas_f, s, bias_k, centre64)


@overload
def invert_edit(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: None = ...,
    centre_m: None = ...,
) -> torch.Tensor: ...


@overload
def invert_edit(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: torch.Tensor,
    centre_m: torch.Tensor | None = ...,
) -> EditedHead: ...


def invert_edit(
    weight_km: torch.Tensor,
    cols: torch.Tensor,
    alpha: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    *,
    bias_k: torch.Tensor | None = None,
    centre_m: torch.Tensor | None = None,
) -> torch.Tensor | EditedHead:
    """Undo :func:`edit_head` with the same arguments, where the edit is invertible.

    Paper: divide by the factors; a factor of 0 (a clamped dimension) erased information, so it
    raises. Projection: ``(I + s a d d^T)^{-1} = I - s a / (1 + s a) d d^T``, applied in reverse
    order; ``1 + s a == 0`` is singular and raises. With ``bias_k`` (the edited bias) and
    ``centre_m``, the bias moves back by ``(W - W') centre`` step by step.
    """
    rule = head_rule(mode)
    s = resolve_sign(sign)
    cols_fm, alphas_f = _cols_and_alphas(cols, alpha, weight_km)
    centre64 = _centre64(centre_m, bias_k, weight_km, rule)
    return rule.invert(weight_km, cols_fm, alphas_f, s, bias_k, centre64)


@overload
def edited_weights(
    weight_km: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: None = ...,
    centre_m: None = ...,
) -> torch.Tensor: ...


@overload
def edited_weights(
    weight_km: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = ...,
    *,
    bias_k: torch.Tensor,
    centre_m: torch.Tensor | None = ...,
) -> EditedHead: ...


def edited_weights(
    weight_km: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    *,
    bias_k: torch.Tensor | None = None,
    centre_m: torch.Tensor | None = None,
) -> torch.Tensor | EditedHead:
    """Edited weights for a grid of alphas, [A, K, M], each bit-identical to ``edit_head``'s.

    Vectorised over the grid (broadcast, no loop), float64 then one rounding to the weight dtype.
    With ``bias_k``: an :class:`EditedHead` whose bias is [A, K] (moved only when centred).
    """
    rule = head_rule(mode)
    s = resolve_sign(sign)
    alphas = alphas64(alphas_a).reshape(-1)
    col64 = col_m.detach().to(torch.float64)
    if col64.shape != (weight_km.shape[1],):
        raise ValueError(f"col_m must be [M={weight_km.shape[1]}], got {tuple(col_m.shape)}")
    centre64 = _centre64(centre_m, bias_k, weight_km, rule)
    return rule.grid(weight_km, col64, alphas, s, bias_k, centre64)


def _logit_chunks(
    acts_nm: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode,
    chunk_size: int | None,
    centre_m: torch.Tensor | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, logits [A, n, K])`` over sample chunks, bounding peak memory."""
    if acts_nm.dim() != 2 or acts_nm.shape[1] != weight_km.shape[1]:
        raise ValueError(f"acts_nm must be [N, M={weight_km.shape[1]}], got {tuple(acts_nm.shape)}")
    dtype = torch.promote_types(acts_nm.dtype, weight_km.dtype)
    head = edited_weights(
        weight_km, col_m, alphas_a, sign, mode, bias_k=bias_k.detach(), centre_m=centre_m
    )
    weights_amk = head.weight.to(dtype).transpose(1, 2)
    biases_a1k = head.bias.to(dtype).unsqueeze(1)
    n_alpha, _, n_class = weights_amk.shape
    n = acts_nm.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BUDGET // max(1, n_alpha * n_class))
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        x_nm = acts_nm[start:stop].detach().to(dtype)
        # [n, M] @ [A, M, K] -> [A, n, K]: the edited head applied to every alpha at once.
        yield start, stop, torch.matmul(x_nm, weights_amk) + biases_a1k


def edited_logits(
    acts_nm: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    chunk_size: int | None = None,
    *,
    centre_m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [A, N, K] of the edited head for every alpha in the grid, from cached activations.

    Exact because ``acts_nm`` is the head's input: the backbone does not depend on alpha.
    Computed in the promoted dtype of ``acts_nm`` and ``weight_km``. ``centre_m`` centres the
    projection edit (the edited bias is applied per alpha).
    """
    alphas = alphas64(alphas_a).reshape(-1)
    dtype = torch.promote_types(acts_nm.dtype, weight_km.dtype)
    out = torch.empty(len(alphas), acts_nm.shape[0], weight_km.shape[0], dtype=dtype)
    for start, stop, block in _logit_chunks(
        acts_nm, weight_km, bias_k, col_m, alphas, sign, mode, chunk_size, centre_m
    ):
        out[:, start:stop] = block
    return out


def edited_predictions(
    acts_nm: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    chunk_size: int | None = None,
    *,
    centre_m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Argmax predictions [A, N] (int64) of the edited head, without holding all logits."""
    alphas = alphas64(alphas_a).reshape(-1)
    out = torch.empty(len(alphas), acts_nm.shape[0], dtype=torch.int64)
    for start, stop, block in _logit_chunks(
        acts_nm, weight_km, bias_k, col_m, alphas, sign, mode, chunk_size, centre_m
    ):
        out[:, start:stop] = block.argmax(dim=-1)
    return out


def accuracy_curves(
    acts_nm: torch.Tensor,
    labels_n: torch.Tensor,
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    col_m: torch.Tensor,
    alphas_a: Alpha,
    sign: Sign,
    mode: Mode = "paper",
    num_classes: int | None = None,
    chunk_size: int | None = None,
    *,
    centre_m: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of the edited head along an alpha grid, as fractions in [0, 1] (float64).

    Returns ``(acc_ak, overall_a)``: per-class accuracy [A, K] (nan for a class with no samples)
    and overall accuracy [A] (correct / N over all samples, not a mean of the per-class values).
    """
    k = weight_km.shape[0] if num_classes is None else int(num_classes)
    labels = torch.as_tensor(labels_n).to(torch.int64).reshape(-1)
    if labels.shape[0] != acts_nm.shape[0]:
        raise ValueError("labels_n and acts_nm disagree on N")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    preds_an = edited_predictions(
        acts_nm, weight_km, bias_k, col_m, alphas_a, sign, mode, chunk_size, centre_m=centre_m
    )
    correct_an = (preds_an == labels.unsqueeze(0)).to(torch.float64)
    counts_k = torch.bincount(labels, minlength=k).to(torch.float64)
    hits_ak = torch.zeros(correct_an.shape[0], k, dtype=torch.float64)
    hits_ak.index_add_(1, labels, correct_an)
    acc_ak = hits_ak / counts_k  # 0/0 -> nan for empty classes
    n = max(1, labels.shape[0])
    overall_a = correct_an.sum(dim=1) / n
    return acc_ak, overall_a


def selectivity(
    acc_base_k: torch.Tensor,
    acc_edited_k: torch.Tensor,
    target_k: int | Sequence[int],
) -> dict[str, float]:
    """How selectively an edit hits its target class(es); all accuracies are fractions in [0, 1].

    Keys: ``target_acc_base``, ``target_acc_edited`` (mean over the targets), ``target_drop``
    (base - edited), ``off_target_mean_change`` (signed mean of edited - base over the other
    classes), ``off_target_mean_abs_change``, ``off_target_max_abs_change``, and
    ``score = target_drop - off_target_mean_abs_change``: 1 is a perfect surgical suppression
    (target from 100% to 0%, nothing else moves); collateral damage or gains both count against it.
    Classes with nan accuracy (no samples) are ignored. For an enhancing edit read ``target_drop``
    with the opposite sign.
    """
    base = torch.as_tensor(acc_base_k, dtype=torch.float64).reshape(-1)
    edited = torch.as_tensor(acc_edited_k, dtype=torch.float64).reshape(-1)
    if base.shape != edited.shape:
        raise ValueError("acc_base_k and acc_edited_k must have the same shape")
    targets = [int(target_k)] if isinstance(target_k, int) else [int(t) for t in target_k]
    if not targets or any(t < 0 or t >= base.numel() for t in targets):
        raise ValueError(f"target classes must lie in [0, {base.numel()})")
    is_target = torch.zeros(base.numel(), dtype=torch.bool)
    is_target[targets] = True
    change = edited - base
    off = change[~is_target & ~torch.isnan(change)]
    t_base = float(base[is_target].nanmean())
    t_edit = float(edited[is_target].nanmean())
    nan = float("nan")
    mean_abs = float(off.abs().mean()) if off.numel() else nan
    return {
        "target_acc_base": t_base,
        "target_acc_edited": t_edit,
        "target_drop": t_base - t_edit,
        "off_target_mean_change": float(off.mean()) if off.numel() else nan,
        "off_target_mean_abs_change": mean_abs,
        "off_target_max_abs_change": float(off.abs().max()) if off.numel() else nan,
        "score": (t_base - t_edit) - mean_abs,
    }


# An edit "suppresses" its target class when that class's accuracy falls below SUPPRESSED_BELOW,
# and is "selective" when the other classes' mean accuracy moves by less than SELECTIVE_WITHIN.
SUPPRESSED_BELOW = 0.10
SELECTIVE_WITHIN = 0.03


def evaluated_classes(base_accuracy_k: torch.Tensor, min_base_accuracy: float) -> list[int]:
    """Classes at or above ``min_base_accuracy`` before any edit: a class the classifier fails
    cannot be suppressed, and at 0 % before any edit it would count as a success."""
    return [c for c, acc in enumerate(base_accuracy_k.tolist()) if acc >= min_base_accuracy]


def head_unchanged(weight_km: torch.Tensor, bias_k: torch.Tensor, edited: EditedHead) -> bool:
    """True when an edited head equals the original (weight and bias, value for value)."""
    return torch.equal(edited.weight, weight_km) and torch.equal(edited.bias, bias_k)


def why_unchanged(weight_km: torch.Tensor, col_m: torch.Tensor, mode: str) -> str:
    """Why an edit with alpha > 0 along the decoder column ``col_m`` left the head as it was."""
    w = weight_km.detach().to(torch.float64)
    c = col_m.detach().to(torch.float64)
    if not bool(w.any()):
        return (
            "the head's weight is all zero: every logit is its bias, which the edit keeps "
            "(train the head first)"
        )
    if not bool(c.any()):
        return "the feature's decoder column is all zero (a dead latent)"
    reason = head_rule(mode).unchanged_reason(w, c)
    return reason or "the change is below the floating-point resolution of the head's weights"


def alpha_scale(col_m: torch.Tensor, unit: str, mode: str) -> float:
    """Multiplier from configured alpha to the rule's alpha. For the paper rule, per_feature
    makes alpha = 1 zero the column's largest |c_j| exactly, so grids mean the same for every
    feature. The projection edit uses the unit direction: alpha = 1 removes the component."""
    return head_rule(mode).alpha_scale(col_m, unit)


def edit_targets(ranking: dict, targets: str) -> list[dict]:
    """The features to sweep: each class's dominant feature, plus cross-class features."""
    items = [
        {"feature": d["feature"], "role": "dominant", "classes": [d["class"]]}
        for d in ranking["dominant"]
    ]
    if targets == "dominant_and_cross":
        items += [
            {"feature": c["feature"], "role": "cross", "classes": c["classes"]}
            for c in ranking["cross_class"]
        ]
    return items
