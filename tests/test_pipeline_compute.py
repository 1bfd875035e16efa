"""Stages that the DAG lets run side by side compute one at a time (flows/pipeline.py COMPUTE):
each wants every core, and torch's thread count is process state they set."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from prefect.logging import disable_run_logger

from flows import pipeline


def test_independent_stages_never_compute_at_the_same_time(monkeypatch, tmp_path):
    running, overlaps, threads_seen = [], [], []
    guard = threading.Lock()

    def fake_run_stage(name, cfg, root, **kwargs):
        with guard:
            running.append(name)
            if len(running) > 1:
                overlaps.append(tuple(running))
        torch.set_num_threads(1 if name == "evaluate" else 2)  # as stages set it
        time.sleep(0.2)
        threads_seen.append((name, torch.get_num_threads()))
        with guard:
            running.remove(name)
        outcome = SimpleNamespace(name=name, status="ran", seconds=0.2)
        outcome.line = lambda: f"{name} ran"
        outcome.row = lambda: {"stage": name}
        return outcome

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    monkeypatch.setattr(pipeline, "load", lambda params: SimpleNamespace())
    before = torch.get_num_threads()
    try:
        with disable_run_logger():
            workers = [
                threading.Thread(
                    target=pipeline.stage_task.fn, args=(s, str(tmp_path), "p", False, False)
                )
                for s in ("edit", "alpha_crit", "gradfam", "evaluate")
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    finally:
        torch.set_num_threads(before)
    assert overlaps == []
    assert sorted(threads_seen) == [("alpha_crit", 2), ("edit", 2), ("evaluate", 1), ("gradfam", 2)]


RELEASE_PROBE = """
import ctypes, sys
from pathlib import Path
from tasks.runner import release_freed_memory

def rss_anon_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(16384) for _ in range(16384)]  # 256 MiB in heap-sized blocks
for b in blocks:
    ctypes.memset(b, 1, 16384)  # touched: resident
for b in blocks[:-1]:
    libc.free(b)  # the last one pins the heap's top: free() alone cannot give it back
held = rss_anon_mib()
released = release_freed_memory()
print(released, held, rss_anon_mib())
"""


def test_release_freed_memory_returns_a_freed_heap_to_the_system():
    """What a stage freed stays resident under glibc until trimmed: 256 MiB malloc'ed in 16 KiB
    blocks and freed (the heap's top pinned) is still held, and `release_freed_memory` (called
    after every stage) hands at least 200 MiB of it back."""
    import subprocess
    import sys

    import pytest

    if not Path("/proc/self/status").exists() or not _has_glibc():
        pytest.skip("needs Linux with glibc (malloc_trim)")
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    released, held, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    assert held - after > 200, (held, after)


def _has_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"
