"""Metric changes between two runs, each with a direction and, where declared, a judgement.

Each metric change carries two separate signals: its direction (an arrow for the sign of new - old)
and, only where the metric declares which way is better, a judgement (better / worse). A change
smaller than the metric's noise floor (absolute, or relative to the larger magnitude) is "within
noise" and never coloured. Identifiers (feature indices, class names) are compared for equality
only: "4 -> 67 (changed)", never a numeric delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from salve.present.kit import fmt

BETTER = ("higher", "lower", "none")
KINDS = ("number", "identifier")
ROUNDOFF = 1e-12  # relative: a float64 change this small is arithmetic, not a result
# Leaf keys whose values name things (feature indices, classes) rather than measure them.
_IDENTIFIER_LEAVES = ("feature", "class", "latent", "label")
_IDENTIFIER_SUFFIXES = ("_feature", "_class", "_latent", "_index")

Diff = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class KeyMetric:
    """A metric a comparison leads with: where it is, what to call it, which way is better,
    how large a change is only noise, and whether it is a quantity or an identifier."""

    file: str
    key: str
    label: str
    better: str = "none"  # "higher" | "lower" | "none"
    noise_floor: float = 0.0  # absolute: a smaller change is noise
    kind: str = "number"  # "number" | "identifier"
    short: str = ""  # name in terminal tables and one-line summaries (default: the key)
    relative_noise: float = 0.0  # a change below this fraction of max(|old|, |new|) is noise
    optional: bool = False  # shown only where its file is at either revision (the study's)

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"KeyMetric {self.key!r}: better={self.better!r}; use one of {BETTER}")
        if self.kind not in KINDS:
            raise ValueError(f"KeyMetric {self.key!r}: kind={self.kind!r}; use one of {KINDS}")
        for name in ("noise_floor", "relative_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(
                    f"KeyMetric {self.key!r}: {name}={value!r}; use a finite value >= 0"
                )

    @property
    def name(self) -> str:
        return self.short or self.key


@dataclass(frozen=True)
class MetricChange:
    """One metric's change, ready to show. ``judgement``: better, worse, changed, noise,
    unchanged, or "" (no judgement: the metric's better direction is unknown)."""

    file: str
    key: str
    label: str
    old: str
    new: str
    change: str
    direction: str  # "up", "down" or ""
    arrow: str
    judgement: str
    verdict: str


@dataclass(frozen=True)
class MetricGroup:
    file: str
    rows: list[MetricChange]
    summary: str


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def looks_like_identifier(key: str) -> bool:
    """Whether a metric key names a thing (``per_class.3.feature``) rather than measures one."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf in _IDENTIFIER_LEAVES or leaf.endswith(_IDENTIFIER_SUFFIXES)


def _row(file: str, key: str, label: str, old: Any, new: Any, **kw: str) -> MetricChange:
    base = {"change": "", "direction": "", "arrow": "", "judgement": "", "verdict": ""}
    return MetricChange(file, key, label, fmt(old), fmt(new), **(base | kw))


def metric_change(
    file: str,
    key: str,
    entry: Mapping[str, Any] | None,
    *,
    label: str | None = None,
    better: str = "none",
    noise_floor: float = 0.0,
    identifier: bool = False,
    relative_noise: float = 0.0,
) -> MetricChange:
    """Classify one diff entry (``{"old": a, "new": b, ...}``, None when the diff omits it).

    A numeric change smaller than ``noise_floor``, or than ``relative_noise`` times the larger
    of |old| and |new|, is "within noise"; a change of exactly the floor is judged."""
    label = label or key
    if entry is None:
        return _row(
            file,
            key,
            label,
            None,
            None,
            change="no change reported",
            judgement="unchanged",
            verdict="unchanged",
        )
    old, new = entry["old"], entry["new"]
    if old is None or new is None:
        what = "added" if old is None else "removed"
        return _row(file, key, label, old, new, change=what, verdict=what)
    if old == new:  # NaN never equals itself: it falls through to the rules below
        return _row(
            file,
            key,
            label,
            old,
            new,
            change="unchanged",
            judgement="unchanged",
            verdict="unchanged",
        )
    if identifier or not (_is_number(old) and _is_number(new)):
        return _row(
            file,
            key,
            label,
            old,
            new,
            change=f"{fmt(old)} -> {fmt(new)} (changed)",
            judgement="changed",
            verdict="changed",
        )
    if not (math.isfinite(old) and math.isfinite(new)):
        up = new > old if not (math.isnan(old) or math.isnan(new)) else None
        return _row(
            file,
            key,
            label,
            old,
            new,
            change=f"{fmt(old)} -> {fmt(new)}",
            direction="" if up is None else ("up" if up else "down"),
            arrow="" if up is None else ("▲" if up else "▼"),
        )
    d = float(new) - float(old)
    rel = f" ({d / abs(old) * 100:+.3g} %)" if old != 0 else ""
    up = d > 0
    kw = {
        "change": f"{d:+.4g}{rel}",
        "direction": "up" if up else "down",
        "arrow": "▲" if up else "▼",
    }
    if abs(d) <= ROUNDOFF * max(abs(old), abs(new)):
        return _row(file, key, label, old, new, **kw, judgement="noise", verdict="round-off")
    if abs(d) < max(noise_floor, relative_noise * max(abs(old), abs(new))):
        return _row(file, key, label, old, new, **kw, judgement="noise", verdict="within noise")
    if better == "none":
        return _row(file, key, label, old, new, **kw)
    good = up if better == "higher" else not up
    return _row(
        file,
        key,
        label,
        old,
        new,
        **kw,
        judgement="better" if good else "worse",
        verdict="better" if good else "worse",
    )


def key_metric_changes(metrics_diff: Diff, key_metrics: Sequence[KeyMetric]) -> list[MetricChange]:
    """Every key metric, in declared order, whether or not the diff lists it; an optional one
    only where the diff has its file (made with every entry, it has each file that is at
    either revision): the study's metrics where neither revision ran the study are no news."""
    return [
        metric_change(
            km.file,
            km.key,
            (metrics_diff.get(km.file) or {}).get(km.key),
            label=km.label,
            better=km.better,
            noise_floor=km.noise_floor,
            identifier=km.kind == "identifier",
            relative_noise=km.relative_noise,
        )
        for km in key_metrics
        if not km.optional or km.file in metrics_diff
    ]


def other_metric_groups(
    metrics_diff: Diff, key_metrics: Sequence[KeyMetric], file_order: Sequence[str] = ()
) -> list[MetricGroup]:
    """The metric changes that are not key metrics, one group per file (``file_order`` first,
    then the rest by name). Unchanged entries (from `--all`) are counted, not listed."""
    keys = {(km.file, km.key) for km in key_metrics}
    rank = {f: i for i, f in enumerate(file_order)}
    groups = []
    for file in sorted(metrics_diff, key=lambda f: (rank.get(f, len(rank)), f)):
        rows, unchanged = [], 0
        for key in sorted(metrics_diff[file], key=lambda k: (k.count("."), k)):
            if (file, key) in keys:
                continue
            row = metric_change(
                file, key, metrics_diff[file][key], identifier=looks_like_identifier(key)
            )
            if row.judgement == "unchanged":
                unchanged += 1
            else:
                rows.append(row)
        if not rows:  # nothing changed in this file (`--all` lists it anyway)
            continue
        noise = sum(r.judgement == "noise" for r in rows)
        summary = f"{len(rows)} changed" + (f", {noise} only by round-off" if noise else "")
        if unchanged:
            summary += f"; {unchanged} unchanged, not listed"
        groups.append(MetricGroup(file, rows, summary))
    return groups


def param_rows(params_diff: Diff) -> list[tuple[str, str, str, str, str]]:
    """(file, parameter, old, new, change) for every changed parameter."""
    rows = []
    for file in sorted(params_diff):
        for key in sorted(params_diff[file]):
            e = params_diff[file][key]
            old, new = e["old"], e["new"]
            change = ""
            if _is_number(old) and _is_number(new) and old != new:
                change = f"{new - old:+g}" + (f" (×{new / old:.3g})" if old else "")
            rows.append((file, key, fmt(old), fmt(new), change))
    return rows


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------
