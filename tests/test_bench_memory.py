"""benchmarks/bench_memory.py without running the stages: the cached image folder, the section
it writes into results.json and RESULTS.md. No timing or memory figure is asserted."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_memory as bm
from benchmarks import run_all
from benchmarks.synthetic_images import SHAPES


def test_class_counts_add_up_to_n() -> None:
    for n in (6, 200, 2000, 32001):
        counts = bm.class_counts(n)
        assert sum(counts.values()) == n and list(counts) == list(SHAPES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_image_folder_is_drawn_once_and_shared_between_sizes(tmp_path: Path) -> None:
    folder, drawn_s = bm.image_folder(tmp_path, 8, 16)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.jpg"))
    assert len(files) == 8 and drawn_s > 0
    again, cached_s = bm.image_folder(tmp_path, 8, 16)
    assert again == folder and cached_s == 0.0
    bigger, _ = bm.image_folder(tmp_path, 12, 16)  # draws only the 4 missing files
    assert len(list(bigger.rglob("*.jpg"))) == 12
    first = folder / files[0]
    assert (bigger / files[0]).stat().st_ino == first.stat().st_ino  # hard links to the pool
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left


def _result() -> dict:
    stage = {"peak_mib": 400.0, "seconds": 2.0, "images_per_s": 100.0, "process_s": 5.0}
    row = {"n": 200, "path": "streamed", "fetch": stage, "extract": stage | {"peak_mib": 900.0},
           "images_file_mib": 28.7, "acts_mib": 0.39}  # fmt: skip
    failed = {"n": 400, "path": "streamed", "error": "extract: exit status 1: boom\nMemoryError"}
    return {"arch": "resnet18", "image_size": 224, "batch_size": 256, "threads": 1,
            "family": "shapes", "baseline_peak_mib": 363.0, "baseline_error": None,
            "rows": [row, failed], "bench_seconds": 12.0}  # fmt: skip


def test_write_merges_the_memory_section_and_regenerates_results_md(tmp_path: Path) -> None:
    machine = {"cpu_model": "X", "logical_cores": 2, "usable_cores": 2, "memory_gib": 8,
               "torch_threads": 1, "torch": "t", "python": "p",
               "load_average_at_start": [0.1, 0.2, 0.3]}  # fmt: skip
    old = {"quick": False, "started": "then", "seconds": 1.0, "machine": machine,
           "results": {"sae": {"n": 1, "d": 2, "width": 3, "batch_size": 4, "epochs": 5,
                               "k": 6, "rows": []}}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(old))
    bm.write_section(tmp_path, "memory", "now", machine, _result())
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["results"]) == {"sae", "memory"} and doc["started"] == "then"
    assert doc["results"]["memory"]["run"]["started"] == "now"
    md = (tmp_path / "RESULTS.md").read_text()
    assert md == run_all.markdown(doc)
    section = md[md.index("## Memory: fetch + extract at scale") :]
    assert "## SAE fitting throughput" in md and "Measured in a separate run on now" in section
    assert "| 200 | streamed | 400 | 900 | 2.00 | 100 | 2.0 | 100.0 | 29 | 0.4 | 5.0 / 5.0 |" in (
        section
    )
    assert "| 400 | streamed | error | MemoryError |" in section and "peaks at 363 MiB" in section


def test_paper_scale_checks_a_runs_outputs(tmp_path: Path) -> None:
    """A run counts only when its outputs check out: a complete tree passes, and each planted
    fault is named."""
    import json

    from benchmarks.bench_paper_scale import check_outputs

    metrics = {
        "fetch": {"train_samples": 8, "val_samples": 2},
        "extract": {"train_samples": 8, "val_samples": 2},
        "fit_sae": {"train_fvu": 0.2},
        "gradfam": {"deletion_auc": 0.3, "deletion_auc_random": 0.5, "am_activating": 5,
                    "am_features": 6},
        "evaluate": {"methods": {"salve_paper": {"efficacy": {"mean": 0.9}}}},
    }  # fmt: skip

    def write(values: dict) -> None:
        (tmp_path / "metrics").mkdir(exist_ok=True)
        for stage, body in values.items():
            (tmp_path / "metrics" / f"{stage}.json").write_text(json.dumps(body))

    write(metrics)
    (tmp_path / "reports" / "latest").mkdir(parents=True)
    (tmp_path / "reports" / "latest" / "index.html").write_text("<html></html>")
    assert check_outputs(tmp_path, 10) == []
    assert check_outputs(tmp_path, 11) == ["fetch found 10 images, not 11"]
    write({"fit_sae": {"train_fvu": float("nan")}, "gradfam": metrics["gradfam"] | {
        "am_activating": 7}})  # fmt: skip
    assert check_outputs(tmp_path, 10) == [
        "fit_sae's train FVU is nan",
        "gradfam's AM counts do not add up",
    ]
    (tmp_path / "metrics" / "evaluate.json").unlink()
    (tmp_path / "reports" / "latest" / "index.html").unlink()
    problems = check_outputs(tmp_path, 10)
    assert "metrics/evaluate.json is missing" in problems
    assert "reports/latest/index.html is missing" in problems
