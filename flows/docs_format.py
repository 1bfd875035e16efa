"""What the generated docs are made from (the files, DocInputs) and how their numbers are
written (the report's formatter, intervals, Markdown tables)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_MD = "docs/RESULTS.md"
PARAMETERS_MD = "docs/PARAMETERS.md"
README = "README.md"
RESULTS_BLOCK = ("<!-- results:start -->", "<!-- results:end -->")
STUDY_BLOCK = ("<!-- study:start -->", "<!-- study:end -->")
PARAMS_BLOCK = ("<!-- params-doc:start -->", "<!-- params-doc:end -->")
BENCH_JSON = "benchmarks/results.json"


@dataclass
class DocInputs:
    """What the generated pages are rendered from, as plain data."""

    metrics: dict[str, dict] = field(default_factory=dict)  # {"fetch": {...}, ...} by stage
    params: dict[str, dict] = field(default_factory=dict)  # {"sae": {"kind": ...}}, dvc.lock's
    bench: dict | None = None  # benchmarks/results.json


def _merge(into: dict, params: Mapping[str, Any]) -> None:
    """dvc.lock's per-stage params (sections, or `section.key` leaves) into {section: {key}}."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            into.setdefault(key, {}).update(value)
        elif "." in key:
            section, leaf = key.split(".", 1)
            into.setdefault(section, {})[leaf] = value


def load_inputs(root: Path) -> DocInputs:
    """metrics/*.json, the parameters dvc.lock records for the run, benchmarks/results.json."""
    from salve.params_file import yaml_load

    out = DocInputs()
    for path in sorted((root / "metrics").glob("*.json")):
        out.metrics[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        for stage in stages.values():
            _merge(out.params, (stage.get("params") or {}).get("params.yaml", {}))
    bench = root / BENCH_JSON
    if bench.is_file():
        out.bench = json.loads(bench.read_text(encoding="utf-8"))
    return out


def fmt_value(value: Any, digits: int = 3) -> str:
    from salve.present.kit import fmt

    return fmt(value, digits)


def pct(value: Any) -> str:
    """A share as a percentage: 0.9972 -> "99.7 %"."""
    return f"{fmt_value(value * 100)} %" if finite(value) else "–"


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def ci_cell(cell: Mapping[str, Any] | None) -> str:
    """``mean [lo, hi]`` (salve.present.study_page.ci_text); the mean alone when the interval has no
    width (a method that does not depend on the SAE gives the same value for every seed)."""
    from salve.present.study_page import ci_text

    if not cell:
        return "–"
    lo, hi = cell.get("ci95", [math.nan, math.nan])
    if finite(lo) and lo == hi:
        return fmt_value(cell.get("mean"))
    return ci_text(cell)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def get_path(tree: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = tree or {}
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node
