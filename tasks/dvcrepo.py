"""The one DVC adapter: every DVC operation salve performs goes through this module.

Everything uses DVC's Python API (`dvc.repo.Repo` and its `status`, `commit`, `stage_cache`,
`params.diff`, `metrics.diff`, `experiments.show`, `experiments.ls`, `pull`, `push`; `dvc.config`
for remotes; `dvc.api.read` for a DVC-tracked file at a revision), in this process: no `dvc`
subprocess is needed (each would also cost a second or more of start-up). Plain git questions
(resolve a revision, a git-tracked file at a revision, branch names) ask `git` itself.

One DVC operation at a time per repository: DVC's own lock (.dvc/tmp/lock) makes a second
concurrent command fail rather than wait. Each function here that opens the repository holds the
pipeline's lock (`tasks.runner.pipeline_lock`, .salve/run.lock) while it works: re-entrant in
this process (a pipeline run, the nightly flow, `salve run` holding it already) and refusing at
once, with a clear message, while another process holds it. The stage helpers (`dvc_repo`,
`stage_is_fresh`, `restore_from_run_cache`) take a repository their caller opened under that
lock (tasks/runner.py).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from salve.compare import ExperimentRow

WORKSPACE = "workspace"  # DVC's name for the working tree in diffs
GIT_TIMEOUT_S = 60


class DvcError(RuntimeError):
    """A DVC operation salve depends on failed; the message names the operation and the cause."""


# ------------------------------------------------------------------------------------------
# Opening the repository
# ------------------------------------------------------------------------------------------


def _quiet_dvc_console() -> None:
    """DVC prints "Updating lock file" and the like on stdout from its own handlers; inside
    salve its records go to the root logger instead (the run log under `salve run`)."""
    dvc_log = logging.getLogger("dvc")
    for handler in list(dvc_log.handlers):
        dvc_log.removeHandler(handler)
    dvc_log.propagate = True


@contextlib.contextmanager
def dvc_repo(root: Path) -> Iterator:
    """A DVC Repo for `root`, used from inside it (DVC resolves output paths against the cwd)."""
    from dvc.repo import Repo

    _quiet_dvc_console()
    with contextlib.chdir(root):
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()


def find_root(start: Path | str = ".") -> Path:
    """The DVC repository holding ``start`` (it or a parent folder with `.dvc/`)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(start)))
    except NotDvcRepoError as exc:
        raise DvcError(
            f"{Path(start).resolve()}: not inside a DVC repository ({exc}); run from the "
            "project's folder or pass --root"
        ) from None


@contextlib.contextmanager
def locked_repo(root: Path) -> Iterator:
    """The repository at (or above) ``root``, opened under the pipeline's lock."""
    from tasks.runner import pipeline_lock  # tasks.runner imports this module

    top = find_root(root)
    with pipeline_lock(top), dvc_repo(top) as repo:
        yield repo


# ------------------------------------------------------------------------------------------
# Stages (the runner's helpers: the caller holds the lock)
# ------------------------------------------------------------------------------------------


def stage_is_fresh(repo, name: str) -> bool:
    return not repo.status(targets=[name])


def restore_from_run_cache(repo, name: str) -> bool:
    from dvc.exceptions import ConfirmRemoveError
    from dvc.stage.cache import RunCacheNotFoundError

    (stage,) = repo.stage.collect(name)
    with repo.lock:
        try:
            repo.stage_cache.restore(stage)
        except RunCacheNotFoundError:
            return False
        except ConfirmRemoveError:
            # An output holds content DVC has no copy of (corrupted, edited by hand, or rewritten
            # by the stage's command run outside DVC), so it will not delete it unasked. The
            # stage owns its outputs and running it would replace them too: delete them all,
            # cached or not (the run-cache holds copies of both), and restore the recorded
            # versions (`dvc repro` also removes a stage's outputs before it consults the
            # run-cache).
            for out in stage.outs:
                out.remove(ignore_remove=False)
            try:
                repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:
                return False
    repo.commit(name, force=True)
    return True


def stale_stages(root: Path, stages: Sequence[str]) -> list[str]:
    """The stages among ``stages`` that DVC finds out of date (`dvc status`), in that order."""
    with locked_repo(root) as repo:
        status = repo.status(targets=list(stages))
    return [s for s in stages if s in status]


def commit(root: Path, stage: str) -> None:
    """Record a stage's current outputs in dvc.lock and the cache (`dvc commit --force`)."""
    with locked_repo(root) as repo:
        repo.commit(stage, force=True)


# ------------------------------------------------------------------------------------------
# Revisions and diffs
# ------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )


def git_commit(root: Path, rev: str) -> str | None:
    """The commit sha ``rev`` names in git (branch, tag, sha, HEAD~1), else None."""
    if not rev or rev.startswith("-"):
        return None
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def experiment_commits(root: Path, name: str) -> list[str]:
    """Commit shas of the DVC experiments called ``name``, whatever their baseline
    (`dvc exp list --all-commits`)."""
    with locked_repo(root) as repo:
        listed = repo.experiments.ls(all_commits=True)
    return sorted({sha for exps in listed.values() for n, sha in exps if n == name and sha})


def resolve_revision(root: Path, rev: str) -> str:
    """The commit sha of a git revision or a DVC experiment name; `workspace` stays itself."""
    if rev == WORKSPACE:
        return WORKSPACE
    sha = git_commit(root, rev)
    if sha:
        return sha
    if rev and not rev.startswith("-") and _git(root, "rev-parse", "--git-dir").returncode == 0:
        shas = experiment_commits(root, rev)
        if len(shas) == 1:
            return shas[0]
        if len(shas) > 1:
            raise DvcError(f"revision {rev!r} is ambiguous: DVC experiments {', '.join(shas)}")
    raise DvcError(
        f"unknown revision {rev!r}: not a git revision or DVC experiment in {root} "
        "(list them with `salve exps` or `git log --oneline`)"
    )


def _diff(root: Path, kind: str, a_rev: str, b_rev: str, *, unchanged: bool) -> dict:
    with locked_repo(root) as repo:
        result = getattr(repo, kind).diff(a_rev=a_rev, b_rev=b_rev, all=unchanged)
    errors = {rev: err for rev, err in (result.get("errors") or {}).items() if err}
    if errors:
        detail = "; ".join(f"{rev}: {err}" for rev, err in errors.items())
        raise DvcError(f"dvc {kind} diff {a_rev} {b_rev}: could not read {kind} ({detail})")
    return {Path(p).as_posix(): entries for p, entries in (result.get("diff") or {}).items()}


def params_diff(root: Path, a_rev: str, b_rev: str = WORKSPACE, *, unchanged: bool = False) -> dict:
    """`dvc params diff A B`: ``{file: {dotted.key: {"old", "new"[, "diff"]}}}``, the changed
    entries (``unchanged``: every entry, as `--all`); files as repository-relative paths."""
    return _diff(Path(root), "params", a_rev, b_rev, unchanged=unchanged)


def metrics_diff(
    root: Path, a_rev: str, b_rev: str = WORKSPACE, *, unchanged: bool = False
) -> dict:
    """`dvc metrics diff A B`, shaped as `params_diff`."""
    return _diff(Path(root), "metrics", a_rev, b_rev, unchanged=unchanged)


def read_text_at(root: Path, rev: str, path: str) -> str | None:
    """The text of ``path`` at a commit (git-tracked, else DVC-tracked), or in the working
    tree for `workspace`; None when it does not exist there."""
    root = Path(root)
    if rev == WORKSPACE:
        p = root / path
        return p.read_text(encoding="utf-8") if p.is_file() else None
    proc = _git(root, "show", f"{rev}:./{path}")
    if proc.returncode == 0:
        return proc.stdout
    import dvc.api
    from dvc.exceptions import DvcException

    from tasks.runner import pipeline_lock

    try:
        with pipeline_lock(root):
            return dvc.api.read(path, repo=str(root), rev=rev, encoding="utf-8")
    except (DvcException, FileNotFoundError, OSError):
        return None  # absent at this revision: the caller says so


# ------------------------------------------------------------------------------------------
# Experiments
# ------------------------------------------------------------------------------------------


def _data(results: dict | None) -> dict[str, dict]:
    """DVC's ``{file: {"data": values} | {"error": ...}}`` as ``{file: values}``."""
    return {
        Path(f).as_posix(): r["data"]
        for f, r in (results or {}).items()
        if isinstance(r, dict) and isinstance(r.get("data"), dict)
    }


def _flat_params(params: dict[str, dict]) -> dict[str, Any]:
    from salve.compare import flatten

    out: dict[str, Any] = {}
    for file, values in params.items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        out |= flatten(values, prefix)
    return out


def _branch_names(root: Path) -> dict[str, str]:
    proc = _git(root, "for-each-ref", "--format=%(objectname) %(refname:short)", "refs/heads")
    names: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        sha, _, name = line.partition(" ")
        names.setdefault(sha, name)
    return names


def experiments(
    root: Path, rev: str = "HEAD", num: int = 1, all_commits: bool = False
) -> list[ExperimentRow]:
    """The workspace, the baseline commits (``num`` first-parent commits from ``rev``, or every
    commit) and their DVC experiments, as `dvc exp show` lists them."""
    from salve.compare import ExperimentRow

    root = find_root(root)
    with locked_repo(root) as repo:
        states = repo.experiments.show(revs=[rev], num=num, all_commits=all_commits)
    branches = _branch_names(root)
    rows: list[ExperimentRow] = []

    def row(state, name: str, baseline: bool, run_state: str = "") -> ExperimentRow:
        data = state.data
        return ExperimentRow(
            name=name,
            rev=state.rev,
            params=_flat_params(_data(data.params)) if data else {},
            metrics=_data(data.metrics) if data else {},
            state="" if run_state in ("", "success") else run_state,
            baseline=baseline,
        )

    for base in states:
        name = WORKSPACE if base.rev == WORKSPACE else base.name or branches.get(base.rev)
        name = name or base.rev[:7]
        rows.append(row(base, name, baseline=True))
        for exp_range in base.experiments or ():
            executor = getattr(exp_range, "executor", None)
            run_state = getattr(executor, "state", "") or ""
            for state in exp_range.revs:
                exp_name = exp_range.name or state.name or state.rev[:7]
                rows.append(row(state, exp_name, baseline=False, run_state=run_state))
    return rows


# ------------------------------------------------------------------------------------------
# Remotes
# ------------------------------------------------------------------------------------------


def configured_remote(root: Path, remote: str | None = None) -> str | None:
    """The DVC remote to use: ``remote`` if given (it must exist), else the default one, if any."""
    from dvc.config import Config

    root = Path(root)
    config = Config(dvc_dir=str(root / ".dvc"))  # system, global, repo and local levels
    names = set(config.get("remote", {}))
    default = config.get("core", {}).get("remote")
    if remote is not None:
        if remote not in names:
            raise DvcError(
                f"DVC remote {remote!r} is not configured in {root} "
                f"(configured: {', '.join(sorted(names)) or 'none'}); add it with "
                f"`dvc remote add {remote} URL`."
            )
        return remote
    return default or None


def pull(root: Path, remote: str) -> dict:
    """`dvc pull --remote REMOTE`: fetch what dvc.lock names and check it out. Returns DVC's
    counts (fetched, added, modified, deleted); raises DvcError when anything failed."""
    from dvc.exceptions import DvcException

    try:
        with locked_repo(root) as repo:
            result = repo.pull(remote=remote)
    except DvcException as exc:
        raise DvcError(f"dvc pull from {remote!r} failed: {exc}") from exc
    stats = result.get("stats", {}) if isinstance(result, dict) else {}
    return {k: v if isinstance(v, int) else len(v) for k, v in stats.items()}


def push(root: Path, remote: str) -> int:
    """`dvc push --remote REMOTE`: upload every cached output dvc.lock names; returns the number
    of files transferred; raises DvcError when anything failed."""
    from dvc.exceptions import DvcException

    try:
        with locked_repo(root) as repo:
            return int(repo.push(remote=remote) or 0)
    except DvcException as exc:
        raise DvcError(f"dvc push to {remote!r} failed: {exc}") from exc
