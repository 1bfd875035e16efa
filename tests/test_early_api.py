"""flows/api.py: the temporary Prefect API starts in the background and is stopped on cancel,
with a stand-in server whose start blocks like the real one's wait for its health check."""

from __future__ import annotations

import threading

import pytest

from flows.api import EarlyApi


class _FakeServer:
    instances: list[_FakeServer] = []

    def __init__(self) -> None:
        self.server_process = None
        self.started = threading.Event()
        self.healthy = threading.Event()
        self.stopped = False
        _FakeServer.instances.append(self)

    def start(self) -> None:
        self.server_process = object()  # the subprocess exists from here on
        self.started.set()
        self.healthy.wait(timeout=10)  # the real one polls /health

    def stop(self) -> None:
        self.stopped = True
        self.server_process = None
        self.healthy.set()


@pytest.fixture
def fake_server(monkeypatch):
    import prefect.server.api.server as server_module

    _FakeServer.instances.clear()
    monkeypatch.setattr(server_module, "SubprocessASGIServer", _FakeServer)
    monkeypatch.setattr("prefect.settings.PREFECT_API_URL.value", lambda: None)
    return _FakeServer.instances


def test_wait_returns_once_the_server_answers(fake_server) -> None:
    api = EarlyApi.start_if_needed()
    assert api is not None
    api._thread.join(timeout=0.2)
    assert api._thread.is_alive()  # still waiting for the health check
    fake_server[0].healthy.set()
    api.wait()
    assert not api._thread.is_alive() and not fake_server[0].stopped


def test_cancel_while_starting_stops_the_launched_server(fake_server) -> None:
    api = EarlyApi.start_if_needed()
    assert fake_server_started(fake_server)
    api.cancel()
    assert fake_server[0].stopped and fake_server[0].server_process is None
    api.wait()  # the thread ends once its server is gone


def test_cancel_before_the_launch_launches_nothing(fake_server) -> None:
    api = EarlyApi()
    api.cancel()
    api._thread.start()
    api.wait()
    assert fake_server == []


def test_nothing_starts_when_a_prefect_api_is_configured(monkeypatch) -> None:
    monkeypatch.setattr("prefect.settings.PREFECT_API_URL.value", lambda: "http://x:4200/api")
    assert EarlyApi.start_if_needed() is None


def fake_server_started(instances: list[_FakeServer], timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if instances and instances[0].started.is_set():
            return True
        threading.Event().wait(0.01)
    return False
