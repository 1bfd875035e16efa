"""Edit evaluation: baselines and metrics for permanent class-suppressing edits (docs/METHOD.md).

Every method suppresses one target class k. Each yields both

- the edited head ``(W', b')``, what a shipped checkpoint holds, and
- the representation the edited model uses, an affine map ``a' = A a + t`` of the head input,
  together with the head that reads it: the original head for representation edits (the paper
  rule ``a' = f * a``, the centred projections ``a' = (I - alpha d d^T)(a - c) + c``, LEACE
  ``a' = eraser(a)``), the edited head itself for head-only edits (``zero_row``: ``a' = a``).

So ``reader(a') == W' a + b'`` for every method (tested). All evaluation runs in float64 on cached
activations (the exact head input): no backbone, no file I/O. Seeds make the random baselines
reproducible: the same (seed, class) always draws the same direction or latent.

``salve_steer`` (``SAE_METHODS``) is activation steering (salve/steering.py): it needs the SAE's
encode rule, not only its decoder, so it runs when ``evaluate_seed`` is given the SAE. Its
representation ``a' = a - z_l(a) c_l`` (alpha = ``STEER_ALPHA``: the latent ablated) is not
affine and no head can be folded from it: the original head reads ``a'``, and its logits are
``head(a')`` (:class:`SteerEdit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from salve.editing import edit_head, paper_factors
from salve.io import TensorRows
from salve.matching import DECODER_COSINE, decoder_cosines, match_latents
from salve.steering import LatentSteer, Steer

F64 = torch.float64
METHODS = (
    "salve_paper",
    "salve_projection",
    "zero_row",
    "random_direction",
    "random_latent",
    "mean_difference",
    "leace",
)
# Methods that need the SAE itself (its encode rule): evaluate_seed runs them when given it.
SAE_METHODS = ("salve_steer",)
STEER_ALPHA = 1.0  # salve_steer's strength: g = 0, the latent's share of a removed (ablation)
METRICS = (
    "efficacy",
    "flip_rate",
    "specificity_mean",
    "specificity_worst",
    "generalisation",
    "probe_recovery",
)
SHIFTS = ("noise", "blur", "jitter")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the usual RGB -> grey weights
_RNG_SALT = {"random_direction": 1, "random_latent": 2, "noise": 3, "jitter": 4}


# --- edits as (head, representation) ---------------------------------------------------------


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


def steer_edit(
    weight_km: torch.Tensor, bias_k: torch.Tensor, sae, latent: int, alpha: float = STEER_ALPHA
) -> SteerEdit:
    """Suppress ``latent`` by steering at strength ``alpha`` (1: ablate), float64."""
    w, b = _head64(weight_km, bias_k)
    steer = LatentSteer.from_sae(sae, Steer(int(latent), float(alpha), "suppress")).to(F64)
    return SteerEdit("salve_steer", w, b, SteeredMap(steer), w, b)  # type: ignore[arg-type]


def _head64(weight_km: torch.Tensor, bias_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    w, b = _head64(weight_km, bias_k)
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
    w, b = _head64(weight_km, bias_k)
    c = centre_m.detach().to(F64)
    edited = edit_head(
        w, direction_m.detach().to(F64), alpha, -1, "projection", bias_k=b, centre_m=c
    )
    d = _unit_direction(direction_m)
    rep = AffineMap.identity_minus_rank_one(alpha, d, alpha * d * torch.dot(d, c))
    return MethodEdit(method, edited.weight, edited.bias, rep, w, b)


def paper_rule_edit(
    weight_km: torch.Tensor, bias_k: torch.Tensor, col_m: torch.Tensor, alpha_per_feature: float
) -> MethodEdit:
    """The paper's rule, suppress, with alpha in per-feature units (``alpha / max_j |c_j|``,
    as ``alpha_scale`` in the edit stage): ``a' = f * a`` read by the original head."""
    w, b = _head64(weight_km, bias_k)
    col = col_m.detach().to(F64)
    peak = float(col.abs().max()) if col.numel() else 0.0
    if not peak > 0:
        raise ValueError("the paper rule needs a non-zero decoder column")
    alpha_abs = alpha_per_feature / peak
    factor_m = paper_factors(col, alpha_abs, -1)
    edited = edit_head(w, col, alpha_abs, -1, "paper")
    rep = AffineMap.diagonal(factor_m)
    return MethodEdit("salve_paper", edited, b.clone(), rep, w, b)


def zero_row_edit(weight_km: torch.Tensor, bias_k: torch.Tensor, target: int) -> MethodEdit:
    """Class ``target``'s head row and bias set to 0: a head-only edit, the input is untouched."""
    w, b = _head64(weight_km, bias_k)
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


def _unit_direction(direction_m: torch.Tensor) -> torch.Tensor:
    d = direction_m.detach().to(F64)
    norm = torch.linalg.vector_norm(d)
    if not bool(norm > 0):
        raise ValueError("an edit direction must be non-zero")
    return d / norm


def _rng(seed: int, target: int, what: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(target), _RNG_SALT[what]])


def random_unit_direction(m: int, seed: int, target: int) -> torch.Tensor:
    """A uniformly random unit vector [M]: unit norm like the normalised decoder column."""
    v = torch.from_numpy(_rng(seed, target, "random_direction").standard_normal(m))
    return v / torch.linalg.vector_norm(v)


def random_other_latent(w_dec_ml: torch.Tensor, latent: int, seed: int, target: int) -> int:
    """A random latent other than ``latent`` whose decoder column is non-zero."""
    norms = torch.linalg.vector_norm(w_dec_ml.detach().to(F64), dim=0)
    pool = [j for j in torch.nonzero(norms > 0).flatten().tolist() if j != latent]
    if not pool:
        raise ValueError("random_latent needs another latent with a non-zero decoder column")
    return int(pool[int(_rng(seed, target, "random_latent").integers(len(pool)))])


def mean_difference_direction(
    acts_nm: torch.Tensor, labels_n: torch.Tensor, target: int
) -> torch.Tensor:
    """Mean of class ``target``'s activations minus the mean of the rest (not normalised)."""
    x = acts_nm.detach().to(F64)
    is_target = torch.as_tensor(labels_n).reshape(-1) == target
    if not bool(is_target.any()) or bool(is_target.all()):
        raise ValueError(f"mean_difference needs samples of class {target} and of other classes")
    return x[is_target].mean(0) - x[~is_target].mean(0)


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
    if method not in METHODS + SAE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + SAE_METHODS}")
    if method == "salve_steer":
        if sae is None:
            raise ValueError("salve_steer needs the SAE (its encode rule): pass sae=")
        return steer_edit(weight_km, bias_k, sae, latent, steer_alpha)
    w_dec = w_dec_ml.detach().to(F64)
    if method == "salve_paper":
        return paper_rule_edit(weight_km, bias_k, w_dec[:, latent], paper_alpha)
    if method == "zero_row":
        return zero_row_edit(weight_km, bias_k, target)
    if method == "leace":
        concept = (torch.as_tensor(train_labels_n).reshape(-1) == target).to(F64)
        rep = fit_leace(train_acts_nm, concept, leace_basis)
        return representation_edit("leace", weight_km, bias_k, rep)
    centre = b_dec_m
    if method == "salve_projection":
        direction = w_dec[:, latent]
    elif method == "random_direction":
        direction = random_unit_direction(w_dec.shape[0], seed, target)
    elif method == "random_latent":
        direction = w_dec[:, random_other_latent(w_dec, latent, seed, target)]
    else:  # mean_difference: centred on the overall train mean
        direction = mean_difference_direction(train_acts_nm, train_labels_n, target)
        centre = train_acts_nm.detach().to(F64).mean(0)
    return centred_projection_edit(method, weight_km, bias_k, direction, centre, projection_alpha)


# --- metrics ---------------------------------------------------------------------------------


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
    w, b = _head64(weight_km, bias_k)
    k = w.shape[0]
    x = acts_nm.detach().to(F64)
    before = per_class_accuracy((x @ w.T + b).argmax(1), labels_n, k)
    after = per_class_accuracy(edit.logits(x).argmax(1), labels_n, k)
    return {str(int(c)): float(after[int(c)] - before[int(c)]) for c in classes}


# --- the whole evaluation of one SAE seed ----------------------------------------------------


def evaluate_seed(
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    train_acts_nm: torch.Tensor,
    train_labels_n: torch.Tensor,
    val_acts_nm: torch.Tensor,
    val_labels_n: torch.Tensor,
    w_dec_ml: torch.Tensor,
    b_dec_m: torch.Tensor,
    dominant_k: Sequence[int] | torch.Tensor,
    *,
    projection_alpha: float,
    paper_alpha: float,
    min_base_accuracy: float,
    seed: int,
    shifted_val_acts: Mapping[str, torch.Tensor] | None = None,
    methods: Sequence[str] | None = None,
    probe: bool = True,
    probe_max_iter: int = 500,
    known_probes: Mapping[str, float] | None = None,
    sae=None,
    steer_alpha: float = STEER_ALPHA,
) -> dict:
    """Every method x metric for one SAE seed; feed a list of its ``["methods"]`` to
    :func:`summarise_methods`.

    Only classes with base val accuracy >= ``min_base_accuracy`` are evaluated (a failing class
    cannot be suppressed). ``shifted_val_acts`` maps a shift kind to the activations of the
    shifted val images (same order and labels as ``val_acts_nm``); with it, ``generalisation``
    (mean over kinds) and ``generalisation_<kind>`` are the efficacy on those. ``probe=False``
    skips ``probe_recovery`` (the costly part); ``known_probes`` (from :func:`seed_free_probes`
    on the same inputs) supplies the values that do not depend on the SAE. Returns a JSON-able
    dict: ``methods`` (metric means over the evaluated classes), ``per_class``,
    ``evaluated_classes``, ``left_out_classes``, ``base_accuracy``, ``latents`` (dominant and
    random latent per class). ``sae``: the SAE of ``w_dec_ml``/``b_dec_m``; with it the default
    ``methods`` include ``salve_steer`` (at ``steer_alpha``), which needs its encode rule.
    """
    if methods is None:
        methods = METHODS + SAE_METHODS if sae is not None else METHODS
    w, b = _head64(weight_km, bias_k)
    k, m = w.shape
    x_train, x_val = _acts64(train_acts_nm, m, "train"), _acts64(val_acts_nm, m, "val")
    y_train, y_val = _labels(train_labels_n, x_train, k), _labels(val_labels_n, x_val, k)
    dominant = [int(v) for v in torch.as_tensor(dominant_k).reshape(-1).tolist()]
    w_dec = w_dec_ml.detach().to(F64)
    if w_dec.dim() != 2 or w_dec.shape[0] != m or tuple(b_dec_m.shape) != (m,):
        raise ValueError(f"need W_dec [M={m}, L] and b_dec [M={m}]")
    if len(dominant) != k or any(not 0 <= v < w_dec.shape[1] for v in dominant):
        raise ValueError(f"dominant_k needs one latent in [0, {w_dec.shape[1]}) per class ({k})")
    unknown = [name for name in methods if name not in METHODS + SAE_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS + SAE_METHODS}")
    if sae is None and set(methods) & set(SAE_METHODS):
        raise ValueError(f"{sorted(set(methods) & set(SAE_METHODS))} need the SAE: pass sae=")
    shifted = {}
    for kind, acts in (shifted_val_acts or {}).items():
        if kind not in SHIFTS:
            raise ValueError(f"unknown shift {kind!r}; choose from {SHIFTS}")
        shifted[kind] = _acts64(acts, m, f"shifted ({kind})")
        if shifted[kind].shape[0] != x_val.shape[0]:
            raise ValueError(f"shifted ({kind}) activations must match the val set's N")

    preds_val = (x_val @ w.T + b).argmax(1)
    base = per_class_accuracy(preds_val, y_val, k)
    evaluated = _evaluated_classes(base, min_base_accuracy)
    left_out = [c for c in range(k) if c not in evaluated]
    preds_shift = {kind: (xs @ w.T + b).argmax(1) for kind, xs in shifted.items()}
    base_shift = {kind: per_class_accuracy(p, y_val, k) for kind, p in preds_shift.items()}

    per_class: dict[str, dict[str, dict[str, float]]] = {name: {} for name in methods}
    latents: dict[str, dict[str, int]] = {}
    probes = dict(known_probes or {})
    basis = LeaceBasis.fit(x_train) if "leace" in methods and evaluated else None
    for target in evaluated:
        latents[str(target)] = {"dominant": dominant[target]}
        for name in methods:
            edit = build_edit(
                name,
                w,
                b,
                target,
                dominant[target],
                w_dec,
                b_dec_m,
                x_train,
                y_train,
                projection_alpha=projection_alpha,
                paper_alpha=paper_alpha,
                seed=seed,
                leace_basis=basis,
                sae=sae,
                steer_alpha=steer_alpha,
            )
            if name == "random_latent":
                latents[str(target)]["random"] = random_other_latent(
                    w_dec, dominant[target], seed, target
                )
            out = prediction_metrics(preds_val, edit.logits(x_val).argmax(1), y_val, target, k)
            if shifted:
                per_kind = {
                    kind: float(
                        base_shift[kind][target]
                        - per_class_accuracy(edit.logits(xs).argmax(1), y_val, k)[target]
                    )
                    for kind, xs in shifted.items()
                }
                out["generalisation"] = float(np.mean(list(per_kind.values())))
                out |= {f"generalisation_{kind}": v for kind, v in per_kind.items()}
            if probe:
                key = _probe_key(name, edit, target)
                if key is not None and key in probes:
                    out["probe_recovery"] = probes[key]
                else:
                    out["probe_recovery"] = _edit_probe(
                        edit, x_train, y_train, x_val, y_val, target, probe_max_iter
                    )
                    if key is not None:
                        probes[key] = out["probe_recovery"]
            per_class[name][str(target)] = out

    means = {name: _mean_over_classes(list(per_class[name].values())) for name in methods}
    return {
        "methods": means,
        "per_class": per_class,
        "evaluated_classes": evaluated,
        "left_out_classes": left_out,
        "base_accuracy": [float(v) for v in base.tolist()],
        "base_accuracy_shifted": {
            kind: [float(v) for v in acc.tolist()] for kind, acc in base_shift.items()
        },
        "latents": latents,
        "settings": {
            "projection_alpha": projection_alpha,
            "paper_alpha": paper_alpha,
            "min_base_accuracy": min_base_accuracy,
            "seed": seed,
        }
        | ({"steer_alpha": steer_alpha} if "salve_steer" in methods else {}),
    }


# Methods whose representation does not depend on the SAE (nor on the seed): their probe
# recovery is the same for every SAE seed of one evaluation.
SEED_FREE_REPRESENTATIONS = ("mean_difference", "leace")


def _probe_key(method: str, edit: MethodEdit, target: int) -> str | None:
    """The cache key of a probe value shared across SAE seeds, None for one that is not."""
    if edit.representation.is_identity:
        return f"identity/{target}"
    return f"{method}/{target}" if method in SEED_FREE_REPRESENTATIONS else None


def seed_free_probes(
    weight_km: torch.Tensor,
    bias_k: torch.Tensor,
    train_acts_nm: torch.Tensor,
    train_labels_n: torch.Tensor,
    val_acts_nm: torch.Tensor,
    val_labels_n: torch.Tensor,
    *,
    projection_alpha: float,
    min_base_accuracy: float,
    probe_max_iter: int = 500,
) -> dict[str, float]:
    """The probe recoveries that every SAE seed shares (the unedited representation, and the
    mean-difference and LEACE edits of each evaluated class), computed once for
    ``evaluate_seed(known_probes=...)``: a third of the logistic fits of a 5-seed evaluation.
    Same inputs, same numbers as evaluate_seed computes them itself."""
    w, b = _head64(weight_km, bias_k)
    k, m = w.shape
    x_train, x_val = _acts64(train_acts_nm, m, "train"), _acts64(val_acts_nm, m, "val")
    y_train, y_val = _labels(train_labels_n, x_train, k), _labels(val_labels_n, x_val, k)
    base = per_class_accuracy((x_val @ w.T + b).argmax(1), y_val, k)
    no_sae = torch.zeros(m, 1, dtype=F64)  # the SAE-free methods do not read it
    out: dict[str, float] = {}
    evaluated = _evaluated_classes(base, min_base_accuracy)
    basis = LeaceBasis.fit(x_train) if evaluated else None
    for target in evaluated:
        for name in ("zero_row", *SEED_FREE_REPRESENTATIONS):
            edit = build_edit(
                name, w, b, target, 0, no_sae, torch.zeros(m, dtype=F64), x_train, y_train,
                projection_alpha=projection_alpha, paper_alpha=0.0, seed=0, leace_basis=basis,
            )  # fmt: skip
            key = _probe_key(name, edit, target)
            out[key] = _edit_probe(edit, x_train, y_train, x_val, y_val, target, probe_max_iter)
    return out


def _edit_probe(edit: MethodEdit, x_train, y_train, x_val, y_val, target: int, max_iter: int):
    """probe_recovery on the representation ``edit`` makes of the train and val activations."""
    return probe_recovery(
        edit.represent(x_train), y_train, edit.represent(x_val), y_val, target, max_iter=max_iter
    )


def _evaluated_classes(base_accuracy_k: torch.Tensor, min_base_accuracy: float) -> list[int]:
    """Classes at or above ``min_base_accuracy`` before any edit (a failing class cannot be
    suppressed)."""
    return [c for c, acc in enumerate(base_accuracy_k.tolist()) if acc >= min_base_accuracy]


def _acts64(acts_nm: torch.Tensor, m: int, what: str) -> torch.Tensor:
    if acts_nm.dim() != 2 or acts_nm.shape[1] != m:
        raise ValueError(f"{what} activations must be [N, M={m}], got {tuple(acts_nm.shape)}")
    return acts_nm.detach().to(F64)


def _labels(labels_n: torch.Tensor, acts_nm: torch.Tensor, k: int) -> torch.Tensor:
    labels = torch.as_tensor(labels_n).to(torch.int64).reshape(-1)
    if labels.shape[0] != acts_nm.shape[0]:
        raise ValueError("labels and activations disagree on N")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    return labels


def _mean_over_classes(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    out = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[key] = float(finite.mean()) if finite.size else math.nan
    return out


# --- seeds and stability ---------------------------------------------------------------------


def mean_ci95(values: Sequence[float] | np.ndarray | torch.Tensor) -> dict:
    """Mean and two-sided 95 % Student-t interval over seeds, ``mean +- t_{0.975, n-1} s/sqrt(n)``
    (``s`` the sample standard deviation). NaNs are ignored; ``n`` counts the rest. One value
    gives a zero-width interval (no spread is measurable); none gives nan everywhere."""
    arr = np.asarray(torch.as_tensor(values, dtype=F64).reshape(-1).numpy(), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    if n == 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "n": 0}
    mean = float(arr.mean())
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def summarise_methods(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """``{method: {metric: mean_ci95 over seeds}}`` from one ``{method: {metric: value}}`` per
    seed (e.g. ``evaluate_seed(...)["methods"]``); a metric a seed lacks counts as nan."""
    methods = list(dict.fromkeys(name for seed in per_seed for name in seed))
    out = {}
    for name in methods:
        metrics = list(dict.fromkeys(key for seed in per_seed for key in seed.get(name, {})))
        out[name] = {
            key: mean_ci95([seed.get(name, {}).get(key, math.nan) for seed in per_seed])
            for key in metrics
        }
    return out


def feature_stability(
    w_dec_ref_ml: torch.Tensor,
    w_dec_ml: torch.Tensor,
    dominant_ref_k: Sequence[int] | torch.Tensor,
    dominant_k: Sequence[int] | torch.Tensor,
    threshold: float = 0.9,
) -> dict:
    """Match one seed's decoder columns to a reference seed's (Hungarian, on |cosine|).

    Sign-blind (a latent and its negation are the same feature for a signed SAE), one-to-one.
    ``matched_fraction``: reference latents whose match has |cosine| > ``threshold``.
    ``dominant_match[k]``: class k's dominant latent in this seed is the match of its dominant
    latent in the reference. Zero columns (dead latents) have cosine 0 with everything.
    """
    # salve.matching: the one matching of compare, nightly and study too (same assignment).
    matching = match_latents(decoder_cosines(w_dec_ref_ml, w_dec_ml), threshold, DECODER_COSINE)
    cos_abs, match, matched_cos = matching.abs_similarity, matching.match_a, matching.scores_a
    dom_ref = [int(v) for v in torch.as_tensor(dominant_ref_k).reshape(-1).tolist()]
    dom = [int(v) for v in torch.as_tensor(dominant_k).reshape(-1).tolist()]
    if len(dom_ref) != len(dom):
        raise ValueError("dominant_ref_k and dominant_k need one latent per class each")
    dominant_match = [bool(match[r] == d) for r, d in zip(dom_ref, dom, strict=True)]
    return {
        "threshold": threshold,
        "matched_fraction": float((matched_cos > threshold).mean()),
        "mean_matched_abs_cosine": float(matched_cos.mean()),
        "dominant_match": dominant_match,
        "dominant_match_fraction": float(np.mean(dominant_match)) if dominant_match else math.nan,
        "dominant_abs_cosine": [float(cos_abs[r, d]) for r, d in zip(dom_ref, dom, strict=True)],
        "match": [int(v) for v in match.tolist()],
    }


# --- shifted images --------------------------------------------------------------------------


def shift_images(images_u8: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """A held-out "style" of uint8 images [N, 3, S, S], for the generalisation metric.

    ``noise``: additive Gaussian, sigma = 0.1 of the range (25.5 grey levels), each image from
    its own seeded stream. ``blur``: Gaussian, sigma 1 px, radius 3, edges replicated (no
    randomness: the seed is unused). ``jitter``: per image, brightness, contrast and saturation
    factors drawn from [0.7, 1.3], applied in that order with clamping after each (contrast
    blends with the image's mean grey, saturation with each pixel's grey). Deterministic for a
    seed; pure torch; returns uint8. :class:`ShiftedRows` makes the same images batch by batch.
    """
    return ShiftedRows(images_u8, kind, seed)[:]


class ShiftedRows:
    """``shift_images`` of a split, made one row slice at a time: ``rows[a:b]`` is exactly
    ``shift_images(images)[a:b]`` (per-image noise streams; the jitter factors of every image
    drawn up front), so the images may be ``TensorRows`` and a split of any size is shifted
    with one batch in memory (``salve.activations.extract_activations`` walks row slices)."""

    def __init__(self, images_u8: torch.Tensor | TensorRows, kind: str, seed: int) -> None:
        if kind not in SHIFTS:
            raise ValueError(f"unknown shift {kind!r}; choose from {SHIFTS}")
        shape = tuple(images_u8.shape)
        if images_u8.dtype != torch.uint8 or len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"images_u8 must be uint8 [N, 3, H, W], got {images_u8.dtype} {shape}")
        self.images, self.kind, self.shape, self.dtype = images_u8, kind, shape, torch.uint8
        self._noise_seed = _seed_int(seed, "noise")
        self._factors_n3 = None
        if kind == "jitter":
            g = torch.Generator().manual_seed(_seed_int(seed, "jitter"))
            self._factors_n3 = 0.7 + 0.6 * torch.rand(shape[0], 3, generator=g, dtype=torch.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"ShiftedRows reads row slices rows[a:b] only, got {index!r}")
        lo, hi, _ = index.indices(self.shape[0])
        hi = max(lo, hi)
        x = self.images[lo:hi].to(torch.float32)
        if self.kind == "noise":
            noise = torch.empty_like(x)
            for j in range(hi - lo):
                g = torch.Generator().manual_seed(self._noise_seed + lo + j)
                noise[j] = torch.randn(x.shape[1:], generator=g, dtype=torch.float32)
            out = x + 25.5 * noise
        elif self.kind == "blur":
            out = _gaussian_blur(x, sigma=1.0, radius=3)
        else:
            out = _colour_jitter(x / 255.0, self._factors_n3[lo:hi]) * 255.0
        return out.round().clamp(0, 255).to(torch.uint8)


def _seed_int(seed: int, what: str) -> int:
    return int(_rng(seed, 0, what).integers(2**62))


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    cols = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), rows, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), cols, groups=c)


def _grey(x: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _colour_jitter(x: torch.Tensor, factors_n3: torch.Tensor) -> torch.Tensor:
    bright, contrast, saturation = (factors_n3[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * bright).clamp(0, 1)
    mean_grey = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean_grey).clamp(0, 1)
    return (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 1)
