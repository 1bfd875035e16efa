"""The study's part of the generated docs: the README's table and docs/RESULTS.md's section,
from the study stages' metrics/study_*.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flows.docs_format import RESULTS_MD, DocInputs, ci_cell, finite, fmt_value, get_path, md_table


def study_staleness(study: Mapping[str, Any], sae: Mapping[str, Any]) -> str | None:
    settings = get_path(study, "parts.sae_variants.settings", {})
    target, val_l0 = settings.get("target_l0"), sae.get("val_l0")
    if settings.get("target_l0_source") != "the pipeline SAE's val L0":
        return None
    if not (finite(target) and finite(val_l0)) or math.isclose(target, val_l0, rel_tol=1e-6):
        return None
    return (
        f"**metrics/study_sae_variants.json is older than the pipeline's outputs**: its target "
        "L0 "
        f"({fmt_value(target)}) is not the pipeline SAE's val L0 ({fmt_value(val_l0)}). `make "
        "study` brings "
        "it up to date; then `salve docs`."
    )


def study_record(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The study as one record (tasks/study_report.py) from the study stages' metrics, None when
    none was computed."""
    from tasks.study_report import from_metrics

    study = from_metrics(metrics)
    return study if study["parts"] else None


def study_readme_block(d: DocInputs) -> str:
    """The README's study table: each open question, its key numbers and the answer's first
    sentence, from metrics/study_*.json."""
    from salve.present.study_page import (
        answer_adversarial,
        answer_deeper,
        answer_variants,
        rho_text,
    )

    study = study_record(d.metrics)
    if not study:
        return "No study recorded yet: `make study` computes it, then `salve docs` shows it here."

    def first(sentence: str) -> str:
        text = " ".join(sentence.split())
        return text.split(". ")[0].rstrip(".") + "."

    rows = []
    adv = study.get("adversarial")
    if adv:
        rho = "; ".join(
            f"{label} {rho_text(adv[norm])}"
            for norm, label in (("linf", "L-inf"), ("l2", "L2"))
            if adv.get(norm)
        )
        rows.append(("low alpha_crit, easy to attack?", rho, first(answer_adversarial(adv))))
    variants = study.get("sae_variants")
    if variants:
        cells = "; ".join(
            f"{r.get('name')} {ci_cell(get_path(r, 'methods.salve_projection.specificity_mean'))}"
            for r in variants
        )
        settings = get_path(study, "parts.sae_variants.settings", {})
        rows.append(
            (
                "other SAE kinds, more precise edits? (projection specificity)",
                cells,
                first(answer_variants(variants, settings)),
            )
        )
    deeper = study.get("deeper_layer")
    if deeper:
        diff = ci_cell(get_path(deeper, "summary.difference.efficacy"))
        rows.append(
            (
                "an edit inside the backbone? (efficacy, backbone minus head)",
                diff,
                first(answer_deeper(deeper)),
            )
        )
    lines = md_table(("question", "numbers (95 % intervals)", "answer"), rows)
    lines += [
        "",
        f"From `metrics/study_*.json` (`make study`); every number: [{RESULTS_MD}]"
        f"({RESULTS_MD}#the-study-salve-study), the page: `reports/study/index.html`.",
    ]
    return "\n".join(lines)


def study_section(study: Mapping[str, Any], sae: Mapping[str, Any]) -> list[str]:
    from salve.present.study_page import (
        answer_adversarial,
        answer_deeper,
        answer_variants,
        rho_text,
    )

    lines = [
        "## The study (`salve study`)",
        "",
        "The three open questions of [METHOD.md](METHOD.md#open-questions-the-study-salve-study), "
        "from `metrics/study_*.json` (the study's DVC stages, study/dvc.yaml: `make study` "
        "recomputes those whose code, data or parameters changed; its page is "
        "`reports/study/index.html`). Intervals are 95 %: bootstrap for correlations, "
        "over seeds or classes for edits. The sentences are written from the numbers.",
        "",
    ]
    stale = study_staleness(study, sae)
    if stale:
        lines += [stale, ""]
    adv = study.get("adversarial") or {}
    lines += ["### 1. Does a low alpha_crit predict adversarial vulnerability?", ""]
    if adv:
        rows = []
        for norm, label in (("linf", "L-inf"), ("l2", "L2")):
            e = adv.get(norm)
            if not e:
                continue
            rows.append(
                (
                    label,
                    rho_text(e),
                    rho_text(get_path(e, "by_estimator.linear", {})),
                    rho_text(get_path(e, "by_estimator.empirical", {})),
                    e.get("n_alpha_infinite", "–"),
                    fmt_value(e.get("median_eps")),
                )
            )
        header = (
            "norm",
            "Spearman, exact alpha_crit",
            "linear estimate",
            "empirical flip",
            "infinite alpha_crit",
            "median smallest flipping size",
        )
        lines += [*md_table(header, rows), ""]
    lines += [answer_adversarial(adv), ""]
    rows_v = study.get("sae_variants") or []
    settings = get_path(study, "parts.sae_variants.settings", {})
    lines += ["### 2. Do other SAE kinds give more precise edits?", ""]
    if rows_v:
        table_rows = [
            (
                r.get("name"),
                ci_cell(r.get("l0")),
                ci_cell(r.get("fvu")),
                ci_cell(r.get("dead_fraction")),
                ci_cell(get_path(r, "methods.salve_projection.efficacy")),
                ci_cell(get_path(r, "methods.salve_projection.specificity_mean")),
            )
            for r in rows_v
        ]
        header = (
            "SAE",
            "L0",
            "FVU",
            "dead fraction",
            "projection efficacy",
            "projection specificity (mean)",
        )
        lines += [*md_table(header, table_rows), ""]
    lines += [answer_variants(rows_v, settings), ""]
    lines += ["### 3. Can an edit inside the backbone change how a concept forms?", ""]
    lines += [answer_deeper(study.get("deeper_layer") or {})]
    return lines
