"""Prefect's temporary API, started in the background while `salve run` checks its input.

With no Prefect server configured (no PREFECT_API_URL), a flow starts a temporary API in a
subprocess when it begins: 7.5 s here on an existing database, 12.5 s on a fresh one (its
migrations), with one core busy and the other idle while `salve run` waited. Started from a
thread before the start-up checks instead, the server comes up on the other core while they run
(in a fresh clone they take ~15 s: every first import compiles its bytecode). The flow then
finds the server running: Prefect keeps one instance per process.

``cancel`` is for runs that will start no flow (bad input, nothing stale, an interrupt): the
server is stopped if it was launched, and the thread cannot launch one afterwards.
"""

from __future__ import annotations

import threading
import time


class EarlyApi:
    """Starts the temporary API server in a daemon thread; ``wait`` before the flow starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._server = None
        self._thread = threading.Thread(target=self._start, name="prefect-api-start", daemon=True)

    @classmethod
    def start_if_needed(cls) -> EarlyApi | None:
        """Start one unless a Prefect API is configured (the flow then starts none)."""
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return None
        api = cls()
        api._thread.start()
        return api

    def _start(self) -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            with self._lock:
                if self._cancelled:
                    return
                self._server = SubprocessASGIServer()
            self._server.start()
        except Exception:  # noqa: BLE001 - the flow starts it again and reports the error
            return

    def wait(self) -> None:
        """Until the server answers (or failed to start: the flow then retries and reports)."""
        self._thread.join()

    def cancel(self) -> None:
        """Stop the server if it was launched; after this the thread launches none."""
        with self._lock:
            self._cancelled = True
            server = self._server
        if server is None:
            return
        # start() is launching it: the process exists within milliseconds of the call.
        while server.server_process is None and self._thread.is_alive():
            time.sleep(0.01)
        server.stop()
