"""Study stage `study_report`: the study page, reports/study/index.html (figures embedded), from
the records the three study parts wrote."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from salve.config import Config
from salve.io import read_json, write_json, write_text
from salve.present.study_page import build_study_page
from tasks import STAGES, STUDY_PARTS
from tasks.artifacts import load_dataset_meta, require

NAME = "study_report"


def combined(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The study as one record, ``{part: record, "parts": {part: {"settings"}}}`` (what the page
    and docs/RESULTS.md read), from each part's ``{"settings", "record"}``."""
    study: dict[str, Any] = {"schema_version": 1, "parts": {}}
    for part, entry in parts.items():
        study[part] = entry["record"]
        study["parts"][part] = {"settings": entry["settings"]}
    return study


def from_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`combined` from the parts' metrics files (``{stage: metrics}``, those present): the
    records without their per-sample lists, enough for every summary table."""
    parts = {}
    for part, stage in STUDY_PARTS.items():
        m = metrics.get(stage)
        if not m:
            continue
        record: Any = {k: v for k, v in m.items() if k != "settings"}
        if part == "sae_variants":
            record = list(record.get("variants", {}).values())
        parts[part] = {"settings": m.get("settings", {}), "record": record}
    return combined(parts)


def run(cfg: Config, root: Path, progress: bool = True) -> dict:
    classes = list(load_dataset_meta(root)["classes"])
    parts = {part: read_json(require(root, stage, "record")) for part, stage in STUDY_PARTS.items()}
    study = combined(parts)
    subtitle = f"{Path(root).resolve().name}: the study stages' records (`salve study`)"
    page = build_study_page(study, classes, subtitle=subtitle)
    spec = STAGES[NAME]
    write_text(spec.path(root, "page"), page)
    metrics = {"parts": sorted(parts), "page_bytes": len(page.encode())}
    write_json(spec.metrics_path(root), metrics)
    return metrics
