"""The busy-CPU warning at the start of a run: the load average and the other CPU-heavy processes.

Orchestration, not method: it looks at the machine (psutil), not at the data, and only decides
what the run log says. ``salve.runtime`` holds the settings that change numbers.
"""

from __future__ import annotations

import os

# A process counts as CPU-heavy when it used at least this share of one core while sampled.
HEAVY_PROCESS_CORES = 0.5


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _other_heavy_processes(
    interval: float, min_cores: float = HEAVY_PROCESS_CORES
) -> list[tuple[str, float]]:
    """(label, cores used) of the other processes that used at least ``min_cores`` of a core
    over ``interval`` seconds, busiest first; this process and its own children are left out."""
    import time

    import psutil

    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.children(recursive=True)}
    procs = []
    for proc in psutil.process_iter(["name"]):
        if proc.pid in mine:
            continue
        try:
            proc.cpu_percent(None)  # the first call starts the sampling window
            procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(interval)
    heavy = []
    for proc in procs:
        try:
            cores = proc.cpu_percent(None) / 100.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cores >= min_cores:
            heavy.append((_process_label(proc), cores))
    return sorted(heavy, key=lambda item: -item[1])


def _own_child_processes() -> int:
    import psutil

    return len(psutil.Process().children(recursive=True))


def _process_label(proc) -> str:
    """``name`` plus the first non-option argument (the script or module): "python tune.py"."""
    name = proc.info.get("name") or str(proc.pid)
    try:
        args = proc.cmdline()[1:]
    except Exception:  # noqa: BLE001 - gone or hidden: the name alone
        return name
    first = next((a for a in args if not a.startswith("-")), "")
    return f"{name} {os.path.basename(first)}"[:40] if first else name


def contention_message(
    load_1min: float, cores: int, heavy: list[tuple[str, float]], threads: int
) -> str | None:
    """The one-line warning for a busy machine, or None when it is quiet enough.

    Busy means another CPU-heavy process runs, or the 1-minute load average exceeds the cores:
    then torch's ``threads`` compete for the cores, and timings are slower and less steady."""
    if not heavy and load_1min <= cores:
        return None
    others = ", ".join(f"{name} {used:.0%}" for name, used in heavy[:3])
    more = f" and {len(heavy) - 3} more" if len(heavy) > 3 else ""
    who = (
        f"{len(heavy)} other CPU-heavy process{'es' if len(heavy) != 1 else ''} ({others}{more})"
        if heavy
        else "no single heavy process"
    )
    return (
        f"CPU busy: load average {load_1min:.2f} on {cores} core{'s' if cores != 1 else ''}, "
        f"{who}; torch's {threads} thread{'s' if threads != 1 else ''} will share the cores, "
        "so this run is slower and its timings unsteady. To run pipelines side by side, give "
        "each its own common.num_threads so that the total stays within the cores."
    )


def cpu_contention(*, interval: float = 0.25, threads: int | None = None) -> str | None:
    """One-line warning when other work shares the CPU (load average, other CPU-heavy
    processes), None when the machine is quiet. Samples process CPU use for ``interval`` s.

    For the log at the start of a run, chiefly when ``common.num_threads`` is 0 (torch then
    takes every core, as if it were alone). ``threads``: the torch thread count to name
    (default: torch's current one)."""
    cores = _usable_cores()
    try:
        load_1min = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load_1min = 0.0
    try:
        heavy = _other_heavy_processes(interval)
        # The load counts this run's own child processes too (`salve run` launches Prefect's
        # temporary API before this check): they are not the other work this warns about.
        load_1min = max(0.0, load_1min - _own_child_processes())
    except ImportError:  # psutil missing: the load average alone
        heavy = []
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return contention_message(load_1min, cores, heavy, threads)
