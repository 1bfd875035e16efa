"""report: one self-contained HTML page (reports/latest/index.html) from the pipeline's artifacts.

Loads the upstream stages' results, metrics and plots files into plain data and hands them to
`salve.report.build_report`; figures are embedded PNGs, so the page opens offline on its own.
Stage times come from `.salve/timings/<stage>.json` when present (informational, not a DVC dep).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from salve.config import Config
from salve.io import load_tensors, read_json, write_text
from salve.report import ESTIMATORS, ReportInputs, build_report
from tasks import STAGE_ORDER, STAGES
from tasks.common import load_dataset_meta, stage_dir, write_metrics

REPORT_FILE = "index.html"


def report_path(root: Path) -> Path:
    return Path(root) / STAGES["report"].out_dir / REPORT_FILE


def read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def read_class_means(path: Path) -> list[list[float]]:
    rows = read_csv_rows(path)
    if not rows:
        return []
    cols = [c for c in rows[0] if c != "class"]
    return [[float(r[c]) for c in cols] for r in rows]


def read_timings(root: Path) -> list[dict]:
    out = []
    for name in STAGE_ORDER:
        path = root / ".salve" / "timings" / f"{name}.json"
        if name != "report" and path.exists():
            try:
                out.append(read_json(path))
            except Exception:  # noqa: BLE001 - informational only
                continue
    return out


def alpha_values(root: Path, num_classes: int) -> dict[str, list[list[float]]]:
    names = [f"alpha_{e}" for e in ESTIMATORS]
    t = load_tensors(stage_dir(root, "alpha_crit") / "alpha_crit.safetensors", [*names, "labels"])
    labels = t["labels"].tolist()
    values: dict[str, list[list[float]]] = {e: [[] for _ in range(num_classes)] for e in ESTIMATORS}
    for e in ESTIMATORS:
        for label, v in zip(labels, t[f"alpha_{e}"].double().tolist(), strict=True):
            if 0 <= label < num_classes:
                values[e][label].append(float(v) if v is not None else math.nan)
    return values


def gradfam_images(root: Path, index: dict, features: set[int]) -> dict[str, bytes]:
    """The overlay and activation-maximisation PNGs of the given features, by file name."""
    folder = stage_dir(root, "gradfam")
    out = {}
    for entry in index.get("features", []):
        if int(entry["feature"]) not in features:
            continue
        for key in ("overlay", "am"):
            name = entry.get(key)
            if name and Path(name).name == name and (folder / name).exists():
                out[name] = (folder / name).read_bytes()
    return out


def load_inputs(root: Path) -> ReportInputs:
    meta = load_dataset_meta(root)
    classes = [str(c) for c in meta["classes"]]
    ranking = read_json(stage_dir(root, "rank") / "ranking.json")
    gradfam_index = read_json(stage_dir(root, "gradfam") / "index.json")
    dominant = {int(d["feature"]) for d in ranking.get("dominant", [])}
    edit_metrics = read_json(root / "metrics" / "edit.json")
    alpha_metrics = read_json(root / "metrics" / "alpha_crit.json")
    sidecars = {}
    for stage, rel in (
        ("finetune", "results/finetune/model.json"),
        ("fit_sae", "results/fit_sae/sae.json"),
        ("edit", "results/edit/model.json"),
    ):
        sc = _optional_json(root / rel)
        if sc:
            sidecars[stage] = sc
    extra_params = {}
    if ranking.get("rule"):
        extra_params["rank"] = dict(ranking["rule"])
    if alpha_metrics.get("empirical_grid"):
        extra_params["alpha_crit"] = {
            f"grid_{k}": v for k, v in alpha_metrics["empirical_grid"].items()
        }
    gradfam_metrics = _optional_json(root / "metrics" / "gradfam.json")
    if "top_k" in gradfam_metrics:
        extra_params["gradfam"] = {"top_k": gradfam_metrics["top_k"]}
    metric_names = ranking.get("classes")
    return ReportInputs(
        classes=classes,
        dataset_info=dict(meta.get("info") or {}),
        fetch_metrics=_optional_json(root / "metrics" / "fetch.json"),
        finetune_epochs=read_csv_rows(root / "plots" / "finetune" / "epochs.csv"),
        finetune_metrics=_optional_json(root / "metrics" / "finetune.json"),
        sidecars=sidecars,
        timings=read_timings(root),
        sae_metrics=read_json(root / "metrics" / "fit_sae.json"),
        sae_loss=read_csv_rows(root / "plots" / "fit_sae" / "loss.csv"),
        ranking=ranking,
        class_means=read_class_means(stage_dir(root, "rank") / "class_means.csv"),
        gradfam_index=gradfam_index,
        gradfam_images=gradfam_images(root, gradfam_index, dominant),
        edit_metrics=edit_metrics,
        edit_curve_rows=read_csv_rows(root / "plots" / "edit" / "curves.csv"),
        alpha_crit_metrics=alpha_metrics,
        alpha_values=alpha_values(root, len(classes)),
        extra_params=extra_params,
        metric_class_names=[str(c) for c in metric_names] if metric_names else None,
    )


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    root = Path(root)
    text, stats = build_report(load_inputs(root))
    write_text(report_path(root), text)
    # No byte count here: the page embeds this run's stage times, so its size varies between
    # identical runs, and metrics must not (dvc metrics diff, reproducibility).
    summary = {
        "figures": stats["figures"],
        "images": stats["images"],
        "sections": stats["sections"],
        "classes": stats["classes"],
    }
    write_metrics(root, "report", summary)
    return summary
