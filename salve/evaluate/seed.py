"""The whole evaluation of one SAE seed: every method x metric over the evaluated classes,
and the probe recoveries that every seed shares."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from salve.editing import evaluated_classes
from salve.evaluate.metrics import per_class_accuracy, prediction_metrics, probe_recovery
from salve.evaluate.shifts import SHIFTS
from salve.methods import (
    F64,
    METHODS,
    SAE_METHODS,
    STEER_ALPHA,
    LeaceBasis,
    MethodEdit,
    build_edit,
    head64,
    random_other_latent,
)


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
    shifted_rows: torch.Tensor | None = None,
    methods: Sequence[str] | None = None,
    probe: bool = True,
    probe_max_iter: int = 500,
    train_sample: int | None = None,
    known_probes: Mapping[str, float] | None = None,
    sae=None,
    steer_alpha: float = STEER_ALPHA,
) -> dict:
    """Every method x metric for one SAE seed; feed a list of its ``["methods"]`` to
    :func:`summarise_methods`.

    Only classes with base val accuracy >= ``min_base_accuracy`` are evaluated (a failing class
    cannot be suppressed). ``shifted_val_acts`` maps a shift kind to the activations of the
    shifted val images (same order and labels as ``val_acts_nm``, or as its ``shifted_rows``
    when the shifted images are a sample of val: :func:`sample_rows`); with it, ``generalisation``
    (mean over kinds) and ``generalisation_<kind>`` are the efficacy on those. The baselines
    fitted on train activations (mean difference, LEACE) and the probes use at most
    ``train_sample`` train rows (:func:`train_rows`). ``probe=False`` skips
    ``probe_recovery`` (the costly part); ``known_probes`` (from :func:`seed_free_probes` on
    the same inputs) supplies the values that do not depend on the SAE. Returns a JSON-able
    dict: ``methods`` (metric means over the evaluated classes), ``per_class``,
    ``evaluated_classes``, ``left_out_classes``, ``base_accuracy``, ``latents`` (dominant and
    random latent per class). ``sae``: the SAE of ``w_dec_ml``/``b_dec_m``; with it the default
    ``methods`` include ``salve_steer`` (at ``steer_alpha``), which needs its encode rule.
    """
    if methods is None:
        methods = METHODS + SAE_METHODS if sae is not None else METHODS
    w, b = head64(weight_km, bias_k)
    k, m = w.shape
    x_train, y_train = _train_sample64(train_acts_nm, train_labels_n, m, k, train_sample)
    x_val = _acts64(val_acts_nm, m, "val")
    y_val = _labels(val_labels_n, x_val, k)
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
    y_shift = (
        y_val if shifted_rows is None else y_val[torch.as_tensor(shifted_rows, dtype=torch.long)]
    )
    for kind, acts in (shifted_val_acts or {}).items():
        if kind not in SHIFTS:
            raise ValueError(f"unknown shift {kind!r}; choose from {SHIFTS}")
        shifted[kind] = _acts64(acts, m, f"shifted ({kind})")
        if shifted[kind].shape[0] != y_shift.shape[0]:
            raise ValueError(f"shifted ({kind}) activations must match the val rows shifted")

    preds_val = (x_val @ w.T + b).argmax(1)
    base = per_class_accuracy(preds_val, y_val, k)
    evaluated = evaluated_classes(base, min_base_accuracy)
    left_out = [c for c in range(k) if c not in evaluated]
    preds_shift = {kind: (xs @ w.T + b).argmax(1) for kind, xs in shifted.items()}
    base_shift = {kind: per_class_accuracy(p, y_shift, k) for kind, p in preds_shift.items()}

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
                        - per_class_accuracy(edit.logits(xs).argmax(1), y_shift, k)[target]
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
    train_sample: int | None = None,
) -> dict[str, float]:
    """The probe recoveries that every SAE seed shares (the unedited representation, and the
    mean-difference and LEACE edits of each evaluated class), computed once for
    ``evaluate_seed(known_probes=...)``: a third of the logistic fits of a 5-seed evaluation.
    Same inputs, same numbers as evaluate_seed computes them itself."""
    w, b = head64(weight_km, bias_k)
    k, m = w.shape
    x_train, y_train = _train_sample64(train_acts_nm, train_labels_n, m, k, train_sample)
    x_val = _acts64(val_acts_nm, m, "val")
    y_val = _labels(val_labels_n, x_val, k)
    base = per_class_accuracy((x_val @ w.T + b).argmax(1), y_val, k)
    no_sae = torch.zeros(m, 1, dtype=F64)  # the SAE-free methods do not read it
    out: dict[str, float] = {}
    evaluated = evaluated_classes(base, min_base_accuracy)
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


# evaluate's train rows are drawn with this seed, the same for every method, class and SAE seed:
# every fit of one evaluation sees the same rows, so the seed-free probes are shared.
TRAIN_ROWS_SEED = 0


def train_rows(n: int, sample: int | None) -> slice | torch.Tensor:
    """The train rows evaluate fits on (the mean-difference and LEACE baselines, the probes):
    all of them up to ``sample``, else ``sample`` rows drawn without replacement (seeded, in
    ascending order). Their cost and memory then stop growing with the data: probe recovery is a
    balanced accuracy, and class means and a covariance, which a few thousand rows estimate."""
    if sample is None or n <= sample:
        return slice(None)
    return sample_rows(n, sample, TRAIN_ROWS_SEED)


def sample_rows(n: int, sample: int, seed: int) -> torch.Tensor:
    """``min(n, sample)`` distinct rows of ``n``, seeded, in ascending order (all rows when
    ``n <= sample``)."""
    if n <= sample:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:sample].sort().values


def _edit_probe(edit: MethodEdit, x_train, y_train, x_val, y_val, target: int, max_iter: int):
    """probe_recovery on the representation ``edit`` makes of the train and val activations."""
    return probe_recovery(
        edit.represent(x_train), y_train, edit.represent(x_val), y_val, target, max_iter=max_iter
    )


def _train_sample64(
    acts_nm: torch.Tensor, labels_n: torch.Tensor, m: int, k: int, sample: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The train rows evaluate fits on (:func:`train_rows`), in float64, with their labels:
    only the sample is ever copied, so a job's memory stops growing with the data."""
    labels = _labels(labels_n, acts_nm, k)
    rows = train_rows(acts_nm.shape[0], sample)
    return _acts64(acts_nm[rows], m, "train"), labels[rows]


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
