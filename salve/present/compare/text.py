"""The comparison as text: Markdown for the nightly Prefect artifact, plain text for a terminal."""

from __future__ import annotations

from collections.abc import Sequence

from salve.present.compare.metrics import (
    Diff,
    KeyMetric,
    MetricChange,
    MetricGroup,
    key_metric_changes,
    other_metric_groups,
    param_rows,
)

# --------------------------------------------------------------------------------------------
# Markdown (the nightly Prefect artifact)
# --------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _group_rows(g: MetricGroup) -> list[tuple[str, str, str, str, str]]:
    def change(r: MetricChange) -> str:
        said = not r.verdict or r.verdict in r.change  # "4 -> 67 (changed)", "added"
        return r.change if said else f"{r.change} ({r.verdict})"

    return [(r.key, r.old, r.new, change(r), r.arrow) for r in g.rows]


def metrics_diff_markdown(
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric],
    *,
    old_label: str = "old",
    new_label: str = "new",
    file_order: Sequence[str] = (),
) -> str:
    """The same story as the compare page, as Markdown: parameters, key metrics, then one line
    per file (stage) for the other metric changes, each with its table folded in a
    ``<details>`` block (Prefect's UI and GitHub render it collapsed)."""
    out = ["### Parameters\n\n"]
    params = param_rows(params_diff)
    if params:
        out.append(md_table(("file", "parameter", old_label, new_label, "change"), params))
    else:
        out.append("No parameter changed.\n")
    out.append("\n### Key metrics\n\n")
    rows = [
        (f"{c.label} ({c.key})", c.old, c.new, c.change, c.arrow, c.verdict)
        for c in key_metric_changes(metrics_diff, key_metrics)
    ]
    if rows:
        header = ("metric", old_label, new_label, "change", "direction", "judgement")
        out.append(md_table(header, rows))
    else:
        out.append("No key metrics declared.\n")
    groups = other_metric_groups(metrics_diff, key_metrics, file_order)
    out.append("\n### Other metric changes, by stage\n")
    if not groups:
        out.append("\nNone.\n")
    for g in groups:
        out.append(f"\n#### {_md(g.file)}: {g.summary}\n\n")
        out.append(f"<details><summary>the {len(g.rows)} change(s)</summary>\n\n")
        header = ("metric", old_label, new_label, "change", "direction")
        out.append(md_table(header, _group_rows(g)))
        out.append("\n</details>\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Plain text (`salve diff`, `salve exps`)
# --------------------------------------------------------------------------------------------

TEXT_WIDTH = 100


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def text_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int = TEXT_WIDTH,
    indent: int = 2,
    shrink: int = 0,
) -> str:
    """Left-aligned columns separated by two spaces; when the table is wider than ``width``,
    column ``shrink`` is clipped (with "…") to fit."""
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    excess = indent + sum(widths) + 2 * (len(widths) - 1) - width
    if excess > 0:
        widths[shrink] = max(widths[shrink] - excess, 8)
    lines = []
    for r in cells:
        parts = [_clip(c, w).ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append((" " * indent + "  ".join(parts)).rstrip())
    return "\n".join(lines) + "\n"


def metrics_diff_text(
    params_diff: Diff,
    metrics_diff: Diff,
    key_metrics: Sequence[KeyMetric],
    *,
    old_label: str = "old",
    new_label: str = "new",
    file_order: Sequence[str] = (),
    show_all: bool = False,
    width: int = TEXT_WIDTH,
) -> str:
    """The comparison for a terminal, in the page's order: parameters, every key metric, then
    one line per file (stage) of other changes (``show_all``: their rows too)."""
    out = [f"Parameters ({old_label} -> {new_label})\n"]
    params = param_rows(params_diff)
    if params:
        rows = [(key, old, new, change, file) for file, key, old, new, change in params]
        out.append(text_table(("parameter", old_label, new_label, "change", "file"), rows))
    else:
        out.append("  no parameter changed\n")
    out.append("\nKey metrics\n")
    changes = key_metric_changes(metrics_diff, key_metrics)
    if changes:
        rows = [(c.label, c.old, c.new, c.change, c.arrow, c.verdict) for c in changes]
        header = ("metric", old_label, new_label, "change", "", "judgement")
        out.append(text_table(header, rows, width=width))
    else:
        out.append("  no key metrics declared\n")
    groups = other_metric_groups(metrics_diff, key_metrics, file_order)
    out.append("\nOther metric changes, by stage\n")
    if not groups:
        out.append("  none\n")
    for g in groups:
        out.append(f"  {g.file}: {g.summary}\n")
        if show_all:
            header = ("metric", old_label, new_label, "change", "")
            out.append(text_table(header, _group_rows(g), width=width, indent=4))
    if groups and not show_all:
        out.append("  (--all lists them)\n")
    return "".join(out)
