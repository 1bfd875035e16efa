"""Run one stage with DVC as the freshness authority.

For each stage: ask DVC whether it is up to date (skip if so); otherwise try DVC's run-cache
(restores outputs produced earlier with the same deps and params, byte for byte); otherwise run
`tasks.<stage>.run` in this process and `dvc commit` the stage, which records it in dvc.lock and
the run-cache. After a pipeline run `dvc status` is clean and `dvc repro` has nothing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from salve.config import Config
from salve.errors import SalveUserError
from salve.io import TEMP_NAME, read_json, remove_temp_files, write_json
from tasks import STAGES
from tasks.dvcrepo import dvc_repo, holding_dvc_lock, restore_from_run_cache, stage_is_fresh

log = logging.getLogger("salve")


@dataclass
class InterruptState:
    """What a signal handler needs to know (flows/interrupt.py): the running stage, and whether
    DVC's bookkeeping is under way (an interrupt then waits for it: `pending`)."""

    running: dict[str, float] = field(default_factory=dict)  # stage -> perf_counter at start
    critical: int = 0
    pending: Callable[[], None] | None = None


INTERRUPT = InterruptState()


@contextlib.contextmanager
def dvc_bookkeeping() -> Iterator[None]:
    """A section an interrupt must not cut: it takes effect right after."""
    INTERRUPT.critical += 1
    try:
        yield
    finally:
        INTERRUPT.critical -= 1
        if not INTERRUPT.critical and INTERRUPT.pending is not None:
            INTERRUPT.pending()


class PipelineBusyError(SalveUserError, RuntimeError):
    """Another pipeline run holds this repository."""


def exit_code_reporting_errors(
    fn: Callable[[], int], *, debug: bool = False, root: Path | None = None
) -> int:
    """Run `fn`; a bad parameter exits 2, a user-facing error 1, each as one line on stderr.

    Any other exception is a bug or an environment problem: one line too, naming the log file
    that holds its traceback (or, with ``debug``, the traceback itself).
    """
    from salve.config import ConfigError

    try:
        return fn()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SalveUserError, FileNotFoundError) as exc:  # the message names the fix
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        described = describe_environment_error(exc)
        if described is not None and not debug:
            print(f"error: {described}", file=sys.stderr)
            return 1
        if debug or root is None:
            raise
        import traceback

        log_path = Path(root) / ".salve" / "logs" / "run.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} unexpected error\n")
            traceback.print_exc(file=fh)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: unexpected {type(exc).__name__}: {first} (traceback in {log_path}; "
            "rerun with --debug to see it here)",
            file=sys.stderr,
        )
        return 1


# What no rerun mends by itself, and what mends it (the file is named before each).
_OS_ERROR_FIXES = {
    errno.ENOSPC: "no space left on the device; free space there (`dvc gc --workspace` drops "
    "cached versions no commit uses) and rerun",
    errno.EDQUOT: "disk quota exceeded; free space there or raise the quota, and rerun",
    errno.EROFS: "read-only file system; make the project's folders writable (or work in a "
    "writable clone) and rerun",
    errno.EACCES: "permission denied; make it writable (e.g. `chmod -R u+w` on its folder) and "
    "rerun",
    errno.EPERM: "operation not permitted; make it writable (e.g. `chmod -R u+w` on its "
    "folder) and rerun",
}


def _final_name(filename: object) -> str:
    """The artifact a temp file stands for (salve.io's `.NAME.<hex>.tmp` next to NAME)."""
    path = Path(str(filename))
    if TEMP_NAME.match(path.name):
        return str(path.with_name(path.name[1:].rsplit(".", 2)[0]))
    return str(path)


def describe_environment_error(exc: BaseException) -> str | None:
    """One line naming the file and the fix for a failure of the machine rather than of salve
    (disk full, read-only or forbidden folder), found anywhere in the exception's chain; None
    for anything else. Such failures fail the same way again: they are never retried."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        fix = _OS_ERROR_FIXES.get(getattr(current, "errno", None))
        if isinstance(current, OSError) and fix is not None:
            where = current.filename or current.filename2
            return f"{_final_name(where)}: {fix}" if where else fix
        current = current.__cause__ or current.__context__
    return None


@dataclass
class StageOutcome:
    name: str
    status: str  # "skipped" | "restored" | "ran"
    seconds: float
    summary: dict = field(default_factory=dict)

    def line(self) -> str:
        """One terminal line: stage, status, seconds and the stage's headline numbers."""
        r = self.row()
        return f"{r['stage']:<10} {r['status']:<9} {r['seconds']:>7.1f} s  {r['summary']}"

    def row(self) -> dict:
        from tasks.keymetrics import headline

        return {
            "stage": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "summary": headline(self.name, self.summary),
        }


_HELD: dict[Path, int] = {}  # lock depth per repository held by this process


@contextlib.contextmanager
def pipeline_lock(root: Path) -> Iterator[None]:
    """One pipeline run per repository: a second one refuses at once with a clear message.

    Re-entrant within a process (the CLI holds it across editing params.yaml and the flow).
    DVC's own lock is held with it, so a `dvc repro` started meanwhile refuses too.
    """
    key = Path(root).resolve()
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = key / ".salve" / "run.lock"
    busy = (
        "another salve run is in progress in {where} ({holder}); wait for it to finish "
        "(runs in one repository cannot overlap: they share the workspace and DVC cache)."
    )
    with exclusive_lock(path, busy, where=key), holding_dvc_lock(key):
        _HELD[key] = 1
        remove_left_temp_files(key)
        try:
            yield
        finally:
            _HELD.pop(key, None)


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str, **fmt: object) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released when the process dies, even by kill -9); when
    another process holds it, raise PipelineBusyError with `busy` formatted with `fmt` and the
    holder (`{holder}`: the pid it wrote)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise PipelineBusyError(busy.format(holder=holder, **fmt)) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield


def remove_left_temp_files(root: Path) -> list[Path]:
    """Temp files anywhere salve writes, left by a killed run (kill -9, power loss).

    Called when a process takes the pipeline lock: it is then the only writer, so every temp
    file present belongs to a run that is gone (a killed fine-tuning left 179 MB of them in
    .salve/resume and beside the checkpoint, which later runs that skipped the stage kept).
    """
    folders = {root / ".salve", *(root / d for d in ("results", "metrics", "plots", "reports"))}
    folders |= {STAGES[name].folder(root) for name in STAGES}
    removed = [p for folder in sorted(folders) for p in remove_temp_files(folder)]
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", len(removed))
    return removed


def prune_stale_outputs(out_dir: Path, since: float) -> list[Path]:
    """Delete files in a stage's output folder that its successful run did not write.

    Outputs are replaced by atomic renames (new mtime), so anything older is a leftover of an
    earlier configuration (e.g. the PNG of a feature no longer ranked) that DVC would otherwise
    cache as part of this run. Pruned only after success: a failed run keeps the old outputs.
    """
    stale = [
        p
        for p in Path(out_dir).rglob("*")
        if p.is_file() and p.name != ".gitignore" and p.stat().st_mtime < since
    ]
    for p in stale:
        p.unlink()
    return stale


# One DVC operation at a time in this process: stages may run concurrently (the flow's DAG),
# their DVC bookkeeping may not (DVC's repository lock, and the working directory it uses).
_DVC_LOCK = threading.RLock()


def release_freed_memory() -> bool:
    """Hand the memory a finished stage freed back to the system (glibc's ``malloc_trim``).

    Stages run one after another in the flow's threads, and glibc keeps what a thread freed in
    that thread's arena for reuse: without this, each stage's peak stayed resident under the next
    one's, and the flow's resident memory grew with the image count. False where there is no
    glibc (musl, macOS): nothing to do there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def run_stage(
    name: str,
    cfg: Config,
    root: Path,
    *,
    force: bool = False,
    progress: bool = True,
    **stage_kwargs,
) -> StageOutcome:
    """Skip ``name`` when DVC finds it up to date, else restore it from DVC's run-cache, else
    run it and commit it. ``stage_kwargs`` go to the stage's `run` (e.g. a fan-out mapper)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    from salve.runtime import pin_cpu_kernels

    t0 = time.perf_counter()
    root = Path(root).resolve()
    pin_cpu_kernels(cfg.common.reproducible)  # idempotent; entry points call it first
    with pipeline_lock(root):  # held already by every entry point: re-entrant, free
        outcome = _run_stage_locked(name, cfg, root, t0, force, progress, stage_kwargs)
    return outcome


def _run_stage_locked(
    name: str, cfg: Config, root: Path, t0: float, force: bool, progress: bool, stage_kwargs: dict
) -> StageOutcome:
    INTERRUPT.running[name] = t0
    target = STAGES[name].dvc_target  # `name`, or `study/dvc.yaml:name` for a study stage
    try:
        with _DVC_LOCK, dvc_repo(root) as repo:
            fresh = not force and stage_is_fresh(repo, target)
            restored = False
            if not fresh and not force:
                with dvc_bookkeeping():
                    restored = restore_from_run_cache(repo, target)
        if fresh:
            status = "skipped"
        elif restored:
            status = "restored"
        else:
            module = importlib.import_module(f"tasks.{name}")
            # File mtimes come from the kernel's coarse clock, which can lag time.time() by
            # milliseconds: the margin keeps a file written at the very start of the run.
            started = time.time() - 1.0
            module.run(cfg, root, progress=progress, **stage_kwargs)
            with _DVC_LOCK, dvc_bookkeeping(), dvc_repo(root) as repo:
                prune_stale_outputs(STAGES[name].folder(root), started)
                repo.commit(target, force=True)
            status = "ran"
    finally:
        INTERRUPT.running.pop(name, None)
        release_freed_memory()
    seconds = time.perf_counter() - t0
    write_json(
        root / ".salve" / "timings" / f"{name}.json",
        {"stage": name, "status": status, "seconds": seconds, "finished": time.time()},
    )
    metrics_path = STAGES[name].metrics_path(root)
    summary = read_json(metrics_path) if metrics_path.exists() else {}
    log.debug("stage %s %s in %.2f s", name, status, seconds)
    return StageOutcome(name, status, seconds, summary)
