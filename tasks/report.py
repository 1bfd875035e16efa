"""report: the run report (reports/latest/index.html) and the latent browser (latents.html).

Loads the upstream stages' results, metrics and plots files into plain data and hands them to
`salve.report.build_report` and `salve.latent_browser.build_latents_page`; figures are embedded
PNGs, so each page opens offline on its own. The report requires every input it shows (a missing
file or key is an error); the latent browser is optional in a partial workspace and says which
stage to run for each source it lacks. Stage times come from `.salve/timings/<stage>.json` when
present (informational, not a DVC dep).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from salve.config import Config
from salve.figures import ESTIMATORS
from salve.io import ArtifactError, load_tensors, read_json, write_text
from salve.latent_browser import LatentSources, build_latents_page
from salve.report import LATENTS_PAGE, ReportInputs, build_report
from tasks import STAGE_ORDER, STAGES
from tasks.common import load_dataset_meta, stage_dir, write_metrics

REPORT_FILE = "index.html"
GRADFAM_LATENTS = "latents.json"  # results/gradfam/: one entry per latent, PNGs beside it
GRADFAM_LEGACY_INDEX = "index.json"  # the older per-feature format (dominant and cross only)
EDIT_LATENTS = "latents.json"  # results/edit/: per-class accuracy change per suppressed latent


def report_path(root: Path) -> Path:
    return Path(root) / STAGES["report"].out_dir / REPORT_FILE


def latents_path(root: Path) -> Path:
    """The latent browser, next to the report (the flow links it)."""
    return Path(root) / STAGES["report"].out_dir / LATENTS_PAGE


def read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise ArtifactError(f"{path}: file not found. Run the stage that produces it first.")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _optional_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def read_class_means(path: Path) -> list[list[float]]:
    """K x L class-mean codes from results/rank/class_means.csv (a `class` column, then f0..)."""
    rows = read_csv_rows(path)
    if not rows:
        raise ArtifactError(f"{path}: no rows. Rerun the rank stage.")
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


def legacy_gradfam(index: dict) -> dict:
    """results/gradfam/index.json (the per-feature format before latents.json) in the shape of
    latents.json: what it lacks (frequency, per-image codes, faithfulness) is None. Remove once
    every workspace's gradfam stage writes latents.json."""
    latents = []
    for e in index["features"]:
        latents.append(
            {
                "latent": e["feature"],
                "frequency": None,
                "top": [
                    {"index": i, "class": c, "code": None}
                    for i, c in zip(e["top_indices"], e["top_classes"], strict=True)
                ],
                "overlay": e["overlay"],
                "am": e.get("am"),  # only dominant features had one
                "am_code": e.get("am_code"),
                "top_code_mean": e.get("top_code_mean"),
                "deletion_auc": None,
                "deletion_auc_random": None,
            }
        )
    return {"image_size": index["image_size"], "layer": None, "map_grid": None, "latents": latents}


def load_gradfam(root: Path, required: bool) -> dict | None:
    """results/gradfam/latents.json (or the legacy index.json, converted); None when neither
    exists and not ``required``."""
    folder = stage_dir(root, "gradfam")
    if (folder / GRADFAM_LATENTS).exists():
        return read_json(folder / GRADFAM_LATENTS)
    if (folder / GRADFAM_LEGACY_INDEX).exists():
        return legacy_gradfam(read_json(folder / GRADFAM_LEGACY_INDEX))
    if required:
        raise ArtifactError(
            f"{folder / GRADFAM_LATENTS}: file not found. Run the gradfam stage first."
        )
    return None


def gradfam_images(root: Path, gradfam: dict, latents: set[int] | None = None) -> dict[str, bytes]:
    """The overlay and activation-maximisation PNGs (of ``latents``, default all), by file name.
    A file the index names must exist."""
    folder = stage_dir(root, "gradfam")
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


def load_inputs(root: Path) -> ReportInputs:
    meta = load_dataset_meta(root)
    classes = [str(c) for c in meta["classes"]]
    ranking = read_json(stage_dir(root, "rank") / "ranking.json")
    gradfam = load_gradfam(root, required=True)
    dominant = {int(d["feature"]) for d in ranking["dominant"]}
    alpha_metrics = read_json(root / "metrics" / "alpha_crit.json")
    sidecars = {
        stage: read_json(root / rel)
        for stage, rel in (
            ("finetune", "results/finetune/model.json"),
            ("fit_sae", "results/fit_sae/sae.json"),
            ("edit", "results/edit/model.json"),
        )
    }
    extra_params = {
        "rank": dict(ranking["rule"]),
        "alpha_crit": {f"grid_{k}": v for k, v in alpha_metrics["empirical_grid"].items()},
    }
    gradfam_metrics = _optional_json(root / "metrics" / "gradfam.json")
    if "top_k" in gradfam_metrics:
        extra_params["gradfam"] = {"top_k": gradfam_metrics["top_k"]}
    return ReportInputs(
        classes=classes,
        metric_class_names=[str(c) for c in ranking["classes"]],
        dataset_info=dict(meta["info"]),
        fetch_metrics=read_json(root / "metrics" / "fetch.json"),
        finetune_epochs=read_csv_rows(root / "plots" / "finetune" / "epochs.csv"),
        finetune_metrics=read_json(root / "metrics" / "finetune.json"),
        sidecars=sidecars,
        timings=read_timings(root),
        sae_metrics=read_json(root / "metrics" / "fit_sae.json"),
        sae_loss=read_csv_rows(root / "plots" / "fit_sae" / "loss.csv"),
        ranking=ranking,
        class_means=read_class_means(stage_dir(root, "rank") / "class_means.csv"),
        gradfam=gradfam,
        gradfam_images=gradfam_images(root, gradfam, dominant),
        edit_metrics=read_json(root / "metrics" / "edit.json"),
        edit_curve_rows=read_csv_rows(root / "plots" / "edit" / "curves.csv"),
        alpha_crit_metrics=alpha_metrics,
        alpha_values=alpha_values(root, len(classes)),
        extra_params=extra_params,
    )


def load_latent_sources(root: Path) -> LatentSources:
    """What the latent browser shows; a source whose stage has not run is None (the page names
    the stage to run)."""
    root = Path(root)
    classes = [str(c) for c in load_dataset_meta(root)["classes"]]
    rank = stage_dir(root, "rank")
    means_path, ranking_path = rank / "class_means.csv", rank / "ranking.json"
    gradfam = load_gradfam(root, required=False)
    edit_path = stage_dir(root, "edit") / EDIT_LATENTS
    return LatentSources(
        classes=classes,
        class_means=read_class_means(means_path) if means_path.exists() else None,
        ranking=read_json(ranking_path) if ranking_path.exists() else None,
        gradfam=gradfam,
        gradfam_images=gradfam_images(root, gradfam) if gradfam else {},
        edit=read_json(edit_path) if edit_path.exists() else None,
        hints={
            "class_means": f"{means_path.relative_to(root)} not found: run `salve stage rank`",
            "ranking": f"{ranking_path.relative_to(root)} not found: run `salve stage rank`",
            "gradfam": f"{stage_dir(root, 'gradfam').relative_to(root)}/{GRADFAM_LATENTS} not "
            "found: run `salve stage gradfam`",
            "edit": f"{edit_path.relative_to(root)} not found: run `salve stage edit` (a "
            "version that writes it)",
        },
    )


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    root = Path(root)
    text, stats = build_report(load_inputs(root))
    write_text(report_path(root), text)
    browser, browser_stats = build_latents_page(load_latent_sources(root))
    write_text(latents_path(root), browser)
    # No byte count here: the page embeds this run's stage times, so its size varies between
    # identical runs, and metrics must not (dvc metrics diff, reproducibility).
    summary = {
        "figures": stats["figures"],
        "images": stats["images"],
        "sections": stats["sections"],
        "classes": stats["classes"],
        "latents": browser_stats["latents"],
        "latents_missing_sources": browser_stats["missing_sources"],
    }
    write_metrics(root, "report", summary)
    return summary | {"pages": [str(report_path(root)), str(latents_path(root))]}
