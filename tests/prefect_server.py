"""Shared helpers and fixtures for the operations tests (test_ops_*.py).

Loaded as a pytest plugin by the modules that need it (`pytest_plugins = ["tests.prefect_server"]`),
so its session fixtures exist once per test session however many modules use them:

- `prefect_server`: a real `prefect server start` in a subprocess, with its own PREFECT_HOME and
  SQLite database in a temp folder, on a free port; stopped (and its process group killed) at the
  end of the session.
(The built tiny project these tests copy is conftest's `built_project_template`.)

Every subprocess started here or through `start_process` runs in its own session, so its whole
process group can be killed; every wait has a timeout.

(PYTEST_DONT_REWRITE: test modules import these helpers before pytest loads this file as a plugin,
so its asserts could not be rewritten anyway; it raises explicit errors instead.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start_process(
    cmd: list[str], *, log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), output appended to ``log``.

    SIGINT and SIGTERM start at their defaults in the child: an ignored signal is inherited
    through exec, and once the test process came to ignore SIGINT (late in a full `pytest -n`
    run), a Prefect worker, which stops by sending itself SIGINT, could no longer stop."""
    fh = open(log, "ab")  # noqa: SIM115 - handed to the child, closed with the process
    try:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_stop_signals,  # noqa: PLW1509 - only signal calls, no locks
        )
    finally:
        fh.close()  # the child holds its own copy of the descriptor


def process_tree(pid: int) -> str:
    """The process and its descendants, one line each (pid, status, command): what a process
    that will not stop is still waiting for."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return f"(process {pid} is gone)"
    lines = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:160]}")
    return "\n".join(lines)


def stop_process(
    proc: subprocess.Popen, timeout: float = 30.0, log: Path | None = None
) -> int | None:
    """SIGTERM the process, wait up to ``timeout`` s, then SIGKILL its whole process group.

    Returns the exit code of a clean stop, or None when it had to be killed; then the process
    tree as it was is appended to ``log``, if given.
    """
    rc = None
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                if log is not None:
                    with open(log, "a") as fh:
                        fh.write(f"\n[test] not stopped after {timeout:g} s; process tree:\n")
                        fh.write(process_tree(proc.pid) + "\n")
        else:
            rc = proc.returncode
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children it left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    return rc


def log_tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    log: Path
    start_seconds: float
    proc: subprocess.Popen

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for clients, `serve` and workers talking to this server."""
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DVC_NO_ANALYTICS="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def settings(self):
        """`with server.settings(): get_client(...)` points this process's client at it."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})


@contextlib.contextmanager
def running_prefect_server(
    workdir: Path, timeout: float = SERVER_START_TIMEOUT_S
) -> Iterator[PrefectServer]:
    """`prefect server start` on a free port with its own PREFECT_HOME (SQLite inside it)."""
    import httpx

    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",  # the API is all the tests need
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    log = workdir / "prefect-server.log"
    t0 = time.perf_counter()
    proc = start_process(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log=log,
        env=env,
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {proc.returncode} before answering:\n"
                    + log_tail(log)
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"prefect server did not answer /api/health within {timeout:.0f} s:\n"
                    + log_tail(log)
                )
            time.sleep(0.25)
        server = PrefectServer(api_url, home, log, time.perf_counter() - t0, proc)
        print(f"\n[prefect server] {api_url} answered /health after {server.start_seconds:.1f} s")
        yield server
    finally:
        rc = stop_process(proc, timeout=30)
        graceful = "Server stopped!" in log_tail(log, 2000)
        how = "killed" if rc is None else f"exit {rc}, {'graceful' if graceful else 'abrupt'}"
        print(f"[prefect server] stopped ({how})")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


def stage_rows(artifact) -> list[dict[str, str]]:
    """The rows of the flow's `salve-stage-summaries` markdown table (stage, status, ...)."""
    lines = [line for line in artifact.data.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=False))
        for line in lines[2:]
    ]
