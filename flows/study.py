"""`salve study`: numbers for docs/METHOD.md's three open questions, from the pipeline's artifacts.

Not a pipeline stage (not in dvc.yaml, not part of `salve run`): it reads what the pipeline
cached and writes `metrics/study.json` and `reports/study/index.html`.

1. ``adversarial``: per correctly classified val sample (``study.attack_per_class`` per class),
   the smallest L-inf and L2 perturbation that flips it, against its exact alpha_crit.
2. ``sae_variants``: seven SAE kinds at matched L0, ``study.seeds`` fits each: quality and edits.
3. ``deeper_layer``: an SAE on an earlier layer's pooled output, its dominant direction
   suppressed inside the backbone, next to the head edit of the same class.

Reruns skip what is unchanged: each part records a fingerprint (salve/study/fingerprint.py) of
the artifact files it reads, its parameters, and the source of the salve modules its numbers
come from (the part's module in salve/study and every project module it imports, transitively;
this orchestration module only loads and passes data and is left out). A part whose fingerprint
is unchanged is kept; ``--force`` recomputes it. study.json is rewritten atomically as each part
finishes, so an interrupted or failed run keeps every part that finished.

The work fans out as Prefect tasks on a Dask cluster: attacks per (class, norm), SAE fits per
(kind, seed), backbone edits per class. By default a local cluster of single-threaded worker
processes, one per CPU core (``study.workers``), whose workers report to this flow's Prefect API.
An existing scheduler is used instead when ``--dask-address`` or ``$SALVE_DASK_ADDRESS`` names
one (``tcp://host:8786``); its workers must import this project (same code and Python
environment) and read the repository at the same path, and should have ``PREFECT_API_URL`` set
to a Prefect server this process also uses (else each worker starts its own temporary API).
Every task runs on one torch thread with the pipeline's CPU kernel settings
(``common.reproducible``), so its numbers do not depend on where or when it is scheduled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flows.fanout import DASK_ADDRESS_ENV, default_workers, task_runner

STUDY_JSON = "metrics/study.json"
STUDY_PAGE = "reports/study/index.html"
ADDRESS_ENV = DASK_ADDRESS_ENV
SCHEMA_VERSION = 1
PARTS = ("adversarial", "sae_variants", "deeper_layer")
NORMS = ("linf", "l2")

# What each part reads, as (stage, role) of upstream outputs (tasks.STAGES owns the paths).
PART_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "adversarial": (
        ("fetch", "val"),
        ("fetch", "meta"),
        ("finetune", "model"),
        ("finetune", "sidecar"),
        ("extract", "val"),
        ("alpha_crit", "values"),
    ),
    "sae_variants": (
        ("fetch", "meta"),
        ("finetune", "model"),
        ("finetune", "sidecar"),
        ("extract", "train"),
        ("extract", "val"),
        ("fit_sae", "sae"),
        ("fit_sae", "sidecar"),
    ),
    "deeper_layer": (
        ("fetch", "train"),
        ("fetch", "val"),
        ("fetch", "meta"),
        ("finetune", "model"),
        ("finetune", "sidecar"),
        ("extract", "train"),
        ("extract", "val"),
        ("fit_sae", "sae"),
        ("fit_sae", "sidecar"),
        ("rank", "ranking"),
    ),
}
# The salve module each part's numbers come from (its imports are followed for the fingerprint).
PART_CODE = {
    "adversarial": "salve.study.vulnerability",
    "sae_variants": "salve.study.variant_edits",
    "deeper_layer": "salve.study.concept",
}


class StudyError(RuntimeError):
    """A study part failed; the parts that finished are saved."""


# --------------------------------------------------------------------------------------------
# Fingerprints and the study record
# --------------------------------------------------------------------------------------------


def code_files(module: str) -> dict[str, Path]:
    """Repository-relative path -> file of ``module`` and every project module its import
    statements name, transitively (a package's ``__init__`` counts when the package itself is
    imported from, not for an import of one of its submodules: it only re-exports)."""
    from tasks.deps import REPO, imported_names, module_path, package_data

    seen: set[str] = set()
    files: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_path(name)
        if path is None:  # third party, or a name imported from a module
            continue
        for p in (path, *package_data(path)):
            files[p.relative_to(REPO).as_posix()] = p
        todo.extend(imported_names(path))
    return files


def part_params(cfg, part: str) -> dict[str, Any]:
    """The parameters a part's numbers depend on (its fingerprint and its record)."""
    s = cfg.study
    out: dict[str, Any] = {
        "common": {"seed": cfg.common.seed, "reproducible": cfg.common.reproducible}
    }
    if part == "adversarial":
        keys = (
            "attack_per_class",
            "attack_steps",
            "attack_bisection_steps",
            "attack_targets",
            "eps_max_linf",
            "eps_max_l2",
            "bootstrap",
        )
    elif part == "sae_variants":
        keys = ("seeds", "target_l0", "match_l0_fits", "aux_l1", "l1_l2_ratio")
    else:
        keys = ("deeper_layer", "deeper_alpha")
    out["study"] = {k: getattr(s, k) for k in keys}
    if part in ("sae_variants", "deeper_layer"):
        out["sae"] = dataclasses.asdict(cfg.sae)
        out["evaluate"] = {
            "projection_alpha": cfg.evaluate.projection_alpha,
            "paper_alpha": cfg.evaluate.paper_alpha,
        }
        out["edit"] = {"min_base_accuracy": cfg.edit.min_base_accuracy}
    return out


def part_fingerprint(root: Path, cfg, part: str) -> str:
    from salve import __version__
    from salve.study.fingerprint import fingerprint
    from tasks.artifacts import require

    inputs = {f"{stage}/{role}": require(root, stage, role) for stage, role in PART_INPUTS[part]}
    return fingerprint(
        inputs, part_params(cfg, part), code_files(PART_CODE[part]), version=__version__
    )


def read_study(root: Path) -> dict[str, Any]:
    """The study record so far; a fresh one when there is none or it is unreadable."""
    from salve.io import ArtifactError, read_json

    path = root / STUDY_JSON
    fresh = {"schema_version": SCHEMA_VERSION, "parts": {}}
    if not path.exists():
        return fresh
    try:
        study = read_json(path)
    except ArtifactError as exc:
        logging.getLogger("salve").warning("%s; starting a new study record", exc)
        return fresh
    if not isinstance(study, dict) or study.get("schema_version") != SCHEMA_VERSION:
        return fresh
    study.setdefault("parts", {})
    return study


def write_study(root: Path, study: dict[str, Any]) -> None:
    from salve.io import write_json

    write_json(root / STUDY_JSON, study)


def write_page(root: Path, study: dict[str, Any], classes: list[str], stale: dict) -> Path:
    from salve.io import write_text
    from salve.study.page import build_study_page

    subtitle = f"{root.name}: numbers from {STUDY_JSON}, computed by `salve study`"
    page = build_study_page(study, classes, stale=stale, subtitle=subtitle)
    path = root / STUDY_PAGE
    write_text(path, page)
    return path


def require_fresh(root: Path, parts: Sequence[str]) -> None:
    """Refuse to study artifacts DVC finds out of date (with params.yaml, data or code)."""
    from salve.io import ArtifactError
    from tasks.runner import dvc_repo

    stages = sorted({stage for p in parts for stage, _ in PART_INPUTS[p]})
    with dvc_repo(root) as repo:
        stale = repo.status(targets=stages)
    if stale:
        names = ", ".join(sorted(str(k).split(":")[-1] for k in stale))
        raise ArtifactError(
            f"the pipeline's outputs are out of date ({names}): run `salve run` first, or pass "
            "--allow-stale to study them as they are"
        )


# --------------------------------------------------------------------------------------------
# Tasks (each runs in a Dask worker: one torch thread, the pipeline's kernel settings)
# --------------------------------------------------------------------------------------------


def _worker_setup(reproducible: bool, seed: int) -> None:
    from salve.runtime import pin_cpu_kernels, seed_everything

    pin_cpu_kernels(reproducible)  # before this worker's first tensor operation
    seed_everything(seed, num_threads=1)


def _normalisation(sidecar: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    norm = sidecar["normalisation"]
    return tuple(norm["mean"]), tuple(norm["std"])


def attack_task(root: str, indices: list[int], norm: str, s: dict, common: dict) -> list[float]:
    import torch

    _worker_setup(common["reproducible"], common["seed"])
    from salve.study.vulnerability import attack_sizes
    from tasks.artifacts import load_model, load_split

    model, sidecar = load_model(Path(root))
    images, labels = load_split(Path(root), "val")
    idx = torch.tensor(indices, dtype=torch.int64)
    mean, std = _normalisation(sidecar)
    eps = attack_sizes(
        model,
        images[idx],
        labels[idx],
        mean,
        std,
        norm=norm,
        eps_max=s[f"eps_max_{norm}"],
        steps=s["attack_steps"],
        bisection_steps=s["attack_bisection_steps"],
        n_targets=s["attack_targets"],
    )
    return [float(v) for v in eps.tolist()]


def _acts(root: Path):
    from tasks.artifacts import load_activations

    return load_activations(root, "train"), load_activations(root, "val")


def match_l0_task(
    root: str, sae: dict, target_l0: float, seed: int, fits: int, common: dict
) -> dict:
    _worker_setup(common["reproducible"], seed)
    from salve.config import SaeConfig
    from salve.study.variants import match_l0_by_l1

    (train, _), (val, _) = _acts(Path(root))
    best, _, trace = match_l0_by_l1(
        train, SaeConfig(**sae), target_l0, seed=seed, fits=fits, eval_acts_nm=val
    )
    return {"l1": best.l1, "trace": trace}


def variant_task(
    root: str, sae: dict, seed: int, match: dict | None, settings: dict, common: dict
) -> dict:
    _worker_setup(common["reproducible"], seed)
    from salve.config import SaeConfig
    from salve.models import head_of
    from salve.study.variant_edits import fit_and_evaluate
    from salve.train import DivergenceError
    from tasks.artifacts import load_model

    cfg = SaeConfig(**sae)
    if match is not None:
        cfg = dataclasses.replace(cfg, l1=match["l1"])
    (train, train_labels), (val, val_labels) = _acts(Path(root))
    head = head_of(load_model(Path(root))[0])
    try:
        return fit_and_evaluate(
            train,
            train_labels,
            val,
            val_labels,
            head.weight.detach(),
            head.bias.detach(),
            cfg,
            seed=seed,
            **settings,
        )
    except DivergenceError as exc:  # one diverging seed is a result, not a crash
        return {"seed": seed, "error": str(exc)}


def layer_task(root: str, layer: str, sae: dict, settings: dict, common: dict) -> dict:
    """Question 3's shared work: the layer's SAE and directions, the unedited model's
    predictions on val and shifted images, and the head edit of every class."""
    import torch

    _worker_setup(common["reproducible"], common["seed"])
    from salve.config import SaeConfig
    from salve.evaluate import SHIFTS, evaluate_seed, shift_images
    from salve.models import head_of
    from salve.study.concept import (
        forward_probe,
        layer_features,
        mean_deviation_along,
        resolve_layer,
    )
    from salve.study.deeper import pooled_activations
    from tasks.artifacts import load_model, load_ranking, load_sae, load_split

    rootp, seed = Path(root), common["seed"]
    model, sidecar = load_model(rootp)
    mean, std = _normalisation(sidecar)
    layer_name, block = resolve_layer(model, layer)
    train_u8, train_labels = load_split(rootp, "train")
    val_u8, val_labels = load_split(rootp, "val")
    num_classes = head_of(model).out_features
    pooled_train = pooled_activations(model, train_u8, layer_name, mean, std)
    base_val, pooled_val, _ = forward_probe(model, val_u8, layer_name, mean, std)
    base, shifted_acts = {"val": base_val}, {}
    for kind in SHIFTS:
        images = shift_images(val_u8, kind, seed)
        base[kind], _, shifted_acts[kind] = forward_probe(model, images, layer_name, mean, std)
    features = layer_features(
        pooled_train,
        train_labels,
        pooled_val,
        SaeConfig(**sae),
        seed=seed,
        num_classes=num_classes,
    )
    reference = pooled_val.double().mean(0)
    before = [
        mean_deviation_along(pooled_val[val_labels == k], reference, torch.tensor(d))
        for k, d in enumerate(features["directions"])
    ]
    pipeline_sae, _ = load_sae(rootp)
    dominant = [d["feature"] for d in load_ranking(rootp)["dominant"]]
    (train_acts, train_acts_labels), (val_acts, _) = _acts(rootp)
    head = head_of(model)
    head_eval = evaluate_seed(
        head.weight.detach(),
        head.bias.detach(),
        train_acts,
        train_acts_labels,
        val_acts,
        val_labels,
        pipeline_sae.W_dec.detach(),
        pipeline_sae.b_dec.detach(),
        dominant,
        shifted_val_acts=shifted_acts,
        methods=("salve_projection",),
        probe=False,
        seed=seed,
        **settings,
    )
    return {
        "layer": layer_name,
        "block": block,
        "num_classes": num_classes,
        "features": features,
        "reference": reference.tolist(),
        "before_along": before,
        "base_preds": {kind: p.tolist() for kind, p in base.items()},
        "evaluated": head_eval["evaluated_classes"],
        "left_out": head_eval["left_out_classes"],
        "head": {int(k): v for k, v in head_eval["per_class"]["salve_projection"].items()},
    }


def backbone_edit_task(root: str, prep: dict, target: int, alpha: float, common: dict):
    import torch

    if target not in prep["evaluated"]:
        return None
    _worker_setup(common["reproducible"], common["seed"])
    from salve.evaluate import SHIFTS, shift_images
    from salve.study.concept import backbone_edit_effect
    from tasks.artifacts import load_model, load_split

    model, sidecar = load_model(Path(root))
    mean, std = _normalisation(sidecar)
    val_u8, val_labels = load_split(Path(root), "val")
    images = {"val": val_u8} | {k: shift_images(val_u8, k, common["seed"]) for k in SHIFTS}
    return backbone_edit_effect(
        model,
        prep["layer"],
        prep["features"]["directions"][target],
        alpha,
        images,
        val_labels,
        {kind: torch.tensor(p) for kind, p in prep["base_preds"].items()},
        target,
        prep["num_classes"],
        mean,
        std,
        reference_c=torch.tensor(prep["reference"], dtype=torch.float64),
        before_along=prep["before_along"][target],
    )


@functools.cache
def prefect_tasks() -> SimpleNamespace:
    """The task functions above as Prefect tasks, made on first use: importing this module (the
    CLI does, to register `salve study`) must not import Prefect."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    wrap = task(cache_policy=NO_CACHE, persist_result=False)
    return SimpleNamespace(
        attack=wrap(attack_task),
        match_l0=wrap(match_l0_task),
        variant=wrap(variant_task),
        layer=wrap(layer_task),
        backbone_edit=wrap(backbone_edit_task),
    )


# --------------------------------------------------------------------------------------------
# Submitting a part's tasks, and assembling its record from their results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PartRun:
    """A part in flight: its futures, and how to turn their results into (record, settings)."""

    futures: list
    assemble: Callable[[], tuple[Any, dict]]
    started: float = dataclasses.field(default_factory=time.perf_counter)


def submit_adversarial(root: Path, cfg, classes: list[str]) -> PartRun:
    import torch

    from salve.io import ArtifactError, load_tensors
    from salve.models import head_of
    from salve.study.vulnerability import select_attack_samples, vulnerability_summary
    from tasks import STAGES
    from tasks.artifacts import load_activations, load_model, require

    s = part_params(cfg, "adversarial")
    common = s["common"]
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
    plan = select_attack_samples(preds, labels, cfg.study.attack_per_class, cfg.common.seed)
    futures = {}
    for k, indices in plan.items():
        if not indices:
            continue
        for norm in NORMS:
            futures[k, norm] = (
                prefect_tasks()
                .attack.with_options(name=f"attack-{norm}-class-{k}")
                .submit(str(root), indices, norm, s["study"], common)
            )

    def assemble() -> tuple[dict, dict]:
        attacked = [k for k in sorted(plan) if (k, NORMS[0]) in futures]
        index = [i for k in attacked for i in plan[k]]
        eps = {norm: [v for k in attacked for v in futures[k, norm].result()] for norm in NORMS}
        idx = torch.tensor(index, dtype=torch.int64)
        picked = {name: alpha[f"alpha_{name}"][idx] for name in ("exact", "linear", "empirical")}
        record = vulnerability_summary(
            picked["exact"],
            eps,
            labels[idx],
            classes,
            n_boot=cfg.study.bootstrap,
            seed=cfg.common.seed,
            alternatives={"linear": picked["linear"], "empirical": picked["empirical"]},
        )
        record["samples"] = {
            "index": index,
            "label": [int(v) for v in labels[idx].tolist()],
            "alpha_exact": [float(v) for v in picked["exact"].tolist()],
        } | {f"eps_{norm}": eps[norm] for norm in NORMS}
        st = s["study"]
        settings = {
            "per_class": st["attack_per_class"],
            "steps": st["attack_steps"],
            "bisection_steps": st["attack_bisection_steps"],
            "targets": st["attack_targets"],
            "eps_max": {norm: st[f"eps_max_{norm}"] for norm in NORMS},
            "resolution": {
                norm: st[f"eps_max_{norm}"] / 2 ** st["attack_bisection_steps"] for norm in NORMS
            },
            "bootstrap": st["bootstrap"],
            "units": "pixels of [0, 1] images",
        }
        return record, settings

    return PartRun(list(futures.values()), assemble)


def submit_sae_variants(root: Path, cfg, classes: list[str]) -> PartRun:
    from salve.sae import quality_metrics
    from salve.study.variant_edits import variant_row
    from salve.study.variants import sae_variants
    from tasks.artifacts import load_activations, load_sae

    s = cfg.study
    common = part_params(cfg, "sae_variants")["common"]
    if s.target_l0 > 0:
        target, source = s.target_l0, "study.target_l0"
    else:
        target = quality_metrics(load_sae(root)[0], load_activations(root, "val")[0])["l0"]
        source = "the pipeline SAE's val L0"
    variants = sae_variants(cfg.sae, target, aux_l1=s.aux_l1, l1_l2_ratio=s.l1_l2_ratio)
    seeds = [cfg.common.seed + i for i in range(s.seeds)]
    settings = {
        "projection_alpha": cfg.evaluate.projection_alpha,
        "paper_alpha": cfg.evaluate.paper_alpha,
        "min_base_accuracy": cfg.edit.min_base_accuracy,
    }
    futures, matches, fits = [], {}, {}
    for v in variants:
        name, sae = v["name"], dataclasses.asdict(v["sae"])
        match = None
        if v["l0_rule"] == "achieved" and v["sae"].kind != "linear" and s.match_l0_fits:
            match = (
                prefect_tasks()
                .match_l0.with_options(name=f"match-l0-{name}")
                .submit(str(root), sae, target, seeds[0], s.match_l0_fits, common)
            )
            matches[name] = match
            futures.append(match)
        for seed in seeds:
            fut = (
                prefect_tasks()
                .variant.with_options(name=f"fit-{name}-seed-{seed}")
                .submit(str(root), sae, seed, match, settings, common)
            )
            fits[name, seed] = fut
            futures.append(fut)

    def assemble() -> tuple[list, dict]:
        rows = []
        for v in variants:
            name = v["name"]
            sae = v["sae"]
            trace = None
            if name in matches:
                found = matches[name].result()
                sae, trace = dataclasses.replace(sae, l1=found["l1"]), found["trace"]
            results = [fits[name, seed].result() for seed in seeds]
            rows.append(
                variant_row(name, sae, v["l0_rule"], results, target_l0=target, l1_trace=trace)
            )
        record_settings = settings | {
            "target_l0": target,
            "target_l0_source": source,
            "seeds": len(seeds),
            "match_l0_fits": s.match_l0_fits,
            "width": cfg.sae.width,
            "epochs": cfg.sae.epochs,
            "num_classes": len(classes),
        }
        return rows, record_settings

    return PartRun(futures, assemble)


def submit_deeper_layer(root: Path, cfg, classes: list[str]) -> PartRun:
    from salve.study.concept import deeper_record

    common = part_params(cfg, "deeper_layer")["common"]
    settings = {
        "projection_alpha": cfg.evaluate.projection_alpha,
        "paper_alpha": cfg.evaluate.paper_alpha,
        "min_base_accuracy": cfg.edit.min_base_accuracy,
    }
    prep = prefect_tasks().layer.submit(
        str(root), cfg.study.deeper_layer, dataclasses.asdict(cfg.sae), settings, common
    )
    edits = {
        k: prefect_tasks()
        .backbone_edit.with_options(name=f"backbone-edit-class-{k}")
        .submit(str(root), prep, k, cfg.study.deeper_alpha, common)
        for k in range(len(classes))
    }

    def assemble() -> tuple[dict, dict]:
        shared = prep.result()
        deeper = {k: f.result() for k, f in edits.items()}
        deeper = {k: v for k, v in deeper.items() if v is not None}
        record = deeper_record(
            layer=shared["layer"],
            block=shared["block"],
            alpha=cfg.study.deeper_alpha,
            features=shared["features"],
            deeper=deeper,
            head=shared["head"],
            left_out=shared["left_out"],
        )
        record_settings = {
            "layer": shared["layer"],
            "block": shared["block"],
            "alpha": cfg.study.deeper_alpha,
            "head_alpha": cfg.evaluate.projection_alpha,
            "min_base_accuracy": cfg.edit.min_base_accuracy,
        }
        return record, record_settings

    return PartRun([prep, *edits.values()], assemble)


SUBMIT = {
    "adversarial": submit_adversarial,
    "sae_variants": submit_sae_variants,
    "deeper_layer": submit_deeper_layer,
}


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def study_flow_body(root: str, parts: list[str], force: list[str]) -> dict[str, Any]:
    """Compute the stale parts (concurrently, on the task runner), keep the others, write the
    record after each part and the page at the end."""
    from prefect import get_run_logger
    from prefect.futures import as_completed

    from flows import interrupt
    from salve.config import load
    from salve.io import ArtifactError
    from tasks.artifacts import load_dataset_meta

    interrupt.reclaim()

    log = get_run_logger()
    root_path = Path(root)
    cfg = load(root_path / "params.yaml")
    classes = list(load_dataset_meta(root_path)["classes"])
    current = {p: part_fingerprint(root_path, cfg, p) for p in parts}
    for p in PARTS:  # parts not asked for: only to flag stale numbers on the page
        if p not in current:
            try:
                current[p] = part_fingerprint(root_path, cfg, p)
            except ArtifactError:
                current[p] = None
    study = read_study(root_path)
    status: dict[str, str] = {}
    todo = []
    for p in parts:
        recorded = study["parts"].get(p, {}).get("fingerprint")
        if p in force or recorded != current[p] or p not in study:
            todo.append(p)
        else:
            status[p] = "skipped"
            _say(log, f"study {p}: unchanged, skipped")
    runs = {p: SUBMIT[p](root_path, cfg, classes) for p in todo}
    owner = {fut: p for p, run in runs.items() for fut in run.futures}
    left = {p: len(run.futures) for p, run in runs.items()}
    failures: dict[str, str] = {}

    def finish(p: str) -> None:
        run = runs[p]
        try:
            record, settings = run.assemble()
        except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
            failures[p] = f"{type(exc).__name__}: {exc}"
            status[p] = "failed"
            _say(log, f"study {p}: failed: {failures[p]}")
            return
        seconds = time.perf_counter() - run.started
        study[p] = record
        study["parts"][p] = {
            "fingerprint": current[p],
            "finished": _now(),
            "seconds": round(seconds, 1),
            "settings": settings,
        }
        write_study(root_path, study)  # atomic: an interruption keeps what finished
        status[p] = "ran"
        _say(log, f"study {p}: computed in {seconds:.1f} s")

    for p in [p for p in runs if not left[p]]:  # nothing to wait for (e.g. no sample to attack)
        finish(p)
    for fut in as_completed(list(owner)):
        p = owner[fut]
        left[p] -= 1
        if not left[p]:
            finish(p)
    stale = {
        p: current[p] is not None and study["parts"].get(p, {}).get("fingerprint") != current[p]
        for p in PARTS
    }
    page = write_page(root_path, study, classes, stale)
    _say(log, f"study page: {page}")
    if failures:
        raise StudyError(
            "; ".join(f"part {p} failed: {msg}" for p, msg in failures.items())
            + f". The parts that finished are saved in {STUDY_JSON}; rerun `salve study` to "
            "retry the failed ones."
        )
    return {"status": status, "study": str(root_path / STUDY_JSON), "page": str(page)}


@functools.cache
def study_flow():
    """The Prefect flow `salve-study` (made on first use, as :func:`prefect_tasks`)."""
    from prefect import flow

    return flow(name="salve-study", persist_result=False)(study_flow_body)


def _say(log, line: str) -> None:
    log.info(line)
    print(line, flush=True)


def run_study(
    root: Path,
    *,
    parts: Sequence[str] = PARTS,
    force: Sequence[str] = (),
    address: str | None = None,
    workers: int | None = None,
    check_fresh: bool = True,
) -> dict[str, Any]:
    """Run the study flow on ``root``'s artifacts; returns ``{"status": {part: ran|skipped|
    failed}, "study": path, "page": path}`` (raises StudyError after saving what finished)."""
    from salve.config import load
    from salve.runtime import pin_cpu_kernels
    from tasks.runner import pipeline_lock

    root = Path(root).resolve()
    unknown = [p for p in (*parts, *force) if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown study parts {unknown}; choose from {', '.join(PARTS)}")
    cfg = load(root / "params.yaml")
    pin_cpu_kernels(cfg.common.reproducible)  # local workers inherit the environment
    address = address or os.environ.get(ADDRESS_ENV) or None
    n = workers or cfg.study.workers or default_workers()
    with pipeline_lock(root):  # the artifacts must not change under the study
        if check_fresh:
            require_fresh(root, parts)
        runner = task_runner(address, n, scratch=root / ".salve" / "dask")
        return study_flow().with_options(task_runner=runner)(
            root=str(root), parts=list(parts), force=list(force)
        )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _install_interrupt() -> None:
    """Ctrl-C / SIGTERM: one line, the Dask workers and temporary API stopped, exit at once;
    parts already written to study.json stay."""
    from flows.interrupt import stop_children

    def handler(signum: int, _frame) -> None:
        print(
            f"interrupted by {signal.Signals(signum).name}: parts that finished are kept in "
            f"{STUDY_JSON}; rerun `salve study` to compute the rest.",
            file=sys.stderr,
            flush=True,
        )
        try:
            stop_children()
        finally:
            os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def cmd_study(args: argparse.Namespace) -> int:
    from flows import logs
    from salve.config import apply_overrides

    root = Path(args.root).resolve()
    logs.configure(root, debug=args.debug)
    _install_interrupt()

    def validate(c) -> None:  # as `salve run` does: nothing is written unless it all holds
        from salve.runtime import pin_cpu_kernels
        from tasks.preflight import preflight

        pin_cpu_kernels(c.common.reproducible)
        preflight(c, root)

    apply_overrides(root / "params.yaml", args.set, check=validate)
    if args.set:
        print(f"params.yaml updated: {', '.join(args.set)}")
    t0 = time.perf_counter()
    try:
        out = run_study(
            root,
            parts=args.parts or PARTS,
            force=args.force,
            address=args.dask_address,
            workers=args.workers,
            check_fresh=not args.allow_stale,
        )
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    page = Path(out["page"]).relative_to(root)
    print(f"study: {time.perf_counter() - t0:.1f} s; {STUDY_JSON}; page: {page}")
    return 0


def add_study_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve study` on the CLI's subparsers."""
    s = sub.add_parser(
        "study",
        help="answer the paper's open questions with numbers (after `salve run`)",
        description=(
            "Answer the open questions of docs/METHOD.md from the pipeline's cached artifacts: "
            "alpha_crit vs adversarial vulnerability, SAE kinds at matched L0, an edit inside "
            "the backbone. "
            f"Writes {STUDY_JSON} and {STUDY_PAGE}; parts whose inputs, parameters and code are "
            "unchanged are kept. Work runs on a local Dask cluster (one single-threaded worker "
            f"per core) or on the scheduler named by --dask-address / ${ADDRESS_ENV}."
        ),
    )
    s.add_argument("--parts", nargs="+", choices=PARTS, help="only these parts (default: all)")
    s.add_argument(
        "--force",
        nargs="+",
        choices=PARTS,
        default=[],
        help="recompute these parts even if their fingerprint is unchanged",
    )
    s.add_argument(
        "--dask-address",
        default=None,
        metavar="ADDR",
        help=f"an existing Dask scheduler, e.g. tcp://host:8786 (default: ${ADDRESS_ENV}, else "
        "a local cluster); its workers need this project's code and the repository's path",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local Dask worker processes (default: study.workers; 0 there = one per core)",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="validate, then write into params.yaml first (e.g. study.seeds=5)",
    )
    s.add_argument(
        "--allow-stale",
        action="store_true",
        help="study the artifacts even if DVC finds the pipeline out of date",
    )
    s.set_defaults(func=cmd_study)
    return s
