"""Ctrl-C and SIGTERM during `salve run`/`salve stage`: stop within seconds, say what was cut off.

Left to Prefect, an interrupt gives a long traceback and can leave the process hanging (Ctrl-C
also kills the temporary Prefect API server, and the client keeps retrying it). So the signal
handler prints one line naming the interrupted stage and how the rerun resumes, stops the
child processes (the temporary API server, Dask workers), and exits at once with 128 + signal
number, without Prefect's shutdown. DVC's bookkeeping for a stage (run-cache restore, commit) is
a critical section (tasks.runner): an interrupt arriving inside it takes effect right after it,
so dvc.lock and the cache stay consistent. A second signal exits immediately.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tasks.runner import INTERRUPT

# How each stage resumes after an interrupt (the others simply rerun).
RESUME_NOTES = {"finetune": "fine-tuning continues from its last finished epoch"}


def message(signum: int) -> str:
    name = signal.Signals(signum).name
    running = dict(INTERRUPT.running)
    if not running:
        where = "between stages: stages that finished are kept and up to date"
    else:
        now = time.perf_counter()
        stages = ", ".join(f"{s} ({now - t:.0f} s in)" for s, t in running.items())
        verb = "did" if len(running) == 1 else "do"
        where = (
            f"during stage {stages}; stages that finished are kept and up to date, the "
            f"interrupted {'one' if len(running) == 1 else 'ones'} {verb} not record anything"
        )
    notes = [RESUME_NOTES[s] for s in running if s in RESUME_NOTES]
    resume = f"; rerun the same command to resume{f' ({notes[0]})' if notes else ''}"
    return f"interrupted by {name} {where}{resume}."


def stop_children(timeout: float = 3.0) -> None:
    """Terminate this process's children (the temporary Prefect API, Dask workers), then kill
    what is left: nothing outlives the run."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue


def _finish(signum: int) -> None:
    print(message(signum), file=sys.stderr, flush=True)
    try:
        stop_children()
    finally:
        os._exit(128 + signum)


def _handler(signum: int, _frame) -> None:
    if INTERRUPT.critical and INTERRUPT.pending is None:
        INTERRUPT.pending = lambda: _finish(signum)  # run when DVC's bookkeeping is done
        return
    _finish(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM as above (main thread only, as Python requires)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


def reclaim() -> None:
    """Inside a flow started by the CLI: take SIGTERM back from Prefect's engine.

    The flow engine installs its own SIGTERM handler for the flow's duration (a worker's cancel
    request); under `salve run` it would raise inside the main thread while the stage threads run
    on, and the process hung. Prefect leaves SIGINT alone, so our handler there says `install()`
    ran; flows run by a worker keep Prefect's handler."""
    import threading

    ours = signal.getsignal(signal.SIGINT) is _handler
    if ours and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
