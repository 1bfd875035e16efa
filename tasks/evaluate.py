"""evaluate: SALVE's permanent edits against baselines, over SAE seeds, with standard metrics.

For every evaluated class and its dominant latent, on the same cached val activations: the two
SALVE rules (paper, centred projection), SALVE's activation steering (salve_steer: the latent
ablated at the head input) and the baselines (zeroing the class's head row, a random
direction, a random latent of the same SAE, the mean-difference direction, LEACE), measured by
efficacy, flip rate, specificity (mean and worst), generalisation to shifted images (noise, blur,
colour jitter: backbone passes on the shifted val images, cached here) and probe recovery
(salve/evaluate.py). `evaluate.seeds` SAEs with seeds common.seed, common.seed + 1, ...: the
first is the pipeline's own SAE (fit_sae's, fitted with common.seed from the same activations),
the others are fitted here. Every metric is a mean with a 95 % interval over seeds, and decoder
columns are matched across seeds (Hungarian on |cosine|) for feature stability, against the
pipeline's SAE. Reusing it saves one fit and, on two cores, one round of two parallel fits.

The probe recoveries that do not depend on the SAE (unedited, mean difference, LEACE) are fitted
once here and handed to every seed. The per-seed work (fit + evaluation + matching to the
pipeline's SAE) is independent: `run` maps `seed_job` over one job per seed with ``map_fn``,
serially by default, and the flow passes a Dask-backed map (flows/fanout.py). A job carries the
repository's path and small parameters, no tensor: the worker reads extract's activations,
finetune's head, fit_sae's SAE and the shifted activations this stage writes before the fan-out,
and sends back numbers. (Jobs that held the arrays put them all into every Dask task's graph:
5.9 MiB a task on digits, 12.9 MiB at 4k images. A job is now about 1 kB, a task's graph 19 kiB,
mostly Prefect's context, whatever the number of images.) Each job uses one torch thread wherever
it runs, so the results do not depend on how it was scheduled.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from salve.activations import extract_activations
from salve.config import Config
from salve.evaluate import (
    METHODS,
    SAE_METHODS,
    SHIFTS,
    STEER_ALPHA,
    ShiftedRows,
    cross_class_accuracy_change,
    evaluate_seed,
    feature_stability,
    seed_free_probes,
    summarise_methods,
)
from salve.io import ArtifactError, TensorRows, load_tensors, save_tensors, write_json
from salve.models import head_of, head_path
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
    require,
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
        dominant = dominant_latents(sae, train_acts, train_labels, job["weight"].shape[0])
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
            sae=sae,  # salve_steer reads its encode rule
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "seed": job["seed"],
        "result": result,
        "dominant": [int(d) for d in dominant.tolist()],
        "w_dec": sae.W_dec.detach().clone(),
    }


def dominant_latents(sae, acts_nm: torch.Tensor, labels_n: torch.Tensor, k: int) -> torch.Tensor:
    """Each class's dominant latent of ``sae`` on ``acts_nm`` (rank's rule)."""
    return dominant_features(class_mean_codes(sae.encode_batched(acts_nm), labels_n, k))


# What a seed's job hands on to fit_and_evaluate as it is.
_JOB_PARAMETERS = (
    "seed",
    "known_probes",
    "reproducible",
    "sae",
    "projection_alpha",
    "paper_alpha",
    "min_base_accuracy",
)


def seed_job(job: dict) -> dict:
    """One seed of the fan-out, as a Dask worker runs it: read the inputs, `fit_and_evaluate`,
    match the decoder to the pipeline SAE's (feature stability); numbers only come back.

    ``job`` names the repository (``root``: the same path on every worker) and the head's
    module (``head``), and carries small parameters: the seed-free probe values, the SAE
    settings, ``pipeline_sae`` (True for the first seed, whose SAE is fit_sae's). The worker
    reads extract's train and val activations, the head's two tensors of finetune's checkpoint,
    fit_sae's SAE and the shifted val activations `run` wrote before the fan-out: the bytes the
    flow holds, so the numbers are the same.
    """
    pin_cpu_kernels(job["reproducible"])  # before this worker's first tensor operation
    root = _worker_root(job["root"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_acts, train_labels = load_activations(root, "train")
        val_acts, val_labels = load_activations(root, "val")
        pipeline_sae, _ = load_sae(root)
        model = require(root, "finetune", "model")
        out = fit_and_evaluate(
            {k: job[k] for k in _JOB_PARAMETERS}
            | {
                "weight": TensorRows(model, f"{job['head']}.weight")[:],
                "bias": TensorRows(model, f"{job['head']}.bias")[:],
                "fitted": pipeline_sae if job["pipeline_sae"] else None,
                "train_acts": train_acts,
                "train_labels": train_labels,
                "val_acts": val_acts,
                "val_labels": val_labels,
                "shifted": load_shifted(root),
            }
        )
        stability = None
        if not job["pipeline_sae"]:  # the first seed is the reference
            k = len(out["dominant"])
            stability = feature_stability(
                pipeline_sae.W_dec.detach(),
                out["w_dec"],
                dominant_latents(pipeline_sae, train_acts, train_labels, k),
                out["dominant"],
            )
    finally:
        torch.set_num_threads(threads)
    return {k: out[k] for k in ("seed", "result", "dominant")} | {"stability": stability}


def _worker_root(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(
            f"{root}: no such folder on the Dask worker {socket.gethostname()}: a worker of an "
            "existing cluster ($SALVE_DASK_ADDRESS) needs this repository, with its results, at "
            "the same path as the salve process (docs/OPERATIONS.md)."
        )
    return root


def load_shifted(root: Path) -> dict[str, torch.Tensor]:
    """The shifted val activations `run` saved, in SHIFTS order (the order of their mean)."""
    path = STAGES["evaluate"].path(root, "shifted")
    tensors = load_tensors(path, [f"acts.{kind}" for kind in SHIFTS])
    return {kind: tensors[f"acts.{kind}"] for kind in SHIFTS}


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
    jobs = [  # paths and small parameters only (seed_job reads the activations)
        {
            "root": str(Path(root).resolve()),
            "head": head_path(model),  # its weight and bias are read from the checkpoint
            "seed": cfg.common.seed + i,
            "pipeline_sae": i == 0,
            "known_probes": known_probes,
            "reproducible": cfg.common.reproducible,
            "sae": cfg.sae,
            "projection_alpha": ev.projection_alpha,
            "paper_alpha": ev.paper_alpha,
            "min_base_accuracy": cfg.edit.min_base_accuracy,
        }
        for i in range(ev.seeds)
    ]
    done = sorted((map_fn or serial_map)(seed_job, jobs), key=lambda r: r["seed"])
    reference = done[0]
    stability = [{"seed": r["seed"]} | r["stability"] for r in done[1:]]
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
        {"seeds": [{k: v for k, v in r.items() if k != "stability"} for r in done]},
    )
    write_plot(
        root,
        "evaluate",
        "methods",
        [
            {"method": m, "metric": k, "mean": v["mean"], "lo": v["ci95"][0], "hi": v["ci95"][1]}
            for m in (*METHODS, *SAE_METHODS)
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
            "steer_alpha": STEER_ALPHA,
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
