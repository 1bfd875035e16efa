"""The run report: one page of every stage's results, its context as plain data.

Pure functions of plain data (lists, dicts, numbers, PNG bytes): nothing here knows where the
pipeline keeps its artifacts; ``tasks/report.py`` loads them and calls in. The sections are built
in ``report_sections`` and laid out by ``templates/report.html`` with the kit (``kit``). Upstream
keys the report needs are indexed directly: a renamed key raises ReportInputError naming the
section and the key, instead of quietly blanking part of the page.

The page is one file that opens offline: figures are embedded as data URIs, CSS is inline, and
it has no script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from salve.present.kit import Embeds, ReportInputError, fmt, kv, render, table
from salve.present.report_sections import (
    alpha_crit,
    baselines,
    class_name,
    cross_class,
    dominant,
    edit_curves,
    edit_entry,
    gradfam_note,
    heatmap,
    sae_quality,
    training,
)

if TYPE_CHECKING:
    from salve.present.compare.metrics import KeyMetric

LATENTS_PAGE = "latents.html"  # the latent browser, next to the report

# (id, title) of the report's sections, in page order.
REPORT_SECTIONS: tuple[tuple[str, str], ...] = (
    ("metadata", "Run metadata"),
    ("training", "Data and fine-tuning"),
    ("sae-quality", "SAE quality"),
    ("class-feature-heatmap", "Class x feature mean codes"),
    ("dominant-features", "Dominant features: Grad-FAM and activation maximisation"),
    ("edit-curves", "Suppression and enhancement curves"),
    ("cross-class", "Cross-class effects"),
    ("baselines", "Edits against baselines"),
    ("alpha-crit", "alpha_crit distributions"),
    ("edited-checkpoint", "Edited checkpoint"),
)


def _section(sid: str, build: Callable[[], Any]) -> Any:
    """Run one section's builder; a missing upstream key becomes one clear error."""
    try:
        return build()
    except KeyError as exc:
        raise ReportInputError(
            f"report section {sid!r}: upstream data has no key {exc.args[0]!r}. The stage that "
            "writes it changed its format or is stale: rerun it (`salve run`), or update "
            "salve/present/report_sections.py to the new format."
        ) from exc


# --------------------------------------------------------------------------------------------
# The run report
# --------------------------------------------------------------------------------------------


@dataclass
class ReportInputs:
    """Everything the report shows, as loaded from the pipeline's artifacts.

    ``classes`` are the display names (index order); metrics that key their entries by class
    name use ``metric_class_names`` (the names the upstream stages saw; normally the same).
    ``gradfam`` is a document in the format of results/gradfam/latents.json (its ``latents``
    entries cover at least the dominant features) and ``gradfam_images`` its PNGs by file name.
    """

    classes: list[str]
    metric_class_names: list[str]
    dataset_info: dict
    fetch_metrics: dict
    finetune_epochs: list[dict]
    finetune_metrics: dict
    sidecars: dict[str, dict]  # stage -> model/SAE sidecar
    sae_metrics: dict
    sae_loss: list[dict]
    ranking: dict
    class_means: list[list[float]]
    gradfam: dict
    gradfam_images: dict[str, bytes]
    edit_metrics: dict
    edit_curve_rows: list[dict]
    alpha_crit_metrics: dict
    alpha_values: dict[str, list[list[float]]]
    evaluate_metrics: dict
    output_hashes: dict[str, str] = field(default_factory=dict)  # stage -> its outputs' md5
    extra_params: dict[str, dict] = field(default_factory=dict)
    title: str = "SALVE run report"
    latents_page: str | None = LATENTS_PAGE  # relative link to the latent browser
    # The headline's key metrics by stage (tasks/keymetrics.py declares them); none: no headline.
    key_metrics: Mapping[str, Sequence[KeyMetric]] = field(default_factory=dict)


def _metadata(d: ReportInputs) -> dict:
    """Provenance that is the same for the same results: the stages' output hashes (as DVC
    recorded them), device, library versions and parameters. The page is a DVC output, so what
    varies between identical runs (git revision, host, thread count, times) stays out of it:
    .salve/runs/ and the run log hold that. Sidecars written before it moved still hold some of
    it; it is not shown."""
    stages = list(dict.fromkeys([*d.output_hashes, *d.sidecars]))
    provenance = table(
        ("stage", "outputs (md5 in dvc.lock)", "device", "kernels"),
        [
            (
                s,
                d.output_hashes.get(s, "not in dvc.lock"),
                str(d.sidecars[s]["device"]) if s in d.sidecars else "–",
                str(d.sidecars[s].get("kernels", "–")) if s in d.sidecars else "–",
            )
            for s in stages
        ],
        code_columns=(1,),
    )
    libs: dict[str, dict[str, str]] = {}
    for s, sc in d.sidecars.items():
        for lib, ver in sc["libraries"].items():
            libs.setdefault(lib, {})[s] = str(ver)
    sidecar_stages = list(d.sidecars)
    if all(len(set(v.values())) == 1 for v in libs.values()):
        rows = [(lib, next(iter(v.values()))) for lib, v in sorted(libs.items())]
        libraries = table(("library", "version"), rows)
    else:  # a sparse matrix: a stage that never recorded a library shows –
        libraries = table(
            ("library", *sidecar_stages),
            [(lib, *(v.get(s, "–") for s in sidecar_stages)) for lib, v in sorted(libs.items())],
        )
    params: dict[str, dict] = {}
    for sc in d.sidecars.values():
        for sec, vals in sc["params"].items():
            params.setdefault(sec, {}).update(vals)
    for sec, vals in d.extra_params.items():
        params.setdefault(sec, {}).update(vals)
    return {
        "provenance": provenance if stages else None,
        "libraries": libraries if libs else None,
        "params": [
            (sec, table(("key", "value"), sorted(params[sec].items()))) for sec in sorted(params)
        ],
    }


def _checkpoint(d: ReportInputs) -> dict:
    rec, sc = d.edit_metrics["checkpoint_edit"], d.sidecars["edit"]
    k = int(rec["class"])
    name = class_name(d.classes, k)
    unit = rec["alpha_unit"]
    scale = "" if unit == "absolute" else f", {fmt(rec['alpha_abs'])} in absolute units"
    desc = (
        f"The saved checkpoint (results/edit/model.safetensors) is the fine-tuned classifier "
        f"with its head edited permanently: {rec['sign']} feature {rec['feature']} (the dominant "
        f"feature of class {name}) with alpha = {fmt(rec['alpha'])} ({unit} units{scale}), "
        f"{rec['mode']} rule."
    )
    if rec.get("mode") == "steer":
        desc = (
            "The saved model (results/edit/model.safetensors) is the fine-tuned classifier with "
            f"its head input steered: {rec['sign']} feature {rec['feature']} (the dominant "
            f"feature of class {name}) with alpha = {fmt(rec['alpha'])} (gain "
            f"{fmt(rec.get('gain'))}), a' = a + (g - 1) z(a) c before the unchanged head. Load "
            "it with salve.load_classifier (the file holds the classifier's state dict plus "
            "the SAE parts the rule needs, under steer.)."
        )
    items = [("class name", name)] + [
        (key.replace("_", " "), v) for key, v in sorted(rec.items()) if key != "class_name"
    ]
    ed = edit_entry(d, k)
    comparison = None
    if ed is not None:
        comparison = (
            f"For comparison, full suppression of this feature on the sweep's grid (alpha = "
            f"{fmt(d.edit_metrics['alpha_grid']['max'])}) takes class {name} from "
            f"{fmt(ed['target_acc_base'])} to {fmt(ed['target_acc_full_suppression'])} val "
            "accuracy."
        )
    recorded = (
        f"Recorded with it: head {sc['head']}, image size {sc['image_size']}, device "
        f"{sc['device']}."
    )
    return {"description": desc, "facts": kv(items), "comparison": comparison, "recorded": recorded}


def _headline(d: ReportInputs) -> list[tuple[str, str, str, str]]:
    """This run's key metrics, (label, value, better arrow, file:key): the ones `salve compare`,
    `salve diff` and the nightly artifact lead with, declared once in tasks/keymetrics.py. Each
    is looked up in the stage's metrics as the report holds them; rank's, extract's and
    gradfam's are recomputed from the outputs the report reads, as those stages compute them."""
    scored = [
        (e["deletion_auc"], e["deletion_auc_random"])
        for e in d.gradfam["latents"]
        if e.get("deletion_auc") is not None and e.get("deletion_auc_random") is not None
    ]
    values: dict[str, Mapping[str, Any]] = {
        "fetch": d.fetch_metrics,
        "finetune": d.finetune_metrics,
        "extract": {"dim": d.sidecars["fit_sae"].get("d_in")},
        "fit_sae": d.sae_metrics,
        "rank": {
            "distinct_dominant_features": len({int(x["feature"]) for x in d.ranking["dominant"]}),
            "cross_class_features": len(d.ranking["cross_class"]),
        },
        "edit": d.edit_metrics,
        "alpha_crit": d.alpha_crit_metrics,
        "gradfam": {
            "deletion_auc": sum(a for a, _ in scored) / len(scored) if scored else None,
            "maps_no_better_than_random": sum(a >= r for a, r in scored),
        },
        "evaluate": d.evaluate_metrics,
    }
    arrows = {"higher": "↑", "lower": "↓"}
    out = []
    for stage, kms in d.key_metrics.items():
        for km in kms:
            node: Any = values.get(stage)
            for part in km.key.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            out.append((km.label, fmt(node), arrows.get(km.better, ""), f"{km.file}:{km.key}"))
    return out


def report_context(d: ReportInputs) -> tuple[dict, Embeds]:
    """The report page's template context (plain data) and what it embeds."""
    embeds = Embeds()
    builders: dict[str, Callable[[], Any]] = {
        "metadata": lambda: _metadata(d),
        "training": lambda: training(d, embeds),
        "sae-quality": lambda: sae_quality(d, embeds),
        "class-feature-heatmap": lambda: heatmap(d, embeds),
        "dominant-features": lambda: dominant(d, embeds),
        "edit-curves": lambda: edit_curves(d, embeds),
        "cross-class": lambda: cross_class(d, embeds),
        "baselines": lambda: baselines(d, embeds),
        "alpha-crit": lambda: alpha_crit(d, embeds),
        "edited-checkpoint": lambda: _checkpoint(d),
    }
    body = {sid.replace("-", "_"): _section(sid, build) for sid, build in builders.items()}
    subtitle = f"{len(d.classes)} classes · {d.fetch_metrics['source']}"
    nav = [(f"#{sid}", title, "") for sid, title in REPORT_SECTIONS]
    if d.latents_page:
        nav.append((d.latents_page, "Latent browser →", "page"))
    context = {
        "title": d.title,
        "subtitle": subtitle,
        "nav": nav,
        "sections": REPORT_SECTIONS,
        "latents_page": d.latents_page,
        "gradfam_note": gradfam_note(d.gradfam),
        "headline": _section("headline", lambda: _headline(d)),
        **body,
    }
    return context, embeds


def build_report(d: ReportInputs) -> tuple[str, dict[str, int]]:
    """The report page and a small summary (figures drawn, images embedded, sections)."""
    context, embeds = report_context(d)
    text = render("report.html", **context)
    return text, {
        "figures": embeds.figures,
        "images": embeds.images,
        "sections": len(REPORT_SECTIONS),
        "classes": len(d.classes),
    }
