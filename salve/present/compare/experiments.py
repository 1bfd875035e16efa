"""Several runs side by side (`salve exps`): a baseline, the workspace and DVC experiments by
their key metrics and the parameters that differ."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from salve.present.compare.metrics import KeyMetric
from salve.present.compare.text import TEXT_WIDTH, md_table, text_table
from salve.present.kit import fmt


@dataclass(frozen=True)
class ExperimentRow:
    """One run in an experiment table: a baseline commit, the workspace or a DVC experiment.
    ``params``: flat dotted names (``sae.width``); ``metrics``: ``{file: nested values}``;
    ``state``: "" when finished, else queued / running / failed (its values may be missing)."""

    name: str
    rev: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, Any]]
    state: str = ""
    baseline: bool = False


def lookup(tree: Mapping[str, Any] | None, dotted: str) -> Any:
    """The value at ``a.b.c`` in nested mappings, None when any part is absent."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


_ARROWS = {"higher": "↑", "lower": "↓", "none": ""}


def changed_params(rows: Sequence[ExperimentRow]) -> list[str]:
    """Parameters whose value differs between any two rows that record parameters (a queued
    or failed run may record none); absent from such a row counts as a value."""
    recorded = [r.params for r in rows if r.params]
    names = sorted({k for p in recorded for k in p})
    return [n for n in names if len({repr(p.get(n, ...)) for p in recorded}) > 1]


def experiments_table(
    rows: Sequence[ExperimentRow],
    key_metrics: Sequence[KeyMetric],
    *,
    markdown: bool = False,
    width: int = TEXT_WIDTH,
) -> str:
    """Runs as rows; columns: the parameters that differ between them, then the key metrics
    (short names, ↑ / ↓ where a direction is better). Plain text is split into column blocks
    that each fit ``width`` (the run column repeated); Markdown is one table."""
    if not rows:
        return "No experiments.\n"
    params = changed_params(rows)
    values = {km: [lookup(r.metrics.get(km.file), km.key) for r in rows] for km in key_metrics}
    present = [km for km in key_metrics if any(v is not None for v in values[km])]
    # With several runs, a key metric equal in all of them is one note, not a column.
    same = [
        km
        for km in present
        if len(rows) > 1 and len({repr(v) for v in values[km] if v is not None}) == 1
    ]
    shown = [km for km in present if km not in same]
    header = ["run", *params, *(f"{km.name}{_ARROWS[km.better]}" for km in shown)]
    body = []
    for r in rows:
        label = r.name if r.rev.startswith(r.name) else f"{r.name} ({r.rev[:7]})"
        if r.state:
            label += f" [{r.state}]"
        cells = [label if r.baseline else f"  {label}"]
        cells += [fmt(r.params.get(p)) for p in params]
        cells += [fmt(lookup(r.metrics.get(km.file), km.key)) for km in shown]
        body.append(cells)
    legend = ", ".join(f"{km.name} = {km.label}" for km in shown)
    notes = [
        f"Changed parameters: {', '.join(params) if params else 'none'}.",
        "↑ higher is better, ↓ lower is better.",
        f"Key metrics: {legend}." if legend else "No key metric differs.",
    ]
    if same:
        notes.append(
            "Same in every run: "
            + ", ".join(
                f"{km.label} {fmt(next(v for v in values[km] if v is not None))}" for km in same
            )
            + "."
        )
    if markdown:
        body = [[c.strip() for c in r] for r in body]
        return md_table(header, body) + "\n" + "\n".join(notes) + "\n"
    blocks = _column_blocks(header, body, width)
    out = "\n".join(
        text_table([header[i] for i in b], [[r[i] for i in b] for r in body], width=width)
        for b in blocks
    )
    return out + "\n" + "\n".join(textwrap.fill(n, width) for n in notes) + "\n"


def _column_blocks(
    header: Sequence[str], body: Sequence[Sequence[str]], width: int
) -> list[list[int]]:
    """Column index groups, each starting with the run column, each fitting ``width``."""
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    blocks: list[list[int]] = []
    current = [0]
    used = 2 + widths[0]
    for i in range(1, len(header)):
        if used + 2 + widths[i] > width and len(current) > 1:
            blocks.append(current)
            current, used = [0], 2 + widths[0]
        current.append(i)
        used += 2 + widths[i]
    blocks.append(current)
    return blocks
