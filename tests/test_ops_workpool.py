"""Beyond one machine: prefect.yaml deployments on a process work pool, run by a real worker.

As a user would: `prefect work-pool create`, `prefect deploy --all` (from prefect.yaml), a worker
started with `prefect worker start` whose SALVE_ROOT names its checkout, then a deployment run
triggered through the client and followed until it completes.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from salve.params_file import yaml_load
from tests.conftest import REPO, copy_project, dvc
from tests.prefect_server import PREFECT, log_tail, stage_rows, start_process, stop_process

pytest_plugins = ["tests.prefect_server"]

POOL = "salve-local"
RUN_TIMEOUT_S = 240


def test_prefect_yaml_declares_both_deployments() -> None:
    spec = yaml_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"salve-pipeline", "salve-nightly"}
    for d in deployments.values():
        assert d["work_pool"]["name"] == POOL
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()
    assert deployments["salve-nightly"]["schedules"][0]["cron"] == "0 3 * * *"
    (pull,) = spec["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == (
        "{{ $SALVE_ROOT }}"
    )


def prefect_cli(args: list[str], *, env: dict, cwd: Path, timeout: int = 120):
    out = subprocess.run(
        [PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
def test_worker_runs_deployment_from_prefect_yaml(
    prefect_server, built_project_template: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    root = copy_project(built_project_template, tmp_path / "project")
    shutil.copy2(REPO / "prefect.yaml", root / "prefect.yaml")
    env = prefect_server.env()
    env.pop("SALVE_ROOT", None)  # resolved by the worker at run time, not at deploy time

    t0 = time.perf_counter()
    prefect_cli(["work-pool", "create", "--type", "process", POOL], env=env, cwd=root)
    prefect_cli(["--no-prompt", "deploy", "--all"], env=env, cwd=root, timeout=300)
    deploy_seconds = time.perf_counter() - t0

    log = tmp_path / "worker.log"
    worker = start_process(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
        log=log,
        env=prefect_server.env(SALVE_ROOT=str(root), PREFECT_WORKER_QUERY_SECONDS="2"),
        cwd=tmp_path,  # not the checkout: the deployment's pull step must move there
    )
    try:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            nightly = client.read_deployment_by_name("salve-nightly/salve-nightly")
            assert nightly.work_pool_name == POOL
            assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
            deployment = client.read_deployment_by_name("salve-pipeline/salve-pipeline")
            assert deployment.work_pool_name == POOL
            assert deployment.pull_steps == [
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": "{{ $SALVE_ROOT }}"
                    }
                }
            ]

            t_trigger = time.perf_counter()
            # Rerun one stage so the worker demonstrably works in the checkout; the rest skip.
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"force": ["rank"]}
            )
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                run = client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    break
                if worker.poll() is not None:
                    pytest.fail(f"worker exited with {worker.returncode}:\n{log_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"deployment run not finished in {RUN_TIMEOUT_S} s:\n{log_tail(log)}"
                    )
                time.sleep(1)
            turnaround = time.perf_counter() - t_trigger
            assert run.state.is_completed(), f"{run.state}\n{log_tail(log)}"
            assert run.work_pool_name == POOL
            wall = (run.end_time - run.start_time).total_seconds()

            (table,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["salve-stage-summaries"])
                ),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            )
            statuses = {r["stage"]: r["status"] for r in stage_rows(table)}
            assert statuses.pop("rank") == "ran"
            assert set(statuses.values()) == {"skipped"}, statuses
    finally:
        rc = stop_process(worker, timeout=30, log=log)

    assert rc is not None, f"worker did not stop on SIGTERM:\n{log_tail(log)}"
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."
    print(
        f"\n[workpool] server start {prefect_server.start_seconds:.1f} s; work-pool create + "
        f"deploy --all {deploy_seconds:.1f} s; deployment run: trigger to COMPLETED "
        f"{turnaround:.1f} s, flow run wall time {wall:.1f} s; worker stopped with exit {rc}"
    )
