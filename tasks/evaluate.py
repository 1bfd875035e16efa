"""evaluate: SALVE's permanent edits against baselines, over SAE seeds, with standard metrics.

For every evaluated class and its dominant latent, on the same cached val activations: the two
SALVE rules (paper, centred projection) and the baselines (zeroing the class's head row, a random
direction, a random latent of the same SAE, the mean-difference direction, LEACE), measured by
efficacy, flip rate, specificity (mean and worst), generalisation to shifted images (noise, blur,
colour jitter: backbone passes on the shifted val images, cached here) and probe recovery
(salve/evaluate.py). `evaluate.seeds` SAEs with seeds common.seed, common.seed + 1, ...: the
first is the pipeline's own SAE (fit_sae's, fitted with common.seed from the same activations),
the others are fitted here. Every metric is a mean with a 95 % interval over seeds, and decoder
columns are matched across seeds (Hungarian on |cosine|) for feature stability, against the
pipeline's SAE. Reusing it saves one fit and, on two cores, one round of two parallel fits.

The probe recoveries that do not depend on the SAE (unedited, mean difference, LEACE) are fitted
once here and handed to every seed. The per-seed work (fit + evaluation) is independent: `run`
maps it with ``map_fn``, serially by default, and the flow passes a Dask-backed map
(flows/fanout.py). Each fit uses one torch thread wherever it runs, so the results do not depend
on how it was scheduled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from salve.activations import extract_activations
from salve.config import Config
from salve.evaluate import (
    METHODS,
    SHIFTS,
    ShiftedRows,
    cross_class_accuracy_change,
    evaluate_seed,
    feature_stability,
    seed_free_probes,
    summarise_methods,
)
from salve.io import TensorRows, save_tensors, write_json
from salve.models import head_of
from salve.ranking import class_mean_codes, dominant_features
from salve.runtime import pin_cpu_kernels, resolve_device, seed_everything
from salve.sae import fit_sae
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_ranking,
    load_sae,
    open_split,
)
from tasks.common import write_metrics, write_plot
from tasks.records import EvaluateMetrics

Mapper = Callable[[Callable[[dict], dict], Sequence[dict]], list[dict]]


def serial_map(fn: Callable[[dict], dict], jobs: Sequence[dict]) -> list[dict]:
    return [fn(job) for job in jobs]


def fit_and_evaluate(job: dict) -> dict:
    """One seed: fit an SAE (unless ``job["fitted"]`` holds one), find each class's dominant
    latent, evaluate every method.

    Module-level and self-contained (its inputs travel in ``job``), so a Dask worker can run it.
    One torch thread: the same bytes wherever it runs.
    """
    pin_cpu_kernels(job["reproducible"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_acts, train_labels = job["train_acts"], job["train_labels"]
        sae = job.get("fitted")
        if sae is None:
            sae, _ = fit_sae(train_acts, job["sae"], seed=job["seed"], progress=False)
        codes = sae.encode_batched(train_acts)
        num_classes = job["weight"].shape[0]
        dominant = dominant_features(class_mean_codes(codes, train_labels, num_classes))
        result = evaluate_seed(
            job["weight"],
            job["bias"],
            train_acts,
            train_labels,
            job["val_acts"],
            job["val_labels"],
            sae.W_dec.detach(),
            sae.b_dec.detach(),
            dominant,
            projection_alpha=job["projection_alpha"],
            paper_alpha=job["paper_alpha"],
            min_base_accuracy=job["min_base_accuracy"],
            seed=job["seed"],
            shifted_val_acts=job["shifted"],
            known_probes=job["known_probes"],
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "seed": job["seed"],
        "result": result,
        "dominant": [int(d) for d in dominant.tolist()],
        "w_dec": sae.W_dec.detach().clone(),
    }


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


def run(cfg: Config, root: Path, progress: bool = True, map_fn: Mapper | None = None) -> dict:
    ev = cfg.evaluate
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    classes = load_dataset_meta(root)["classes"]
    model, sidecar = load_model(root)
    head = head_of(model)
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    train_acts, train_labels = load_activations(root, "train")
    val_acts, val_labels = load_activations(root, "val")
    val_images, _ = open_split(root, "val")
    shifted = shifted_activations(model, val_images, sidecar["normalisation"], cfg, device)
    spec = STAGES["evaluate"]
    save_tensors(spec.path(root, "shifted"), {f"acts.{k}": v for k, v in shifted.items()})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every job: the same numbers wherever a probe is fitted
    try:
        known_probes = seed_free_probes(
            weight,
            bias,
            train_acts,
            train_labels,
            val_acts,
            val_labels,
            projection_alpha=ev.projection_alpha,
            min_base_accuracy=cfg.edit.min_base_accuracy,
        )
    finally:
        torch.set_num_threads(threads)
    pipeline_sae, _ = load_sae(root)  # fitted with common.seed: the first seed's SAE
    jobs = [
        {
            "seed": cfg.common.seed + i,
            "fitted": pipeline_sae if i == 0 else None,
            "known_probes": known_probes,
            "reproducible": cfg.common.reproducible,
            "sae": cfg.sae,
            "train_acts": train_acts,
            "train_labels": train_labels,
            "val_acts": val_acts,
            "val_labels": val_labels,
            "weight": weight,
            "bias": bias,
            "shifted": shifted,
            "projection_alpha": ev.projection_alpha,
            "paper_alpha": ev.paper_alpha,
            "min_base_accuracy": cfg.edit.min_base_accuracy,
        }
        for i in range(ev.seeds)
    ]
    done = sorted((map_fn or serial_map)(fit_and_evaluate, jobs), key=lambda r: r["seed"])
    reference = done[0]
    stability = [
        {"seed": r["seed"]}
        | feature_stability(reference["w_dec"], r["w_dec"], reference["dominant"], r["dominant"])
        for r in done[1:]
    ]
    summary = summarise_methods([r["result"]["methods"] for r in done])

    # Cross-class latents of the pipeline's SAE: how each sharing class moves when one goes.
    sae = pipeline_sae
    cross = [
        {
            "feature": c["feature"],
            "class_change": {
                classes[int(k)]: v
                for k, v in cross_class_accuracy_change(
                    weight,
                    bias,
                    val_acts,
                    val_labels,
                    sae.W_dec.detach(),
                    sae.b_dec.detach(),
                    c["feature"],
                    c["classes"],
                    ev.projection_alpha,
                ).items()
            },
        }
        for c in load_ranking(root)["cross_class"]
    ]
    first = reference["result"]
    write_json(
        spec.path(root, "seeds"),
        {"seeds": [{k: v for k, v in r.items() if k != "w_dec"} for r in done]},
    )
    write_plot(
        root,
        "evaluate",
        "methods",
        [
            {"method": m, "metric": k, "mean": v["mean"], "lo": v["ci95"][0], "hi": v["ci95"][1]}
            for m in METHODS
            for k, v in summary[m].items()
        ],
    )
    metrics: EvaluateMetrics = {
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
            "min_base_accuracy": cfg.edit.min_base_accuracy,
            "shifts": list(SHIFTS),
        },
    }
    write_metrics(root, "evaluate", EvaluateMetrics, metrics)
    salve_projection = summary["salve_projection"]
    return {
        "seeds": len(done),
        "efficacy": salve_projection["efficacy"]["mean"],
        "specificity_mean": salve_projection["specificity_mean"]["mean"],
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
