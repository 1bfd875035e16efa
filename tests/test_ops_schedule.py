"""Scheduled reruns: `salve schedule` serves the nightly flow against a real Prefect server.

The server is started as a user would (`prefect server start`, tests/prefect_server.py); the serve
command runs as a subprocess; what happened is read back through the Prefect client.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import copy_project, dvc
from tests.prefect_server import free_port, log_tail, stage_rows, start_process, stop_process

pytest_plugins = ["tests.prefect_server"]

INTERVAL_S = 20  # long enough that one run finishes before the next is due
RUN_TIMEOUT_S = 150


def salve_cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--root", str(root), *args]


def test_schedule_refuses_without_api_url(tiny_project: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run(
        salve_cli(tiny_project, "schedule", "--interval", "60"),
        cwd=tiny_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "PREFECT_API_URL is not set" in out.stderr
    assert "prefect server start" in out.stderr


def test_schedule_refuses_unreachable_server(tiny_project: Path) -> None:
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    out = subprocess.run(
        salve_cli(tiny_project, "schedule", "--cron", "0 3 * * *"),
        cwd=tiny_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "is not reachable" in out.stderr
    assert env["PREFECT_API_URL"] in out.stderr


def test_schedule_rejects_bad_arguments(tiny_project: Path, capsys) -> None:
    from flows.cli import main

    for argv in (["schedule", "--interval", "-5"], ["schedule"]):
        with pytest.raises(SystemExit) as exc:
            main(["--root", str(tiny_project), *argv])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "positive" in err and "--cron" in err
    bad = ["schedule", "--cron", "61 3 * * *", "--timezone", "Mars/Base"]
    with contextlib.chdir(Path.cwd()):  # restored even if the command got as far as serving
        assert main(["--root", str(tiny_project), *bad]) == 2
    err = capsys.readouterr().err
    assert "Invalid cron string" in err and "Invalid timezone" in err


def test_configured_remote_default_named_and_missing(tiny_project: Path, tmp_path: Path) -> None:
    from tasks.dvcrepo import DvcError, configured_remote

    assert configured_remote(tiny_project) is None  # no remote: nightly skips pull and push
    dvc(tiny_project, "remote", "add", "--local", "other", str(tmp_path / "other"))
    assert configured_remote(tiny_project) is None  # configured but not the default
    assert configured_remote(tiny_project, "other") == "other"
    dvc(tiny_project, "remote", "add", "--local", "-d", "shared", str(tmp_path / "shared"))
    assert configured_remote(tiny_project) == "shared"
    with pytest.raises(DvcError, match="'nope' is not configured"):
        configured_remote(tiny_project, "nope")


def test_report_leads_with_the_cause_then_key_metrics() -> None:
    from flows.nightly import render_report

    rows = [{"stage": "fit_sae", "status": "ran", "seconds": 1.5, "summary": "x=1"}]
    alpha = {f"per_class.{c}.exact.median": {"old": 1.0 + c, "new": 2.0 + c} for c in range(50)}
    diff = {
        "head": "abc1234",
        "metrics": {
            "metrics/alpha_crit.json": alpha,
            "metrics/fit_sae.json": {
                "val_fvu": {"old": 0.2, "new": 0.1, "diff": -0.1},
                "val_l0": {"old": 5.0, "new": 5.0, "diff": 0.0},
            },
        },
        "params": {"params.yaml": {"sae.width": {"old": 32, "new": 64, "diff": 32}}},
        "errors": {},
        "val_samples": 200,
    }
    text, changed, cause = render_report(Path("/r"), diff, rows, None, {"ok": True, "seconds": 0.5})
    assert changed == 51 and cause == "sae.width 32 -> 64"
    assert text.splitlines()[2] == "**sae.width 32 -> 64**; 51 metric(s) changed."
    order = [
        text.index(s)
        for s in (
            "| params.yaml | sae.width | 32 | 64 | +32 (×2) |",
            "| SAE val FVU (val_fvu) | 0.2 | 0.1 | -0.1 (-50 %) | ▼ | better |",
            "| SAE val L0 (active latents) (val_l0) | 5 | 5 | unchanged |  | unchanged |",
            "#### metrics/alpha_crit.json: 50 changed",
            "<details>",
            "| per_class.0.exact.median | 1 | 2 |",
            "### Stages",
        )
    ]
    assert order == sorted(order)
    assert "dvc pull: skipped (no DVC remote configured)" in text
    assert "dvc push: ok in 0.5 s" in text and "| fit_sae | ran | 1.5 | x=1 |" in text
    diff = {"head": "unknown", "metrics": {}, "params": {}, "errors": {"metrics": "no HEAD"}}
    text, changed, cause = render_report(Path("/r"), diff, [], None, None)
    assert changed == 0 and cause == "no parameter changed"
    assert "**metrics diff not available:** `no HEAD`" in text and "No parameter changed." in text


def test_schedule_deployment_name_is_apart_from_prefect_yaml() -> None:
    from flows.schedule import DEFAULT_DEPLOYMENT, prefect_yaml_deployments, takeover_warnings
    from tests.conftest import REPO

    declared = prefect_yaml_deployments(REPO)
    assert declared["salve-nightly"] == "flows/nightly.py:nightly"
    assert DEFAULT_DEPLOYMENT not in declared
    assert takeover_warnings(REPO, DEFAULT_DEPLOYMENT) == []
    (clash,) = takeover_warnings(REPO, "salve-nightly")
    assert "salve-nightly/salve-nightly is also declared in prefect.yaml" in clash
    assert "salve-pipeline" in declared and takeover_warnings(REPO, "salve-pipeline") == []
    (pool,) = takeover_warnings(REPO, "mine", existing_pool="salve-gpu")
    assert "on work pool 'salve-gpu'" in pool


@pytest.mark.slow
def test_serve_runs_nightly_on_schedule(
    prefect_server, built_project_template: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.exceptions import ObjectNotFound

    from flows.nightly import ARTIFACT_KEY

    root = copy_project(built_project_template, tmp_path / "project")
    remote = tmp_path / "remote"
    dvc(root, "remote", "add", "--local", "-d", "shared", str(remote))

    deployment_name = "nightly-test"
    log = tmp_path / "serve.log"
    t_serve = time.perf_counter()
    serve = start_process(
        salve_cli(root, "schedule", "--interval", str(INTERVAL_S), "--name", deployment_name),
        log=log,
        env=prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="2"),
        cwd=root,
    )
    try:
        with prefect_server.settings(), get_client(sync_client=True) as client:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            deployment, done = None, None
            while done is None:
                if serve.poll() is not None:
                    pytest.fail(f"salve schedule exited with {serve.returncode}:\n{log_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no scheduled run completed in {RUN_TIMEOUT_S} s:\n{log_tail(log)}"
                    )
                time.sleep(1)
                if deployment is None:
                    try:
                        deployment = client.read_deployment_by_name(
                            f"salve-nightly/{deployment_name}"
                        )
                    except ObjectNotFound:
                        continue
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
                for run in runs:
                    if run.state and run.state.is_final() and not run.state.is_completed():
                        pytest.fail(f"scheduled run {run.name} ended {run.state}:\n{log_tail(log)}")
                    if run.state and run.state.is_completed():
                        done = run
            observed = time.perf_counter() - t_serve

            assert done.auto_scheduled, "the completed run was not created by the scheduler"
            assert deployment.schedules and deployment.schedules[0].active
            assert deployment.parameters["root"] == str(root)
            wall = (done.end_time - done.start_time).total_seconds()
            lag = (done.start_time - done.expected_start_time).total_seconds()

            (pipeline_run,) = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[done.id])
                )
            )
            assert pipeline_run.state.is_completed()
            (table,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["salve-stage-summaries"])
                ),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_run.id])),
            )
            rows = stage_rows(table)
            stages = dvc(root, "stage", "list", "--name-only").stdout.split()
            assert [r["stage"] for r in rows] == stages
            assert {r["status"] for r in rows} == {"skipped"}, rows

            (report,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[done.id])),
            )
            markdown = report.data
            assert "**no parameter changed**; 0 metric(s) changed." in markdown
            assert "dvc pull: ok" in markdown and "dvc push: ok" in markdown
    finally:
        # 60 s: under pytest -n 2 on 2 cores, serve's shutdown (pausing the schedule through the
        # API, stopping its runner) once took over 30 s
        rc = stop_process(serve, timeout=60)

    assert rc is not None, f"salve schedule did not stop on SIGTERM:\n{log_tail(log)}"
    assert any(remote.rglob("*")), "dvc push left the remote empty"
    assert dvc(root, "status").stdout.strip() == "Data and pipelines are up to date."
    print(
        f"\n[schedule] server start {prefect_server.start_seconds:.1f} s; "
        f"serve to first completed scheduled run {observed:.1f} s (interval {INTERVAL_S} s); "
        f"scheduled run wall time {wall:.1f} s (start {lag:+.1f} s from its slot); "
        f"serve stopped with exit {rc}"
    )
