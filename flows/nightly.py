"""Nightly rerun: `dvc pull` -> the pipeline (as a subflow) -> `dvc push` -> what changed.

With ``with_study`` (`salve schedule --with-study`) the study's stages (flows/study.py) run
after the pipeline, before the push, and their key metrics join the artifact.

Served on a schedule by `salve schedule` (flows/schedule.py) or deployed to a work pool from
prefect.yaml. Pull and push happen only when a DVC remote is configured (the repository's default
remote, or the one named by `remote`). The markdown artifact `salve-nightly-metrics-diff`
compares the workspace with the last commit (HEAD) in the compare page's order: the parameter
changes (the cause) first, one line on how many classes' dominant features survived since HEAD
(the latent matching `salve compare` shows, salve/matching.py), then every key metric
(tasks/keymetrics.py) with direction and judgement, then the other metric changes as one line per
stage with their table folded, and the stage table last.

Every DVC operation goes through tasks/dvcrepo.py, in this process. They never overlap in one
repository: a nightly run holds `.salve/nightly.lock` for its whole length (a second nightly run
refuses at once) and each DVC operation holds the pipeline's lock (`.salve/run.lock`, the one
`salve run` takes), so a concurrent `salve run` cannot interleave with them either.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.pipeline import pipeline
from tasks import dvcrepo
from tasks.dvcrepo import WORKSPACE, DvcError, configured_remote, git_commit, read_text_at
from tasks.runner import exclusive_lock

ARTIFACT_KEY = "salve-nightly-metrics-diff"


@contextlib.contextmanager
def nightly_lock(root: Path) -> Iterator[None]:
    """One nightly run per repository at a time; a second one fails at once with a clear message."""
    busy = (
        "another nightly run is in progress in {where}; this one stops here "
        "(serve with a concurrency limit of 1 to queue runs instead)."
    )
    with exclusive_lock(root / ".salve" / "nightly.lock", busy, where=root):
        yield


def _counts(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items()) or "nothing to do"


@task(name="dvc-pull", cache_policy=NO_CACHE, persist_result=False)
def dvc_pull(root: str, remote: str) -> dict:
    """Fetch the cache objects dvc.lock names and check them out. Missing objects are not fatal:
    the pipeline recomputes whatever is still stale afterwards."""
    log = get_run_logger()
    t0 = time.perf_counter()
    try:
        stats = dvcrepo.pull(Path(root), remote)
    except DvcError as exc:
        seconds = time.perf_counter() - t0
        log.warning("%s (after %.1f s); stale stages will be recomputed", exc, seconds)
        return {"ok": False, "seconds": round(seconds, 2), "output": str(exc)}
    seconds = time.perf_counter() - t0
    log.info("dvc pull from %r in %.1f s: %s", remote, seconds, _counts(stats))
    return {"ok": True, "seconds": round(seconds, 2), "output": _counts(stats)}


@task(
    name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=30
)
def dvc_push(root: str, remote: str) -> dict:
    log = get_run_logger()
    t0 = time.perf_counter()
    pushed = dvcrepo.push(Path(root), remote)  # DvcError fails the task (and is retried)
    seconds = time.perf_counter() - t0
    log.info("dvc push to %r in %.1f s: %d file(s) uploaded", remote, seconds, pushed)
    return {"ok": True, "seconds": round(seconds, 2), "output": f"{pushed} file(s) uploaded"}


def _json_at(root: Path, rev: str, path: str) -> dict:
    text = read_text_at(root, rev, path)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


@task(name="dvc-diff", cache_policy=NO_CACHE, persist_result=False)
def metrics_and_params_diff(root: str) -> dict:
    """Both diffs, HEAD against the workspace; a failed diff (no commit yet, say) is reported,
    not raised. Metrics include unchanged entries, so key metrics show both values."""
    from tasks.keymetrics import VAL_SAMPLES, val_samples

    r = Path(root)
    out: dict = {"errors": {}}
    for kind, fn in (("metrics", dvcrepo.metrics_diff), ("params", dvcrepo.params_diff)):
        try:
            out[kind] = fn(r, "HEAD", WORKSPACE, unchanged=kind == "metrics")
        except DvcError as exc:
            get_run_logger().warning("%s", exc)
            out[kind], out["errors"][kind] = {}, str(exc)
    head = git_commit(r, "HEAD")
    out["head"] = head[:7] if head else "unknown"
    file = VAL_SAMPLES[0]
    out["val_samples"] = val_samples(
        *({file: _json_at(r, rev, file)} for rev in ((head,) if head else ()) + (WORKSPACE,))
    )
    out["features"] = dominant_features_line(r, head)
    return out


def dominant_features_line(root: Path, head: str | None) -> str:
    """How many classes' dominant features survived since HEAD (salve/matching.py's matching,
    as `salve compare` shows it); a failure is said, not raised."""
    from flows.compare import dominant_survival

    if head is None:
        return "Dominant features since HEAD: not compared (no commit yet)."
    try:
        return dominant_survival(root, "HEAD", WORKSPACE)
    except (DvcError, OSError, ValueError, KeyError, RuntimeError) as exc:
        get_run_logger().warning("feature matching against HEAD failed: %s", exc)
        return f"Dominant features since HEAD: not compared ({_cell(exc)})."


def _cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def changed_count(metrics: dict) -> int:
    """Metric entries whose value differs (a diff with `--all` also lists equal ones)."""
    return sum(
        e.get("old") != e.get("new") for entries in metrics.values() for e in entries.values()
    )


def render_report(
    root: Path, diff: dict, rows: list[dict], pulled: dict | None, pushed: dict | None
) -> tuple[str, int, str]:
    """The artifact's Markdown, the number of metrics changed since HEAD, and the parameter
    changes in one line (the likely cause)."""
    from salve.present.compare.metrics import param_rows
    from salve.present.compare.text import metrics_diff_markdown
    from tasks.keymetrics import headline, key_metrics, metrics_files

    errors = diff.get("errors", {})
    body = metrics_diff_markdown(
        diff["params"],
        diff["metrics"],
        key_metrics(diff.get("val_samples")),
        old_label="HEAD",
        new_label="workspace",
        file_order=metrics_files(),
    )
    for kind in ("params", "metrics"):
        if kind in errors:
            body = f"**{kind} diff not available:** `{_cell(errors[kind])}`\n\n" + body
    changed = changed_count(diff["metrics"])
    params = param_rows(diff["params"])
    cause = (
        "; ".join(f"{key} {old} -> {new}" for _, key, old, new, _ in params[:3])
        + ("; ..." if len(params) > 3 else "")
        if params
        else "no parameter changed"
    )

    def sync(label: str, res: dict | None) -> str:
        if res is None:
            return f"{label}: skipped (no DVC remote configured)"
        return f"{label}: {'ok' if res['ok'] else 'FAILED'} in {res['seconds']} s"

    def summary(r: dict) -> str:
        metrics = root / "metrics" / f"{r['stage']}.json"
        try:
            return headline(r["stage"], json.loads(metrics.read_text()))
        except (OSError, json.JSONDecodeError):
            return str(r.get("summary", ""))

    stage_md = "| stage | status | seconds | key metrics |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['stage']} | {r['status']} | {r['seconds']} | {_cell(summary(r))} |" for r in rows
    )
    text = (
        f"# SALVE nightly: the workspace against HEAD ({diff['head']})\n\n"
        f"**{cause}**; {changed} metric(s) changed.\n\n"
        + (f"{diff['features']}\n\n" if diff.get("features") else "")
        + f"Repository: `{root}` · {sync('dvc pull', pulled)} · {sync('dvc push', pushed)}\n\n"
        f"{body}\n"
        f"### Stages\n\n{stage_md}\n"
    )
    return text, changed, cause


@flow(name="salve-nightly", persist_result=False)
def nightly(
    root: str = ".", remote: str | None = None, push: bool = True, with_study: bool = False
) -> dict:
    """Pull, rerun what is stale (the study's stages too with ``with_study``), push, and
    publish what changed since the last commit."""
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
        if with_study:  # flows/study.py: its stages through the same runner, as a subflow
            from flows.study import run_study

            rows = rows + run_study(root_path, check_fresh=False)["stages"]
        pushed = dvc_push(str(root_path), name) if name and push else None
        diff = metrics_and_params_diff(str(root_path))
        markdown, changed, cause = render_report(root_path, diff, rows, pulled, pushed)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=markdown,
        description=f"SALVE nightly vs HEAD ({diff['head']}): {cause}; {changed} metric(s) changed",
    )
    return {
        "remote": name,
        "pulled": pulled,
        "pushed": pushed,
        "stages": rows,
        "metrics_changed": changed,
        "head": diff["head"],
    }
