"""flows/api.py: the temporary Prefect API launched before the start-up checks, waited for,
relaunched when its port was taken, stopped. A stand-in server (a few lines of http.server)
plays Prefect's, which the pipeline tests run for real."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import flows.api as api_module
from flows.api import TemporaryApi

# Answers /api/health with 200 after DELAY seconds; exits with EXIT instead while FLAG exists
# (removing it), as uvicorn does when its port is taken.
FAKE = """
import http.server, os, sys, time
port, delay, flag, exit_code = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if os.path.exists(flag):
    os.remove(flag)
    sys.exit(exit_code)
time.sleep(delay)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake(monkeypatch, tmp_path: Path):
    flag = tmp_path / "fail-once"
    options = {"delay": 0.3, "exit": 3}
    ports = []

    def command(port: int) -> list[str]:
        ports.append(port)
        return [sys.executable, "-c", FAKE, str(port), str(options["delay"]), str(flag),
                str(options["exit"])]  # fmt: skip

    monkeypatch.setattr(api_module, "server_command", command)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return {"flag": flag, "options": options, "ports": ports, "cwd": tmp_path}


def test_wait_returns_once_the_server_answers_and_stop_ends_it(fake) -> None:
    api = TemporaryApi.launch_if_needed(fake["cwd"])
    assert api is not None
    api.wait(timeout_s=30)
    assert api.url == f"http://127.0.0.1:{fake['ports'][0]}/api"
    process = api.process
    api.stop()
    assert process.poll() is not None and api.process is None
    api.stop()  # twice is harmless


def test_a_taken_port_is_replaced_by_another(fake) -> None:
    fake["flag"].write_text("")
    api = TemporaryApi(fake["cwd"])
    try:
        api.wait(timeout_s=30)
    finally:
        api.stop()
    assert len(fake["ports"]) == 2


def test_a_server_that_exits_is_an_error_naming_its_code(fake) -> None:
    fake["flag"].write_text("")
    fake["options"]["exit"] = 5
    api = TemporaryApi(fake["cwd"])
    with pytest.raises(RuntimeError, match="exited with code 5.*PREFECT_API_URL"):
        api.wait(timeout_s=30)


def test_a_server_that_never_answers_times_out_and_is_stopped(fake) -> None:
    fake["options"]["delay"] = 60
    api = TemporaryApi(fake["cwd"])  # returns at once: launching does not wait for the server
    process = api.process
    with pytest.raises(RuntimeError, match="did not answer within 1 s"):
        api.wait(timeout_s=1)
    assert process.poll() is not None


def test_nothing_is_launched_when_prefect_api_url_is_set(fake, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert TemporaryApi.launch_if_needed(fake["cwd"]) is None
    assert fake["ports"] == []


def test_serving_runs_the_meanwhile_work_during_the_wait_and_names_the_server(fake, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setattr(PREFECT_API_URL, "value", lambda: None)  # no server configured
    fake["options"]["delay"] = 0.5
    done = []

    def meanwhile() -> None:
        time.sleep(1.0)  # longer than the server's start: serving still waits for it
        done.append(True)

    api = TemporaryApi(fake["cwd"])
    try:
        with api.serving(meanwhile):
            assert done == [True]
            monkeypatch.undo()
            assert PREFECT_API_URL.value() == api.url
        with api.serving(lambda: 1 / 0):  # a failed head start is not the run's error
            pass
    finally:
        api.stop()


def test_a_configured_server_wins_and_ours_is_stopped(fake, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setattr(PREFECT_API_URL, "value", lambda: "http://127.0.0.1:4200/api")
    api = TemporaryApi(fake["cwd"])
    process = api.process
    with api.serving():
        pass
    assert process.wait(timeout=10) is not None and api.process is None


# Launches the real server command, prints the server's pid, then waits to be killed.
LAUNCHER = """
import pathlib, sys, time
from flows.api import TemporaryApi
api = TemporaryApi(pathlib.Path(sys.argv[1]))
print(api.process.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after_s", [0.5, 6.0])  # while Prefect imports, and once it serves
def test_the_server_ends_when_salve_is_killed(tmp_path: Path, after_s: float) -> None:
    """`kill -9` of `salve run` runs none of its cleanup: the server it launched must end by
    itself (it lived on with parent 1, still there minutes and another run later)."""
    import os
    import signal
    import subprocess

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    server = int(launcher.stdout.readline())
    try:
        time.sleep(after_s)
        assert not _gone(server), "the server should run while salve does"
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not _gone(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(server), "the temporary API outlived the salve process by 10 s"
    finally:
        if not _gone(server):
            os.kill(server, signal.SIGKILL)
        launcher.kill()
