"""benchmarks/bench_peers.py without the peer packages: the skip paths, the map check, FVU, the
peers table. No timing is asserted (timings are measurements, not tests)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_peers as bpe
from benchmarks import run_all


def test_map_agreement_oracles():
    a = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    same = bpe.map_agreement(a, a.clone())
    assert same["correlation"] == pytest.approx(1.0) and same["max_abs_diff"] == 0.0
    flipped = bpe.map_agreement(a, 3.0 - a)
    assert flipped["correlation"] == pytest.approx(-1.0)
    assert flipped["max_abs_diff"] == pytest.approx(3.0)
    # hand case: x = (0, 1, 2), y = (0, 2, 1): centred (-1, 0, 1) and (-1, 1, 0): r = 1 / 2
    r = bpe.map_agreement(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 2.0, 1.0]))
    assert r["correlation"] == pytest.approx(0.5) and r["max_abs_diff"] == pytest.approx(1.0)


def test_reference_postprocess_is_relu_then_scale_twice_per_map():
    calls = []

    def scale(cams, size=None):  # records what pytorch-grad-cam's scale_cam_image would get
        calls.append((cams.copy(), size))
        out = cams / cams.reshape(len(cams), -1).max(1).reshape(-1, 1, 1).clip(min=1e-7)
        return out.repeat(2, axis=1).repeat(2, axis=2) if size else out

    maps = torch.tensor([[[[1.0, -2.0], [4.0, 0.0]], [[-1.0, -1.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
    out = bpe.reference_postprocess(maps, 4, scale)
    assert out.shape == (1, 2, 4, 4)
    first, size = calls[0]
    assert size == (4, 4) and first.shape == (2, 2, 2) and first.min() == 0.0  # ReLU before
    assert calls[1][1] is None  # the aggregation's second scaling, no resize
    assert out[0, 0].max() == pytest.approx(1.0) and float(out[0, 1].abs().max()) == 0.0
    assert out[0, 0, 2, 0] == pytest.approx(1.0) and out[0, 0, 0, 0] == pytest.approx(0.25)


def test_fvu_oracles():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(20, 5, generator=g)
    assert bpe.fvu(acts, acts) == 0.0
    assert bpe.fvu(acts, acts.mean(0).expand_as(acts)) == pytest.approx(1.0)
    # hand case: acts (0, 2) in 1-d, mean 1, sum of squares 2; recon (1, 1): error 2: FVU 1
    # recon (0, 1): error 1: FVU 0.5
    two = torch.tensor([[0.0], [2.0]])
    assert bpe.fvu(two, torch.tensor([[0.0], [1.0]])) == pytest.approx(0.5)


def test_missing_peer_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(bpe.PEERS, "ghost", ("salve_ghost_module", "salve-ghost-dist-xyz"))
    module, info = bpe.import_peer("ghost")
    assert module is None and "not installed" in info["skipped"]
    assert "salve-ghost-dist-xyz" in info["skipped"]
    # installed distribution whose module does not import: the error is the reason
    monkeypatch.setitem(bpe.PEERS, "broken", ("salve_ghost_module", "torch"))
    module, info = bpe.import_peer("broken")
    assert module is None and "does not import" in info["skipped"]
    assert "ModuleNotFoundError" in info["skipped"]


def _no_peers(monkeypatch):
    for name in list(bpe.PEERS):
        monkeypatch.setitem(bpe.PEERS, name, ("salve_ghost_module", f"salve-ghost-{name}"))


def test_sae_comparison_runs_salve_and_reports_skipped_peers(monkeypatch):
    _no_peers(monkeypatch)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(48, 8, generator=g).relu()
    out = bpe.bench_sae_vs_peers(acts, width=8, k=2, epochs=1, batch_size=16, lr=1e-3, repeats=1)
    rows = {r["library"]: r for r in out["rows"]}
    assert set(rows) == {"salve", "overcomplete", "SAELens"}
    assert rows["salve"]["samples_per_s"] > 0 and 0.0 <= rows["salve"]["fvu"] < 10.0
    assert "not installed" in rows["overcomplete"]["skipped"]
    assert "not installed" in rows["SAELens"]["skipped"]
    assert out["matmul_floor_s"] > 0
    flops = bpe.sae_flops_per_sample(8, 8) * 48
    assert out["rows"][0]["gflop_per_s"] == pytest.approx(flops / rows["salve"]["seconds"] / 1e9)


def test_peers_table_says_what_was_skipped_and_that_the_machine_was_busy(monkeypatch):
    _no_peers(monkeypatch)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(32, 8, generator=g).relu()
    sae = bpe.bench_sae_vs_peers(acts, width=8, k=2, epochs=1, batch_size=16, lr=1e-3, repeats=1)
    extract = {"n": 4, "image_size": 16, "batch_size": 2, "salve_images_per_s": 10.0,
               "bare_images_per_s": 9.0, "throughput_ratio_salve_over_bare": 0.9 / 0.8 * 0.8,
               "max_abs_diff": 0.0}  # fmt: skip
    _, gradfam_info = bpe.import_peer("pytorch-grad-cam")
    peers = {
        "load_average_before": [3.5, 2.0, 1.0],
        "load_average_after": [3.0, 2.0, 1.0],
        "contention_before": "CPU busy: load average 3.50 on 2 cores",
        "kernel_settings": {"MKL_CBWR": "AUTO"},
        "torch_threads": 2,
        "gradfam": {"peer": gradfam_info, "rows": []},
        "sae": {"activations": "test activations"} | sae,
        "extract": extract,
    }
    text = "\n".join(run_all._render_peers(peers))
    assert "**Measured on a busy machine**: CPU busy: load average 3.50" in text
    assert "pytorch-grad-cam skipped: not installed" in text
    assert text.count("| skipped | not installed") == 2
    assert "salve reaches" in text and "test activations" in text
    assert not math.isnan(sae["salve_fraction_of_matmul_floor"])


def _doc(started: str, cpu: str, extract_ratio: float) -> dict:
    machine = {"cpu_model": cpu, "logical_cores": 2, "usable_cores": 2, "memory_gib": 1.0,
               "torch_threads": 2, "torch": "t", "python": "p",
               "load_average_at_start": [0.1, 0.2, 0.3]}  # fmt: skip
    extract = {"n": 4, "image_size": 16, "batch_size": 2, "salve_images_per_s": 10.0,
               "bare_images_per_s": 9.0, "salve_s": 0.4, "bare_s": 0.44, "max_abs_diff": 0.0,
               "throughput_ratio_salve_over_bare": extract_ratio}  # fmt: skip
    sae = {"n": 8, "d": 4, "width": 4, "epochs": 1, "batch_size": 4, "k": 2,
           "rows": [{"kind": "relu", "samples_per_s": 100.0, "seconds": 0.08}]}  # fmt: skip
    return {"quick": False, "started": started, "seconds": 1.0, "machine": machine,
            "results": {"extract": extract, "sae": sae}}  # fmt: skip


def test_merge_replaces_only_the_sections_run_and_says_where_they_come_from():
    old, new = _doc("old-run", "CPU A", 1.01), _doc("new-run", "CPU B", 2.5)
    del new["results"]["sae"]
    merged = run_all.merge(old, new)
    assert merged["machine"]["cpu_model"] == "CPU A" and merged["started"] == "old-run"
    assert merged["results"]["sae"] == old["results"]["sae"]  # kept as it was
    assert merged["results"]["extract"]["throughput_ratio_salve_over_bare"] == 2.5
    assert merged["results"]["extract"]["run"]["machine"]["cpu_model"] == "CPU B"
    text = run_all.markdown(merged)
    section = text[text.index("## Activation extraction") : text.index("## SAE fitting")]
    assert "Measured in a separate run on new-run: CPU B" in section and "**1.014**" not in section
    assert "**2.500**" in section
    assert "separate run" not in text[text.index("## SAE fitting") :]


def test_no_benchmark_script_shadows_an_installed_package():
    # `python benchmarks/run_all.py` puts benchmarks/ first on sys.path: a script named like a
    # package (datasets.py did) hides it from the peers, and SAELens failed to import
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    shadows = [
        p.stem
        for p in folder.glob("*.py")
        if p.stem != "__init__" and importlib.util.find_spec(p.stem) is not None
    ]
    assert shadows == [], f"rename these benchmark scripts: {shadows}"


# --------------------------------------------------------------------------------------------
# Time to salve's FVU: the protocols on fakes (no timing asserted beyond what must hold)
# --------------------------------------------------------------------------------------------


def test_time_to_fvu_salve_alone_reaches_its_own_target_within_the_budget(monkeypatch):
    _no_peers(monkeypatch)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(256, 16, generator=g).relu()
    out = bpe.bench_sae_vs_peers(
        acts, width=8, k=2, epochs=2, batch_size=64, lr=1e-3, repeats=1, max_epochs=4
    )
    t = out["time_to_fvu"]
    rows = {r["library"]: r for r in t["rows"]}
    assert (t["epochs"], t["max_epochs"]) == (2, 4)
    assert t["target_fvu"] == out["rows"][0]["fvu"]  # salve's FVU at the epoch budget
    salve = rows["salve"]
    assert salve["reached"] and 1 <= salve["epochs"] <= 2 and salve["fvu"] <= t["target_fvu"]
    assert len(salve["fvu_by_epochs"]) == salve["epochs"] and salve["seconds"] > 0
    assert "separate fits" in salve["protocol"]
    assert "not installed" in rows["overcomplete"]["skipped"]
    assert "not installed" in rows["SAELens"]["skipped"]
    text = "\n".join(run_all._render_time_to_fvu(t))
    assert "Time to reach salve's FVU at 2 epochs" in text and "| skipped |" in text


def test_time_to_fvu_stops_once_reached_and_reports_a_never_improving_run_at_the_cap():
    trained = []
    falling = iter([0.9, 0.6, 0.4, 0.1])
    row = bpe.time_epochs_to_fvu(lambda: trained.append(1), lambda: next(falling), 0.5, 10)
    assert row["reached"] and row["epochs"] == 3 and row["fvu"] == 0.4 and len(trained) == 3
    trained.clear()
    row = bpe.time_epochs_to_fvu(lambda: trained.append(1), lambda: 0.9, 0.5, 4)
    assert not row["reached"] and row["epochs"] == 4 and row["fvu"] == 0.9 and len(trained) == 4
    # through the table: salve reached, the peer not: its ratio is a lower bound, said so
    to_fvu = {
        "salve": lambda target: (
            bpe.time_separate_fits_to_fvu(lambda e: e, lambda e: 1.0 / e, target, max_epochs=2)
            | {"protocol": "fits"}
        ),
        "stuck": lambda target: (
            bpe.time_epochs_to_fvu(lambda: None, lambda: 0.9, target, 4) | {"protocol": "one run"}
        ),
    }
    t = bpe.time_to_salve_fvu(to_fvu, {"salve": {}, "stuck": {"version": "0"}}, 0.5, 2, 4)
    salve, stuck = t["rows"]
    assert salve["reached"] and salve["epochs"] == 2 and salve["fvu_by_epochs"] == [1.0, 0.5]
    assert not stuck["reached"] and stuck["ratio_is_lower_bound"]
    assert stuck["ratio_peer_over_salve"] == pytest.approx(stuck["seconds"] / salve["seconds"])
    text = "\n".join(run_all._render_time_to_fvu(t))
    assert "not reached in 4 epochs (FVU 0.9 at the cap)" in text and "| >= **x" in text


def test_a_pulling_trainer_is_checked_after_each_epochs_last_step_and_stopped_there():
    acts = torch.arange(10.0).view(10, 1)
    seen = []  # samples stepped on, as SAELens counts them: stop at the total, ask no more

    def make_fit(batches, total=10 * 5):
        def fit():
            while sum(seen) < total:
                seen.append(len(next(batches)))

        return fit

    at_check = []

    def current_fvu():
        at_check.append(sum(seen))
        return 1.0 / len(at_check)

    row = bpe.time_pulled_fit_to_fvu(make_fit, acts, 4, current_fvu, 0.34, max_epochs=5)
    assert row["reached"] and row["epochs"] == 3 and at_check == [10, 20, 30]
    assert sum(seen) == 30  # the fit ended at the boundary: no batch of a 4th epoch stepped
    seen.clear()
    row = bpe.time_pulled_fit_to_fvu(make_fit, acts, 4, lambda: 0.9, 0.5, max_epochs=5)
    assert not row["reached"] and row["epochs"] == 5 and sum(seen) == 50  # the last checked too


@pytest.mark.parametrize("protocol", ["one run", "pulled", "separate fits"])
def test_time_to_fvu_excludes_the_time_spent_checking(protocol):
    import time

    def slow_check(*_):
        time.sleep(0.2)
        return 0.9  # never reached: every epoch up to the cap is checked

    epochs, sleeps = 4, 4 * 0.2
    if protocol == "one run":
        row = bpe.time_epochs_to_fvu(lambda: None, slow_check, 0.5, epochs)
    elif protocol == "pulled":
        acts = torch.zeros(8, 2)

        def make_fit(batches):
            return lambda: [None for _ in batches]  # a trainer that steps on nothing

        row = bpe.time_pulled_fit_to_fvu(make_fit, acts, 4, slow_check, 0.5, epochs)
    else:
        row = bpe.time_separate_fits_to_fvu(lambda e: e, slow_check, 0.5, epochs)
    assert row["epochs"] == epochs and not row["reached"]
    assert row["fvu_check_seconds"] >= sleeps
    assert row["seconds"] < sleeps  # the training here does nothing: the sleeps are not in it
