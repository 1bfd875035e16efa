"""flows.contention.cpu_contention: the busy-CPU warning, from the load average and the other
CPU-heavy processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

from flows import contention


def test_quiet_machine_gives_no_warning():
    assert contention.contention_message(0.4, 2, [], threads=2) is None
    assert contention.contention_message(2.0, 2, [], threads=2) is None  # load == cores: not over


def test_busy_machine_names_the_processes_and_the_threads():
    msg = contention.contention_message(3.8, 2, [("python tune.py", 1.08), ("dvc", 0.74)], 2)
    assert msg is not None and "\n" not in msg
    assert "load average 3.80 on 2 cores" in msg
    assert "2 other CPU-heavy processes (python tune.py 108%, dvc 74%)" in msg
    assert "torch's 2 threads" in msg and "common.num_threads" in msg


def test_high_load_without_a_heavy_process_still_warns_and_long_lists_are_cut():
    assert "no single heavy process" in contention.contention_message(5.0, 4, [], threads=4)
    heavy = [(f"p{i}", 0.9) for i in range(5)]
    msg = contention.contention_message(1.0, 8, heavy, threads=1)
    assert "p0 90%, p1 90%, p2 90% and 2 more" in msg and "torch's 1 thread " in msg


def test_cpu_contention_uses_the_load_and_the_sampled_processes(monkeypatch):
    # a test worker may have some
    monkeypatch.setattr(contention, "_own_child_processes", lambda: 0)
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    monkeypatch.setattr(contention, "_other_heavy_processes", lambda interval: [("x", 2.0)])
    msg = contention.cpu_contention(threads=3)
    assert "load average 9.00" in msg and "(x 200%)" in msg and "torch's 3 threads" in msg
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(contention, "_other_heavy_processes", lambda interval: [])
    assert contention.cpu_contention(threads=1) is None


def test_busy_processes_are_found_except_our_own_children(tmp_path):
    loop = "import time\nt = time.time()\nwhile time.time() - t < 3:\n    pass\n"
    (tmp_path / "busy_stranger.py").write_text(loop)
    (tmp_path / "busy_child.py").write_text(loop)
    # not our child: started by a shell that exits at once (the loop is re-parented)
    script = tmp_path / "busy_stranger.py"
    shell = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" "{script}" >/dev/null 2>&1 & echo $!'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    stranger = int(shell.stdout.strip())
    child = subprocess.Popen([sys.executable, str(tmp_path / "busy_child.py")])
    try:
        time.sleep(0.3)
        # any CPU use at all: on a loaded machine the loop may get far less than a core
        labels = [name for name, _ in contention._other_heavy_processes(0.5, min_cores=0.02)]
        assert any(label.endswith("busy_stranger.py") for label in labels), sorted(labels)
        assert not any(label.endswith("busy_child.py") for label in labels), labels
    finally:
        child.kill()
        child.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(stranger, 9)


def test_the_load_of_our_own_children_is_not_counted(monkeypatch):
    # salve run launches Prefect's API server before the check: load 2.6 on 2 cores is this
    # process and its server, not other work
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    monkeypatch.setattr(contention, "_other_heavy_processes", lambda interval: [])
    monkeypatch.setattr(contention, "_own_child_processes", lambda: 1)
    assert contention.cpu_contention(threads=2) is None
    monkeypatch.setattr(contention, "_own_child_processes", lambda: 0)
    assert "load average 2.60" in contention.cpu_contention(threads=2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        monkeypatch.undo()
        assert contention._own_child_processes() >= 1
    finally:
        child.kill()
        child.wait()
