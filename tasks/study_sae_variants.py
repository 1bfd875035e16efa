"""Study stage `study_sae_variants`: do other SAE kinds give more precise edits?

Seven SAE kinds at matched L0 (salve/study/variants.py), ``study.seeds`` fits each, on the
pipeline's activations; each fit is scored for quality and for the edits it enables, head edits
and activation steering alike (salve/study/variant_edits.py). Two rounds of jobs: the L0
matching of the kinds whose L0 follows l1 (relu, jumprelu), then one job per (kind, seed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from salve.config import Config, SaeConfig
from salve.models import head_of
from salve.sae import quality_metrics
from salve.study.variant_edits import fit_and_evaluate, variant_row
from salve.study.variants import match_l0_by_l1, sae_variants
from salve.train import DivergenceError
from tasks.artifacts import load_activations, load_dataset_meta, load_model, load_sae
from tasks.study_common import (
    Mapper,
    common_job,
    serial_map,
    worker_root,
    worker_setup,
    write_part,
)

NAME = "study_sae_variants"


def match_l0_job(job: dict) -> dict:
    """Bisect l1 for one kind so it reaches the target L0; returns the l1 and the trace."""
    worker_setup(job["reproducible"], job["seed"])
    root = worker_root(job["root"])
    train, _ = load_activations(root, "train")
    val, _ = load_activations(root, "val")
    best, _, trace = match_l0_by_l1(
        train, SaeConfig(**job["sae"]), job["target_l0"], seed=job["seed"], fits=job["fits"],
        eval_acts_nm=val,
    )  # fmt: skip
    return {"l1": best.l1, "trace": trace}


def variant_job(job: dict) -> dict:
    """Fit one kind with one seed, then its quality and edit metrics (a divergence is a result)."""
    worker_setup(job["reproducible"], job["seed"])
    root = worker_root(job["root"])
    train, train_labels = load_activations(root, "train")
    val, val_labels = load_activations(root, "val")
    head = head_of(load_model(root)[0])
    try:
        return fit_and_evaluate(
            train,
            train_labels,
            val,
            val_labels,
            head.weight.detach(),
            head.bias.detach(),
            SaeConfig(**job["sae"]),
            seed=job["seed"],
            projection_alpha=job["projection_alpha"],
            paper_alpha=job["paper_alpha"],
            min_base_accuracy=job["min_base_accuracy"],
        )
    except DivergenceError as exc:  # one diverging seed is a result, not a crash
        return {"seed": job["seed"], "error": str(exc)}


def run(cfg: Config, root: Path, progress: bool = True, map_fn: Mapper | None = None) -> dict:
    s = cfg.study
    mapper = map_fn or serial_map
    classes = load_dataset_meta(root)["classes"]
    if s.target_l0 > 0:
        target, source = s.target_l0, "study.target_l0"
    else:
        target = quality_metrics(load_sae(root)[0], load_activations(root, "val")[0])["l0"]
        source = "the pipeline SAE's val L0"
    variants = sae_variants(cfg.sae, target, aux_l1=s.aux_l1, l1_l2_ratio=s.l1_l2_ratio)
    seeds = [cfg.common.seed + i for i in range(s.seeds)]
    base = {"root": str(Path(root).resolve()), **common_job(cfg)}

    # Round 1: the kinds whose L0 is whatever their l1 gives, matched to the target.
    to_match = [
        v
        for v in variants
        if v["l0_rule"] == "achieved" and v["sae"].kind != "linear" and s.match_l0_fits
    ]
    matched = mapper(
        match_l0_job,
        [
            base
            | {"sae": dataclasses.asdict(v["sae"]), "target_l0": target, "fits": s.match_l0_fits}
            for v in to_match
        ],
    )
    traces = {}
    for v, found in zip(to_match, matched, strict=True):
        v["sae"] = dataclasses.replace(v["sae"], l1=found["l1"])
        traces[v["name"]] = found["trace"]

    # Round 2: every kind, every seed.
    edit = {
        "projection_alpha": cfg.evaluate.projection_alpha,
        "paper_alpha": cfg.evaluate.paper_alpha,
        "min_base_accuracy": cfg.edit.min_base_accuracy,
    }
    jobs = [
        base | edit | {"sae": dataclasses.asdict(v["sae"]), "seed": seed}
        for v in variants
        for seed in seeds
    ]
    fits = iter(mapper(variant_job, jobs))
    rows = [
        variant_row(
            v["name"],
            v["sae"],
            v["l0_rule"],
            [next(fits) for _ in seeds],
            target_l0=target,
            l1_trace=traces.get(v["name"]),
        )
        for v in variants
    ]
    settings = edit | {
        "target_l0": target,
        "target_l0_source": source,
        "seeds": len(seeds),
        "match_l0_fits": s.match_l0_fits,
        "width": cfg.sae.width,
        "epochs": cfg.sae.epochs,
        "num_classes": len(classes),
    }
    metrics = {"variants": {row["name"]: _without_lists(row) for row in rows}}
    return write_part(root, NAME, rows, settings, metrics)


def _without_lists(row: dict) -> dict:
    """A row as a metrics entry: its numbers (the seed lists and l1 trace stay in the record)."""
    return {k: v for k, v in row.items() if not isinstance(v, list)}
