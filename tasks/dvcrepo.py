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
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from salve.errors import SalveUserError

if TYPE_CHECKING:
    from salve.present.compare.experiments import ExperimentRow

log = logging.getLogger("salve")

WORKSPACE = "workspace"  # DVC's name for the working tree in diffs
GIT_TIMEOUT_S = 60


class DvcError(SalveUserError, RuntimeError):
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
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.utils.serialize import YAMLFileCorruptedError

    _quiet_dvc_console()
    with contextlib.chdir(root):
        try:
            repo = Repo(str(root))
            try:
                yield repo
            finally:
                repo.close()
        except (YAMLFileCorruptedError, LockError) as exc:  # a file to mend, another DVC running
            raise DvcError(dvc_failure(exc, Path(root))) from exc


def dvc_failure(exc: BaseException, root: Path) -> str:
    """DVC's error as one line that names the file and what to do: no retry mends these."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for name in ("dvc.lock", "dvc.yaml", "params.yaml"):
        if f"'{name}'" in text or f"{name}:" in text:
            mend = {
                "dvc.lock": "restore it with `git checkout dvc.lock` (or delete it: the next "
                "run recomputes and records every stage)",
                "dvc.yaml": "regenerate it with `salve dvc-yaml`",
                "params.yaml": "restore it with `git checkout params.yaml`",
            }[name]
            return f"{root / name}: DVC cannot read it ({text}); {mend}"
    return dvc_busy(root) if "acquire lock" in text else f"DVC failed in {root}: {text}"


def dvc_busy(root: Path) -> str:
    return (
        f"another DVC command is running in {root} (dvc repro, dvc exp run, dvc push ...): wait "
        "for it to finish, then rerun (salve and DVC cannot work in one workspace at once)"
    )


# DVC's repository lock files this process holds for a whole pipeline run (see holding_dvc_lock).
_HELD_DVC_LOCKS: set[str] = set()
DVC_LOCK_WAIT_S = 3.0  # as long as DVC itself retries a busy lock


class _HeldLock:
    """DVC's lock interface for a repository whose lock file this process already holds: DVC
    operations in this process (one at a time, tasks.runner) then pass, re-entrantly."""

    def __init__(self, lockfile: str) -> None:
        self.lockfile = lockfile
        self.files = [lockfile]
        self._depth = 0

    @property
    def is_locked(self) -> bool:
        return self._depth > 0

    def lock(self) -> None:
        self._depth += 1

    def unlock(self) -> None:
        self._depth = max(0, self._depth - 1)

    def __enter__(self) -> None:
        self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def _route_held_locks_to_this_process() -> None:
    """Make every DVC Repo this process opens on a held lock file use `_HeldLock` (Repo asks
    `dvc.lock.make_lock` for its lock when it is created; other DVC locks are untouched)."""
    import dvc.lock

    if getattr(dvc.lock.make_lock, "salve_routed", False):
        return
    original = dvc.lock.make_lock

    def make_lock(lockfile, *args, **kwargs):
        if os.path.abspath(lockfile) in _HELD_DVC_LOCKS:
            return _HeldLock(lockfile)
        return original(lockfile, *args, **kwargs)

    make_lock.salve_routed = True
    dvc.lock.make_lock = make_lock


@contextlib.contextmanager
def holding_dvc_lock(root: Path) -> Iterator[None]:
    """Hold DVC's own repository lock (.dvc/tmp/lock) while a pipeline run owns the workspace.

    A `dvc repro` started meanwhile would delete the outputs of a stage it finds stale before
    running its command, under a stage salve is writing; holding DVC's lock makes it refuse at
    once instead ("Unable to acquire lock"). DVC releases that lock while a stage's command runs,
    so `python -m tasks` under `dvc repro` takes it too, and a `salve run` started then refuses.
    """
    dvc_dir = Path(root) / ".dvc"
    if not dvc_dir.is_dir():
        yield
        return
    import zc.lockfile

    (dvc_dir / "tmp").mkdir(exist_ok=True)
    path = os.path.abspath(dvc_dir / "tmp" / "lock")
    deadline = time.monotonic() + DVC_LOCK_WAIT_S
    while True:
        try:
            handle = zc.lockfile.LockFile(path)
            break
        except zc.lockfile.LockError:
            if time.monotonic() >= deadline:
                raise DvcError(dvc_busy(root)) from None
            time.sleep(0.25)
    _route_held_locks_to_this_process()
    _HELD_DVC_LOCKS.add(path)
    try:
        yield
    finally:
        _HELD_DVC_LOCKS.discard(path)
        handle.close()


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


def restore_recorded_outputs(root: Path, name: str) -> list[str]:
    """Put back the outputs of stage ``name`` that dvc.lock records and the workspace lacks.

    `dvc repro` deletes a stage's outputs before it runs the stage's command; when that command
    then refuses (bad parameters, a busy workspace) or fails, this brings them back from DVC's
    cache: the cached outputs and the uncached metrics and plots alike (DVC's run-cache keeps a
    copy of both). Only missing paths are written. Returns the restored paths; one whose
    recorded content is not in the cache stays missing and is named in the log.
    """
    import shutil

    import yaml

    from tasks import STAGES

    root = Path(root)
    lock_path = root / (STAGES[name].lock_file if name in STAGES else "dvc.lock")
    try:
        recorded = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
        outs = recorded["stages"][name].get("outs", [])
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return []  # nothing recorded (or unreadable): nothing to restore
    missing = [o for o in outs if o.get("md5") and not (root / o["path"]).exists()]
    if not missing:
        return []
    with dvc_repo(root) as repo:
        odb = repo.cache.local

        def copy(md5: str, dest: Path) -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.{os.urandom(6).hex()}.tmp"  # salve.io.TEMP_NAME
            shutil.copyfile(odb.oid_to_path(md5), tmp)
            os.replace(tmp, dest)

        restored = []
        for out in missing:
            dest, md5 = root / out["path"], str(out["md5"])
            try:
                if md5.endswith(".dir"):  # a folder: built beside it, then renamed into place
                    import json

                    entries = json.loads(Path(odb.oid_to_path(md5)).read_text(encoding="utf-8"))
                    building = dest.parent / f".{dest.name}.{os.urandom(6).hex()}.tmp"
                    for entry in entries:
                        copy(entry["md5"], building / entry["relpath"])
                    building.mkdir(parents=True, exist_ok=True)
                    os.replace(building, dest)
                else:
                    copy(md5, dest)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("could not restore %s from DVC's cache (%s)", out["path"], exc)
                continue
            restored.append(out["path"])
    return restored


def stale_stages(root: Path, stages: Sequence[str]) -> list[str]:
    """The stages among ``stages`` that DVC finds out of date (`dvc status`), in that order
    (a study stage, declared in study/dvc.yaml, is asked about as DVC names it)."""
    from tasks import STAGES

    targets = {s: STAGES[s].dvc_target if s in STAGES else s for s in stages}
    with locked_repo(root) as repo:
        status = repo.status(targets=list(targets.values()))
    return [s for s in stages if targets[s] in status]


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


def read_bytes_at(root: Path, rev: str, paths: Sequence[str]) -> dict[str, bytes | None]:
    """The bytes of each of ``paths`` at a commit, as `read_text_at` finds them (git-tracked,
    else DVC-tracked, from DVC's cache); None for one absent there. One DVC filesystem serves
    every path of the revision (opening one costs about a second)."""
    root = Path(root)
    if rev == WORKSPACE:
        return {p: (root / p).read_bytes() if (root / p).is_file() else None for p in paths}
    out: dict[str, bytes | None] = {}
    for path in paths:
        proc = subprocess.run(
            ["git", "show", f"{rev}:./{path}"], cwd=root, capture_output=True, timeout=GIT_TIMEOUT_S
        )
        out[path] = proc.stdout if proc.returncode == 0 else None
    rest = [p for p in paths if out[p] is None]
    if not rest:
        return out
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    from tasks.runner import pipeline_lock

    with pipeline_lock(root):
        try:
            fs = DVCFileSystem(str(root), rev=rev)
        except (DvcException, OSError):
            return out
        try:
            for path in rest:
                try:
                    out[path] = fs.read_bytes(path)
                except (DvcException, FileNotFoundError, OSError):
                    out[path] = None  # absent at this revision, or not in the cache
        finally:
            fs.close()
    return out


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
    from salve.present.compare.experiments import flatten

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
    from salve.present.compare.experiments import ExperimentRow

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
