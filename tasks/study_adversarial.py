"""Study stage `study_adversarial`: does a low alpha_crit predict adversarial vulnerability?

Per correctly classified val sample (``study.attack_per_class`` per class), the smallest L-inf
and L2 perturbation that flips it (salve/study/vulnerability.py), against its exact alpha_crit
(the alpha_crit stage), with bootstrap CIs. One job per (class, norm).
"""

from __future__ import annotations

from pathlib import Path

import torch

from salve.config import Config
from salve.io import ArtifactError, load_tensors
from salve.models import head_of
from salve.study.vulnerability import attack_sizes, select_attack_samples, vulnerability_summary
from tasks import STAGES
from tasks.artifacts import (
    load_activations,
    load_dataset_meta,
    load_model,
    load_split,
    require,
)
from tasks.study_common import (
    Mapper,
    common_job,
    normalisation,
    serial_map,
    worker_root,
    worker_setup,
    write_part,
)

NAME = "study_adversarial"
NORMS = ("linf", "l2")


def attack_job(job: dict) -> list[float]:
    """The smallest flipping size of each sample of ``job["indices"]`` under ``job["norm"]``."""
    worker_setup(job["reproducible"], job["seed"])
    root = worker_root(job["root"])
    model, sidecar = load_model(root)
    images, labels = load_split(root, "val")
    idx = torch.tensor(job["indices"], dtype=torch.int64)
    mean, std = normalisation(sidecar)
    eps = attack_sizes(
        model,
        images[idx],
        labels[idx],
        mean,
        std,
        norm=job["norm"],
        eps_max=job["eps_max"],
        steps=job["attack_steps"],
        bisection_steps=job["attack_bisection_steps"],
        n_targets=job["attack_targets"],
    )
    return [float(v) for v in eps.tolist()]


def run(cfg: Config, root: Path, progress: bool = True, map_fn: Mapper | None = None) -> dict:
    s = cfg.study
    classes = list(load_dataset_meta(root)["classes"])
    acts, labels = load_activations(root, "val")
    head = head_of(load_model(root)[0])
    with torch.no_grad():
        preds = (acts @ head.weight.T + head.bias).argmax(1)
    alpha = load_tensors(require(root, "alpha_crit", "values"))
    if not torch.equal(alpha["labels"], labels):
        raise ArtifactError(
            f"{STAGES['alpha_crit'].path(root, 'values')} and the val activations disagree on the "
            "labels: they come from different runs; rerun the pipeline (`salve run`)"
        )
    plan = select_attack_samples(preds, labels, s.attack_per_class, cfg.common.seed)
    attacked = [k for k in sorted(plan) if plan[k]]
    jobs = [
        {
            "root": str(Path(root).resolve()),
            "indices": plan[k],
            "norm": norm,
            "eps_max": getattr(s, f"eps_max_{norm}"),
            "attack_steps": s.attack_steps,
            "attack_bisection_steps": s.attack_bisection_steps,
            "attack_targets": s.attack_targets,
            **common_job(cfg),
        }
        for k in attacked
        for norm in NORMS
    ]
    sizes = (map_fn or serial_map)(attack_job, jobs)
    eps = {
        norm: [v for job, r in zip(jobs, sizes, strict=True) if job["norm"] == norm for v in r]
        for norm in NORMS
    }
    index = [i for k in attacked for i in plan[k]]
    idx = torch.tensor(index, dtype=torch.int64)
    picked = {name: alpha[f"alpha_{name}"][idx] for name in ("exact", "linear", "empirical")}
    record = vulnerability_summary(
        picked["exact"],
        eps,
        labels[idx],
        classes,
        n_boot=s.bootstrap,
        seed=cfg.common.seed,
        alternatives={"linear": picked["linear"], "empirical": picked["empirical"]},
    )
    summary = {norm: record[norm] for norm in NORMS}
    record["samples"] = {
        "index": index,
        "label": [int(v) for v in labels[idx].tolist()],
        "alpha_exact": [float(v) for v in picked["exact"].tolist()],
    } | {f"eps_{norm}": eps[norm] for norm in NORMS}
    settings = {
        "per_class": s.attack_per_class,
        "steps": s.attack_steps,
        "bisection_steps": s.attack_bisection_steps,
        "targets": s.attack_targets,
        "eps_max": {norm: getattr(s, f"eps_max_{norm}") for norm in NORMS},
        "resolution": {
            norm: getattr(s, f"eps_max_{norm}") / 2**s.attack_bisection_steps for norm in NORMS
        },
        "bootstrap": s.bootstrap,
        "units": "pixels of [0, 1] images",
    }
    return write_part(root, NAME, record, settings, summary)
