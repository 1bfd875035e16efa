"""report: the run report (reports/latest/index.html) and the latent browser (latents.html).

Loads the upstream stages' results, metrics and plots files into plain data and hands them to
`salve.present.report.build_report` and `salve.present.latent_browser.build_latents_page`. The
report embeds its figures (one file that opens offline); the latent browser, with a picture or
two per latent (thousands at a realistic SAE width), links its pictures instead: they are copied
from results/gradfam into ``latents/`` beside it, in this stage's output folder, so the page
and its pictures move together. The report requires every input it shows (a missing file or key
is an error); the latent browser is optional in a partial workspace and says which stage to run
for each source it lacks.

The page is a DVC output: identical results must give an identical page (the same hash), so it
shows no stage times, git revision or host (those stay in `.salve/runs/`, `.salve/timings/` and
the run log). Its provenance is the upstream stages' output hashes as dvc.lock records them.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from ruamel.yaml import YAMLError

from salve.config import Config
from salve.io import ArtifactError, load_tensors, read_json, write_bytes, write_text
from salve.params_file import yaml_load
from salve.present.figures import ESTIMATORS
from salve.present.latent_browser import LatentSources, build_latents_page
from salve.present.report import ReportInputs, build_report
from tasks import STAGE_ORDER, STAGES
from tasks.artifacts import load_dataset_meta, load_ranking, require
from tasks.common import write_metrics
from tasks.keymetrics import KEY_METRICS_BY_STAGE
from tasks.records import (
    AlphaCritMetrics,
    EditLatents,
    EditMetrics,
    EvaluateMetrics,
    FetchMetrics,
    FinetuneMetrics,
    FitSaeMetrics,
    GradfamLatents,
    GradfamMetrics,
    Ranking,
    ReportMetrics,
    read_record,
)


def report_path(root: Path) -> Path:
    return STAGES["report"].path(root, "report")


def latents_path(root: Path) -> Path:
    """The latent browser, next to the report (the flow links it)."""
    return STAGES["report"].path(root, "latents")


LATENT_IMAGES = "latents"  # the browser's pictures, a folder beside it


def latent_images_dir(root: Path) -> Path:
    return latents_path(root).parent / LATENT_IMAGES


def read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise ArtifactError(f"{path}: file not found. Run the stage that produces it first.")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_class_means(path: Path) -> list[list[float]]:
    """K x L class-mean codes from results/rank/class_means.csv (a `class` column, then f0..)."""
    rows = read_csv_rows(path)
    if not rows:
        raise ArtifactError(f"{path}: no rows. Rerun the rank stage.")
    cols = [c for c in rows[0] if c != "class"]
    return [[float(r[c]) for c in cols] for r in rows]


def read_output_hashes(root: Path) -> dict[str, str]:
    """Each upstream stage's output-folder md5 as dvc.lock records it (stages it lacks are left
    out). These are hashes of this stage's own dependencies, so they are the same whenever the
    inputs are: stable provenance, unlike a git revision. dvc.lock is read, not declared as a
    dependency (it is the pipeline's own record)."""
    path = root / "dvc.lock"
    try:
        lock = yaml_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, YAMLError):  # no lock yet (a stage run outside DVC), or unreadable
        return {}
    entries = lock.get("stages", {}) if isinstance(lock, dict) else {}
    out = {}
    for name in STAGE_ORDER:
        outs = (entries.get(name) or {}).get("outs") or []
        md5 = next((o.get("md5") for o in outs if o.get("path") == STAGES[name].out_dir), None)
        if name != "report" and md5:
            out[name] = str(md5)
    return out


def alpha_values(root: Path, num_classes: int) -> dict[str, list[list[float]]]:
    names = [f"alpha_{e}" for e in ESTIMATORS]
    t = load_tensors(require(root, "alpha_crit", "values"), [*names, "labels"])
    labels = t["labels"].tolist()
    values: dict[str, list[list[float]]] = {e: [[] for _ in range(num_classes)] for e in ESTIMATORS}
    for e in ESTIMATORS:
        for label, v in zip(labels, t[f"alpha_{e}"].double().tolist(), strict=True):
            if 0 <= label < num_classes:
                values[e][label].append(float(v) if v is not None else math.nan)
    return values


def gradfam_images(root: Path, gradfam: dict, latents: set[int] | None = None) -> dict[str, bytes]:
    """The overlay and activation-maximisation PNGs (of ``latents``, default all), by file name.
    A file the index names must exist."""
    folder = STAGES["gradfam"].folder(root)
    out = {}
    for entry in gradfam["latents"]:
        if latents is not None and int(entry["latent"]) not in latents:
            continue
        for name in (entry["overlay"], entry["am"]):
            if not name:
                continue
            if Path(name).name != name:
                raise ArtifactError(f"{folder}: image name {name!r} is not a plain file name")
            out[name] = (folder / name).read_bytes()
    return out


def _metrics(root: Path, stage: str, record: type):
    path = STAGES[stage].metrics_path(root)
    if not path.exists():
        raise ArtifactError(f"{path.relative_to(root)} is missing: run `salve stage {stage}`.")
    return read_record(path, record, stage)


def load_inputs(root: Path) -> ReportInputs:
    meta = load_dataset_meta(root)
    classes = [str(c) for c in meta["classes"]]
    ranking = load_ranking(root)
    gradfam = read_record(require(root, "gradfam", "latents"), GradfamLatents, "gradfam")
    dominant = {int(d["feature"]) for d in ranking["dominant"]}
    alpha_metrics = _metrics(root, "alpha_crit", AlphaCritMetrics)
    sidecars = {
        stage: read_json(require(root, stage, "sidecar"))
        for stage in ("finetune", "fit_sae", "edit")
    }
    gradfam_metrics = _metrics(root, "gradfam", GradfamMetrics)
    extra_params = {
        "rank": dict(ranking["rule"]),
        "alpha_crit": {f"grid_{k}": v for k, v in alpha_metrics["empirical_grid"].items()},
        "gradfam": {"top_k": gradfam_metrics["top_k"]},
    }
    return ReportInputs(
        classes=classes,
        metric_class_names=[str(c) for c in ranking["classes"]],
        dataset_info=dict(meta["info"]),
        fetch_metrics=_metrics(root, "fetch", FetchMetrics),
        finetune_epochs=read_csv_rows(STAGES["finetune"].plot(root, "epochs")),
        finetune_metrics=_metrics(root, "finetune", FinetuneMetrics),
        sidecars=sidecars,
        output_hashes=read_output_hashes(root),
        sae_metrics=_metrics(root, "fit_sae", FitSaeMetrics),
        sae_loss=read_csv_rows(STAGES["fit_sae"].plot(root, "loss")),
        ranking=ranking,
        class_means=read_class_means(require(root, "rank", "class_means")),
        gradfam=gradfam,
        gradfam_images=gradfam_images(root, gradfam, dominant),
        edit_metrics=_metrics(root, "edit", EditMetrics),
        edit_curve_rows=read_csv_rows(STAGES["edit"].plot(root, "curves")),
        alpha_crit_metrics=alpha_metrics,
        alpha_values=alpha_values(root, len(classes)),
        evaluate_metrics=_metrics(root, "evaluate", EvaluateMetrics),
        extra_params=extra_params,
        key_metrics=KEY_METRICS_BY_STAGE,
    )


def _optional(path: Path, read):
    return read(path) if path.exists() else None


def load_latent_sources(root: Path) -> LatentSources:
    """What the latent browser shows; a source whose stage has not run is None (the page names
    the stage to run). Its pictures are named by their place beside the page
    (``copy_latent_images`` puts them there)."""
    root = Path(root)
    classes = [str(c) for c in load_dataset_meta(root)["classes"]]
    rank, gradfam_stage, edit = STAGES["rank"], STAGES["gradfam"], STAGES["edit"]
    means_path, ranking_path = rank.path(root, "class_means"), rank.path(root, "ranking")
    gradfam_path, edit_path = gradfam_stage.path(root, "latents"), edit.path(root, "latents")
    gradfam = _optional(gradfam_path, lambda p: read_record(p, GradfamLatents, "gradfam"))

    def missing(path: Path, stage: str) -> str:
        return f"{path.relative_to(root)} not found: run `salve stage {stage}`"

    return LatentSources(
        classes=classes,
        class_means=_optional(means_path, read_class_means),
        ranking=_optional(ranking_path, lambda p: read_record(p, Ranking, "rank")),
        gradfam=gradfam,
        gradfam_images=gradfam_image_srcs(root, gradfam) if gradfam else {},
        edit=_optional(edit_path, lambda p: read_record(p, EditLatents, "edit")),
        hints={
            "class_means": missing(means_path, "rank"),
            "ranking": missing(ranking_path, "rank"),
            "gradfam": missing(gradfam_path, "gradfam"),
            "edit": missing(edit_path, "edit"),
        },
    )


def gradfam_image_srcs(root: Path, gradfam: dict) -> dict[str, str]:
    """Each picture the gradfam index names, by file name: its src from the browser page. A
    file the index names must exist."""
    folder = STAGES["gradfam"].folder(root)
    out = {}
    for entry in gradfam["latents"]:
        for name in (entry["overlay"], entry["am"]):
            if not name:
                continue
            if Path(name).name != name:
                raise ArtifactError(f"{folder}: image name {name!r} is not a plain file name")
            if not (folder / name).is_file():
                raise ArtifactError(f"{folder / name}: not found. Rerun the gradfam stage.")
            out[name] = f"{LATENT_IMAGES}/{name}"
    return out


def copy_latent_images(root: Path, srcs: dict[str, str]) -> int:
    """Copy the browser's pictures from results/gradfam beside it (pictures an earlier run left
    are removed); one filesystem sync at the end, not one fsync per file. Returns how many."""
    source, dest = STAGES["gradfam"].folder(root), latent_images_dir(root)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {Path(src).name for src in srcs.values()}
    for stale in dest.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for name in sorted(wanted):
        # A new file each time (atomic rename), never a write through a link into DVC's cache.
        write_bytes(dest / name, (source / name).read_bytes(), fsync=False)
    if wanted and hasattr(os, "sync"):
        os.sync()
    return len(wanted)


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    root = Path(root)
    text, stats = build_report(load_inputs(root))
    write_text(report_path(root), text)
    sources = load_latent_sources(root)
    copy_latent_images(root, dict(sources.gradfam_images))
    browser, browser_stats = build_latents_page(sources)
    write_text(latents_path(root), browser)
    summary = {
        "figures": stats["figures"],
        "images": stats["images"],
        "sections": stats["sections"],
        "classes": stats["classes"],
        "latents": browser_stats["latents"],
        "latents_missing_sources": browser_stats["missing_sources"],
    }
    write_metrics(root, "report", ReportMetrics, summary)
    return summary | {"pages": [str(report_path(root)), str(latents_path(root))]}
