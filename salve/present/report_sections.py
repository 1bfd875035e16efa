"""The run report's sections: each turns the report's inputs into one section's plain data.

One function per section of ``salve.present.report.REPORT_SECTIONS`` (the metadata, headline and
checkpoint sections stay beside the page assembly). A missing upstream key raises KeyError here,
which the page turns into a ReportInputError naming the section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from salve.present.figures import (
    ESTIMATORS,
    MAX_CURVE_PANELS,
    alpha_crit_figure,
    curves_from_rows,
    edit_curves_figure,
    finetune_figure,
    heatmap_figure,
    methods_figure,
    sae_loss_figure,
)
from salve.present.kit import Embeds, fmt, kv, table

if TYPE_CHECKING:
    from salve.present.report import ReportInputs

MAX_HEATMAP_FEATURES = 128  # wider SAEs: only the features some class ranks in its top list
MAX_PER_CLASS_COLUMNS = 30  # samples-per-class table: wider datasets skip it


def class_name(classes: Sequence[str], k: int) -> str:
    return classes[k] if 0 <= k < len(classes) else f"class {k}"


def training(d: ReportInputs, embeds: Embeds) -> dict:
    info, fetch = d.dataset_info, d.fetch_metrics
    data = [
        ("source", fetch["source"]),
        ("classes", f"{len(d.classes)}: {', '.join(d.classes)}"),
        ("image size", fetch["image_size"]),
        ("train samples", fetch["train_samples"]),
        ("val samples", fetch["val_samples"]),
    ]
    # Descriptions that depend on the source (CIFAR-100 has a given split, no val_fraction).
    optional = ("split", "val_fraction", "resize", "variant", "seed")
    data += [(k.replace("_", " "), info[k]) for k in optional if k in info]
    train, val = info["train_per_class"], info["val_per_class"]
    per_class = None
    if 0 < len(train) <= MAX_PER_CLASS_COLUMNS:
        names = list(train)
        per_class = table(
            ("split", *names),
            [("train", *(train[k] for k in names)), ("val", *(val[k] for k in names))],
        )
    return {
        "data": kv(data),
        "finetune": kv(sorted(d.finetune_metrics.items())),
        "per_class": per_class,
        "figure": embeds.figure(
            finetune_figure(d.finetune_epochs), "fine-tuning loss and accuracy"
        ),
    }


_SAE_ROWS = (
    ("fvu", "FVU (fraction of variance unexplained)"),
    ("explained_variance", "explained variance"),
    ("l0", "L0 (mean active latents)"),
    ("dead_fraction", "dead fraction"),
    ("splice_accuracy", "splice accuracy (head reads a_hat)"),
    ("splice_agreement", "splice agreement with original predictions"),
    ("accuracy_original", "accuracy (original activations)"),
    ("n_samples", "samples"),
)
_SAE_INFO = ("kind", "d_in", "d_latent", "k", "hook_point", "decoder_columns_normalised")


def sae_quality(d: ReportInputs, embeds: Embeds) -> dict:
    m, sc = d.sae_metrics, d.sidecars["fit_sae"]
    return {
        "metrics": table(
            ("metric", "train", "val"),
            [(label, m[f"train_{key}"], m[f"val_{key}"]) for key, label in _SAE_ROWS],
        ),
        "info": kv([(k, sc[k]) for k in _SAE_INFO]),
        "final_loss": fmt(m["final_loss"]),
        "figure": embeds.figure(sae_loss_figure(d.sae_loss), "SAE training loss"),
    }


def heatmap(d: ReportInputs, embeds: Embeds) -> dict:
    m = np.asarray(d.class_means, dtype=np.float64)
    cols = list(range(m.shape[1]))
    note = None
    if len(cols) > MAX_HEATMAP_FEATURES:
        cols = sorted({int(f) for fs in d.ranking["top"].values() for f in fs})
        note = (
            f"{m.shape[1]} features: only the {len(cols)} that appear in some class's top list "
            "are drawn."
        )
    col_pos = {c: i for i, c in enumerate(cols)}
    marks = [
        (int(x["class"]), col_pos[int(x["feature"])])
        for x in d.ranking["dominant"]
        if int(x["feature"]) in col_pos
    ]
    png = heatmap_figure(
        m[:, cols],
        d.classes[: m.shape[0]],
        [str(c) for c in cols],
        title="mean SAE code per class (training split); outlined: each class's dominant feature",
        colorbar_label="mean code",
        xlabel="feature",
        ylabel="class",
        marks=marks,
    )
    return {"figure": embeds.figure(png, "class x feature mean codes"), "note": note}


def edit_entry(d: ReportInputs, k: int) -> dict | None:
    """Class k's entry in edit_metrics["per_class"]; None when the edit stage left it out (too
    inaccurate before any edit); an error when it is neither."""
    name = d.metric_class_names[k]
    per_class = d.edit_metrics["per_class"]
    if name in per_class:
        return per_class[name]
    if name in {c["class"] for c in d.edit_metrics.get("classes_left_out", [])}:
        return None
    raise KeyError(f"per_class.{name}")


def gradfam_note(g: Mapping[str, Any]) -> str | None:
    if g.get("layer") is None:  # the older index format records no layer
        return None
    h, w = g["map_grid"]
    return (
        f"Grad-FAM differentiates {g['layer']} ({h}x{w} map at {g['image_size']} px images). "
        "Deletion AUC: the feature's code as the most salient pixels are deleted first (lower "
        "is more faithful), against a random deletion order."
    )


def dominant(d: ReportInputs, embeds: Embeds) -> list[dict]:
    entries = {int(e["latent"]): e for e in d.gradfam["latents"]}
    cards = []
    for dom in d.ranking["dominant"]:
        k, f = int(dom["class"]), int(dom["feature"])
        e = entries[f]
        ed = edit_entry(d, k)
        codes = [t["code"] for t in e["top"]]
        # The older gradfam index recorded no per-image codes, only their mean.
        mean_code = float(np.mean(codes)) if None not in codes else e.get("top_code_mean")
        items: list[tuple[str, Any]] = [
            ("dominant feature", f),
            ("class-mean code", dom["class_mean"]),
            ("top features", ", ".join(map(str, d.ranking["top"][d.metric_class_names[k]]))),
        ]
        if e["frequency"] is not None:  # the older index recorded none
            items.append(("activation frequency", e["frequency"]))
        items += [
            ("top-activating val images (classes)", ", ".join(str(t["class"]) for t in e["top"])),
            ("mean code of those images", mean_code),
            ("code of the AM image", e["am_code"]),
        ]
        if e["deletion_auc"] is not None:
            items.append(
                (
                    "deletion AUC (random order)",
                    f"{fmt(e['deletion_auc'])} ({fmt(e['deletion_auc_random'])})",
                )
            )
        if ed is None:
            items.append(("edit", "not evaluated: below edit.min_base_accuracy before any edit"))
        else:
            acc = f"{fmt(ed['target_acc_base'])} → {fmt(ed['target_acc_full_suppression'])}"
            items += [
                ("val accuracy → at full suppression", acc),
                ("off-target mean change", ed["off_target_mean_change"]),
            ]
        am_code = e["am_code"]
        cards.append(
            {
                "anchor": f"class-{k}",
                "title": f"{class_name(d.classes, k)} — feature {f}",
                "latent": f,
                "facts": kv(items),
                "raises_target": bool(ed and ed.get("raises_target", False)),
                "overlay": embeds.image(
                    d.gradfam_images.get(e["overlay"]), f"Grad-FAM overlays, feature {f}"
                ),
                "am": embeds.image(
                    d.gradfam_images.get(e["am"]) if e["am"] else None,
                    f"activation maximisation, feature {f}",
                    cls="thumb",
                ),
                "am_inactive": am_code is not None and am_code <= 0,
            }
        )
    return cards


# How the edit stage's modes read (edit.mode, and its companion measured beside it).
CONTROL_LABELS = {
    "projection": "centred projection (head edit)",
    "paper": "paper rule (head edit)",
    "steer": "activation steering",
}


def edit_curves(d: ReportInputs, embeds: Embeds) -> dict:
    m = d.edit_metrics
    mode = m["checkpoint_edit"].get("mode", "")
    comp = m.get("companion")  # the other control on the same grid (absent in older runs)
    by_method: dict[str, list[dict]] = {}
    for r in d.edit_curve_rows:  # rows without `method`: an older run, one mode only
        by_method.setdefault(r.get("method") or mode, []).append(r)
    _, curves = curves_from_rows(by_method.get(mode, d.edit_curve_rows))
    targets = [(int(x["class"]), int(x["feature"])) for x in d.ranking["dominant"]]
    grid = m["alpha_grid"]
    alpha_label = f"alpha ({grid['unit']} units)"
    summary: list[tuple[str, Any]] = [
        ("classes below 10% at full suppression", m["classes_below_10pct"]),
        ("classes selective (below 10%, off-target |mean change| < 3%)", m["classes_selective"]),
        ("mean selectivity score", m["mean_score"]),
        ("mean |off-target change|", m["mean_abs_off_target_change"]),
        ("alpha grid", f"0 … {fmt(grid['max'])}, {fmt(grid['steps'])} steps, {grid['unit']}"),
    ]
    if "classes_evaluated" in m:
        evaluated = m["classes_evaluated"]
        names = f"{len(evaluated)} of {len(d.classes)}: {', '.join(evaluated)}"
        summary.insert(0, ("classes evaluated", names))
    if mode:
        summary.insert(0, ("control (edit.mode)", CONTROL_LABELS.get(mode, mode)))
    if comp is not None:
        label = CONTROL_LABELS.get(comp["mode"], comp["mode"])
        summary += [
            (f"beside it, {label}: classes below 10%", comp["classes_below_10pct"]),
            (f"{label}: classes selective", comp["classes_selective"]),
            (f"{label}: mean selectivity score", comp["mean_score"]),
            (f"{label}: mean |off-target change|", comp["mean_abs_off_target_change"]),
        ]
    left_out = [(c["class"], fmt(c["base_accuracy"])) for c in m.get("classes_left_out", [])]
    figures = []
    shown = [(mode, curves)]
    if comp is not None and comp["mode"] in by_method:
        shown.append((comp["mode"], curves_from_rows(by_method[comp["mode"]])[1]))
    for sign, caption in (("suppress", "suppression"), ("enhance", "enhancement")):
        for method, method_curves in shown:
            png = edit_curves_figure(
                method_curves, targets, d.classes, sign, alpha_label=alpha_label
            )
            name = f"{CONTROL_LABELS.get(method, method)}: " if len(shown) > 1 else ""
            figures.append(
                embeds.figure(png, f"{name}{caption} curves (dominant feature of each class)")
            )
    rows, flags = [], []
    for k, f in targets:
        v = edit_entry(d, k)
        if v is None:
            continue
        raises = bool(v.get("raises_target", False))
        rows.append(
            (
                class_name(d.classes, k),
                f,
                v["target_acc_base"],
                v["target_acc_full_suppression"],
                v["off_target_mean_change"],
                v["off_target_max_abs_change"],
                v["score"],
                *_companion_cells(comp, d.metric_class_names[k]),
                "suppressing it raises this class's accuracy" if raises else "",
            )
        )
        flags.append("flag" if raises else "")
    beside = []
    if comp is not None:
        short = "steering" if comp["mode"] == "steer" else comp["mode"]
        beside = [
            f"{short}: target acc (full)",
            f"{short}: off-target mean change",
            f"{short}: score",
        ]
    header = (
        "class",
        "feature",
        "target acc (base)",
        "target acc (full suppression)",
        "off-target mean change",
        "off-target max |change|",
        "score",
        *beside,
        "flag",
    )
    if not any(flags):  # the flag column only when some edit raised its own target
        header, rows = header[:-1], [r[:-1] for r in rows]
    return {
        "summary": kv(summary),
        "left_out": left_out,
        "figures": figures,
        "panel_note": len(targets) > MAX_CURVE_PANELS,
        "max_panels": MAX_CURVE_PANELS,
        "per_class": table(header, rows, row_classes=tuple(flags)),
    }


def _companion_cells(comp: Mapping[str, Any] | None, name: str) -> tuple:
    """The companion control's cells of one class's row: "–" where it has no entry."""
    if comp is None:
        return ()
    v = comp["per_class"].get(name)
    if v is None:
        return ("–", "–", "–")
    return (v["target_acc_full_suppression"], v["off_target_mean_change"], v["score"])


def cross_class(d: ReportInputs, embeds: Embeds) -> dict:
    cross, rule = d.edit_metrics["cross_class"], d.ranking["rule"]
    frac = fmt(rule["cross_class_fraction"])
    rule_text = (
        "Rule: with m1 ≥ m2 the two largest |class mean| of a feature, it is cross-class when "
        f"m1 ≥ {fmt(rule['min_mean_fraction'])} × the largest |class mean| of any feature and "
        f"m2 ≥ {frac} × m1; its classes are those with |mean| ≥ {frac} × m1. Each is suppressed "
        "at full strength and the change in every class's val accuracy is shown (outlined: the "
        "sharing classes)."
    )
    most_shared = _most_shared(d)
    if not cross:
        return {"rule": rule_text, "figure": None, "table": None, **most_shared}
    left_out = {c["class"] for c in d.edit_metrics.get("classes_left_out", [])}
    mat, labels, rows, marks = [], [], [], []
    for c in cross:
        marks += [(len(mat), int(j)) for j in c["classes"]]
        ch = c["class_change_full_suppression"]
        names = d.metric_class_names
        # A class the edit stage left out may have no change recorded.
        mat.append(
            [ch.get(nm, math.nan) if nm in left_out else ch[nm] for nm in names[: len(d.classes)]]
        )
        shared = ", ".join(class_name(d.classes, int(j)) for j in c["classes"])
        labels.append(f"f{c['feature']} ({shared})")
        changes = [(j, v) for j, v in enumerate(mat[-1]) if math.isfinite(v)]
        worst = min(changes, key=lambda t: t[1]) if changes else None
        best = max(changes, key=lambda t: t[1]) if changes else None
        rows.append(
            (
                c["feature"],
                shared,
                c["suppress"]["target_acc_base"],
                c["suppress"]["target_acc_edited"],
                f"{class_name(d.classes, worst[0])}: {fmt(worst[1])}" if worst else "–",
                (
                    f"{class_name(d.classes, best[0])}: {fmt(best[1])}"
                    if best and best[1] > 0
                    else "–"
                ),
                c["enhance_min_class_change"],
            )
        )
    png = heatmap_figure(
        mat,
        labels,
        d.classes,
        title="change in per-class accuracy at full suppression of each cross-class feature",
        colorbar_label="accuracy change",
        diverging=True,
        annotate=True,
        xlabel="class",
        marks=marks,
    )
    header = (
        "feature",
        "shared by",
        "acc of sharing classes (base)",
        "at full suppression",
        "largest drop",
        "largest gain",
        "worst change when enhancing",
    )
    return {
        "rule": rule_text,
        "figure": embeds.figure(
            png, "cross-class effects (rows: feature and the classes sharing it)"
        ),
        "table": table(header, rows),
        **most_shared,
    }


MOST_SHARED = 5  # latents listed by how evenly two classes share them


def _most_shared(d: ReportInputs) -> dict:
    """The latents two classes share most evenly (largest m2 / m1, the rank stage's ratio), with
    their two class means and whether each passes the cross-class rule, so the section says how
    close the run came even when no latent is cross-class."""
    mu = np.abs(np.asarray(d.class_means, dtype=np.float64))
    rule = d.ranking["rule"]
    frac = float(rule["cross_class_fraction"])
    floor = rule.get("min_class_mean")
    floor = float(floor if floor is not None else rule["min_mean_fraction"] * mu.max(initial=0))
    if mu.shape[0] < 2 or mu.shape[1] == 0:
        note = "fewer than two classes: nothing is shared"
        return {"shared": None, "shared_note": note, "shared_extra": None}
    order = np.argsort(-mu, axis=0, kind="stable")  # classes by |mean|, per latent
    cols = np.arange(mu.shape[1])
    m1, m2 = mu[order[0], cols], mu[order[1], cols]
    ratio = np.divide(m2, m1, out=np.zeros_like(m1), where=m1 > 0)

    def row(f: int) -> tuple:
        k1, k2 = int(order[0, f]), int(order[1, f])
        if m1[f] <= floor:
            verdict = f"no: largest mean {fmt(m1[f])} ≤ floor {fmt(floor)}"
        elif ratio[f] < frac:
            verdict = f"no: ratio < {fmt(frac)}"
        else:
            verdict = "yes: cross-class"
        return (
            f,
            f"{class_name(d.classes, k1)}: {fmt(d.class_means[k1][f])}",
            f"{class_name(d.classes, k2)}: {fmt(d.class_means[k2][f])}",
            ratio[f],
            verdict,
        )

    top = [int(f) for f in np.argsort(-ratio, kind="stable")[:MOST_SHARED] if m1[f] > 0]
    header = ("feature", "largest class mean", "second", "ratio m2 / m1", "passes the rule")
    rows = [row(f) for f in top]
    flags = tuple("" if r[-1].startswith("no") else "flag" for r in rows)
    above = [int(f) for f in np.argsort(-ratio, kind="stable") if m1[f] > floor]
    extra = None
    if above and above[0] not in top:
        f = above[0]
        extra = (
            f"Most shared latent above the floor: feature {f}, ratio {fmt(ratio[f])} "
            f"({row(f)[1]}, {row(f)[2]})."
        )
    return {
        "shared": table(header, rows, row_classes=flags),
        "shared_note": (
            f"The {len(rows)} latents with the largest ratio of their second to their largest "
            f"|class mean| (training split). The rule needs a ratio ≥ {fmt(frac)} and a largest "
            f"|class mean| above {fmt(floor)}."
        ),
        "shared_extra": extra,
    }


# The evaluate stage's metrics, in table order, with what each means (README, "Evaluation").
BASELINE_METRICS: tuple[tuple[str, str], ...] = (
    ("efficacy", "efficacy (target accuracy drop)"),
    ("flip_rate", "flip rate"),
    ("specificity_mean", "specificity (mean)"),
    ("specificity_worst", "specificity (worst)"),
    ("generalisation", "generalisation (shifted images)"),
    ("probe_recovery", "probe recovery"),
)


def _interval(v: Mapping[str, Any]) -> str:
    lo, hi = v["ci95"]
    return f"{fmt(v['mean'], 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}]"


def baselines(d: ReportInputs, embeds: Embeds) -> dict:
    m = d.evaluate_metrics
    methods = m["methods"]
    shown = [(k, label) for k, label in BASELINE_METRICS if any(k in v for v in methods.values())]
    rows = [
        (name, *(_interval(v[k]) if k in v else "–" for k, _ in shown))
        for name, v in methods.items()
    ]
    stability = m["stability"]
    facts = [
        ("SAE seeds", m["seeds"]),
        ("classes evaluated", ", ".join(m["classes_evaluated"]) or "none"),
        (
            "classes left out (below edit.min_base_accuracy)",
            ", ".join(m["classes_left_out"]) or "none",
        ),
        (
            f"latents matched across seeds (|cosine| > {fmt(stability['threshold'])})",
            stability["matched_fraction"],
        ),
        ("dominant latent found again in the other seeds", stability["dominant_match_fraction"]),
        ("strengths", ", ".join(f"{k} {fmt(v)}" for k, v in m["settings"].items() if "alpha" in k)),
    ]
    return {
        "facts": kv(facts),
        "figure": embeds.figure(methods_figure(methods), "efficacy vs specificity per method"),
        "table": table(("method", *(label for _, label in shown)), rows),
    }


def _estimator_cell(s: Mapping[str, Any]) -> str:
    bits = []
    if s["median"] is not None:  # None: no finite value in this class
        bits.append(f"{fmt(s['median'])} [{fmt(s['q25'], 3)}, {fmt(s['q75'], 3)}]")
    for key, sym in (("frac_inf", "∞"), ("frac_nan", "n/a")):
        frac = s[key]
        if frac:
            bits.append(f"{sym} {'all' if frac >= 1 else fmt(frac * 100, 3) + '%'}")
    return " · ".join(bits) or "–"


def alpha_crit(d: ReportInputs, embeds: Embeds) -> dict:
    m = d.alpha_crit_metrics
    figure = embeds.figure(
        alpha_crit_figure(d.classes, d.alpha_values),
        "alpha_crit per class and estimator (log axis; ∞N: N samples whose class logit never "
        "reaches zero, not drawn; n/a: no root bracketed)",
    )
    rows = []
    for k in range(len(d.classes)):
        v = m["per_class"][d.metric_class_names[k]]
        rows.append(
            (
                class_name(d.classes, k),
                v[ESTIMATORS[0]]["count"],
                *(_estimator_cell(v[est]) for est in ESTIMATORS),
            )
        )
    grid = m["empirical_grid"]
    checks = [
        ("median exact alpha_crit (finite, all samples)", m["median_exact"]),
        ("samples with every term w_ij a_j ≥ 0", m["fraction_all_terms_nonnegative"]),
        ("linear ≤ exact where every term ≥ 0", m["linear_le_exact_when_nonnegative"]),
        ("linear ≤ exact overall", m["linear_le_exact_overall"]),
        (
            "single root / multiple roots",
            f"{fmt(m['fraction_single_root'])} / {fmt(m['fraction_multiple_roots'])}",
        ),
        ("max |exact − brentq| (single root)", m["exact_vs_brentq_max_abs_diff_single_root"]),
        (
            "empirical flips confirmed on the real model",
            f"{fmt(m['real_model_agree'])} of {fmt(m['real_model_checked'])}",
        ),
        (
            "empirical grid",
            f"0, then {fmt(grid['min'])} … {fmt(grid['max'])}, {fmt(grid['steps'])} steps, "
            f"{grid['spacing']} spacing",
        ),
    ]
    return {
        "units": m["units"],
        "figure": figure,
        "table": table(("class", "n", *ESTIMATORS), rows),
        "checks": kv(checks),
    }
