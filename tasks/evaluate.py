"""evaluate: SALVE's permanent edits and steering against baselines, over SAE seeds, with
standard metrics (salve/evaluate/, the methods in salve/methods/).

For every evaluated class and its dominant latent, on the same cached val activations: the two
SALVE rules (paper, centred projection), SALVE's activation steering (salve_steer: the latent
ablated at the head input) and the baselines (zeroing the class's head row, a random
direction, a random latent of the same SAE, the mean-difference direction, LEACE), measured by
efficacy, flip rate, specificity (mean and worst), generalisation to shifted images (noise, blur,
colour jitter: backbone passes on the shifted val images, cached here) and probe recovery.

The probe recoveries that do not depend on the SAE (unedited, mean difference, LEACE) are fitted
once here and handed to every seed. The per-seed work (fit + evaluation + matching to the
pipeline's SAE) is independent: `run` maps `seed_job` over one job per seed with ``map_fn``,
serially by default, and the flow passes a Dask-backed map (flows/fanout.py). A job carries the
repository's path and small parameters, no tensor (about 1 kB, whatever the number of images):
the worker reads extract's activations, finetune's head, fit_sae's SAE and the shifted
activations this stage writes before the fan-out, and sends back numbers.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from salve.config import Config
from salve.evaluate import SHIFTS, feature_stability
from salve.evaluate.seed import sample_rows
from salve.evaluate.stage import (
    cross_class_changes,
    dominant_latents,
    evaluate_metrics,
    fit_and_evaluate,
    method_rows,
    one_thread_probes,
    shifted_activations,
)
from salve.io import ArtifactError, TensorRows, load_tensors, save_tensors, write_json
from salve.models import head_of, head_path
from salve.runtime import pin_cpu_kernels, resolve_device, seed_everything
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
from tasks.common import PartTimes, write_metrics, write_plot
from tasks.records import EvaluateMetrics

Mapper = Callable[[Callable[[dict], dict], Sequence[dict]], list[dict]]


def serial_map(fn: Callable[[dict], dict], jobs: Sequence[dict]) -> list[dict]:
    return [fn(job) for job in jobs]


# What a seed's job hands on to fit_and_evaluate as it is.
_JOB_PARAMETERS = (
    "seed",
    "known_probes",
    "train_sample",
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
        shifted, shifted_rows = load_shifted(root)
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
                "shifted": shifted,
                "shifted_rows": shifted_rows,
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


def load_shifted(root: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The shifted val activations `run` saved, in SHIFTS order (the order of their mean), and
    the val rows they were made of."""
    path = STAGES["evaluate"].path(root, "shifted")
    tensors = load_tensors(path, [*(f"acts.{kind}" for kind in SHIFTS), "rows"])
    return {kind: tensors[f"acts.{kind}"] for kind in SHIFTS}, tensors["rows"]


def run(cfg: Config, root: Path, progress: bool = True, map_fn: Mapper | None = None) -> dict:
    ev, spec = cfg.evaluate, STAGES["evaluate"]
    parts = PartTimes()
    device = resolve_device(cfg.common.device)
    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    classes = load_dataset_meta(root)["classes"]
    model, sidecar = load_model(root)
    head = head_of(model)
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    train = load_activations(root, "train")
    val = load_activations(root, "val")
    val_images, _ = open_split(root, "val")
    parts.lap("load")
    # The generalisation metric on a fixed-size sample of val: its cost stops growing with N.
    rows = sample_rows(val_images.shape[0], ev.shift_sample, cfg.common.seed)
    sampled = val_images if len(rows) == val_images.shape[0] else val_images[rows]
    shifted = shifted_activations(model, sampled, sidecar["normalisation"], cfg, device)
    save_tensors(
        spec.path(root, "shifted"), {f"acts.{k}": v for k, v in shifted.items()} | {"rows": rows}
    )
    parts.lap("shifted_images")
    known_probes = one_thread_probes(weight, bias, train, val, cfg)
    parts.lap("seed_free_probes")
    pipeline_sae, _ = load_sae(root)  # fitted with common.seed: the first seed's SAE
    jobs = [  # paths and small parameters only (seed_job reads the activations)
        {
            "root": str(Path(root).resolve()),
            "head": head_path(model),  # its weight and bias are read from the checkpoint
            "seed": cfg.common.seed + i,
            "pipeline_sae": i == 0,
            "known_probes": known_probes,
            "train_sample": ev.train_sample,
            "reproducible": cfg.common.reproducible,
            "sae": cfg.sae,
            "projection_alpha": ev.projection_alpha,
            "paper_alpha": ev.paper_alpha,
            "min_base_accuracy": cfg.edit.min_base_accuracy,
        }
        for i in range(ev.seeds)
    ]
    done = sorted((map_fn or serial_map)(seed_job, jobs), key=lambda r: r["seed"])
    parts.lap("seeds")  # the fan-out: SAE refits, every method's edits and probes per seed
    cross = cross_class_changes(
        weight, bias, val, pipeline_sae, load_ranking(root)["cross_class"], classes,
        ev.projection_alpha,
    )  # fmt: skip
    metrics, summary = evaluate_metrics(done, cross, classes, cfg)
    write_json(
        spec.path(root, "seeds"),
        {"seeds": [{k: v for k, v in r.items() if k != "stability"} for r in done]},
    )
    write_plot(root, "evaluate", "methods", method_rows(summary))
    parts.lap("cross_class_and_write")
    write_metrics(root, "evaluate", EvaluateMetrics, metrics, run=parts.record())
    salve_projection = summary["salve_projection"]
    return {
        "seeds": len(done),
        "efficacy": salve_projection["efficacy"]["mean"],
        "specificity_mean": salve_projection["specificity_mean"]["mean"],
    }
