"""The SALVE pipeline as one Prefect flow: each stage is a task named after it, in a DAG.

DVC decides what is stale (tasks.runner); Prefect runs, retries, logs and shows. Stages that do
not depend on each other (edit, alpha_crit and gradfam, after rank) are submitted as independent
tasks, each with `wait_for` its upstream stages, so the UI shows the DAG; they compute one at a
time on every core (``COMPUTE``), and their DVC bookkeeping happens one operation at a time
(tasks.runner). A stage that was skipped or restored ends
in a Completed state named "Skipped" or "Restored", so the UI tells them from a real run ("Ran").
A stage is retried once only after a lost connection; anything else would fail the same way
again (bad data, a quality gate, a full disk, a bug) and is reported at once. Task results are
not persisted (summaries are small dicts, and no tensors ever enter Prefect's result store).
"""

from __future__ import annotations

import threading
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import interrupt
from flows.fanout import dask_map
from salve.config import load
from tasks import STAGE_ORDER, STAGES
from tasks.runner import pipeline_lock, run_stage

STATE_NAMES = {"ran": "Ran", "skipped": "Skipped", "restored": "Restored"}
# Stages whose independent fits run as concurrent tasks on Dask (flows/fanout.py).
FANOUT_STAGES = ("evaluate",)
# One stage computes at a time. Each wants every core (torch's pool is sized to the machine, the
# local Dask cluster starts a single-threaded worker per core): side by side, gradfam beside
# evaluate's two workers kept four threads busy on two cores. And torch's thread count is
# process state that stages set (seed_everything; evaluate's single-threaded probes), on which a
# stage's float reductions depend, so two stages in this process cannot each keep their own.
# The DAG still shows them as independent, and Prefect still submits them as such.
COMPUTE = threading.Lock()


def one_stage_at_a_time() -> threading.Lock:
    """``COMPUTE``, reached through a function: Prefect's Dask runner pickles the stage task's
    function by value (the module's name holds the Task), and a lock among its globals cannot be
    pickled; a module-level function is pickled by reference."""
    return COMPUTE


def _retry_transient(task, task_run, state) -> bool:
    """Retry only what can succeed on a second try: a lost connection (Prefect's API, a Dask
    worker). A stage is deterministic, so bad input, a full or read-only disk, a missing device
    or a bug fails the same way again; retrying it only hides the error for a while."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - everything else fails the same way again
        return False
    return False


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_transient,
)
def stage_task(name: str, root: str, params: str, force: bool, progress: bool):
    cfg = load(params)
    kwargs = {"map_fn": dask_map} if name in FANOUT_STAGES else {}
    with one_stage_at_a_time():
        outcome = run_stage(name, cfg, Path(root), force=force, progress=progress, **kwargs)
    get_run_logger().info("stage %s %s in %.2f s", outcome.name, outcome.status, outcome.seconds)
    print(outcome.line(), flush=True)
    return Completed(name=STATE_NAMES[outcome.status], message=outcome.line(), data=outcome.row())


def stage_markdown(rows: list[dict]) -> str:
    """The stage summary as a Markdown table: one row per stage, wrapped text (a table
    artifact cut it off)."""
    lines = ["| stage | status | seconds | key numbers |", "|---|---|---:|---|"]
    for r in rows:
        summary = str(r["summary"]).replace("|", "\\|")
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {summary} |")
    return "\n".join(lines) + "\n"


@flow(name="salve-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)
def pipeline(
    root: str = ".",
    stages: list[str] | None = None,
    force: list[str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the stages (all by default) as a DAG, skipping those DVC finds up to date."""
    interrupt.reclaim()
    root_path = Path(root).resolve()
    params = str(root_path / "params.yaml")
    load(params)  # validate before any work
    wanted = [s for s in STAGE_ORDER if stages is None or s in stages]
    forced = set(force or ())
    futures = {}
    with pipeline_lock(root_path):
        for name in wanted:
            upstream = [futures[u] for u in STAGES[name].upstream if u in futures]
            futures[name] = stage_task.with_options(name=name).submit(
                name, str(root_path), params, name in forced, progress, wait_for=upstream
            )
        rows = []
        for name in wanted:  # in DAG order: the first failure is the one to report
            futures[name].wait()
            rows.append(futures[name].result())  # raises the stage's own error
    create_markdown_artifact(
        key="salve-stage-summaries",
        markdown=stage_markdown(rows),
        description="SALVE pipeline: what each stage did",
    )
    report_dir = root_path / STAGES["report"].out_dir
    for key, name, text in (
        ("salve-report", "index.html", "SALVE report (open locally)"),
        ("salve-latents", "latents.html", "SALVE latent browser (open locally)"),
    ):
        if "report" in wanted and (report_dir / name).exists():
            create_link_artifact(key=key, link=(report_dir / name).as_uri(), link_text=text)
    return rows
