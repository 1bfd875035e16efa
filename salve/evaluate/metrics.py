"""The metrics of one edit: efficacy, flip rate, specificity, probe recovery, and how the
classes sharing a latent move (docs/METHOD.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from salve.methods import F64, centred_projection_edit, head64

METRICS = (
    "efficacy",
    "flip_rate",
    "specificity_mean",
    "specificity_worst",
    "generalisation",
    "probe_recovery",
)


def per_class_accuracy(preds_n: torch.Tensor, labels_n: torch.Tensor, k: int) -> torch.Tensor:
    """Accuracy per class [K] (float64, fractions); nan for a class without samples."""
    labels = torch.as_tensor(labels_n).to(torch.int64).reshape(-1)
    hits = torch.zeros(k, dtype=F64).index_add_(0, labels, (preds_n == labels).to(F64))
    return hits / torch.bincount(labels, minlength=k).to(F64)


def prediction_metrics(
    preds_before_n: torch.Tensor,
    preds_after_n: torch.Tensor,
    labels_n: torch.Tensor,
    target: int,
    num_classes: int,
) -> dict[str, float]:
    """Efficacy, flip rate and specificity of one edit from its predictions before and after.

    ``efficacy`` = target accuracy before - after; ``flip_rate`` = fraction of the target's
    originally correct samples whose prediction changed; ``specificity_mean`` and
    ``specificity_worst`` = mean and minimum of (after - before) accuracy over the other classes
    with samples (signed: 0 is perfect, damage is negative).
    """
    labels = torch.as_tensor(labels_n).to(torch.int64).reshape(-1)
    before = per_class_accuracy(preds_before_n, labels, num_classes)
    after = per_class_accuracy(preds_after_n, labels, num_classes)
    correct = (labels == target) & (preds_before_n == labels)
    flips = float((preds_after_n[correct] != preds_before_n[correct]).to(F64).mean())
    others = torch.arange(num_classes) != target
    change = (after - before)[others]
    change = change[~torch.isnan(change)]
    nan = math.nan
    return {
        "efficacy": float(before[target] - after[target]),
        "flip_rate": flips if bool(correct.any()) else nan,
        "specificity_mean": float(change.mean()) if change.numel() else nan,
        "specificity_worst": float(change.min()) if change.numel() else nan,
    }


def probe_recovery(
    train_reps_nm: torch.Tensor,
    train_labels_n: torch.Tensor,
    val_reps_nm: torch.Tensor,
    val_labels_n: torch.Tensor,
    target: int,
    *,
    max_iter: int = 500,
    random_state: int = 0,
) -> float:
    """Balanced val accuracy of a target-vs-rest logistic-regression probe fitted on train.

    Feed it the representation the edited model uses. A head-only edit (``zero_row``) leaves the
    representation as it was, so its probe recovery equals the unedited probe's: the class stays
    decodable from the features even when the head no longer predicts it. Standardised inputs,
    balanced class weights (the target is a minority), fixed ``random_state``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    y_train = (torch.as_tensor(train_labels_n).reshape(-1) == target).numpy()
    y_val = (torch.as_tensor(val_labels_n).reshape(-1) == target).numpy()
    if y_train.all() or not y_train.any():
        raise ValueError(f"probe_recovery needs train samples of class {target} and of the rest")
    scaler = StandardScaler().fit(train_reps_nm.detach().to(F64).numpy())
    probe = LogisticRegression(
        class_weight="balanced", max_iter=max_iter, random_state=random_state
    )
    probe.fit(scaler.transform(train_reps_nm.detach().to(F64).numpy()), y_train)
    pred = probe.predict(scaler.transform(val_reps_nm.detach().to(F64).numpy()))
    return float(balanced_accuracy_score(y_val, pred))


def cross_class_accuracy_change(
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    acts_nm: torch.Tensor,
    labels_n: torch.Tensor,
    w_dec_ml: torch.Tensor,
    b_dec_m: torch.Tensor,
    latent: int,
    classes: Sequence[int],
    alpha: float,
) -> dict[str, float]:
    """Accuracy change (after - before) of each class sharing ``latent`` under the centred
    projection suppression of that latent, keyed by class index as a string (JSON keys)."""
    edit = centred_projection_edit(
        "salve_projection", weight_km, bias_k, w_dec_ml.detach()[:, latent], b_dec_m, alpha
    )
    w, b = head64(weight_km, bias_k)
    k = w.shape[0]
    x = acts_nm.detach().to(F64)
    before = per_class_accuracy((x @ w.T + b).argmax(1), labels_n, k)
    after = per_class_accuracy(edit.logits(x).argmax(1), labels_n, k)
    return {str(int(c)): float(after[int(c)] - before[int(c)]) for c in classes}
