"""Nightly rerun: `dvc pull` -> the pipeline (as a subflow) -> `dvc push` -> metrics diff artifact.

Served on a schedule by `salve schedule` (flows/schedule.py) or deployed to a work pool from
prefect.yaml. Pull and push happen only when a DVC remote is configured (the repository's default
remote, or the one named by `remote`). The markdown artifact compares the workspace metrics and
params with the last committed state (`dvc metrics diff HEAD`, `dvc params diff HEAD`).

DVC commands never overlap in one repository: a nightly run holds `.salve/nightly.lock` for its
whole length (a second nightly run refuses at once) and the pipeline's own lock around each DVC
command it runs (so a concurrent `salve run` cannot interleave with them either).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import pipeline
from tasks.runner import PipelineBusyError, pipeline_lock

ARTIFACT_KEY = "salve-nightly-metrics-diff"
DVC_TIMEOUT_S = 1800  # pull/push of a large cache over a slow link; never unbounded


class DvcCommandError(RuntimeError):
    """A DVC command the nightly run depends on failed."""


@contextlib.contextmanager
def nightly_lock(root: Path) -> Iterator[None]:
    """One nightly run per repository at a time; a second one fails at once with a clear message."""
    path = root / ".salve" / "nightly.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusyError(
                f"another nightly run is in progress in {root}; this one stops here "
                "(serve with a concurrency limit of 1 to queue runs instead)."
            ) from None
        yield


def run_dvc(root: Path, *args: str, timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`dvc ARGS` in ``root`` with this interpreter's DVC, under the pipeline lock."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    with pipeline_lock(root):
        return subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )


def configured_remote(root: Path, remote: str | None = None) -> str | None:
    """The DVC remote to use: ``remote`` if given (it must exist), else the default one, if any."""
    from dvc.config import Config

    config = Config(dvc_dir=str(root / ".dvc"))  # system, global, repo and local levels
    names = set(config.get("remote", {}))
    default = config.get("core", {}).get("remote")
    if remote is not None:
        if remote not in names:
            raise DvcCommandError(
                f"DVC remote {remote!r} is not configured in {root} "
                f"(configured: {', '.join(sorted(names)) or 'none'}); add it with "
                f"`dvc remote add {remote} URL`."
            )
        return remote
    return default or None


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


@task(name="dvc-pull", cache_policy=NO_CACHE, persist_result=False)
def dvc_pull(root: str, remote: str) -> dict:
    """Fetch the cache objects dvc.lock names and check them out. Missing objects are not fatal:
    the pipeline recomputes whatever is still stale afterwards."""
    log = get_run_logger()
    t0 = time.perf_counter()
    out = run_dvc(Path(root), "pull", "--remote", remote)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        log.warning(
            "dvc pull from %r failed (rc %d) after %.1f s; stale stages will be recomputed:\n%s",
            remote,
            out.returncode,
            seconds,
            _tail(out.stderr or out.stdout),
        )
        return {"ok": False, "seconds": round(seconds, 2), "output": _tail(out.stderr)}
    log.info("dvc pull from %r in %.1f s: %s", remote, seconds, _tail(out.stdout, 300))
    return {"ok": True, "seconds": round(seconds, 2), "output": _tail(out.stdout, 300)}


@task(
    name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=30
)
def dvc_push(root: str, remote: str) -> dict:
    log = get_run_logger()
    t0 = time.perf_counter()
    out = run_dvc(Path(root), "push", "--remote", remote)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        detail = _tail(out.stderr or out.stdout)
        raise DvcCommandError(f"dvc push to {remote!r} failed (rc {out.returncode}):\n{detail}")
    log.info("dvc push to %r in %.1f s: %s", remote, seconds, _tail(out.stdout, 300))
    return {"ok": True, "seconds": round(seconds, 2), "output": _tail(out.stdout, 300)}


def _diff_json(root: Path, kind: str) -> dict:
    """`dvc {metrics|params} diff HEAD --json`: {file: {name: {old, new[, diff]}}}."""
    out = run_dvc(root, kind, "diff", "HEAD", "--json", timeout=300)
    if out.returncode != 0:
        raise DvcCommandError(
            f"dvc {kind} diff HEAD failed (rc {out.returncode}):\n{_tail(out.stderr or out.stdout)}"
        )
    text = out.stdout.strip()
    return json.loads(text) if text else {}


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|")


def _diff_table(diff: dict, what: str) -> tuple[str, int]:
    rows = [
        f"| {path} | {name} | {_cell(d.get('old'))} | {_cell(d.get('new'))} "
        f"| {_cell(d.get('diff'))} |"
        for path, entries in sorted(diff.items())
        for name, d in sorted(entries.items())
    ]
    if not rows:
        return f"No {what} changed since HEAD.\n", 0
    head = f"| file | {what[:-1]} | HEAD | workspace | change |\n|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n", len(rows)


@task(name="dvc-diff", cache_policy=NO_CACHE, persist_result=False)
def metrics_and_params_diff(root: str) -> dict:
    """Both diffs against HEAD; a failed diff (no commit yet, say) is reported, not raised."""
    r = Path(root)
    out: dict = {"errors": {}}
    for kind in ("metrics", "params"):
        try:
            out[kind] = _diff_json(r, kind)
        except (DvcCommandError, json.JSONDecodeError) as exc:
            get_run_logger().warning("%s", exc)
            out[kind], out["errors"][kind] = {}, str(exc)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=r, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    out["head"] = rev or "unknown"
    return out


def render_report(
    root: Path, diff: dict, rows: list[dict], pulled: dict | None, pushed: dict | None
) -> tuple[str, int]:
    metrics_md, n_metrics = _diff_table(diff["metrics"], "metrics")
    params_md, _ = _diff_table(diff["params"], "params")
    errors = diff.get("errors", {})
    if "metrics" in errors:
        metrics_md = f"Not available:\n\n```\n{errors['metrics']}\n```\n"
    if "params" in errors:
        params_md = f"Not available:\n\n```\n{errors['params']}\n```\n"
    stage_md = "| stage | status | seconds | summary |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['stage']} | {r['status']} | {r['seconds']} | {_cell(r['summary'])} |" for r in rows
    )

    def sync(label: str, res: dict | None) -> str:
        if res is None:
            return f"{label}: skipped (no DVC remote configured)"
        return f"{label}: {'ok' if res['ok'] else 'FAILED'} in {res['seconds']} s"

    text = (
        f"# SALVE nightly: metrics against HEAD ({diff['head']})\n\n"
        f"Repository: `{root}`\n\n"
        f"- {sync('dvc pull', pulled)}\n- {sync('dvc push', pushed)}\n\n"
        f"## Metrics (`dvc metrics diff HEAD`)\n\n{metrics_md}\n"
        f"## Params (`dvc params diff HEAD`)\n\n{params_md}\n"
        f"## Stages\n\n{stage_md}\n"
    )
    return text, n_metrics


@flow(name="salve-nightly")
def nightly(root: str = ".", remote: str | None = None, push: bool = True) -> dict:
    """Pull, rerun what is stale, push, and publish what changed since the last commit."""
    log = get_run_logger()
    root_path = Path(root).resolve()
    if not (root_path / "dvc.yaml").exists():
        raise FileNotFoundError(f"{root_path}: no dvc.yaml here; pass the repository root")
    # DVC resolves outputs against the working directory: run inside the repository.
    with contextlib.chdir(root_path), nightly_lock(root_path):
        name = configured_remote(root_path, remote)
        pulled = dvc_pull(str(root_path), name) if name else None
        if name is None:
            log.info("no DVC remote configured: skipping dvc pull and dvc push")
        rows = pipeline(root=str(root_path), progress=False)
        pushed = dvc_push(str(root_path), name) if name and push else None
        diff = metrics_and_params_diff(str(root_path))
        markdown, changed = render_report(root_path, diff, rows, pulled, pushed)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown,
        description=f"SALVE nightly: {changed} metric(s) changed since HEAD ({diff['head']})",
    )
    return {
        "remote": name,
        "pulled": pulled,
        "pushed": pushed,
        "stages": rows,
        "metrics_changed": changed,
        "head": diff["head"],
    }
