"""Prefect's temporary API for one `salve run`, launched before the start-up checks.

With no Prefect server configured, a flow starts a temporary API server in a subprocess when it
begins: 7.5 s here with an existing database, 12.5 s with a fresh one (its migrations), one core
busy and the other idle while `salve run` waited. Launched first instead, the server comes up on
the other core while the checks run (in a fresh clone they take ~14 s: every first import
compiles its bytecode), and the flow is pointed at it (PREFECT_API_URL for the flow's duration).

The server is the one Prefect would start (its app factory under uvicorn, the same settings and
environment); it is stopped when the process exits, or by `flows.interrupt` on Ctrl-C with the
other child processes. Prefect, whose import alone takes seconds, is imported only once the
flow is about to start (`serving`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("salve")

# What Prefect sets for its own temporary server: no UI, ephemeral-mode services only.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
PORT_IN_USE_EXIT = 3  # uvicorn's exit code when it cannot bind
DEFAULT_TIMEOUT_S = 90.0


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prefect_dir() -> Path:
    """Prefect's package folder, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise RuntimeError("prefect is not installed: run `make run`, which installs it")
    return Path(spec.origin).parent


def server_command(port: int) -> list[str]:
    """Prefect's own command for its temporary server (its app factory under uvicorn), run by
    this module so that the server ends with the process that launched it."""
    return [
        sys.executable, "-m", "flows.api", str(os.getpid()),
        "--app-dir", str(_prefect_dir().parent),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a head start only: the real call reports errors
        log.debug("work done while the API started failed", exc_info=True)


class TemporaryApi:
    """A Prefect API server subprocess; `serving` points a flow at it once it answers."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._launch()
        atexit.register(self.stop)

    @classmethod
    def launch_if_needed(cls, cwd: Path) -> TemporaryApi | None:
        """Launch one unless PREFECT_API_URL names a server (the flow uses that one)."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        return cls(cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        self.port = _free_port()
        self.launched = time.monotonic()
        self.process = subprocess.Popen(
            server_command(self.port), cwd=self.cwd, env=os.environ | SERVER_ENV
        )

    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Until the server answers its health check; raises RuntimeError when it cannot start."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process is not None else -1
            if code == PORT_IN_USE_EXIT:  # the port was taken meanwhile: another one
                self._launch()
                continue
            if code is not None:
                raise RuntimeError(
                    f"Prefect's temporary API server exited with code {code} before it answered "
                    "(its messages are above). Set PREFECT_API_URL to a running Prefect server "
                    "to use that one instead."
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as response:
                    if response.status == 200:
                        log.info(
                            "temporary Prefect API at %s answered %.1f s after its launch "
                            "(%.1f s of waiting for it)",
                            self.url,
                            time.monotonic() - self.launched,
                            time.monotonic() - started,
                        )
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary API server did not answer within {timeout_s:.0f} s "
            "(server.ephemeral.startup_timeout_seconds in prefect.toml)."
        )

    @contextlib.contextmanager
    def serving(self, meanwhile: Callable[[], None] | None = None) -> Iterator[None]:
        """Prefect's settings name this server while the block runs, unless Prefect's own
        settings (a profile, prefect.toml) name another: then this one is stopped unused.

        ``meanwhile`` runs in a thread while the server starts (this process has a core free
        then) and is finished before the block; its errors are ignored."""
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        if PREFECT_API_URL.value():
            self.stop()
            yield
            return
        helper = None
        if meanwhile is not None:
            helper = threading.Thread(target=_quietly, args=(meanwhile,), daemon=True)
            helper.start()
        try:
            self.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        finally:
            if helper is not None:
                helper.join()
        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            yield

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_while_parent_lives(parent: int, uvicorn_args: list[str]) -> None:
    """Run uvicorn with ``uvicorn_args`` until the process ``parent`` ends.

    A `kill -9` of `salve run` runs none of its cleanup, and the server it launched lived on
    with parent 1. On Linux the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG);
    a watcher thread also polls the parent once a second, for other systems.
    """
    import signal

    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    from uvicorn.main import main

    main(args=uvicorn_args, prog_name="uvicorn")


if __name__ == "__main__":
    serve_while_parent_lives(int(sys.argv[1]), sys.argv[2:])
