"""`salve study`: docs/METHOD.md's three open questions, as DVC stages run by the pipeline's runner.

The study is four stages of the registry (tasks/__init__.py, ``STUDY_ORDER``), declared in
study/dvc.yaml (docs/PIPELINE.md, "The study"):

1. ``study_adversarial``: per correctly classified val sample, the smallest L-inf and L2
   perturbation that flips it, against its exact alpha_crit;
2. ``study_sae_variants``: seven SAE kinds at matched L0, ``study.seeds`` fits each: quality, head
   edits and activation steering;
3. ``study_deeper_layer``: an SAE on an earlier layer's pooled output, its dominant direction
   suppressed inside the backbone, next to the head edit of the same class;
4. ``study_report``: the page reports/study/index.html.

This module only wires them: each stage goes through `tasks.runner.run_stage`, as under
`salve run`, so DVC decides what is stale, its run-cache restores what was computed before with
the same code, data and parameters, and what runs is committed (study/dvc.lock). The three parts
run concurrently as Prefect tasks; inside each, its independent jobs (attacks per class and norm,
fits per kind and seed, backbone edits per class) fan out on Dask (flows/fanout.py): one local
cluster of single-threaded workers for the whole run (``study.workers``, 0 = one per core), or
the scheduler named by ``--dask-address`` / ``$SALVE_DASK_ADDRESS``. The computation is in
tasks/study_*.py and salve/study/. A part that fails does not stop the others; what finished
stays committed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flows.fanout import DASK_ADDRESS_ENV
from tasks import STAGES, STUDY_ORDER, STUDY_PARTS

ADDRESS_ENV = DASK_ADDRESS_ENV
PARTS = tuple(STUDY_PARTS)  # adversarial, sae_variants, deeper_layer
PAGE_STAGE = "study_report"
STUDY_PAGE = f"{STAGES[PAGE_STAGE].out_dir}/{STAGES[PAGE_STAGE].files['page']}"


class StudyError(RuntimeError):
    """A study part failed; the parts that finished are committed."""


def part_stages(parts: Sequence[str]) -> list[str]:
    unknown = [p for p in parts if p not in STUDY_PARTS]
    if unknown:
        raise ValueError(f"unknown study parts {unknown}; choose from {', '.join(PARTS)}")
    return [STUDY_PARTS[p] for p in PARTS if p in parts]


def pipeline_inputs(stages: Sequence[str]) -> list[str]:
    """The pipeline stages whose outputs the given study stages read."""
    ups = {u for s in stages for u in STAGES[s].upstream if u not in STUDY_ORDER}
    return [s for s in STAGES if s in ups]


def require_fresh(root: Path, stages: Sequence[str]) -> None:
    """Refuse to study outputs the pipeline would recompute (params.yaml, data or code changed)."""
    from salve.io import ArtifactError
    from tasks.dvcrepo import stale_stages

    stale = stale_stages(root, pipeline_inputs(stages))
    if stale:
        raise ArtifactError(
            f"the pipeline's outputs are out of date ({', '.join(stale)}): run `salve run` "
            "first, or pass --allow-stale to study them as they are"
        )


@functools.cache
def study_flow():
    """The Prefect flow `salve-study`, made on first use: importing this module (the CLI does, to
    register `salve study`) must not import Prefect."""
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Completed
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import interrupt
    from flows.fanout import dask_map
    from flows.pipeline import STATE_NAMES, _retry_transient
    from salve.config import load
    from tasks.runner import pipeline_lock, run_stage

    @task(
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=1,
        retry_delay_seconds=1,
        retry_condition_fn=_retry_transient,
    )
    def study_stage(name: str, root: str, force: bool, address: str | None, workers: int):
        cfg = load(Path(root) / "params.yaml")
        kwargs = {}
        if name != PAGE_STAGE:
            kwargs["map_fn"] = functools.partial(
                dask_map, name=name.replace("_", "-"), address=address, workers=workers
            )
        outcome = run_stage(name, cfg, Path(root), force=force, progress=False, **kwargs)
        get_run_logger().info("stage %s %s in %.2f s", name, outcome.status, outcome.seconds)
        print(outcome.line(), flush=True)
        return Completed(
            name=STATE_NAMES[outcome.status], message=outcome.line(), data=outcome.row()
        )

    @flow(name="salve-study", task_runner=ThreadPoolTaskRunner(max_workers=3), persist_result=False)
    def salve_study(
        root: str, stages: list[str], force: list[str], address: str | None, workers: int
    ) -> dict[str, Any]:
        """The part stages concurrently, then the page when they all succeeded."""
        interrupt.reclaim()
        rows, failures = [], {}
        with pipeline_lock(Path(root)), shared_cluster(root, address, workers) as address:
            parts = [s for s in stages if s != PAGE_STAGE]
            futures = {
                s: study_stage.with_options(name=s).submit(s, root, s in force, address, workers)
                for s in parts
            }
            for s in parts:
                futures[s].wait()
                try:
                    rows.append(futures[s].result())
                except Exception as exc:  # noqa: BLE001 - one part's failure keeps the others
                    failures[s] = f"{type(exc).__name__}: {exc}"
            if PAGE_STAGE in stages and not failures:
                page = study_stage.with_options(name=PAGE_STAGE).submit(
                    PAGE_STAGE, root, PAGE_STAGE in force, address, workers
                )
                rows.append(page.result())
        if failures:
            raise StudyError(
                "; ".join(f"stage {s} failed: {msg}" for s, msg in failures.items())
                + ". The stages that finished are committed; rerun `salve study` to retry."
            )
        return {"stages": rows}

    return salve_study


@contextlib.contextmanager
def shared_cluster(root: str, address: str | None, workers: int) -> Iterator[str | None]:
    """The scheduler every part's fan-out uses: ``address`` when given, else one local cluster
    for the whole flow run (each `dask_map` connects to it instead of starting its own: one
    start-up, and workers that keep their imports). Started inside the flow, so that its
    workers report to this flow run's Prefect API (flows/fanout.py)."""
    if address:
        yield address
        return
    from flows.fanout import local_cluster

    cluster = local_cluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.WARNING,
        local_directory=str(Path(root) / ".salve" / "dask"),
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def run_study(
    root: Path,
    *,
    parts: Sequence[str] = PARTS,
    force: Sequence[str] = (),
    address: str | None = None,
    workers: int | None = None,
    check_fresh: bool = True,
    page: bool = True,
) -> dict[str, Any]:
    """Run the study stages of ``parts`` (and the page) on ``root``; returns ``{"status":
    {stage: ran|restored|skipped}, "stages": the runner's rows, "page": path}``. ``force``
    names parts or stages to rerun. Inside a flow (the nightly) it runs as a subflow."""
    from flows.fanout import check_scheduler, default_workers
    from salve.config import load
    from salve.runtime import pin_cpu_kernels
    from tasks.runner import pipeline_lock

    root = Path(root).resolve()
    stages = part_stages(parts) + ([PAGE_STAGE] if page else [])
    forced = [STUDY_PARTS.get(f, f) for f in force]
    unknown = [f for f in forced if f not in STUDY_ORDER]
    if unknown:
        raise ValueError(f"unknown study parts {unknown}; choose from {', '.join(PARTS)}")
    cfg = load(root / "params.yaml")
    pin_cpu_kernels(cfg.common.reproducible)  # local workers inherit the environment
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address:
        check_scheduler(address)  # before any flow starts: a wrong address fails fast
    n = workers or cfg.study.workers or default_workers()
    with pipeline_lock(root):  # the pipeline's outputs must not change under the study
        if check_fresh:
            require_fresh(root, stages)
        out = study_flow()(root=str(root), stages=stages, force=forced, address=address, workers=n)
    return {
        "status": {r["stage"]: r["status"] for r in out["stages"]},
        "stages": out["stages"],
        "page": str(root / STUDY_PAGE),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def cmd_study(args: argparse.Namespace) -> int:
    """`salve study`: the same start as `salve run` (run log, Ctrl-C handling, --set checked
    before anything is written); no flow is started when every study stage is up to date."""
    from flows.cli import _all_fresh, _prepare, _print_total, _start
    from flows.fanout import check_scheduler
    from tasks.runner import pipeline_lock

    root = _start(args)
    t0 = time.perf_counter()
    with pipeline_lock(root):
        os.chdir(root)  # Prefect reads its settings (prefect.toml) from here
        _prepare(args)
        address = args.dask_address or os.environ.get(ADDRESS_ENV) or None
        if address:
            check_scheduler(address)  # a wrong address fails here, in one line
        parts = args.parts or list(PARTS)
        wanted = [*part_stages(parts), PAGE_STAGE]
        if not args.force:
            fresh = _all_fresh(root, wanted)
            if fresh is not None:
                for outcome in fresh:
                    print(outcome.line())
                print(f"every study stage is up to date: nothing to do; page: {STUDY_PAGE}")
                return 0
        try:
            run_study(
                root,
                parts=parts,
                force=args.force,
                address=address,
                workers=args.workers,
                check_fresh=not args.allow_stale,
            )
        except StudyError as exc:  # each failed part's own error, in one line
            print(f"error: {exc}", file=sys.stderr)
            return 1
    _print_total(time.perf_counter() - t0, root)
    print(f"study page: {STUDY_PAGE}")
    return 0


def add_study_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve study` on the CLI's subparsers."""
    s = sub.add_parser(
        "study",
        help="answer the paper's open questions with numbers (after `salve run`)",
        description=(
            "Answer the open questions of docs/METHOD.md from the pipeline's outputs: alpha_crit "
            "vs adversarial vulnerability, SAE kinds at matched L0, an edit inside the backbone. "
            "Runs the study's DVC stages (study/dvc.yaml): DVC skips or restores what is up to "
            f"date; writes metrics/study_*.json, results/study_*/ and {STUDY_PAGE}. Work runs on "
            "a local Dask cluster (one single-threaded worker per core) or on the scheduler "
            f"named by --dask-address / ${ADDRESS_ENV}."
        ),
    )
    s.add_argument("--parts", nargs="+", choices=PARTS, help="only these parts (default: all)")
    s.add_argument(
        "--force",
        nargs="+",
        choices=PARTS,
        default=[],
        help="recompute these parts even if DVC finds them up to date",
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
        help="study the pipeline's outputs even if DVC finds them out of date",
    )
    s.set_defaults(func=cmd_study)
    return s
