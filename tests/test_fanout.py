"""flows/fanout.py: the local Dask cluster the evaluate stage and the study fan out on."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(120)
def test_local_workers_run_without_the_statistical_profiler() -> None:
    """The profiler's sampling thread printed a tornado traceback ('bool' object has no
    attribute 'f_code') on the terminal of a successful run: the workers do not start it."""
    import dask
    from distributed import Client

    from flows.fanout import local_cluster

    with (
        local_cluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        enabled = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        threads = client.run(
            lambda dask_worker: [t.name for t in __import__("threading").enumerate()]
        )
    assert list(enabled.values()) == [False]
    assert not any("Profile" in name for names in threads.values() for name in names), threads
    assert dask.config.get("distributed.worker.profile.enabled")  # this process keeps its own
