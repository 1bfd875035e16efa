"""`salve docs`: the generated parts of the documentation, and the checks that keep the rest true.

Generated, from what the repository holds (never typed by hand):

- docs/RESULTS.md, whole: every number of the default run, from metrics/*.json (the pipeline's
  stages and `salve study`), the parameters dvc.lock records, and benchmarks/results.json;
- README.md, between ``<!-- results:start -->`` and ``<!-- results:end -->``: the headline;
- docs/PARAMETERS.md, between ``<!-- params-doc:start -->`` and ``<!-- params-doc:end -->``: the
  parameter reference (salve.config.params_markdown, as `salve params-doc --write FILE`).

`salve docs` rewrites what differs; `salve docs --check` writes nothing and exits 1 naming each
stale file and each drift problem of the hand-written pages (README.md and docs/*.md):

- a ``section.key`` that the parameter schema (salve/config.py) does not have;
- a relative link whose file (or Markdown heading) is missing, lies outside the repository or
  is ignored by git (a generated file a fresh clone does not have);
- a command in a fenced shell block that names no real `salve` subcommand or flag (parsed by the
  CLI's own parser), no Makefile target, or no script in the repository.

The rendering and checking functions take strings and return strings (or problems), so the
tests feed them planted errors. Numbers go through the report's formatter (salve.report.fmt and
salve.study.page's interval text): the same digits as the HTML report. Presentation only:
nothing in salve/ or tasks/ imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_MD = "docs/RESULTS.md"
PARAMETERS_MD = "docs/PARAMETERS.md"
README = "README.md"
RESULTS_BLOCK = ("<!-- results:start -->", "<!-- results:end -->")
PARAMS_BLOCK = ("<!-- params-doc:start -->", "<!-- params-doc:end -->")
BENCH_JSON = "benchmarks/results.json"

# The evaluate stage's methods, in table order (salve.evaluate.METHODS), as a reader names them.
METHOD_LABELS = {
    "salve_projection": "SALVE, centred projection",
    "salve_paper": "SALVE, paper rule",
    "zero_row": "zero the class's head row",
    "mean_difference": "mean-difference direction",
    "leace": "LEACE",
    "random_direction": "random direction",
    "random_latent": "random SAE latent",
}
ERASED_PROBE = 0.55  # probe recovery at or below this: the class is erased from the features


class DocsError(ValueError):
    """A documentation file lacks the block `salve docs` writes into."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class DocInputs:
    """What the generated pages are rendered from, as plain data."""

    metrics: dict[str, dict] = field(default_factory=dict)  # {"fetch": {...}, "study": {...}}
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
    from salve.config import yaml_load

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


# --------------------------------------------------------------------------------------------
# Number formatting: the report's
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    from salve.report import fmt

    return fmt(value, digits)


def _pct(value: Any) -> str:
    """A share as a percentage: 0.9972 -> "99.7 %"."""
    return f"{_fmt(value * 100)} %" if _finite(value) else "–"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ci(cell: Mapping[str, Any] | None) -> str:
    """``mean [lo, hi]`` (salve.study.page.ci_text); the mean alone when the interval has no
    width (a method that does not depend on the SAE gives the same value for every seed)."""
    from salve.study.page import ci_text

    if not cell:
        return "–"
    lo, hi = cell.get("ci95", [math.nan, math.nan])
    if _finite(lo) and lo == hi:
        return _fmt(cell.get("mean"))
    return ci_text(cell)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _get(tree: Mapping[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = tree or {}
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# Rendering: strings out
# --------------------------------------------------------------------------------------------


def setup_sentence(d: DocInputs) -> str:
    """What the numbers are of: data, model, SAE, edit, as the run recorded them."""
    m, p = d.metrics, d.params
    fetch, fine = m.get("fetch", {}), m.get("finetune", {})
    weights = _get(p, "finetune.weights", "?")
    start = "from scratch" if weights == "none" else f"from `{weights}` weights"
    edit = _get(m, "edit.checkpoint_edit", {})
    mode = edit.get("mode", _get(p, "edit.mode", "?"))
    rule = "centred projection" if mode == "projection" and edit.get("centred") else mode
    return (
        f"`{fetch.get('source', '?')}` at {fetch.get('image_size', '?')} px, "
        f"{fetch.get('train_samples', '?')} train and {fetch.get('val_samples', '?')} val images "
        f"in {fetch.get('num_classes', '?')} classes; `{fine.get('arch', '?')}` fine-tuned {start} "
        f"for {fine.get('epochs_run', '?')} epochs at batch {_get(p, 'finetune.batch_size', '?')}; "
        f"a {_get(p, 'sae.kind', '?')} SAE with {_get(p, 'sae.width', '?')} latents; the {rule} "
        f"edit; seed {_get(p, 'common.seed', '?')}, {_get(p, 'common.num_threads', '?')} CPU "
        f"threads, `common.reproducible: {str(_get(p, 'common.reproducible', '?')).lower()}`"
    )


def _lowest_class(fine: Mapping[str, Any]) -> str:
    per = fine.get("val_class_accuracy") or {}
    if not per:
        return "–"
    name = min(per, key=lambda k: per[k])
    return f"{_pct(per[name])} (class {name})"


def _edit_line(edit: Mapping[str, Any]) -> str:
    n = len(edit.get("classes_evaluated", []))
    return (
        f"{edit.get('classes_below_10pct', '–')} of {n} classes below 10 % at full suppression, "
        f"{edit.get('classes_selective', '–')} selectively; the other classes move "
        f"{_fmt(_get(edit, 'mean_abs_off_target_change', math.nan) * 100)} points on average"
    )


def _gradfam_line(g: Mapping[str, Any]) -> str:
    grid = "x".join(str(x) for x in g.get("map_grid", [])) or "?"
    return (
        f"`{g.get('layer', '?')}`, {grid} maps; deletion AUC {_fmt(g.get('deletion_auc'))} in "
        f"saliency order vs {_fmt(g.get('deletion_auc_random'))} in random order; "
        f"{g.get('maps_no_better_than_random', '–')} of {g.get('latents', '–')} latents no "
        "better than random"
    )


def _sae_line(s: Mapping[str, Any], width: Any) -> str:
    return (
        f"FVU {_fmt(s.get('val_fvu'))}, L0 {_fmt(s.get('val_l0'))} of {width}, dead fraction "
        f"{_fmt(s.get('val_dead_fraction'))}, splice accuracy {_pct(s.get('val_splice_accuracy'))}"
    )


def _method_label(name: str, settings: Mapping[str, Any]) -> str:
    label = METHOD_LABELS.get(name, name)
    if name == "salve_paper" and "paper_alpha" in settings:
        label += f" (alpha {_fmt(settings['paper_alpha'])})"
    return label


def _ordered_methods(methods: Mapping[str, Any]) -> list[str]:
    return [k for k in METHOD_LABELS if k in methods] + [
        k for k in methods if k not in METHOD_LABELS
    ]


def _evaluate_reading(ev: Mapping[str, Any]) -> str:
    """What the methods table says, written from its numbers (never a fixed conclusion)."""
    methods = ev.get("methods", {})
    proj = _get(methods, "salve_projection.efficacy")
    if not proj:
        return ""
    lo, hi = proj.get("ci95", [math.nan, math.nan])
    bits = [
        f"Suppressing the dominant SAE feature by centred projection lowers the target "
        f"class's accuracy by {_ci(proj)}"
    ]
    for name in ("zero_row", "mean_difference", "leace"):
        cell = _get(methods, f"{name}.efficacy")
        if not cell or not _finite(cell.get("mean")):
            continue
        mean = cell["mean"]
        where = "above" if mean > hi else "below" if mean < lo else "inside"
        bits.append(f"{METHOD_LABELS[name]} {_fmt(mean)} ({where} that interval)")
    erased = [
        METHOD_LABELS.get(k, k)
        for k in _ordered_methods(methods)
        if _finite(_get(methods, f"{k}.probe_recovery.mean"))
        and methods[k]["probe_recovery"]["mean"] <= ERASED_PROBE
    ]
    text = "; ".join(bits) + "."
    if erased:
        text += (
            f" A linear probe no longer finds the class (probe recovery at most {ERASED_PROBE}) "
            f"after: {', '.join(erased)}."
        )
    return text


def readme_block(d: DocInputs) -> str:
    """The README's headline: a few numbers of the default run, a link to the rest."""
    m = d.metrics
    if not m.get("fetch"):
        return "No run recorded yet: `make run` computes it, then `salve docs` shows it here."
    fine, sae, edit = m.get("finetune", {}), m.get("fit_sae", {}), m.get("edit", {})
    ev, g = m.get("evaluate", {}), m.get("gradfam", {})
    rows = [
        (
            "fine-tuned val accuracy",
            f"{_pct(fine.get('val_accuracy'))}, lowest class {_lowest_class(fine)}",
        ),
        ("SAE on val images", _sae_line(sae, _get(d.params, "sae.width", "?"))),
        ("suppressing each class's dominant feature", _edit_line(edit) if edit else "–"),
    ]
    methods = ev.get("methods", {})
    if methods:
        cells = [
            f"{_method_label(k, {})} {_ci(_get(methods, f'{k}.efficacy'))}"
            for k in ("salve_projection", "zero_row", "mean_difference")
            if k in methods
        ]
        rows.append(
            (
                f"efficacy (target accuracy drop) against baselines, {ev.get('seeds', '?')} SAE "
                "seeds",
                "; ".join(cells),
            )
        )
    if g:
        rows.append(("Grad-FAM", _gradfam_line(g)))
    lines = [f"What `make run` computes: {setup_sentence(d)}.", ""]
    lines += _table(("", "value"), rows)
    lines += [
        "",
        f"Every number, with 95 % intervals and the study's answers: [{RESULTS_MD}]({RESULTS_MD}),"
        " written by `salve docs` from `metrics/`.",
    ]
    return "\n".join(lines)


def _finetune_section(fine: Mapping[str, Any]) -> list[str]:
    per = fine.get("val_class_accuracy") or {}
    rows = [
        ("val accuracy", _pct(fine.get("val_accuracy"))),
        ("lowest class", _lowest_class(fine)),
        ("train accuracy", _pct(fine.get("train_accuracy"))),
        ("epochs run (budget)", f"{fine.get('epochs_run', '–')} ({fine.get('epoch_budget', '–')})"),
        ("best epoch", fine.get("best_epoch", "–")),
        ("stopped early", _fmt(fine.get("stopped_early"))),
    ]
    lines = ["## Fine-tuning", "", *_table(("", "value"), rows)]
    if per:
        lines += [
            "",
            "Val accuracy per class: " + ", ".join(f"{k} {_pct(v)}" for k, v in per.items()) + ".",
        ]
    return lines


def _sae_section(s: Mapping[str, Any], width: Any) -> list[str]:
    keys = (
        ("fvu", "FVU"),
        ("explained_variance", "explained variance"),
        ("l0", f"L0 (of {width} latents)"),
        ("dead_fraction", "dead fraction"),
        ("splice_accuracy", "splice accuracy (head reading the reconstruction)"),
        ("splice_agreement", "splice agreement with the model"),
    )
    show = {"splice_accuracy": _pct, "splice_agreement": _pct}
    rows = [
        (label, *(show.get(k, _fmt)(s.get(f"{split}_{k}")) for split in ("train", "val")))
        for k, label in keys
    ]
    return ["## SAE quality", "", *_table(("", "train", "val"), rows)]


def _edit_section(edit: Mapping[str, Any], rank: Mapping[str, Any]) -> list[str]:
    grid = edit.get("alpha_grid", {})
    left_out = ", ".join(edit.get("classes_left_out", [])) or "none"
    lines = [
        "## Editing the head",
        "",
        f"Each class's dominant feature suppressed along the alpha grid up to "
        f"{_fmt(grid.get('max'))} ({grid.get('unit', '?')} units); full suppression is the end of "
        f"the grid. {_edit_line(edit)}. Distinct dominant features: "
        f"{rank.get('distinct_dominant_features', '–')} for {rank.get('num_classes', '–')} "
        f"classes; cross-class features: {rank.get('cross_class_features', '–')}. Classes left "
        f"out (below `edit.min_base_accuracy`): {left_out}.",
        "",
    ]
    rows = [
        (
            k,
            v.get("feature", "–"),
            _pct(v.get("target_acc_base")),
            _pct(v.get("target_acc_full_suppression")),
            _fmt(_get(v, "off_target_mean_change", math.nan) * 100),
            _fmt(_get(v, "off_target_max_abs_change", math.nan) * 100),
            _fmt(v.get("score")),
        )
        for k, v in (edit.get("per_class") or {}).items()
    ]
    header = (
        "class",
        "feature",
        "accuracy before",
        "at full suppression",
        "other classes, mean change (points)",
        "other classes, largest change (points)",
        "score",
    )
    return lines + _table(header, rows)


def _evaluate_section(ev: Mapping[str, Any]) -> list[str]:
    from salve.report import BASELINE_METRICS

    methods = ev.get("methods", {})
    settings = ev.get("settings", {})
    shown = [(k, label) for k, label in BASELINE_METRICS if any(k in v for v in methods.values())]
    rows = [
        (_method_label(name, settings), *(_ci(methods[name].get(k)) for k, _ in shown))
        for name in _ordered_methods(methods)
    ]
    stab = ev.get("stability", {})
    per_seed = [s.get("dominant_match_fraction") for s in stab.get("per_seed", [])]
    per_seed = [x for x in per_seed if _finite(x)]
    spread = f" ({_pct(min(per_seed))} to {_pct(max(per_seed))} per seed)" if per_seed else ""
    return [
        "## Edits against baselines",
        "",
        f"`evaluate`: {ev.get('seeds', '?')} SAE seeds, mean over the evaluated classes with a "
        "95 % interval over seeds (one value where the method does not depend on the SAE). "
        "Efficacy is the drop in the target class's val accuracy; specificity the mean (or worst) "
        "accuracy change of the other classes; generalisation the efficacy on shifted images "
        f"({', '.join(settings.get('shifts', [])) or '?'}); probe recovery the balanced accuracy "
        "of a target-vs-rest logistic probe on the representation the edited model reads (0.5: "
        "the class is erased from it). Projection strength "
        f"{_fmt(settings.get('projection_alpha'))}.",
        "",
        *_table(("method", *(label for _, label in shown)), rows),
        "",
        _evaluate_reading(ev),
        "",
        f"Dominant features found again across SAE seeds: "
        f"{_pct(stab.get('dominant_match_fraction'))} of classes{spread}; latents matched "
        f"(|cosine| > {_fmt(stab.get('threshold'))}): {_pct(stab.get('matched_fraction'))}.",
    ]


def _alpha_crit_section(a: Mapping[str, Any]) -> list[str]:
    checked = a.get("real_model_checked", 0)
    rows = [
        ("median exact alpha_crit", _fmt(a.get("median_exact"), 4)),
        ("samples with a single root", _pct(a.get("fraction_single_root"))),
        ("samples with several roots", _pct(a.get("fraction_multiple_roots"))),
        ("linear estimate below the exact value", _pct(a.get("linear_le_exact_overall"))),
        (
            "samples whose every term w_ij a_j is non-negative",
            _pct(a.get("fraction_all_terms_nonnegative")),
        ),
        (
            "largest difference exact vs brentq (single root)",
            _fmt(a.get("exact_vs_brentq_max_abs_diff_single_root")),
        ),
        (
            "flips confirmed on the real edited model",
            f"{a.get('real_model_agree', '–')} of {checked}",
        ),
    ]
    return ["## alpha_crit", "", f"Units: {a.get('units', '?')}.", "", *_table(("", "value"), rows)]


def _gradfam_section(g: Mapping[str, Any]) -> list[str]:
    return [
        "## Grad-FAM",
        "",
        f"{_gradfam_line(g)}. Features shown: {g.get('features', '–')}, "
        f"{g.get('top_k', '–')} top-activating val images each; activation-maximisation images: "
        f"{g.get('am_images', '–')}.",
    ]


def _study_staleness(study: Mapping[str, Any], sae: Mapping[str, Any]) -> str | None:
    settings = _get(study, "parts.sae_variants.settings", {})
    target, val_l0 = settings.get("target_l0"), sae.get("val_l0")
    if settings.get("target_l0_source") != "the pipeline SAE's val L0":
        return None
    if not (_finite(target) and _finite(val_l0)) or math.isclose(target, val_l0, rel_tol=1e-6):
        return None
    return (
        f"**metrics/study.json is older than the pipeline's outputs**: its target L0 "
        f"({_fmt(target)}) is not the pipeline SAE's val L0 ({_fmt(val_l0)}). `make study` brings "
        "it up to date; then `salve docs`."
    )


def _study_section(study: Mapping[str, Any], sae: Mapping[str, Any]) -> list[str]:
    from salve.study.page import answer_adversarial, answer_deeper, answer_variants, rho_text

    lines = [
        "## The study (`salve study`)",
        "",
        "The three open questions of [METHOD.md](METHOD.md#open-questions-the-study-salve-study), "
        "from `metrics/study.json` (`make study` recomputes the parts whose inputs changed; its "
        "page is `reports/study/index.html`). Intervals are 95 %: bootstrap for correlations, "
        "over seeds or classes for edits. The sentences are written from the numbers.",
        "",
    ]
    stale = _study_staleness(study, sae)
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
                    rho_text(_get(e, "by_estimator.linear", {})),
                    rho_text(_get(e, "by_estimator.empirical", {})),
                    e.get("n_alpha_infinite", "–"),
                    _fmt(e.get("median_eps")),
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
        lines += [*_table(header, rows), ""]
    lines += [answer_adversarial(adv), ""]
    rows_v = study.get("sae_variants") or []
    settings = _get(study, "parts.sae_variants.settings", {})
    lines += ["### 2. Do other SAE kinds give more precise edits?", ""]
    if rows_v:
        table_rows = [
            (
                r.get("name"),
                _ci(r.get("l0")),
                _ci(r.get("fvu")),
                _ci(r.get("dead_fraction")),
                _ci(_get(r, "methods.salve_projection.efficacy")),
                _ci(_get(r, "methods.salve_projection.specificity_mean")),
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
        lines += [*_table(header, table_rows), ""]
    lines += [answer_variants(rows_v, settings), ""]
    lines += ["### 3. Can an edit inside the backbone change how a concept forms?", ""]
    lines += [answer_deeper(study.get("deeper_layer") or {})]
    return lines


def _bench_section(bench: Mapping[str, Any]) -> list[str]:
    stages = _get(bench, "results.stages", {})
    cold = [s for s in stages.get("cold", []) if _finite(s.get("wall_s"))]
    if not cold:
        return []
    mc = bench.get("machine", {})
    total = sum(s["wall_s"] for s in cold)
    rows = [(f"`{s['stage']}`", _fmt(s["wall_s"])) for s in cold]
    rows.append(("the stages above", _fmt(total)))
    warm = _get(stages, "warm_salve_run.wall_s")
    if _finite(warm):
        rows.append(("`salve run` with every stage up to date", _fmt(warm)))
    quick = " (a `--quick` run: tiny sizes)" if bench.get("quick") else ""
    return [
        "## Time",
        "",
        f"From `{BENCH_JSON}`{quick}: each stage as DVC runs it, in its own process, on "
        f"{mc.get('cpu_model', '?')} with {mc.get('usable_cores', '?')} usable cores and "
        f"{mc.get('torch_threads', '?')} torch threads, with the parameters that file records. "
        "`make bench` measures them again; [benchmarks/RESULTS.md](../benchmarks/RESULTS.md) has "
        "every benchmark.",
        "",
        *_table(("stage", "seconds, cold"), rows),
    ]


def results_markdown(d: DocInputs) -> str:
    """docs/RESULTS.md, whole."""
    m = d.metrics
    lines = [
        "# Results",
        "",
        "<!-- Generated by `salve docs` from metrics/*.json, dvc.lock and "
        "benchmarks/results.json: edit flows/docs.py, not this file. -->",
        "",
    ]
    if not m.get("fetch"):
        lines += ["No run recorded yet: `make run`, then `salve docs`."]
        return "\n".join(lines) + "\n"
    lines += [
        f"The default run: {setup_sentence(d)}. `make run` reproduces it "
        "([REPRODUCIBILITY.md](REPRODUCIBILITY.md)); `salve docs` rewrites this page from its "
        "metrics.",
        "",
    ]
    sections: list[list[str]] = []
    if m.get("finetune"):
        sections.append(_finetune_section(m["finetune"]))
    if m.get("fit_sae"):
        sections.append(_sae_section(m["fit_sae"], _get(d.params, "sae.width", "?")))
    if m.get("edit"):
        sections.append(_edit_section(m["edit"], m.get("rank", {})))
    if m.get("evaluate"):
        sections.append(_evaluate_section(m["evaluate"]))
    if m.get("alpha_crit"):
        sections.append(_alpha_crit_section(m["alpha_crit"]))
    if m.get("gradfam"):
        sections.append(_gradfam_section(m["gradfam"]))
    if m.get("study"):
        sections.append(_study_section(m["study"], m.get("fit_sae", {})))
    if d.bench:
        sections.append(_bench_section(d.bench))
    for section in sections:
        if section:
            lines += [*section, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_block(doc: str, start: str, end: str, body: str, *, where: str = "the file") -> str:
    """``doc`` with the text between the ``start`` and ``end`` markers replaced by ``body``."""
    if start not in doc or end not in doc.split(start, 1)[1]:
        raise DocsError(f"{where} has no {start} ... {end} block")
    head, rest = doc.split(start, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{body.strip(chr(10))}\n{end}{tail}"


def rendered(root: Path, inputs: DocInputs | None = None) -> dict[str, str]:
    """Every generated file's expected text, by path relative to ``root``."""
    from salve.config import params_markdown

    d = inputs if inputs is not None else load_inputs(root)
    out = {RESULTS_MD: results_markdown(d)}
    for rel, (start, end), body in (
        (README, RESULTS_BLOCK, readme_block(d)),
        (PARAMETERS_MD, PARAMS_BLOCK, params_markdown()),
    ):
        path = root / rel
        if not path.is_file():
            raise DocsError(f"{rel} is missing: it holds a block `salve docs` writes")
        out[rel] = replace_block(path.read_text(encoding="utf-8"), start, end, body, where=rel)
    return out


def stale_files(root: Path) -> list[str]:
    """Generated files whose committed text differs from what `salve docs` renders."""
    out = []
    for rel, text in rendered(root).items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


# --------------------------------------------------------------------------------------------
# Drift checks: text in, problems out ("LINE: message")
# --------------------------------------------------------------------------------------------

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
# `metrics/rank.json`, `sae.json`: file names, not parameters.
FILE_EXTENSIONS = {
    "json", "py", "md", "yaml", "yml", "html", "csv", "safetensors", "lock", "toml", "txt",
    "png", "log", "pt", "pth", "tgz", "gz", "zip", "sh", "cfg", "ini", "db", "dvc",
}  # fmt: skip


def schema_keys() -> dict[str, set[str]]:
    """Every parameter section and its keys, from salve/config.py's schema."""
    from salve.config import section_fields, sections

    return {name: set(section_fields(cls)) for name, cls in sections().items()}


def blank_code(text: str, *, fenced: bool = True, inline: bool = True) -> str:
    """``text`` with fenced blocks and/or inline code spans blanked (line numbers kept)."""
    if fenced:
        out, inside = [], None
        for line in text.split("\n"):
            m = FENCE.match(line)
            if inside is None and m:
                inside = m.group(2)[0]
                out.append("")
            elif inside is not None:
                if m and m.group(2)[0] == inside and not m.group(3):
                    inside = None
                out.append("")
            else:
                out.append(line)
        text = "\n".join(out)
    if inline:
        text = re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), text)
    return text


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def wrong_keys(text: str, schema: Mapping[str, set[str]]) -> list[str]:
    """``section.key`` mentions (prose, code spans and code blocks) the schema does not have.

    A mention is a section name followed by ``.key`` that is not part of a longer dotted name or
    path (``cfg.sae.width``, ``metrics/rank.json``) nor a file name; ``edit.checkpoint_*`` is a
    prefix and matches when some key starts with it."""
    sections = "|".join(sorted(map(re.escape, schema), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./$-])({sections})\.([A-Za-z_][A-Za-z0-9_]*)(\*?)")
    problems = []
    for m in pattern.finditer(text):
        section, key, star = m.groups()
        if key in FILE_EXTENSIONS:
            continue
        keys = schema[section]
        ok = any(k.startswith(key) for k in keys) if star else key in keys
        if not ok:
            problems.append(
                f"{_line_of(text, m.start())}: `{section}.{key}{star}` is not a parameter "
                f"(the `{section}` section has: {', '.join(sorted(keys))})"
            )
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors a Markdown page defines: its headings' slugs (``-1``, ``-2`` for repeats) and
    explicit ``<a id=...>`` / ``<a name=...>``."""
    seen: dict[str, int] = {}
    out = set()
    for line in blank_code(markdown, inline=False).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(
    text: str,
    doc: Path,
    root: Path,
    *,
    ignored: Callable[[Path], bool] = lambda p: False,
) -> list[str]:
    """Relative links of ``text`` (the page at ``doc``) that do not resolve inside ``root``:
    the file is missing, outside the repository or ignored by git; for a Markdown target, an
    ``#anchor`` that none of its headings defines."""
    root = root.resolve()
    problems = []
    for m in re.finditer(r"`(\.\./[^`\s]*)`", blank_code(text, inline=False)):
        # a path in a code span that climbs out of the page's folder: it must stay inside too
        if not (doc.parent / m.group(1)).resolve().is_relative_to(root):
            line = _line_of(text, m.start())
            problems.append(f"{line}: `{m.group(1)}` names a path outside the repository")
    prose = blank_code(text)
    for m in LINK.finditer(prose):
        target = m.group(1)
        line = _line_of(prose, m.start())
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path_part = re.sub(r"%20", " ", path_part)
        if path_part.startswith("/"):
            problems.append(f"{line}: link `{target}` is absolute: make it relative to the page")
            continue
        dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        if not dest.is_relative_to(root):
            problems.append(f"{line}: link `{target}` points outside the repository")
            continue
        rel = dest.relative_to(root)
        if not dest.exists():
            problems.append(f"{line}: link `{target}`: {rel} does not exist")
            continue
        if ignored(dest):
            problems.append(
                f"{line}: link `{target}`: {rel} is ignored by git (generated; a fresh clone "
                "does not have it): name it as `code` instead"
            )
            continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            page = text if dest == doc.resolve() else dest.read_text(encoding="utf-8")
            if anchor not in anchors(page):
                problems.append(f"{line}: link `{target}`: {rel} has no heading #{anchor}")
    return sorted(problems, key=lambda p: int(p.split(":", 1)[0]))


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """Each logical line of the fenced shell blocks (``bash``, ``sh``, ...), with its line
    number; backslash continuations are joined."""
    out: list[tuple[int, str]] = []
    inside, lang, pending, first = None, "", "", 0
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if inside is None:
            if m:
                inside, lang = m.group(2)[0], m.group(3).lower()
            continue
        if m and m.group(2)[0] == inside and not m.group(3):
            inside = None
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            first = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", ";;", "|&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<&", "&>>", ">|"}


def simple_commands(line: str) -> list[list[str]]:
    """A shell line split into simple commands (on ``&&``, ``||``, ``|``, ``;``, ``&`` and
    parentheses), redirections and leading ``VAR=value`` assignments left out, a ``$ `` prompt
    dropped. Raises ValueError when the line does not tokenise (an unclosed quote)."""
    line = re.sub(r"^\s*\$\s+", "", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    commands: list[list[str]] = [[]]
    skip_next = False
    for tok in tokens:
        if skip_next:
            skip_next = False
            continue
        if tok in SEPARATORS:
            commands.append([])
        elif tok in REDIRECTS:
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()  # 2>&1: the descriptor is not an argument
            skip_next = True
        else:
            commands[-1].append(tok)
    out = []
    for cmd in commands:
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def makefile_targets(makefile: str) -> set[str]:
    """The targets a Makefile defines, ``$(VAR)`` expanded from its ``VAR :=`` lines."""
    variables = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:?=\s*(.*?)\s*$", makefile, re.M))

    def expand(s: str, depth: int = 0) -> str:
        if depth > 10:
            return s
        new = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), s)
        return new if new == s else expand(new, depth + 1)

    targets = set()
    for m in re.finditer(r"^([^\s:#=][^:=]*?)\s*:(?!=)", makefile, re.M):
        for name in m.group(1).split():
            name = expand(name)
            if not name.startswith(".") or "/" in name:  # .venv/.installed, not .PHONY
                targets.add(name)
    return targets


def _parse_salve(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when `salve ARGS` parses, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            lines = [x for x in err.getvalue().strip().split("\n") if x.strip()]
            return lines[-1] if lines else f"exit {exc.code}"
    return None


def wrong_commands(
    text: str,
    parser: argparse.ArgumentParser,
    make_targets: set[str],
    root: Path | None = None,
) -> list[str]:
    """Commands of the fenced shell blocks that would fail at once: `salve` with a subcommand or
    flag its parser rejects, `make` with a target the Makefile lacks, `python SCRIPT.py` whose
    script is not in ``root``."""
    problems = []
    for n, line in shell_blocks(text):
        try:
            commands = simple_commands(line)
        except ValueError as exc:
            problems.append(f"{n}: cannot read `{line.strip()}` as a shell line ({exc})")
            continue
        for cmd in commands:
            prog, args = Path(cmd[0]).name, cmd[1:]
            shown = " ".join(cmd)
            if prog == "salve":
                complaint = _parse_salve(parser, args)
                if complaint:
                    problems.append(f"{n}: `{shown}`: {complaint}")
            elif prog == "make":
                names = [a for a in args if not a.startswith("-") and "=" not in a]
                for t in names:
                    if t not in make_targets:
                        problems.append(f"{n}: `{shown}`: the Makefile has no target `{t}`")
            elif re.fullmatch(r"python(3(\.\d+)?)?", prog) and root is not None:
                script = next((a for a in args if not a.startswith("-")), None)
                if args and args[0] in ("-m", "-c"):
                    continue
                if script and script.endswith(".py") and not (root / script).is_file():
                    problems.append(f"{n}: `{shown}`: no script {script} in the repository")
    return problems


def hand_written_pages(root: Path) -> list[Path]:
    """The pages the drift checks read: README.md and docs/*.md."""
    return [root / README, *sorted((root / "docs").glob("*.md"))]


def git_ignored(root: Path) -> Callable[[Path], bool]:
    """Whether git ignores a path (False for every path outside a git work tree)."""

    def check(path: Path) -> bool:
        try:
            out = subprocess.run(
                ["git", "check-ignore", "-q", str(path)],
                cwd=root,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0

    return check


def drift(root: Path, pages: Sequence[Path] | None = None) -> list[str]:
    """Every drift problem of the hand-written pages, as ``PAGE:LINE: message``."""
    from flows.cli import build_parser

    root = root.resolve()
    schema = schema_keys()
    parser = build_parser()
    makefile = root / "Makefile"
    targets = makefile_targets(makefile.read_text()) if makefile.is_file() else set()
    ignored = git_ignored(root)
    problems = []
    for page in pages if pages is not None else hand_written_pages(root):
        text = page.read_text(encoding="utf-8")
        rel = page.resolve().relative_to(root)
        found = (
            wrong_keys(text, schema)
            + broken_links(text, page, root, ignored=ignored)
            + wrong_commands(text, parser, targets, root)
        )
        problems += [f"{rel}:{p}" for p in sorted(found, key=lambda p: int(p.split(":", 1)[0]))]
    return problems


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def cmd_docs(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    try:
        texts = rendered(root)
    except DocsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        bad = 0
        for rel, text in texts.items():
            path = root / rel
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                print(f"{rel} is out of date: run `salve docs`", file=sys.stderr)
                bad += 1
        problems = drift(root)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if bad or problems else 0
    from salve.io import write_text

    for rel, text in texts.items():
        path = root / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        write_text(path, text)
        print(f"wrote {rel}")
    return 0


def add_docs_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve docs` on the CLI's subparsers."""
    d = sub.add_parser(
        "docs",
        help="write the generated docs (docs/RESULTS.md, README's results, docs/PARAMETERS.md)",
        description=(
            f"Render {RESULTS_MD} and README.md's results block from metrics/*.json, dvc.lock "
            f"and {BENCH_JSON}, and {PARAMETERS_MD}'s reference from the parameter schema. "
            "--check writes nothing: it exits 1 naming each stale file and each drift problem "
            "of README.md and docs/*.md (unknown section.key, broken relative link, a shell "
            "command naming no real salve subcommand, flag or make target)."
        ),
    )
    d.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a generated file is stale or a page has drifted; write nothing",
    )
    d.set_defaults(func=cmd_docs)
    return d
