"""The study page: docs/METHOD.md's open questions, each with its method, numbers, figure and an
answer written from the numbers (never a fixed conclusion).

Pure functions of the study record (the JSON that `salve study` writes) and the class names;
laid out by ``salve/present/templates/study.html`` with the report's kit (salve/present/kit.py).
A verdict rests on 95 % intervals only: an interval that excludes 0 (or another kind's interval) is
evidence, an overlapping one is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from salve.present.kit import Embeds, fmt, kv, render, table
from salve.present.study_figures import deeper_figure, variants_figure, vulnerability_figure

PARTS: tuple[tuple[str, str], ...] = (
    ("adversarial", "1. Does a low alpha_crit predict adversarial vulnerability?"),
    ("sae_variants", "2. Do other SAE kinds give more precise edits?"),
    ("deeper_layer", "3. Can an edit inside the backbone change how a concept forms?"),
)
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
REFERENCE_KIND = "relu"  # the l1 SAE the other kinds are compared with
EDIT_NAMES = {"salve_projection": "centred projection", "salve_paper": "paper rule"}
SHIFT_NOTE = "noise, blur and colour jitter (salve.evaluate.shift_images)"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def ci_text(cell: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``mean [lo, hi]`` of a mean_ci95 cell; ``–`` when absent."""
    if not cell or not _finite(cell.get("mean")):
        return "–"
    lo, hi = cell.get("ci95", [math.nan, math.nan])
    parts = [fmt(v * scale, digits) if _finite(v) else "?" for v in (lo, hi)]
    return f"{fmt(cell['mean'] * scale, digits)} [{parts[0]}, {parts[1]}]"


def rho_text(entry: Mapping[str, Any]) -> str:
    """``rho = 0.12 [-0.02, 0.25], n = 200``."""
    rho = entry.get("spearman")
    lo, hi = entry.get("ci95", [math.nan, math.nan])
    ci = f" [{fmt(lo, 2)}, {fmt(hi, 2)}]" if _finite(lo) and _finite(hi) else ""
    return f"rho = {fmt(rho, 2) if _finite(rho) else 'undefined'}{ci}, n = {entry.get('n', 0)}"


def _sign_of_interval(lo: Any, hi: Any) -> int | None:
    """+1 / -1 when a 95 % interval excludes 0 on that side, 0 when it spans 0, None if unknown."""
    if not (_finite(lo) and _finite(hi)):
        return None
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _cell_side(cell: Mapping[str, Any] | None) -> int | None:
    """:func:`_sign_of_interval` of a mean_ci95 cell; None below two values (a single value's
    interval has zero width: no spread was measured, so it is no evidence)."""
    if not cell or cell.get("n", 0) < 2:
        return None
    return _sign_of_interval(*cell.get("ci95", [math.nan, math.nan]))


# --------------------------------------------------------------------------------------------
# Answers, written from the numbers
# --------------------------------------------------------------------------------------------


def rho_verdict(entry: Mapping[str, Any]) -> str:
    """What one Spearman interval says about question 1."""
    if entry.get("n", 0) < 3 or not _finite(entry.get("spearman")):
        return "too few pairs to say anything"
    side = _sign_of_interval(*entry.get("ci95", [math.nan, math.nan]))
    if side == 1:
        return "evidence that a low alpha_crit goes with a small flipping perturbation"
    if side == -1:
        return "evidence of the opposite: a low alpha_crit goes with a large flipping perturbation"
    if side == 0:
        return "no evidence that a low alpha_crit predicts a small flipping perturbation"
    return "no interval (bootstrap off or degenerate): no evidence either way"


def answer_adversarial(part: Mapping[str, Any]) -> str:
    sentences = []
    for norm, label in NORM_NAMES.items():
        entry = part.get(norm)
        if not entry:
            continue
        sentences.append(f"{label}: {rho_text(entry)}: {rho_verdict(entry)}.")
        sides = [
            _sign_of_interval(*c.get("ci95", [math.nan, math.nan]))
            for c in entry.get("per_class", [])
            if c.get("n", 0) >= 3
        ]
        known = [s for s in sides if s is not None]
        if known:
            sentences.append(
                f"Within classes ({label}), {sum(s != 0 for s in known)} of {len(known)} "
                f"intervals exclude 0 ({sum(s == 1 for s in known)} positive, "
                f"{sum(s == -1 for s in known)} negative)."
            )
    first = next((part[n] for n in NORM_NAMES if part.get(n)), None)
    if first:
        n = first.get("n", 0)
        notes = [
            f"{first.get('n_alpha_infinite', 0)} of {n} samples have an infinite alpha_crit "
            "(the class logit never reaches zero under the paper rule) and share the last rank"
        ]
        unflipped = ", ".join(
            f"{part[norm].get('n_eps_infinite', 0)} ({NORM_NAMES[norm]})"
            for norm in NORM_NAMES
            if part.get(norm)
        )
        notes.append(f"samples not flipped within eps_max: {unflipped}")
        text = "; ".join(notes)
        sentences.append(text[:1].upper() + text[1:] + ".")
    return " ".join(sentences) if sentences else "Not computed."


def _cell(row: Mapping[str, Any], method: str, metric: str) -> Mapping[str, Any] | None:
    return row.get("methods", {}).get(method, {}).get(metric)


def _compare(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> int | None:
    """+1 when a's interval lies above b's, -1 below, 0 when they overlap, None if unknown."""
    if not a or not b or a.get("n", 0) < 2 or b.get("n", 0) < 2:
        return None
    (alo, ahi), (blo, bhi) = a.get("ci95", [math.nan] * 2), b.get("ci95", [math.nan] * 2)
    if not all(_finite(v) for v in (alo, ahi, blo, bhi)):
        return None
    return 1 if alo > bhi else -1 if ahi < blo else 0


def _names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def answer_variants(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    if not rows:
        return "Not computed."
    ref = next((r for r in rows if r["name"] == REFERENCE_KIND), rows[0])
    others = [r for r in rows if r is not ref]
    seeds = settings.get("seeds", "?")
    sentences = [
        f"At a target L0 of {fmt(settings.get('target_l0'), 3)} ({seeds} seeds per kind, "
        f"{settings.get('num_classes', '?')} classes), with the {ref['name']} SAE as reference "
        f"(its achieved L0 {ci_text(ref.get('l0'))}, FVU {ci_text(ref.get('fvu'))})."
    ]
    for method, label in EDIT_NAMES.items():
        ref_eff, ref_spec = _cell(ref, method, "efficacy"), _cell(ref, method, "specificity_mean")
        if not ref_eff:
            continue
        better, worse, stronger, weaker = [], [], [], []
        for r in others:
            spec = _compare(_cell(r, method, "specificity_mean"), ref_spec)
            eff = _compare(_cell(r, method, "efficacy"), ref_eff)
            (better if spec == 1 else worse if spec == -1 else []).append(r["name"])
            (stronger if eff == 1 else weaker if eff == -1 else []).append(r["name"])
        best = max(
            rows,
            key=lambda r: (
                (_cell(r, method, "specificity_mean") or {}).get("mean", -math.inf)
                if _finite((_cell(r, method, "specificity_mean") or {}).get("mean"))
                else -math.inf
            ),
        )
        verdict = (
            f"more precise than {ref['name']} (specificity interval above its interval): "
            f"{_names(better)}; less precise: {_names(worse)}"
        )
        if not better:
            verdict += (
                f"; so no evidence that another kind gives more precise {label} edits than "
                f"the {ref['name']} SAE"
            )
        sentences.append(
            f"{label.capitalize()} edit: {ref['name']} drops the target class's accuracy by "
            f"{ci_text(ref_eff)} and changes the other classes' by {ci_text(ref_spec)}; "
            f"{verdict}. Target removed better: {_names(stronger)}; worse: {_names(weaker)}. "
            f"Best mean specificity: {best['name']} "
            f"({ci_text(_cell(best, method, 'specificity_mean'))})."
        )
    failed = [f"{r['name']} ({len(r['failed'])})" for r in rows if r.get("failed")]
    if failed:
        sentences.append(f"Fits that failed and are left out: {', '.join(failed)}.")
    return " ".join(sentences)


def answer_deeper(part: Mapping[str, Any]) -> str:
    summary = part.get("summary")
    if not summary:
        return "Not computed."
    deeper, head, diff = summary["deeper"], summary["head"], summary["difference"]
    n = deeper.get("efficacy", {}).get("n", 0)
    pp = 100.0
    sentences = [
        f"Suppressing each class's dominant {part.get('layer')} feature in block "
        f"{part.get('block')} (alpha = {fmt(part.get('alpha'))}) drops the target class's "
        f"accuracy by {ci_text(deeper.get('efficacy'))}, the head edit of the same class by "
        f"{ci_text(head.get('efficacy'))} (over {n} evaluated class(es); paired difference "
        f"{ci_text(diff.get('efficacy'))})."
    ]
    side = _cell_side(diff.get("efficacy"))
    gap = diff.get("efficacy", {}).get("mean")
    survival = part.get("survival", {})
    share = part.get("feature_share", {})
    if side == -1 and _finite(gap):
        why = [
            f"The backbone edit removes the class less well than the head edit, by "
            f"{fmt(-gap * pp, 3)} percentage points of target accuracy on average."
        ]
        if _finite(survival.get("mean")):
            why.append(
                f"In the layer's pooled output, the target's mean deviation along the edited "
                f"direction keeps {ci_text(survival, scale=pp)} % of its unedited size (the "
                "edit leaves the block's shortcut untouched)"
            )
        if _finite(share.get("mean")):
            why.append(
                f"and the dominant layer feature's largest other-class mean is "
                f"{ci_text(share, scale=pp)} % of its own class's (100 % = just as active for "
                "another class)"
            )
        sentences.append(why[0] + (" " + ", ".join(why[1:]) + "." if len(why) > 1 else ""))
    elif side == 1 and _finite(gap):
        sentences.append(
            f"The backbone edit removes the class better than the head edit, by "
            f"{fmt(gap * pp, 3)} percentage points of target accuracy on average."
        )
    elif side == 0:
        sentences.append("No evidence of a difference in efficacy between the two edits.")
    else:
        sentences.append(
            f"Too few evaluated classes (n = {n}) for an interval: the two edits are not compared."
        )
    spec_side = _cell_side(diff.get("specificity_mean"))
    spec_words = {
        1: "harms the other classes less than the head edit",
        -1: "harms the other classes more than the head edit",
        0: "shows no evidence of a different effect on the other classes",
    }.get(spec_side, "cannot be compared on the other classes")
    sentences.append(
        f"Other classes' accuracy change: {ci_text(deeper.get('specificity_mean'))} vs "
        f"{ci_text(head.get('specificity_mean'))}; the backbone edit {spec_words}."
    )
    if deeper.get("generalisation"):
        gen_side = _cell_side(diff.get("generalisation"))
        gen_words = {
            1: "carries over to shifted images better than the head edit",
            -1: "carries over to shifted images worse than the head edit",
            0: "carries over to shifted images about as well as the head edit",
        }.get(gen_side, "cannot be compared on shifted images")
        sentences.append(
            f"On shifted images the target drops by {ci_text(deeper.get('generalisation'))} vs "
            f"{ci_text(head.get('generalisation'))}: the backbone edit {gen_words}."
        )
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _method_adversarial(s: Mapping[str, Any]) -> list[str]:
    eps = s.get("eps_max", {})
    return [
        f"Per class, up to {s.get('per_class')} correctly classified val samples; the smallest "
        f"L-inf and L2 perturbation (pixels in [0, 1], images kept valid) that flips the "
        f"prediction, by PGD ({s.get('steps')} steps, {s.get('targets')} targeted run(s)) inside "
        f"a {s.get('bisection_steps')}-step bisection up to eps_max = {fmt(eps.get('linf'))} "
        f"(L-inf), {fmt(eps.get('l2'))} (L2).",
        "Spearman's rho against the exact alpha_crit of the sample's class's dominant feature "
        f"(results/alpha_crit), with a {s.get('bootstrap')}-resample bootstrap 95 % CI; "
        "infinite values rank last.",
    ]


def _method_variants(s: Mapping[str, Any]) -> list[str]:
    return [
        f"Seven SAE kinds fitted {s.get('seeds')} times each on the head input (width "
        f"{s.get('width')}, {s.get('epochs')} epochs), sparsity matched to L0 = "
        f"{fmt(s.get('target_l0'), 3)} ({s.get('target_l0_source')}): top-k kinds set k; relu "
        f"and jumprelu bisect l1 ({s.get('match_l0_fits')} fits); linear codes are dense.",
        "Each fit's FVU, L0 and dead fraction on val, and its edits scored by salve.evaluate "
        f"(projection alpha {fmt(s.get('projection_alpha'))}, paper alpha "
        f"{fmt(s.get('paper_alpha'))}) along each class's dominant latent; 95 % t-intervals "
        "over seeds.",
    ]


def _method_deeper(s: Mapping[str, Any]) -> list[str]:
    return [
        f"An SAE (the pipeline's settings) fitted on the pooled output of {s.get('layer')}; "
        f"each class's dominant latent's decoder direction suppressed in block {s.get('block')}'s "
        f"output branch (alpha = {fmt(s.get('alpha'))}, salve.study.edit_block_output).",
        "Efficacy, specificity and generalisation (on " + SHIFT_NOTE + ") from real forward "
        f"passes, against the head edit of the same class (centred projection, alpha "
        f"{fmt(s.get('head_alpha'))}); 95 % t-intervals over classes.",
    ]


def _adversarial_section(part: Mapping[str, Any], classes: Sequence[str], counter: Embeds):
    norms = [n for n in NORM_NAMES if part.get(n)]
    rows = [("all classes", *(_rho_cell(part[n]) for n in norms))]
    per_class = {n: {c["class"]: c for c in part[n].get("per_class", [])} for n in norms}
    for k, name in enumerate(classes):
        rows.append((name, *(_rho_cell(per_class[n].get(k, {})) for n in norms)))
    alternatives = []
    for n in norms:
        for est, entry in part[n].get("by_estimator", {}).items():
            alternatives.append((NORM_NAMES[n], est, rho_text(entry)))
    figure = counter.figure(
        vulnerability_figure(part.get("samples", {}), classes),
        "alpha_crit (exact) against the smallest flipping perturbation, per sample",
    )
    return {
        "table": table(("class", *(f"{NORM_NAMES[n]}: rho [95 % CI] (n)" for n in norms)), rows),
        "alternatives": table(("norm", "alpha_crit estimator", "Spearman"), alternatives)
        if alternatives
        else None,
        "facts": kv(
            [(f"median flip size ({NORM_NAMES[n]})", part[n].get("median_eps")) for n in norms]
            + [
                (f"already wrong at the attack ({NORM_NAMES[n]})", part[n].get("n_already_wrong"))
                for n in norms
            ]  # fmt: skip
        ),
        "figure": figure,
    }


def _rho_cell(entry: Mapping[str, Any]) -> str:
    if not entry:
        return "–"
    rho = entry.get("spearman")
    lo, hi = entry.get("ci95", [math.nan, math.nan])
    ci = f" [{fmt(lo, 2)}, {fmt(hi, 2)}]" if _finite(lo) and _finite(hi) else ""
    return f"{fmt(rho, 2) if _finite(rho) else '–'}{ci} ({entry.get('n', 0)})"


def _variants_section(rows: Sequence[Mapping[str, Any]], counter: Embeds):
    header = (
        "kind",
        "sparsity",
        "FVU",
        "L0",
        "dead fraction",
        "projection efficacy",
        "projection specificity",
        "projection worst class",
        "paper efficacy",
        "paper specificity",
        "failed seeds",
    )
    body = []
    for r in rows:
        if r.get("l0_rule") == "k":
            sparsity = f"k = {r.get('k')}"
        elif r.get("kind") == "linear":
            sparsity = "dense (signed codes)"
        else:
            sparsity = f"l1 = {fmt(r.get('l1'), 3)}"
        body.append(
            (
                r["name"],
                sparsity,
                ci_text(r.get("fvu")),
                ci_text(r.get("l0")),
                ci_text(r.get("dead_fraction")),
                ci_text(_cell(r, "salve_projection", "efficacy")),
                ci_text(_cell(r, "salve_projection", "specificity_mean")),
                ci_text(_cell(r, "salve_projection", "specificity_worst")),
                ci_text(_cell(r, "salve_paper", "efficacy")),
                ci_text(_cell(r, "salve_paper", "specificity_mean")),
                len(r.get("failed", [])),
            )
        )
    figure = counter.figure(
        variants_figure(rows), "Edit efficacy and specificity per SAE kind (95 % CI over seeds)"
    )
    return {"table": table(header, body), "figure": figure}


def _deeper_section(part: Mapping[str, Any], classes: Sequence[str], counter: Embeds):
    summary = part.get("summary", {})
    metrics = ("efficacy", "flip_rate", "specificity_mean", "specificity_worst", "generalisation")
    rows = [
        (
            m,
            ci_text(summary.get("head", {}).get(m)),
            ci_text(summary.get("deeper", {}).get(m)),
            ci_text(summary.get("difference", {}).get(m)),
        )
        for m in metrics
    ]
    rows.append(("survival along the direction", "–", ci_text(part.get("survival")), "–"))
    rows.append(("feature share (other class / own)", "–", ci_text(part.get("feature_share")), "–"))
    per_class = []
    for r in part.get("per_class", []):
        d, h = r.get("deeper") or {}, r.get("head") or {}
        name = classes[r["class"]] if 0 <= r["class"] < len(classes) else str(r["class"])
        per_class.append(
            (
                name,
                r.get("latent"),
                h.get("efficacy"),
                d.get("efficacy"),
                h.get("specificity_mean"),
                d.get("specificity_mean"),
                h.get("generalisation"),
                d.get("generalisation"),
                d.get("survival"),
                r.get("feature_share"),
            )
        )
    sae = part.get("sae", {})
    return {
        "summary": table(("metric", "head edit", "backbone edit", "backbone - head"), rows),
        "per_class": table(
            (
                "class",
                "layer latent",
                "head efficacy",
                "backbone efficacy",
                "head specificity",
                "backbone specificity",
                "head generalisation",
                "backbone generalisation",
                "survival",
                "feature share",
            ),
            per_class,
        ),
        "sae": kv(
            [
                ("layer SAE FVU (val)", sae.get("fvu")),
                ("L0", sae.get("l0")),
                ("dead fraction", sae.get("dead_fraction")),
                (
                    "classes left out (base accuracy)",
                    ", ".join(
                        classes[k] if 0 <= k < len(classes) else str(k)
                        for k in part.get("left_out_classes", [])
                    )
                    or "none",
                ),
            ]
        ),  # fmt: skip
        "figure": counter.figure(
            deeper_figure(part.get("per_class", []), classes),
            "Backbone edit next to the head edit, per class",
        ),
    }


def study_context(
    study: Mapping[str, Any],
    classes: Sequence[str],
    *,
    stale: Mapping[str, bool] | None = None,
    title: str = "SALVE: the open questions",
    subtitle: str = "",
) -> dict[str, Any]:
    """Everything study.html shows, as plain data (strings, tables, data-URI figures)."""
    counter = Embeds()
    records = study.get("parts", {})
    sections = []
    for key, heading in PARTS:
        record = records.get(key)
        data = study.get(key)
        section: dict[str, Any] = {
            "id": key.replace("_", "-"),
            "title": heading,
            "computed": bool(record) and data is not None,
            "stale": bool((stale or {}).get(key)),
            "record": kv(
                [
                    ("fingerprint", str(record.get("fingerprint", ""))[:16]),
                    ("computed", record.get("finished", "–")),
                    ("seconds", record.get("seconds")),
                ]
            )
            if record
            else None,  # fmt: skip
        }
        if section["computed"]:
            settings = record.get("settings", {})
            if key == "adversarial":
                section["method"] = _method_adversarial(settings)
                section["answer"] = answer_adversarial(data)
                section["body"] = _adversarial_section(data, classes, counter)
            elif key == "sae_variants":
                section["method"] = _method_variants(settings)
                section["answer"] = answer_variants(data, settings)
                section["body"] = _variants_section(data, counter)
            else:
                section["method"] = _method_deeper(settings)
                section["answer"] = answer_deeper(data)
                section["body"] = _deeper_section(data, classes, counter)
        sections.append(section)
    return {
        "title": title,
        "subtitle": subtitle,
        "nav": [
            (f"#{s['id']}", s["title"].split(" ", 1)[0] + " " + _short(s["id"]), "")
            for s in sections
        ],  # fmt: skip
        "sections": sections,
        "figures": counter.figures,
    }


def _short(section_id: str) -> str:
    return {
        "adversarial": "alpha_crit vs attacks",
        "sae-variants": "SAE kinds",
        "deeper-layer": "backbone edit",
    }.get(section_id, section_id)


def build_study_page(
    study: Mapping[str, Any],
    classes: Sequence[str],
    *,
    stale: Mapping[str, bool] | None = None,
    title: str = "SALVE: the open questions",
    subtitle: str = "",
) -> str:
    """The study page as one offline HTML file (figures embedded)."""
    context = study_context(study, classes, stale=stale, title=title, subtitle=subtitle)
    return render("study.html", **context)
