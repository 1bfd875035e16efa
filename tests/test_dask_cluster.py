"""An existing Dask cluster, for real (issue #25): `dask scheduler` and two `dask worker`
processes, started as docs/OPERATIONS.md tells a user to start them on other machines (the
project's code and environment, the repository at the same path: here their cwd and
PYTHONPATH; `--preload-nanny salve`), run evaluate's fan-out and a study part's with the same
bytes as the local cluster (and as the serial run that built the project). A wrong
$SALVE_DASK_ADDRESS is refused at once, in one line naming it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_PARAMS, copy_project, write_params

DASK = Path(sys.executable).parent / "dask"  # the console script of the environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (a worker's nanny and its worker process), then SIGKILL what
    is left after 15 s."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


@contextlib.contextmanager
def dask_cluster(repo: Path, scratch: Path, workers: int = 2) -> Iterator[str]:
    """A scheduler and ``workers`` single-threaded workers as separate process groups; yields
    the scheduler's address. The workers run in ``repo`` with it on PYTHONPATH, import salve
    in their nanny (its kernel settings reach the worker process before numpy loads) and
    report to this process's Prefect API; everything is killed on the way out."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    scratch.mkdir(parents=True, exist_ok=True)
    info = scratch / "scheduler.json"
    from salve import runtime

    # A user's shell: none of the kernel settings this process (and a local cluster) got from
    # salve's entry points, which are read before any salve code runs in a worker.
    chosen = runtime.PINNED_ENV | runtime.BASE_ENV | runtime.THREAD_ENV | runtime.OPENBLAS_ENV
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    env |= {"PYTHONPATH": str(repo), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, *args: str) -> None:
        log = scratch / f"{name}.log"
        logs.append(log)
        with open(log, "wb") as fh:
            procs.append(
                subprocess.Popen(
                    [str(DASK), *args],
                    cwd=repo,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as one
                )
            )

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", str(info))  # fmt: skip
        deadline = time.monotonic() + 30
        while not info.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.exists(), f"no scheduler within 30 s:\n{_tail(logs[0])}"
        address = json.loads(info.read_text())["address"]
        for i in range(workers):
            start(f"worker{i}", "worker", address, "--nthreads", "1", "--no-dashboard",
                  "--preload-nanny", "salve", "--host", "127.0.0.1", "--name", f"worker{i}",
                  "--local-directory", str(scratch / f"worker{i}"))  # fmt: skip
        with Client(address, timeout=30) as client:
            try:
                client.wait_for_workers(workers, timeout=60)
            except TimeoutError:
                pytest.fail("workers did not join within 60 s:\n" + _tail(logs[-1]))
        yield address
    finally:
        _stop(procs)


def worker_report(address: str) -> tuple[dict[str, int], list, tuple]:
    """Tasks each worker ran (by name); each worker's always-on kernel settings and OpenBLAS
    kernels (read when numpy loads: a plain `dask worker` ran SkylakeX ones on an AVX-512 CPU,
    the local cluster Haswell ones); and this process's."""
    from distributed import Client

    def kernels() -> tuple:  # nested: sent by value (a worker cannot import tests/)
        import numpy  # noqa: F401 - loads OpenBLAS
        from threadpoolctl import threadpool_info

        from salve import runtime

        keys = sorted(runtime.THREAD_ENV | runtime.OPENBLAS_ENV)
        blas = [i.get("architecture") for i in threadpool_info() if "blas" in i["user_api"]]
        return {k: os.environ.get(k) for k in keys}, sorted(map(str, blas))

    with Client(address, timeout=30) as client:
        counts = client.run(lambda dask_worker: dask_worker.state.executed_count)
        names = client.run(lambda dask_worker: dask_worker.name)
        theirs = client.run(kernels)
    return {names[a]: n for a, n in counts.items()}, list(theirs.values()), kernels()


def evaluate_outputs(root: Path) -> dict[str, bytes]:
    """Every file the evaluate stage writes, by repository-relative path."""
    from tasks import STAGES

    spec = STAGES["evaluate"]
    files = [*sorted((root / spec.out_dir).rglob("*")), root / spec.metrics_file]
    files += [root / p for p in spec.plot_files]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files if p.is_file()}


# The study's cheapest part on the tiny project: one attack per class and norm (20 tasks).
STUDY_PART = "adversarial"
TINY_ATTACKS = [
    "study.attack_per_class=1",
    "study.attack_steps=2",
    "study.attack_bisection_steps=3",
    "study.bootstrap=50",
]


def study_part(root: Path, part: str) -> str:
    """The study stage of ``part`` run with its jobs on Dask: its record and metrics bytes."""
    import importlib

    from flows.fanout import dask_map
    from salve.config import load
    from tasks import STAGES, STUDY_PARTS

    stage = STUDY_PARTS[part]
    importlib.import_module(f"tasks.{stage}").run(
        load(root / "params.yaml"), root, progress=False, map_fn=dask_map
    )
    spec = STAGES[stage]
    files = (spec.path(root, "record"), spec.metrics_path(root))
    return json.dumps([p.read_text() for p in files])


@pytest.mark.slow
def test_an_existing_cluster_gives_the_local_clusters_bytes(
    built_project_template: Path, tmp_path: Path, prefect_harness, monkeypatch
) -> None:
    import tasks.evaluate as stage
    from flows.fanout import DASK_ADDRESS_ENV, dask_map
    from salve.config import load
    from salve.params_file import apply_overrides

    laps = {"start": time.perf_counter()}
    root = copy_project(built_project_template, tmp_path / "project")
    serial = evaluate_outputs(root)  # the pipeline's run: jobs mapped in-process
    apply_overrides(root / "params.yaml", TINY_ATTACKS)
    cfg = load(root / "params.yaml")

    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    stage.run(cfg, root, progress=False, map_fn=dask_map)
    local = evaluate_outputs(root)
    laps["local evaluate"] = time.perf_counter()
    local_study = study_part(root, STUDY_PART)
    laps["local study"] = time.perf_counter()

    with dask_cluster(root, tmp_path / "dask") as address:
        laps["cluster up"] = time.perf_counter()
        monkeypatch.setenv(DASK_ADDRESS_ENV, address)
        for rel in local:
            (root / rel).unlink()  # whatever comes next is written anew
        stage.run(cfg, root, progress=False, map_fn=dask_map)
        remote = evaluate_outputs(root)
        laps["evaluate there"] = time.perf_counter()
        remote_study = study_part(root, STUDY_PART)
        laps["study there"] = time.perf_counter()
        executed, kernels, ours = worker_report(address)
    laps["cluster down"] = time.perf_counter()

    assert sorted(remote) == sorted(local) == sorted(serial)
    assert {"results/evaluate/seeds.json", "metrics/evaluate.json"} <= set(remote)
    for rel in sorted(local):
        assert remote[rel] == local[rel], f"{rel}: the existing cluster wrote other bytes"
        assert local[rel] == serial[rel], f"{rel}: the local cluster wrote other bytes"
    assert remote_study == local_study
    # The work ran on the two external workers (evaluate's seeds, then two attacks or more),
    # with the kernels a local cluster's workers get.
    assert sorted(executed) == ["worker0", "worker1"] and min(executed.values()) > 0, executed
    assert sum(executed.values()) >= cfg.evaluate.seeds + 2, executed
    assert kernels == [ours] * 2
    names, times = list(laps), list(laps.values())
    steps = zip(names[1:], times[:-1], times[1:], strict=True)
    print(f"\n[dask cluster] {times[-1] - times[0]:.1f} s (", end="")
    print(", ".join(f"{k} {b - a:.1f} s" for k, a, b in steps), f"); tasks run: {executed}")


def test_a_wrong_address_is_refused_in_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch
) -> None:
    from flows.fanout import DASK_ADDRESS_ENV, dask_map
    from salve.config import ConfigError

    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv(DASK_ADDRESS_ENV, address)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{DASK_ADDRESS_ENV}={address}: no Dask scheduler"):
        dask_map(len, [{}])
    assert time.perf_counter() - t0 < 5  # not Dask's 30 s of connection attempts

    write_params(tmp_path, TINY_PARAMS)  # refused before any artifact is read
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(tmp_path), "study", "--allow-stale"],
        cwd=REPO,
        env=os.environ | {DASK_ADDRESS_ENV: address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {DASK_ADDRESS_ENV}={address}: ")
    assert f"unset {DASK_ADDRESS_ENV}" in lines[0] and "docs/OPERATIONS.md" in lines[0]
