"""The SALVE pipeline as one Prefect flow: each stage is a task named after it.

DVC decides what is stale (tasks.runner); Prefect runs, retries, logs and shows. Task results are
not persisted (summaries are small dicts, and no tensors ever enter Prefect's result store).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from salve.config import load
from tasks import STAGE_ORDER, STAGES
from tasks.runner import pipeline_lock, run_stage


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(name: str, root: str, params: str, force: bool, progress: bool) -> dict:
    cfg = load(params)
    outcome = run_stage(name, cfg, Path(root), force=force, progress=progress)
    get_run_logger().info("stage %s %s in %.2f s", outcome.name, outcome.status, outcome.seconds)
    print(outcome.line(), flush=True)
    return outcome.row()


@flow(name="salve-pipeline")
def pipeline(
    root: str = ".",
    stages: list[str] | None = None,
    force: list[str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the stages in DAG order (all by default), skipping those DVC finds up to date."""
    root_path = Path(root).resolve()
    params = str(root_path / "params.yaml")
    load(params)  # validate before any work
    wanted = [s for s in STAGE_ORDER if stages is None or s in stages]
    forced = set(force or ())
    rows = []
    with pipeline_lock(root_path):
        for name in wanted:
            rows.append(
                stage_task.with_options(name=name)(
                    name, str(root_path), params, name in forced, progress
                )
            )
    create_table_artifact(
        key="salve-stage-summaries", table=rows, description="SALVE pipeline: stage summaries"
    )
    report_dir = root_path / STAGES["report"].out_dir
    for key, name, text in (
        ("salve-report", "index.html", "SALVE report (open locally)"),
        ("salve-latents", "latents.html", "SALVE latent browser (open locally)"),
    ):
        if "report" in wanted and (report_dir / name).exists():
            create_link_artifact(key=key, link=(report_dir / name).as_uri(), link_text=text)
    return rows
