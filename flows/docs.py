"""`salve docs`: the generated parts of the documentation, and the checks that keep the rest true.

Generated, from what the repository holds (never typed by hand):

- docs/RESULTS.md, whole: every number of the default run, from metrics/*.json (the pipeline's
  stages and `salve study`), the parameters dvc.lock records, and benchmarks/results.json;
- README.md, between ``<!-- results:start -->`` and ``<!-- results:end -->``: the headline;
  between ``<!-- study:start -->`` and ``<!-- study:end -->``: the study's table (from the study
  stages' metrics/study_*.json);
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
salve.present.study_page's interval text): the same digits as the HTML report. Presentation only:
nothing in salve/ or tasks/ imports this module.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.docs_drift import drift
from flows.docs_format import (
    BENCH_JSON,
    PARAMETERS_MD,
    PARAMS_BLOCK,
    README,
    RESULTS_BLOCK,
    RESULTS_MD,
    STUDY_BLOCK,
    DocInputs,
    ci_cell,
    finite,
    fmt_value,
    get_path,
    load_inputs,
    md_table,
    pct,
)
from flows.docs_study import study_readme_block, study_record, study_section

# The evaluate stage's methods, in table order (salve.methods.EDIT_METHODS), as a reader names
# them.
METHOD_LABELS = {
    "salve_projection": "SALVE, centred projection",
    "salve_paper": "SALVE, paper rule",
    "zero_row": "zero the class's head row",
    "mean_difference": "mean-difference direction",
    "leace": "LEACE",
    "random_direction": "random direction",
    "random_latent": "random SAE latent",
    "salve_steer": "SALVE, activation steering",
}
ERASED_PROBE = 0.55  # probe recovery at or below this: the class is erased from the features


class DocsError(ValueError):
    """A documentation file lacks the block `salve docs` writes into."""


# --------------------------------------------------------------------------------------------
# Rendering: strings out
# --------------------------------------------------------------------------------------------


def setup_sentence(d: DocInputs) -> str:
    """What the numbers are of: data, model, SAE, edit, as the run recorded them."""
    m, p = d.metrics, d.params
    fetch, fine = m.get("fetch", {}), m.get("finetune", {})
    weights = get_path(p, "finetune.weights", "?")
    start = "from scratch" if weights == "none" else f"from `{weights}` weights"
    edit = get_path(m, "edit.checkpoint_edit", {})
    mode = edit.get("mode", get_path(p, "edit.mode", "?"))
    rule = "centred projection" if mode == "projection" and edit.get("centred") else mode
    return (
        f"`{fetch.get('source', '?')}` at {fetch.get('image_size', '?')} px, "
        f"{fetch.get('train_samples', '?')} train and {fetch.get('val_samples', '?')} val images "
        f"in {fetch.get('num_classes', '?')} classes; `{fine.get('arch', '?')}` fine-tuned {start} "
        f"for {fine.get('epochs_run', '?')} epochs at batch "
        f"{get_path(p, 'finetune.batch_size', '?')}; "
        f"a {get_path(p, 'sae.kind', '?')} SAE with {get_path(p, 'sae.width', '?')} latents; "
        f"the {rule} "
        f"edit; seed {get_path(p, 'common.seed', '?')}, "
        f"{get_path(p, 'common.num_threads', '?')} CPU "
        f"threads, `common.reproducible: {str(get_path(p, 'common.reproducible', '?')).lower()}`"
        + KERNEL_NOTE.get(get_path(p, "common.reproducible", None), "")
    )


# What the kernel mode means for a reader comparing their own run with these numbers.
KERNEL_NOTE = {
    False: " (the CPU's fastest kernels: another CPU model can differ in the last digits; "
    "`--set common.reproducible=true` gives the same bytes on every x86-64 CPU)",
    True: " (the cross-CPU kernel pin: the same bytes on every x86-64 CPU)",
}


def _lowest_class(fine: Mapping[str, Any]) -> str:
    per = fine.get("val_class_accuracy") or {}
    if not per:
        return "–"
    name = min(per, key=lambda k: per[k])
    return f"{pct(per[name])} (class {name})"


def _edit_line(edit: Mapping[str, Any]) -> str:
    n = len(edit.get("classes_evaluated", []))
    return (
        f"{edit.get('classes_below_10pct', '–')} of {n} classes below 10 % at full suppression, "
        f"{edit.get('classes_selective', '–')} selectively; the other classes move "
        f"{fmt_value(get_path(edit, 'mean_abs_off_target_change', math.nan) * 100)} points on "
        "average"
    )


def _gradfam_line(g: Mapping[str, Any]) -> str:
    grid = "x".join(str(x) for x in g.get("map_grid", [])) or "?"
    return (
        f"`{g.get('layer', '?')}`, {grid} maps; deletion AUC {fmt_value(g.get('deletion_auc'))} in "
        f"saliency order vs {fmt_value(g.get('deletion_auc_random'))} in random order; "
        f"{g.get('maps_no_better_than_random', '–')} of {g.get('latents', '–')} latents no "
        "better than random"
    )


def _sae_line(s: Mapping[str, Any], width: Any) -> str:
    return (
        f"FVU {fmt_value(s.get('val_fvu'))}, L0 {fmt_value(s.get('val_l0'))} of {width}, dead "
        "fraction "
        f"{fmt_value(s.get('val_dead_fraction'))}, splice accuracy "
        f"{pct(s.get('val_splice_accuracy'))}"
    )


def _method_label(name: str, settings: Mapping[str, Any]) -> str:
    label = METHOD_LABELS.get(name, name)
    if name == "salve_paper" and "paper_alpha" in settings:
        label += f" (alpha {fmt_value(settings['paper_alpha'])})"
    return label


def _ordered_methods(methods: Mapping[str, Any]) -> list[str]:
    return [k for k in METHOD_LABELS if k in methods] + [
        k for k in methods if k not in METHOD_LABELS
    ]


def _evaluate_reading(ev: Mapping[str, Any]) -> str:
    """What the methods table says, written from its numbers (never a fixed conclusion)."""
    methods = ev.get("methods", {})
    proj = get_path(methods, "salve_projection.efficacy")
    if not proj:
        return ""
    lo, hi = proj.get("ci95", [math.nan, math.nan])
    bits = [
        f"Suppressing the dominant SAE feature by centred projection lowers the target "
        f"class's accuracy by {ci_cell(proj)}"
    ]
    for name in ("zero_row", "mean_difference", "leace"):
        cell = get_path(methods, f"{name}.efficacy")
        if not cell or not finite(cell.get("mean")):
            continue
        mean = cell["mean"]
        where = "above" if mean > hi else "below" if mean < lo else "inside"
        bits.append(f"{METHOD_LABELS[name]} {fmt_value(mean)} ({where} that interval)")
    erased = [
        METHOD_LABELS.get(k, k)
        for k in _ordered_methods(methods)
        if finite(get_path(methods, f"{k}.probe_recovery.mean"))
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
            f"{pct(fine.get('val_accuracy'))}, lowest class {_lowest_class(fine)}",
        ),
        ("SAE on val images", _sae_line(sae, get_path(d.params, "sae.width", "?"))),
        ("suppressing each class's dominant feature", _edit_line(edit) if edit else "–"),
    ]
    methods = ev.get("methods", {})
    if methods:
        cells = [
            f"{_method_label(k, {})} {ci_cell(get_path(methods, f'{k}.efficacy'))}"
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
    lines += md_table(("", "value"), rows)
    lines += [
        "",
        f"Every number, with 95 % intervals and the study's answers: [{RESULTS_MD}]({RESULTS_MD}),"
        " written by `salve docs` from `metrics/`.",
    ]
    return "\n".join(lines)


def _finetune_section(fine: Mapping[str, Any]) -> list[str]:
    per = fine.get("val_class_accuracy") or {}
    rows = [
        ("val accuracy", pct(fine.get("val_accuracy"))),
        ("lowest class", _lowest_class(fine)),
        ("train accuracy", pct(fine.get("train_accuracy"))),
        ("epochs run (budget)", f"{fine.get('epochs_run', '–')} ({fine.get('epoch_budget', '–')})"),
        ("best epoch", fine.get("best_epoch", "–")),
        ("stopped early", fmt_value(fine.get("stopped_early"))),
    ]
    lines = ["## Fine-tuning", "", *md_table(("", "value"), rows)]
    if per:
        lines += [
            "",
            "Val accuracy per class: " + ", ".join(f"{k} {pct(v)}" for k, v in per.items()) + ".",
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
    show = {"splice_accuracy": pct, "splice_agreement": pct}
    rows = [
        (label, *(show.get(k, fmt_value)(s.get(f"{split}_{k}")) for split in ("train", "val")))
        for k, label in keys
    ]
    return ["## SAE quality", "", *md_table(("", "train", "val"), rows)]


def _edit_section(edit: Mapping[str, Any], rank: Mapping[str, Any]) -> list[str]:
    grid = edit.get("alpha_grid", {})
    left_out = ", ".join(edit.get("classes_left_out", [])) or "none"
    lines = [
        "## Editing the head",
        "",
        f"Each class's dominant feature suppressed along the alpha grid up to "
        f"{fmt_value(grid.get('max'))} ({grid.get('unit', '?')} units); full suppression is the "
        "end of "
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
            pct(v.get("target_acc_base")),
            pct(v.get("target_acc_full_suppression")),
            fmt_value(get_path(v, "off_target_mean_change", math.nan) * 100),
            fmt_value(get_path(v, "off_target_max_abs_change", math.nan) * 100),
            fmt_value(v.get("score")),
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
    return lines + md_table(header, rows)


def _evaluate_section(ev: Mapping[str, Any]) -> list[str]:
    from salve.present.report_sections import BASELINE_METRICS

    methods = ev.get("methods", {})
    settings = ev.get("settings", {})
    shown = [(k, label) for k, label in BASELINE_METRICS if any(k in v for v in methods.values())]
    rows = [
        (_method_label(name, settings), *(ci_cell(methods[name].get(k)) for k, _ in shown))
        for name in _ordered_methods(methods)
    ]
    stab = ev.get("stability", {})
    per_seed = [s.get("dominant_match_fraction") for s in stab.get("per_seed", [])]
    per_seed = [x for x in per_seed if finite(x)]
    spread = f" ({pct(min(per_seed))} to {pct(max(per_seed))} per seed)" if per_seed else ""
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
        f"{fmt_value(settings.get('projection_alpha'))}.",
        "",
        *md_table(("method", *(label for _, label in shown)), rows),
        "",
        _evaluate_reading(ev),
        "",
        f"Dominant features found again across SAE seeds: "
        f"{pct(stab.get('dominant_match_fraction'))} of classes{spread}; latents matched "
        f"(|cosine| > {fmt_value(stab.get('threshold'))}): {pct(stab.get('matched_fraction'))}.",
    ]


def _alpha_crit_section(a: Mapping[str, Any]) -> list[str]:
    checked = a.get("real_model_checked", 0)
    rows = [
        ("median exact alpha_crit", fmt_value(a.get("median_exact"), 4)),
        ("samples with a single root", pct(a.get("fraction_single_root"))),
        ("samples with several roots", pct(a.get("fraction_multiple_roots"))),
        ("linear estimate below the exact value", pct(a.get("linear_le_exact_overall"))),
        (
            "samples whose every term w_ij a_j is non-negative",
            pct(a.get("fraction_all_terms_nonnegative")),
        ),
        (
            "largest difference exact vs brentq (single root)",
            fmt_value(a.get("exact_vs_brentq_max_abs_diff_single_root")),
        ),
        (
            "flips confirmed on the real edited model",
            f"{a.get('real_model_agree', '–')} of {checked}",
        ),
    ]
    return [
        "## alpha_crit",
        "",
        f"Units: {a.get('units', '?')}.",
        "",
        *md_table(("", "value"), rows),
    ]


def _gradfam_section(g: Mapping[str, Any]) -> list[str]:
    return [
        "## Grad-FAM",
        "",
        f"{_gradfam_line(g)}. Features shown: {g.get('features', '–')}, "
        f"{g.get('top_k', '–')} top-activating val images each; activation-maximisation images: "
        f"{g.get('am_images', '–')}.",
    ]


def _bench_section(bench: Mapping[str, Any]) -> list[str]:
    stages = get_path(bench, "results.stages", {})
    cold = [s for s in stages.get("cold", []) if finite(s.get("wall_s"))]
    if not cold:
        return []
    mc = bench.get("machine", {})
    total = sum(s["wall_s"] for s in cold)
    rows = [(f"`{s['stage']}`", fmt_value(s["wall_s"])) for s in cold]
    rows.append(("the stages above", fmt_value(total)))
    warm = get_path(stages, "warm_salve_run.wall_s")
    if finite(warm):
        rows.append(("`salve run` with every stage up to date", fmt_value(warm)))
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
        *md_table(("stage", "seconds, cold"), rows),
    ]


def _paper_scale_section(bench: Mapping[str, Any]) -> list[str]:
    """The whole pipeline at 224 px on thousands of images (bench_paper_scale.py)."""
    ps = get_path(bench, "results.paper_scale", {})
    rows = [r for r in ps.get("rows", []) if "error" not in r and r.get("passes")]
    if not rows:
        return []
    cpu = get_path(ps, "run.machine.cpu_model", "?")
    passes = ("extract", "fit_sae", "gradfam", "evaluate")
    table = [
        (f"{r['n']:,}", r["width"], f"{r['total_passes']:.2f} ({r['wall_s']:.0f} s)")
        + tuple(f"{r['passes'].get(s, float('nan')):.2f}" for s in passes)
        + (f"{r['peak_anon_mib']:,.0f}",)
        for r in rows
    ]
    return [
        "## Paper scale",
        "",
        f"From `{BENCH_JSON}` (`benchmarks/bench_paper_scale.py`): `salve run` explaining a "
        f"seeded {ps.get('arch', '?')} as it is at {ps.get('image_size', '?')} px on a synthetic "
        f"6-class folder, {ps.get('threads', '?')} threads on {cpu}. Seconds as multiples of "
        f"one bare forward pass over the same images ({ps.get('bare_forward_images_per_s', 0):.1f}"
        " images/s, `inference_mode`, measured in the same run); peak anonymous memory of every "
        "process of the run.",
        "",
        *md_table(("images", "SAE width", "whole run", *passes, "peak anon MiB"), table),
        *[f"\n- {r['n']:,} x {r['width']}: {r['note']}" for r in rows if r.get("note")],
        *_memory_growth(rows),
    ]


def _memory_growth(rows: list[dict[str, Any]]) -> list[str]:
    """How the peak grows from the fewest images to the most, at the narrowest SAE."""
    width = min(r["width"] for r in rows)
    same_width = sorted((r for r in rows if r["width"] == width), key=lambda r: r["n"])
    low, high = same_width[0], same_width[-1]
    growth = high["peak_anon_mib"] / low["peak_anon_mib"] - 1
    return [] if low["n"] == high["n"] else [
        f"\nPeak anonymous memory from {low['n']:,} to {high['n']:,} images (width {width}): "
        f"{low['peak_anon_mib']:,.0f} to {high['peak_anon_mib']:,.0f} MiB ({growth:+.0%})."
    ]  # fmt: skip


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
        sections.append(_sae_section(m["fit_sae"], get_path(d.params, "sae.width", "?")))
    if m.get("edit"):
        sections.append(_edit_section(m["edit"], m.get("rank", {})))
    if m.get("evaluate"):
        sections.append(_evaluate_section(m["evaluate"]))
    if m.get("alpha_crit"):
        sections.append(_alpha_crit_section(m["alpha_crit"]))
    if m.get("gradfam"):
        sections.append(_gradfam_section(m["gradfam"]))
    study = study_record(m)
    sections.append(
        study_section(study, m.get("fit_sae", {}))
        if study
        else [
            "## The study (`salve study`)",
            "",
            "Not computed yet: `make study` computes the study's stages, then `salve docs` writes "
            "their numbers here.",
        ]
    )
    if d.bench:
        sections.append(_bench_section(d.bench))
        sections.append(_paper_scale_section(d.bench))
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
        (README, STUDY_BLOCK, study_readme_block(d)),
        (PARAMETERS_MD, PARAMS_BLOCK, params_markdown()),
    ):
        path = root / rel
        if not path.is_file():
            raise DocsError(f"{rel} is missing: it holds a block `salve docs` writes")
        text = out[rel] if rel in out else path.read_text(encoding="utf-8")
        out[rel] = replace_block(text, start, end, body, where=rel)
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
