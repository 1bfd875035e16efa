"""Independent fits fanned out as concurrent Prefect tasks on a Dask task runner.

The evaluate stage fits one SAE per seed (the study: one per SAE variant and seed); the fits do
not depend on each other. `dask_map(fn, jobs)` runs `fn(job)` for every job as a Prefect task of
a subflow on `prefect_dask.DaskTaskRunner`: by default a local cluster with one single-threaded
worker process per core, or an existing Dask scheduler named by `SALVE_DASK_ADDRESS`
(`tcp://host:8786`), for users who outgrow one machine. Workers only compute: they return their
results to the flow, which writes every file and runs every DVC command (one DVC command at a
time in a repository). `fn` must be a module-level function and `jobs` picklable.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

DASK_ADDRESS_ENV = "SALVE_DASK_ADDRESS"


@task(cache_policy=NO_CACHE, persist_result=False)
def run_job(fn: Callable[[dict], dict], job: dict) -> dict:
    return fn(job)


def task_runner(address: str | None = None, workers: int | None = None):
    """A DaskTaskRunner on ``address`` (or $SALVE_DASK_ADDRESS), else a local cluster."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    n = workers or os.cpu_count() or 1
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": n,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


@contextlib.contextmanager
def _workers_share_the_api() -> Iterator[None]:
    """Point spawned Dask workers at this process's Prefect API.

    Without a configured server, Prefect runs a temporary API in a subprocess; a worker process
    knows nothing of it and would start its own (7-14 s each, all on one database). The workers
    inherit the environment at spawn, so PREFECT_API_URL is set while the cluster starts.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    running = [s for s in SubprocessASGIServer._instances.values() if s.running]
    if not running:
        yield
        return
    os.environ["PREFECT_API_URL"] = running[0].api_url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def dask_map(
    fn: Callable[[dict], dict],
    jobs: Sequence[dict],
    *,
    name: str = "salve-fanout",
    address: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    """``[fn(job) for job in jobs]``, computed concurrently on Dask, in the jobs' order."""

    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))

    @flow(name=name, task_runner=task_runner(address, workers))
    def fanout(batch: list[dict]) -> list[dict]:
        futures = [
            run_job.with_options(name=f"{name}-{i}").submit(fn, job) for i, job in enumerate(batch)
        ]
        return [f.result() for f in futures]

    with _workers_share_the_api(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # distributed's port notices
        return fanout(list(jobs))
