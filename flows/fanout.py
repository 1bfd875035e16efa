"""Independent fits fanned out as concurrent Prefect tasks on a Dask task runner.

The evaluate stage fits one SAE per seed (the study: one per SAE variant and seed); the fits do
not depend on each other. `dask_map(fn, jobs)` runs `fn(job)` for every job as a Prefect task of
a subflow on `prefect_dask.DaskTaskRunner`: by default a local cluster with one single-threaded
worker process per core, or an existing Dask scheduler named by `SALVE_DASK_ADDRESS`
(`tcp://host:8786`), for users who outgrow one machine (docs/OPERATIONS.md: its workers need
this project's code and environment, and the repository at the same path). Workers only
compute: they return their results to the flow, which writes every file and runs every DVC
command (one DVC command at a time in a repository). `fn` must be a module-level function and
`jobs` small and picklable: paths of the files a worker reads and small parameters, never
arrays (every task's graph holds its job, and Prefect's context there the whole batch). Prefect
is imported only when a map runs: importing this module (the CLI does) must leave Prefect's
logging to be configured by `salve run` first.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DASK_ADDRESS_ENV = "SALVE_DASK_ADDRESS"


def run_job(fn: Callable[[dict], dict], job: dict) -> dict:
    return fn(job)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_cluster(**kwargs: Any):
    """A Dask LocalCluster whose workers report to this flow run's Prefect API.

    Without a configured server, Prefect runs a temporary API in a subprocess; a worker process
    knows nothing of it and would start its own (7-14 s each, all on one database).
    """
    from distributed import LocalCluster
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    env = {"PREFECT_API_URL": str(ctx.client.api_url)} if ctx is not None else {}
    # No statistical profiler in the workers (nannies hand their config to the worker
    # processes): its sampling thread printed a tornado traceback ('bool' object has no
    # attribute 'f_code') on the terminal of a successful run, and the dashboard that shows
    # its profiles is off anyway.
    import dask

    with dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(env=env, **kwargs)


def check_scheduler(address: str, timeout: float = 10.0) -> None:
    """Raise ConfigError, one line naming the setting and the fix, when nothing answers at
    ``address``: Dask itself retries for 30 s, then fails inside the flow with a bare
    'Timed out trying to connect'."""
    from distributed.comm.addressing import parse_address, parse_host_port

    from salve.config import ConfigError

    name = DASK_ADDRESS_ENV if os.environ.get(DASK_ADDRESS_ENV) == address else "--dask-address"
    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as exc:
        raise ConfigError(
            f"{name}={address}: not a Dask scheduler address ({exc}); write it as "
            "tcp://host:8786, or unset it to run on a local cluster"
        ) from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"{name}={address}: no Dask scheduler answers there ({exc.strerror or exc}); start "
            f"one (`dask scheduler`, docs/OPERATIONS.md), correct the address, or unset "
            f"{DASK_ADDRESS_ENV} to run on a local cluster"
        ) from None


def task_runner(
    address: str | None = None, workers: int | None = None, scratch: Path | None = None
):
    """A DaskTaskRunner on ``address`` (or $SALVE_DASK_ADDRESS), else a local cluster of
    ``workers`` (default: one per core) single-threaded worker processes. An address where no
    scheduler answers is refused here, before any flow starts."""
    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        check_scheduler(address)  # before importing Prefect: a wrong address fails fast
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    kwargs = {
        "n_workers": workers or default_workers(),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.WARNING,
    }
    if scratch is not None:
        kwargs["local_directory"] = str(scratch)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=kwargs)


def dask_map(
    fn: Callable[[dict], dict],
    jobs: Sequence[dict],
    *,
    name: str = "salve-fanout",
    address: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    """``[fn(job) for job in jobs]``, computed concurrently on Dask, in the jobs' order."""

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    workers = min(workers or default_workers(), max(1, len(jobs)))
    job_task = task(run_job, cache_policy=NO_CACHE, persist_result=False)

    @flow(name=name, task_runner=task_runner(address, workers), persist_result=False)
    def fanout(batch: list[dict]) -> list[dict]:
        futures = [
            job_task.with_options(name=f"{name}-{i}").submit(fn, job) for i, job in enumerate(batch)
        ]
        return [f.result() for f in futures]

    return fanout(list(jobs))
