"""Stages that the DAG lets run side by side compute one at a time (flows/pipeline.py COMPUTE):
each wants every core, and torch's thread count is process state they set."""

from __future__ import annotations

import threading
import time
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
