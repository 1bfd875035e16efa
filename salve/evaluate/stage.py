"""The evaluate stage's analysis: one seed's fit and evaluation, and the stage's metrics.

`evaluate.seeds` SAEs with seeds common.seed, common.seed + 1, ...: the first is the pipeline's
own SAE (fit_sae's, fitted with common.seed from the same activations), the others are fitted
per seed (:func:`fit_and_evaluate`). Every metric is a mean with a 95 % interval over seeds, and
decoder columns are matched across seeds for feature stability, against the pipeline's SAE.
Each seed's work uses one torch thread, so the results do not depend on where it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from salve.activations import extract_activations
from salve.config import Config
from salve.evaluate.intervals import summarise_methods
from salve.evaluate.metrics import cross_class_accuracy_change
from salve.evaluate.seed import evaluate_seed, seed_free_probes
from salve.evaluate.shifts import SHIFTS, ShiftedRows
from salve.io import TensorRows
from salve.methods import METHODS, SAE_METHODS, STEER_ALPHA
from salve.ranking import class_mean_codes, dominant_features
from salve.runtime import pin_cpu_kernels
from salve.sae import SparseAutoencoder, fit_sae


def one_thread_probes(
    weight: torch.Tensor, bias: torch.Tensor, train: tuple, val: tuple, cfg: Config
) -> dict[str, float]:
    """:func:`seed_free_probes` with one torch thread, as in every job: the same numbers
    wherever a probe is fitted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return seed_free_probes(
            weight, bias, *train, *val,
            projection_alpha=cfg.evaluate.projection_alpha,
            min_base_accuracy=cfg.edit.min_base_accuracy,
            train_sample=cfg.evaluate.train_sample,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def fit_and_evaluate(job: dict) -> dict:
    """One seed: fit an SAE (unless ``job["fitted"]`` holds one), find each class's dominant
    latent, evaluate every method.

    Self-contained (its inputs travel in ``job``), so a Dask worker can run it. One torch
    thread: the same bytes wherever it runs.
    """
    pin_cpu_kernels(job["reproducible"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_acts, train_labels = job["train_acts"], job["train_labels"]
        sae = job.get("fitted")
        if sae is None:
            sae, _ = fit_sae(train_acts, job["sae"], seed=job["seed"], progress=False)
        dominant = dominant_latents(sae, train_acts, train_labels, job["weight"].shape[0])
        result = evaluate_seed(
            job["weight"], job["bias"], train_acts, train_labels, job["val_acts"],
            job["val_labels"], sae.W_dec.detach(), sae.b_dec.detach(), dominant,
            projection_alpha=job["projection_alpha"], paper_alpha=job["paper_alpha"],
            min_base_accuracy=job["min_base_accuracy"], seed=job["seed"],
            shifted_val_acts=job["shifted"], shifted_rows=job["shifted_rows"],
            known_probes=job["known_probes"],
            train_sample=job["train_sample"],
            sae=sae,  # salve_steer reads its encode rule
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {
        "seed": job["seed"],
        "result": result,
        "dominant": [int(d) for d in dominant.tolist()],
        "w_dec": sae.W_dec.detach().clone(),
    }


def dominant_latents(
    sae: SparseAutoencoder, acts_nm: torch.Tensor, labels_n: torch.Tensor, k: int
) -> torch.Tensor:
    """Each class's dominant latent of ``sae`` on ``acts_nm`` (rank's rule)."""
    return dominant_features(class_mean_codes(sae.encode_batched(acts_nm), labels_n, k))


def shifted_activations(
    model: torch.nn.Module, images_u8: torch.Tensor | TensorRows, norm: dict, cfg: Config, device
) -> dict[str, torch.Tensor]:
    """Head inputs of the val images under each held-out style (one backbone pass each, the
    images read and shifted batch by batch)."""
    return {
        kind: extract_activations(
            model,
            ShiftedRows(images_u8, kind, cfg.common.seed),
            tuple(norm["mean"]),
            tuple(norm["std"]),
            batch_size=cfg.extract.batch_size,
            device=device,
            progress=False,
        )
        for kind in SHIFTS
    }


def cross_class_changes(
    weight: torch.Tensor,
    bias: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    sae: SparseAutoencoder,
    cross_class: Sequence[dict],
    classes: Sequence[str],
    alpha: float,
) -> list[dict]:
    """Cross-class latents of the pipeline's SAE: how each sharing class moves when one goes."""
    w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    return [
        {
            "feature": c["feature"],
            "class_change": {
                classes[int(k)]: v
                for k, v in cross_class_accuracy_change(
                    weight, bias, *val, w_dec, b_dec, c["feature"], c["classes"], alpha
                ).items()
            },
        }
        for c in cross_class
    ]


def method_rows(summary: dict) -> list[dict]:
    """plots/evaluate/methods.csv: one row per method and metric, mean and 95 % interval."""
    return [
        {"method": m, "metric": k, "mean": v["mean"], "lo": v["ci95"][0], "hi": v["ci95"][1]}
        for m in (*METHODS, *SAE_METHODS)
        for k, v in summary[m].items()
    ]


def evaluate_metrics(done: list[dict], cross: list[dict], classes: Sequence[str], cfg: Config):
    """metrics/evaluate.json from the seeds' results (sorted by seed, the pipeline's SAE first)
    and the cross-class table; returns ``(metrics, summary)``."""
    ev = cfg.evaluate
    stability = [{"seed": r["seed"]} | r["stability"] for r in done[1:]]
    summary = summarise_methods([r["result"]["methods"] for r in done])
    first = done[0]["result"]
    metrics = {
        "methods": summary,
        "seeds": len(done),
        "stability": {
            "threshold": stability[0]["threshold"] if stability else 0.9,
            "matched_fraction": _mean([s["matched_fraction"] for s in stability]),
            "dominant_match_fraction": _mean([s["dominant_match_fraction"] for s in stability]),
            "per_seed": [
                {k: s[k] for k in ("seed", "matched_fraction", "dominant_match_fraction")}
                for s in stability
            ],
        },
        "classes_evaluated": [classes[k] for k in first["evaluated_classes"]],
        "classes_left_out": [classes[k] for k in first["left_out_classes"]],
        "cross_class": cross,
        "settings": {
            "projection_alpha": ev.projection_alpha,
            "paper_alpha": ev.paper_alpha,
            "steer_alpha": STEER_ALPHA,
            "min_base_accuracy": cfg.edit.min_base_accuracy,
            "shifts": list(SHIFTS),
        },
    }
    return metrics, summary


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
