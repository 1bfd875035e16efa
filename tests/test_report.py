"""The report stage (run report and latent browser), the compare page and its Markdown."""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import numpy as np
import pytest
from PIL import Image

from salve.config import load
from salve.io import read_json, write_json
from salve.params_file import apply_overrides
from salve.present.compare.metrics import (
    KeyMetric,
    looks_like_identifier,
    metric_change,
    other_metric_groups,
)
from salve.present.compare.page import COMPARE_SECTIONS, RevisionData, build_compare_page
from salve.present.compare.text import metrics_diff_markdown
from salve.present.figures import mpl_text
from salve.present.kit import ReportInputError, fmt
from salve.present.latent_browser import DATA_OPEN, LatentSources, build_latents_page
from salve.present.report import REPORT_SECTIONS, build_report
from tasks.runner import run_stage
from tests.conftest import git, run_pipeline

# A class name that must come out as text: markup, an attribute that would fetch a file if it
# were parsed, and a `$...$` pair that matplotlib would try to read as mathtext.
EVIL_CLASS = '<script>console.error("salve-xss")</script><img src=x onerror="alert(1)"> $\\frac{$'
REPORT = Path("reports/latest/index.html")
LATENTS = Path("reports/latest/latents.html")
SIBLING_PAGES = ("index.html", "latents.html")


class _Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse_tags(text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(text)
    p.close()
    return p.tags


def assert_self_contained(text: str, scripts: int = 0, pages=SIBLING_PAGES) -> int:
    """No external references; at most ``scripts`` inline scripts (none with a src); links only
    in the page or to ``pages`` (its sibling pages); every <img> a valid embedded PNG. Returns
    the number of images."""
    tags = parse_tags(text)
    assert not [t for t, _ in tags if t in ("link", "iframe", "object", "embed")]
    inline = [a for t, a in tags if t == "script"]
    assert len(inline) <= scripts and not [a for a in inline if "src" in a], inline
    lowered = text.lower()
    assert "url(" not in lowered and "@import" not in lowered  # nothing fetched from CSS
    images = 0
    for tag, attrs in tags:
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = attrs.get(name)
            if value is None:
                continue
            assert "http://" not in value and "https://" not in value, (tag, name, value[:80])
            assert not value.startswith("//"), (tag, name, value[:80])
            if name == "href":
                assert value.startswith("#") or value.split("#")[0] in pages, value
            else:
                assert value.startswith("data:"), (tag, name, value[:80])
        if tag == "img":
            images += 1
            src = attrs.get("src") or ""
            prefix = "data:image/png;base64,"
            assert src.startswith(prefix), src[:40]
            png = base64.b64decode(src[len(prefix) :], validate=True)
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
            with Image.open(io.BytesIO(png)) as im:
                im.load()  # decodes every pixel: a truncated PNG raises here
                assert im.width > 0 and im.height > 0
    return images


def latent_data(page: str) -> dict:
    """The latent browser's entries, as its script reads them (the JSON inside the page)."""
    start = page.index(DATA_OPEN) + len(DATA_OPEN)
    return json.loads(page[start : page.index("</script>", start)])


def escaped(text: str) -> str:
    """``text`` as the templates write it (Jinja2 autoescape: & < > " ')."""
    return str(markupsafe.escape(text))


def section_ids(text: str) -> list[str]:
    return [a["id"] for t, a in parse_tags(text) if t == "section" and a.get("id")]


def rename_class(root: Path, index: int, name: str) -> None:
    """Give one class a new display name in the fetch stage's metadata (a DVC dep of report)."""
    path = root / "results" / "fetch" / "meta.json"
    meta = read_json(path)
    meta["classes"][index] = name
    write_json(path, meta)


def run_report(root: Path) -> str:
    return run_stage("report", load(root / "params.yaml"), root, progress=False).status


# ------------------------------------------------------------------------------------------
# Synthetic latent-browser sources, in exactly the formats the upstream stages write
# ------------------------------------------------------------------------------------------


def _png(rgb: tuple[int, int, int], width: int = 48, height: int = 48) -> bytes:
    """A small picture: a gradient over ``rgb`` (so a decoder has real pixels to decode)."""
    ramp = np.linspace(0.4, 1.0, width)[None, :, None] * np.ones((height, 1, 1))
    pixels = (ramp * np.asarray(rgb)[None, None, :]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_latent_sources(
    root: Path, classes: list[str], num_latents: int, *, gradfam: bool = True, edit: bool = True
) -> dict:
    """fetch meta, rank (class_means.csv, ranking.json) and, optionally, gradfam and edit
    latents.json with their PNGs. Latents 0 and 1 have no Grad-FAM entry (never active).
    Returns the numbers written (the test oracle)."""
    rng = np.random.default_rng(7)
    k = len(classes)
    mu = rng.normal(size=(k, num_latents)).round(3)
    write_json(root / "results/fetch/meta.json", {"classes": classes, "info": {}})
    rank = root / "results/rank"
    rank.mkdir(parents=True, exist_ok=True)
    with open(rank / "class_means.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["class"] + [f"f{j}" for j in range(num_latents)])
        for i, name in enumerate(classes):
            w.writerow([name] + [repr(float(v)) for v in mu[i]])
    dominant = [int(np.abs(mu[i]).argmax()) for i in range(k)]
    cross = [
        {"feature": num_latents - 1, "classes": [0, k - 1], "class_means": [1.0, 0.9], "ratio": 0.9}
    ]
    write_json(
        rank / "ranking.json",
        {
            "classes": classes,
            "dominant": [
                {
                    "class": i,
                    "name": classes[i],
                    "feature": dominant[i],
                    "class_mean": float(mu[i, dominant[i]]),
                }
                for i in range(k)
            ],
            "top": {classes[i]: [dominant[i]] for i in range(k)},
            "cross_class": cross,
            "rule": {"cross_class_fraction": 0.5, "min_mean_fraction": 0.1},
        },
    )
    freq = {j: round(0.05 + 0.9 * j / num_latents, 4) for j in range(2, num_latents)}
    change = rng.uniform(-1, 0.2, size=(num_latents, k)).round(4)
    if gradfam:
        folder = root / "results/gradfam"
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for j, f in freq.items():
            (folder / f"latent_{j}.png").write_bytes(_png((20 * j % 255, 90, 160), 144, 72))
            am = f"am_{j}.png" if j % 2 == 0 else None
            if am:
                (folder / am).write_bytes(_png((200, 40 * j % 255, 60)))
            entries.append(
                {
                    "latent": j,
                    "frequency": f,
                    "top": [{"index": 3 * j, "class": classes[j % k], "code": 1.5 + j}],
                    "overlay": f"latent_{j}.png",
                    "am": am,
                    "am_code": 0.7 if am else None,
                    "deletion_auc": 0.3,
                    "deletion_auc_random": 0.6,
                }
            )
        write_json(
            folder / "latents.json",
            {"image_size": 16, "layer": "layer3", "map_grid": [4, 4], "latents": entries},
        )
    if edit:
        write_json(
            root / "results/edit/latents.json",
            {
                "mode": "projection",
                "alpha": 1.0,
                "classes": classes,
                "latents": [
                    {"latent": j, "base_accuracy": [0.9] * k, "class_change": change[j].tolist()}
                    for j in range(num_latents)
                ],
            },
        )
    return {"mu": mu, "dominant": dominant, "cross": cross, "frequency": freq, "change": change}


def class_filter_oracle(oracle: dict, k: int) -> set[int]:
    """Latents the class filter must keep for class k: strongest class mean, or ranked for it."""
    mu = oracle["mu"]
    keep = {j for j in range(mu.shape[1]) if int(np.abs(mu[:, j]).argmax()) == k}
    keep |= {f for c, f in enumerate(oracle["dominant"]) if c == k}
    keep |= {c["feature"] for c in oracle["cross"] if k in c["classes"]}
    return keep


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def test_formatting_and_matplotlib_text():
    assert fmt(None) == "–" and fmt(math.inf) == "∞" and fmt(-0.0) == "0"
    assert fmt(0.123456) == "0.1235" and fmt(True) == "yes" and fmt(3) == "3"
    assert mpl_text("$x$") == r"\$x\$"
    assert len(mpl_text("x" * 100, 10)) == 10


def test_metric_change_direction_and_judgement_are_separate():
    up_worse = metric_change("m.json", "fvu", {"old": 0.10, "new": 0.12}, better="lower")
    assert (up_worse.arrow, up_worse.direction, up_worse.judgement) == ("▲", "up", "worse")
    down_better = metric_change("m.json", "fvu", {"old": 0.12, "new": 0.10}, better="lower")
    assert (down_better.arrow, down_better.judgement) == ("▼", "better")
    down_worse = metric_change("m.json", "acc", {"old": 0.9, "new": 0.8}, better="higher")
    assert (down_worse.arrow, down_worse.judgement, down_worse.verdict) == ("▼", "worse", "worse")
    assert down_worse.change.startswith("-0.1 ")  # and the relative change
    unknown = metric_change("m.json", "l0", {"old": 3.0, "new": 5.0}, better="none")
    assert (unknown.arrow, unknown.judgement, unknown.verdict) == ("▲", "", "")


def test_metric_change_noise_identifiers_and_gaps():
    tiny = metric_change(
        "m.json",
        "mean_score",
        {"old": 0.5, "new": 0.5 + 8.8e-06},
        better="higher",
        noise_floor=0.005,
    )
    assert (tiny.judgement, tiny.verdict, tiny.arrow) == ("noise", "within noise", "▲")
    # The floor is strict: a change of exactly the floor is judged.
    at_floor = metric_change("m", "a", {"old": 0.0, "new": 0.25}, better="higher", noise_floor=0.25)
    assert at_floor.judgement == "better"
    roundoff = metric_change("m", "x", {"old": 1.0, "new": 1.0 + 2.0**-52})
    assert (roundoff.judgement, roundoff.verdict) == ("noise", "round-off")
    ident = metric_change("m", "checkpoint_edit.feature", {"old": 4, "new": 67}, identifier=True)
    assert ident.change == "4 -> 67 (changed)" and ident.arrow == "" and "63" not in ident.change
    text = metric_change("m", "checkpoint_edit.mode", {"old": "paper", "new": "projection"})
    assert text.change == "paper -> projection (changed)"
    same = metric_change("m", "per_class.0.feature", {"old": 4, "new": 4}, identifier=True)
    assert same.judgement == "unchanged"
    absent = metric_change("m", "val_accuracy", None, better="higher")
    assert absent.judgement == "unchanged" and absent.arrow == ""
    added = metric_change("m", "new_key", {"old": None, "new": 3})
    assert added.change == "added" and added.judgement == ""
    inf = metric_change("m", "median", {"old": 2.0, "new": math.inf})
    assert inf.arrow == "▲" and inf.change == "2 -> ∞"
    assert looks_like_identifier("per_class.3.feature")
    assert looks_like_identifier("checkpoint_edit.class")
    assert not looks_like_identifier("distinct_dominant_features")
    assert not looks_like_identifier("num_classes")
    with pytest.raises(ValueError, match="better"):
        KeyMetric("m.json", "x", "x", better="up")
    with pytest.raises(ValueError, match="noise_floor"):
        KeyMetric("m.json", "x", "x", noise_floor=-1.0)


# A synthetic `sae.width 64 -> 128` comparison: ~170 changed metrics, 120 of them alpha_crit
# quantiles, and the key metrics scattered among them.
CLASSES10 = [f"class{k}" for k in range(10)]
KEYS = (
    KeyMetric("metrics/finetune.json", "val_accuracy", "fine-tuned val accuracy", "higher", 0.005),
    KeyMetric("metrics/fit_sae.json", "val_fvu", "SAE val FVU", "lower", 0.002),
    KeyMetric("metrics/fit_sae.json", "val_l0", "SAE val L0", "none", 0.5),
    KeyMetric("metrics/fit_sae.json", "val_dead_fraction", "SAE dead fraction", "lower", 0.005),
    KeyMetric("metrics/edit.json", "classes_selective", "classes edited selectively", "higher"),
    KeyMetric("metrics/edit.json", "mean_score", "mean selectivity score", "higher", 0.005),
    KeyMetric(
        "metrics/edit.json", "checkpoint_edit.feature", "saved edit's feature", kind="identifier"
    ),
    KeyMetric("metrics/alpha_crit.json", "median_exact", "median exact alpha_crit"),
)


def synthetic_width_diff() -> tuple[dict, dict]:
    params = {"params.yaml": {"sae.width": {"old": 64, "new": 128, "diff": 64}}}
    rng = np.random.default_rng(3)
    alpha = {}
    for c in CLASSES10:
        for est in ("linear", "exact", "brentq", "empirical"):
            for q in ("median", "q25", "q75"):
                old = float(rng.uniform(1, 100))
                entry = {"old": old, "new": old * 1.1, "diff": old * 0.1}
                alpha[f"per_class.{c}.{est}.{q}"] = entry
    alpha["median_exact"] = {"old": 30.0, "new": 33.0, "diff": 3.0}
    edit = {
        f"per_class.{c}.{k}": {"old": 0.5, "new": 0.4, "diff": -0.1}
        for c in CLASSES10
        for k in ("score", "off_target_mean_change", "target_acc_full_suppression")
    }
    edit |= {
        f"per_class.{c}.feature": {"old": i, "new": i + 40, "diff": 40}
        for i, c in enumerate(CLASSES10)
    }
    edit["classes_selective"] = {"old": 6, "new": 8, "diff": 2}
    edit["mean_score"] = {"old": 0.5, "new": 0.5 + 8.8e-06, "diff": 8.8e-06}
    edit["checkpoint_edit.feature"] = {"old": 4, "new": 67, "diff": 63}
    sae = {
        "val_fvu": {"old": 0.12, "new": 0.09, "diff": -0.03},
        "val_l0": {"old": 16.0, "new": 21.0, "diff": 5.0},
        "val_dead_fraction": {"old": 0.0, "new": 0.05, "diff": 0.05},
        "train_fvu": {"old": 0.11, "new": 0.08, "diff": -0.03},
        "train_l0": {"old": 15.0, "new": 20.0, "diff": 5.0},
    }
    metrics = {
        "metrics/alpha_crit.json": alpha,
        "metrics/edit.json": edit,
        "metrics/fit_sae.json": sae,
        "metrics/finetune.json": {"val_accuracy": {"old": 0.91, "new": 0.93, "diff": 0.02}},
    }
    return params, metrics


def test_synthetic_diff_is_the_size_the_brief_describes():
    _, metrics = synthetic_width_diff()
    rows = sum(len(v) for v in metrics.values())
    assert 160 <= rows <= 180, rows
    assert len(metrics["metrics/alpha_crit.json"]) > 111  # what buried the key metrics before


def _rev(label: str) -> RevisionData:
    return RevisionData(label=label, sha=label * 10)


def test_compare_page_leads_with_params_then_key_metrics():
    params, metrics = synthetic_width_diff()
    order = ["metrics/finetune.json", "metrics/fit_sae.json", "metrics/edit.json"]
    text = build_compare_page(_rev("a"), _rev("b"), params, metrics, KEYS, file_order=order)
    assert section_ids(text) == [sid for sid, _ in COMPARE_SECTIONS]
    assert_self_contained(text)
    # Document order: the parameter change, then every key metric, then the rest.
    pos = [text.index('data-key="sae.width"')]
    pos += [text.index(f'data-key="{k.file}:{k.key}"') for k in KEYS]
    pos.append(text.index('id="other-metrics"'))
    assert pos == sorted(pos)
    # Key metrics are listed once, not again among the rest.
    for k in KEYS:
        assert text.count(f'data-key="{k.file}:{k.key}"') == 1
    key_html = text[text.index('id="key-metrics"') : text.index('id="other-metrics"')]
    assert "4 -&gt; 67 (changed)" in key_html and "+63" not in key_html
    noisy = key_html[key_html.index('data-key="metrics/edit.json:mean_score"') :]
    noisy = noisy[: noisy.index("</tr>")]
    assert 'data-judgement="noise"' in noisy and "within noise" in noisy and "worse" not in noisy
    fvu = key_html[key_html.index('data-key="metrics/fit_sae.json:val_fvu"') :]
    assert 'data-direction="down" data-judgement="better"' in fvu[: fvu.index("</tr>")]
    # The rest: one collapsed group per file, in the given order, unknown files last.
    groups = [a["data-file"] for t, a in parse_tags(text) if t == "details"]
    assert groups == [*order[1:], "metrics/alpha_crit.json"]  # finetune: only a key metric
    assert not [a for t, a in parse_tags(text) if t == "details" and "open" in a]
    rest = text[text.index('id="other-metrics"') : text.index('id="figures"')]
    assert "per_class.class3.feature" in rest and "3 -&gt; 43 (changed)" in rest
    assert 'data-judgement="better"' not in rest and 'data-judgement="worse"' not in rest


def test_other_groups_count_unchanged_entries_without_listing_them():
    diff = {"metrics/x.json": {"a": {"old": 1, "new": 1, "diff": 0}, "b": {"old": 1, "new": 2}}}
    (g,) = other_metric_groups(diff, ())
    assert [r.key for r in g.rows] == ["b"] and "1 unchanged" in g.summary
    assert other_metric_groups({"metrics/x.json": {"a": {"old": 1, "new": 1}}}, ()) == []


def test_markdown_keeps_the_page_order():
    params, metrics = synthetic_width_diff()
    md = metrics_diff_markdown(params, metrics, KEYS, old_label="HEAD", new_label="workspace")
    p, k, o = md.index("### Parameters"), md.index("### Key metrics"), md.index("### Other")
    assert p < k < o
    assert "| params.yaml | sae.width | 64 | 128 | +64 (×2) |" in md
    key_part = md[k:o]
    lines = [ln for ln in key_part.splitlines() if ln.startswith("| ") and "metric" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in lines] == [f"{m.label} ({m.key})" for m in KEYS]
    assert "| 4 | 67 | 4 -> 67 (changed) |" in key_part
    assert "within noise" in key_part
    assert md.index("#### metrics/alpha_crit.json") > o
    assert "| metric | HEAD | workspace | change | direction | judgement |" in key_part
    piped = metrics_diff_markdown({}, {"m.json": {"a|b": {"old": 1, "new": 2}}}, ())
    assert "a\\|b" in piped and "No parameter changed." in piped


# ------------------------------------------------------------------------------------------
# The latent browser
# ------------------------------------------------------------------------------------------


def test_latent_browser_from_synthetic_sources(tmp_path: Path):
    from tasks.report import load_latent_sources

    classes = ["cat", "dog", EVIL_CLASS, "owl"]
    oracle = write_latent_sources(tmp_path, classes, 10)
    text, stats = build_latents_page(load_latent_sources(tmp_path))
    assert stats == {"latents": 10, "images": 8 + 4, "missing_sources": 0}
    assert assert_self_contained(text, scripts=2) == 0  # pictures are files, drawn by the script
    assert escaped(EVIL_CLASS) in text and EVIL_CLASS not in text
    data = latent_data(text)
    assert data["classes"] == classes
    by = {x["latent"]: x for x in data["entries"]}
    assert [x["latent"] for x in data["entries"]] == list(range(10))
    assert by[0]["frequency"] is None and by[0]["overlay"] is None  # no Grad-FAM: sorts last
    assert by[5]["frequency"] == oracle["frequency"][5]
    assert by[5]["overlay"] == "latents/latent_5.png"
    assert [j for j in by if by[j]["am"]] == [2, 4, 6, 8]
    for j in range(10):  # suppression effect: the largest drop over classes
        assert by[j]["effect"] == pytest.approx(-oracle["change"][j].min())
        assert by[j]["max_mean"] == pytest.approx(np.abs(oracle["mu"][:, j]).max())
        assert by[j]["top_class"] == int(np.abs(oracle["mu"][:, j]).argmax())
        assert [float(v) for v in by[j]["change"]] == pytest.approx(oracle["change"][j], abs=1e-4)
        expected = {k for k in range(4) if j in class_filter_oracle(oracle, k)}
        assert set(by[j]["classes"]) == expected
    assert "dominant: cat" in text and "cross-class: cat, owl" in text


def test_latent_browser_names_the_stage_for_each_missing_source(tmp_path: Path):
    from tasks.report import load_latent_sources

    write_latent_sources(tmp_path, ["a", "b"], 5, gradfam=False, edit=False)
    text, stats = build_latents_page(load_latent_sources(tmp_path))
    assert stats["latents"] == 5 and stats["missing_sources"] == 2
    assert "run `salve stage gradfam`" in text and "run `salve stage edit`" in text
    assert len(latent_data(text)["entries"]) == 5
    empty = LatentSources(
        classes=["a"],
        class_means=None,
        ranking=None,
        gradfam=None,
        hints={"class_means": "run rank"},
    )
    text, stats = build_latents_page(empty)
    assert stats["latents"] == 0 and "run rank" in text and "<script" not in text


def test_latent_browser_rejects_a_class_count_mismatch(tmp_path: Path):
    with pytest.raises(ReportInputError, match="rerun rank"):
        build_latents_page(LatentSources(["a", "b", "c"], [[0.1, 0.2]], None, None))


# ------------------------------------------------------------------------------------------
# The run report
# ------------------------------------------------------------------------------------------


def test_report_is_deterministic(built_project_template: Path):
    """The same inputs give the same page, byte for byte (figures included)."""
    from tasks.report import load_inputs

    inputs = load_inputs(built_project_template)  # reads only: the template is shared
    first, stats = build_report(inputs)
    second, _ = build_report(inputs)
    assert first == second
    assert stats["sections"] == len(REPORT_SECTIONS)


def test_report_fails_loudly_on_a_renamed_key(built_project_template: Path):
    from tasks.report import load_inputs

    inputs = load_inputs(built_project_template)
    broken = copy.deepcopy(inputs)
    broken.sae_metrics["val_fraction_unexplained"] = broken.sae_metrics.pop("val_fvu")
    with pytest.raises(ReportInputError, match="'sae-quality'.*'val_fvu'"):
        build_report(broken)
    broken = copy.deepcopy(inputs)
    del broken.edit_metrics["per_class"][next(iter(broken.edit_metrics["per_class"]))]
    with pytest.raises(ReportInputError, match="per_class"):
        build_report(broken)


def test_report_shows_left_out_classes_and_edits_that_raise_their_target(
    built_project_template: Path,
):
    from tasks.report import load_inputs

    d = load_inputs(built_project_template)
    names = d.metric_class_names
    m = d.edit_metrics
    # Which classes the tiny model evaluates depends on its accuracy: give classes 1 and 3 a row
    # (a copy of an evaluated one) so the case below does not hang on the numerics.
    some_row = next(iter(m["per_class"].values()))
    for k in (1, 3):
        m["per_class"].setdefault(names[k], copy.deepcopy(some_row))
    m["per_class"] = {n: m["per_class"][n] for n in names if n in m["per_class"]}
    left = names[3]
    del m["per_class"][left]
    m["classes_left_out"] = [
        *(c for c in m.get("classes_left_out", []) if c["class"] not in (left, names[1])),
        {"class": left, "base_accuracy": 0.42},
    ]
    gone = {c["class"] for c in m["classes_left_out"]}
    m["per_class"] = {n: v for n, v in m["per_class"].items() if n not in gone}
    m["classes_evaluated"] = list(m["per_class"])
    for row in m["per_class"].values():
        row["raises_target"] = False
    m["per_class"][names[1]]["raises_target"] = True
    text, _ = build_report(d)
    edit = text[text.index('id="edit-curves"') : text.index('id="cross-class"')]
    assert f"{left} (0.42)" in edit and "min_base_accuracy" in edit
    evaluated = len(m["classes_evaluated"])
    assert f"{evaluated} of {len(names)}" in edit
    per_class = edit[edit.index("Per class, suppressing its dominant feature") :]
    rows = per_class.split("<tbody>")[1].split("</tbody>")[0].split("<tr")[1:]
    assert len(rows) == evaluated  # the left-out class has no row
    flagged = [r for r in rows if r.startswith(' class="flag"')]
    assert len(flagged) == 1 and "raises this class" in flagged[0]
    card = text[text.index('id="class-1"') :]
    assert "suppressing it raises this class" in card[: card.index("</h3>")]
    card = text[text.index('id="class-3"') :]
    assert "not evaluated" in card[: card.index("</table>")]


def test_report_reads_the_gradfam_latents_format(built_project_template: Path):
    """The dominant cards from results/gradfam/latents.json entries: frequency, per-image
    codes (their mean), faithfulness, and the layer note."""
    from tasks.report import load_inputs

    d = load_inputs(built_project_template)
    for e in d.gradfam["latents"]:
        e |= {"frequency": 0.25, "deletion_auc": 0.125, "deletion_auc_random": 0.5}
        for i, t in enumerate(e["top"]):
            t["code"] = 2.0 + 4.0 * i  # mean over 2 images: 4
    d.gradfam |= {"layer": "layer3", "map_grid": [4, 4]}
    text, _ = build_report(d)
    card = text[text.index('id="class-0"') :]
    card = card[: card.index("</table>")]
    assert "<td>activation frequency</td><td>0.25</td>" in card
    assert "<td>mean code of those images</td><td>4</td>" in card
    assert "<td>deletion AUC (random order)</td><td>0.125 (0.5)</td>" in card
    assert "Grad-FAM differentiates layer3 (4x4 map at 32 px images)" in text


# ------------------------------------------------------------------------------------------
# The report stage
# ------------------------------------------------------------------------------------------


def test_report_stage_writes_a_self_contained_page(built_project: Path):
    root = built_project
    rename_class(root, 1, EVIL_CLASS)
    assert run_report(root) == "ran"

    path = root / REPORT
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert section_ids(text) == [sid for sid, _ in REPORT_SECTIONS]
    images = assert_self_contained(text)

    # The class name is text, escaped wherever it appears, never markup.
    assert escaped(EVIL_CLASS) in text
    assert EVIL_CLASS not in text
    assert "<script" not in text.lower()

    metrics = read_json(root / "metrics" / "report.json")
    assert "bytes" not in metrics
    assert metrics["sections"] == len(REPORT_SECTIONS)
    assert images == metrics["figures"] + metrics["images"]
    assert metrics["figures"] >= 6  # curves, SAE loss, heatmap, edit x2, alpha_crit (+ cross)
    ranking = read_json(root / "results" / "rank" / "ranking.json")
    for d in ranking["dominant"]:  # one card per class, its images embedded
        assert f'id="class-{d["class"]}"' in text
        assert f'href="latents.html#latent-{d["feature"]}"' in text
    assert metrics["images"] >= len(ranking["dominant"])  # overlays (+ AM images)

    # The latent browser, beside it: one entry per SAE latent, linked from the report.
    browser = (root / LATENTS).read_text(encoding="utf-8")
    width = load(root / "params.yaml").sae.width
    assert metrics["latents"] == width
    entries = latent_data(browser)["entries"]
    assert [x["latent"] for x in entries] == list(range(width))
    assert_self_contained(browser, scripts=2)
    # Its pictures are files beside it, the gradfam stage's bytes, and only those.
    shown = {x[k] for x in entries for k in ("overlay", "am") if x[k]}
    assert shown and all(s.startswith("latents/") for s in shown)
    beside = {f"latents/{p.name}" for p in (root / LATENTS).parent.joinpath("latents").iterdir()}
    assert beside == shown
    gradfam_dir = root / "results" / "gradfam"
    for s in shown:
        assert (root / LATENTS).parent.joinpath(s).read_bytes() == (
            gradfam_dir / s.split("/", 1)[1]
        ).read_bytes()
    assert 'href="latents.html"' in text and 'href="index.html"' in browser

    # Nothing changed since: DVC finds the stage fresh and the page is left alone.
    mtime = path.stat().st_mtime_ns
    assert run_report(root) == "skipped"
    assert path.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------
# salve compare
# ------------------------------------------------------------------------------------------


def salve(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compare_two_commits(built_project: Path):
    root = built_project
    apply_overrides(root / "params.yaml", ["edit.alpha_max=1.0"])
    statuses = run_pipeline(root)
    assert statuses["edit"] == "ran" and statuses["fit_sae"] == "skipped"
    git(root, "add", "-A")
    git(root, "commit", "-qm", "edit.alpha_max=1.0")

    proc = salve(root, "compare", "HEAD~1", "HEAD")
    assert proc.returncode == 0, proc.stderr
    page = root / "reports" / "compare" / "HEAD_1_vs_HEAD.html"
    assert page.is_file(), proc.stdout
    text = page.read_text(encoding="utf-8")
    assert section_ids(text) == [sid for sid, _ in COMPARE_SECTIONS]
    # Its only links: both runs' latent browsers (B, HEAD, is the workspace's; A's, read from
    # DVC's cache, is written beside the page).
    sha = git(root, "rev-parse", "HEAD~1").strip()
    browsers = ("../latest/latents.html", f"revisions/{sha[:12]}/latents.html")
    assert_self_contained(text, pages=browsers)
    assert all((page.parent / b).is_file() for b in browsers)

    # The changed parameter, with both values.
    params = text[text.index('id="params-diff"') : text.index('id="key-metrics"')]
    assert 'data-key="edit.alpha_max"' in params
    assert ">1.5</td>" in params and ">1</td>" in params
    # Every declared key metric has its row, changed or not.
    from tasks.keymetrics import PIPELINE_KEY_METRICS as KEY_METRICS

    keys = text[text.index('id="key-metrics"') : text.index('id="other-metrics"')]
    for k in KEY_METRICS:
        assert f'data-key="{k.file}:{k.key}"' in keys
    # The sweep's recorded grid maximum moved by -0.5: among the other metrics, by stage.
    rest = text[text.index('id="other-metrics"') : text.index('id="figures"')]
    assert 'data-file="metrics/edit.json"' in rest
    assert "alpha_grid.max" in rest and "-0.5" in rest
    # Figures of both revisions, side by side.
    figures = text[text.index('id="figures"') :]
    assert figures.count("<img") >= 4

    out = root / "elsewhere.html"
    assert salve(root, "compare", "HEAD~1", "HEAD", "--out", str(out)).returncode == 0
    assert out.is_file()


def test_compare_unknown_revision_is_one_line(built_project: Path):
    proc = salve(built_project, "compare", "HEAD", "no-such-revision")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no-such-revision" in lines[0] and lines[0].startswith("error:")
    assert not (built_project / "reports" / "compare").exists()


def test_compare_workspace_must_be_second(built_project: Path):
    proc = salve(built_project, "compare", "workspace", "HEAD")
    assert proc.returncode == 1
    assert "workspace" in proc.stderr


# ------------------------------------------------------------------------------------------
# The headline and the most shared latents (#28)
# ------------------------------------------------------------------------------------------


def test_report_opens_with_the_key_metrics(built_project_template: Path):
    """Before the provenance tables: every key metric (tasks/keymetrics.py, as `salve compare`
    leads with them), valued as the stage's metrics file has it."""
    from salve.present.compare.experiments import lookup
    from tasks.keymetrics import PIPELINE_KEY_METRICS as KEY_METRICS
    from tasks.report import load_inputs

    root = built_project_template
    text, _ = build_report(load_inputs(root))
    start = text.index('id="headline"')
    assert start < text.index("<section") < text.index("Provenance")
    head = text[start : text.index('id="metadata"')]
    keys = [a["data-key"] for t, a in parse_tags(head) if t == "div" and "data-key" in a]
    assert keys == [f"{km.file}:{km.key}" for km in KEY_METRICS]
    for km in KEY_METRICS:
        tile = head[head.index(f'data-key="{km.file}:{km.key}"') :]
        tile = tile[: tile.index("</div>")]
        value = lookup(read_json(root / km.file), km.key)
        assert value is not None, km.key
        assert f"<b>{escaped(fmt(value))}</b>" in tile and escaped(km.label) in tile, km.key


class _Rows(HTMLParser):
    """Table rows as (class attribute, cell texts)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str, list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append((dict(attrs).get("class") or "", []))
        elif tag == "td":
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None


def test_cross_class_section_lists_the_most_shared_latents(built_project_template: Path):
    """No cross-class feature is never a bare "none": the five latents with the largest m2 / m1
    (of |class mean|), with their two class means and whether each passes the rule."""
    from tasks.report import load_inputs

    d = load_inputs(built_project_template)
    names = d.classes
    mu = np.zeros((len(names), 8))
    mu[0, 0], mu[1, 0] = 10.0, 9.0  # 0.9, strong: passes
    mu[2, 1], mu[3, 1] = 0.2, 0.19  # 0.95, but near-silent: below the floor
    mu[4, 2], mu[5, 2] = 10.0, 4.0  # 0.4: the second class too weak
    mu[6, 3], mu[7, 3] = -8.0, 6.0  # |.|: 0.75, passes
    mu[0, 4] = 12.0  # one class only
    mu[1, 5], mu[2, 5] = 5.0, 3.0  # 0.6, passes
    d.class_means = mu.tolist()
    d.ranking = {**d.ranking, "rule": {"cross_class_fraction": 0.5, "min_mean_fraction": 0.1}}
    d.edit_metrics = {**d.edit_metrics, "cross_class": []}
    text, _ = build_report(d)
    section = text[text.index('id="cross-class"') : text.index('id="baselines"')]
    assert "No latent passes this rule" in section
    listed = section[section.index("Most shared latents") :]
    parser = _Rows()
    parser.feed(listed[: listed.index("</table>")])
    rows = [(cls, cells) for cls, cells in parser.rows if cells]
    floor = "no: largest mean 0.2 ≤ floor 1.2"
    assert [(cls, cells[0], cells[3], cells[4]) for cls, cells in rows] == [
        ("", "1", "0.95", floor),
        ("flag", "0", "0.9", "yes: cross-class"),
        ("flag", "3", "0.75", "yes: cross-class"),
        ("flag", "5", "0.6", "yes: cross-class"),
        ("", "2", "0.4", "no: ratio < 0.5"),
    ]
    assert rows[2][1][1:3] == [f"{names[6]}: -8", f"{names[7]}: 6"]  # signed means, by |.|
    assert "ratio ≥ 0.5 and a largest |class mean| above 1.2" in section


@pytest.fixture
def chromium_here():
    from tests.test_report_browser import ensure_chromium

    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)


BOX = "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom];"


@pytest.mark.timeout(600)
def test_report_first_screen_shows_the_headline(
    chromium_here, built_project_template: Path, tmp_path: Path
):
    """At 1400x900 in headless Chromium every key metric's tile is on the first screen."""
    from selenium.webdriver.common.by import By

    from tasks.keymetrics import PIPELINE_KEY_METRICS as KEY_METRICS
    from tasks.report import load_inputs
    from tests.test_report_browser import open_offline, start_driver

    text, _ = build_report(load_inputs(built_project_template))
    page = tmp_path / "index.html"
    page.write_text(text, encoding="utf-8")
    (tmp_path / "profile").mkdir()
    driver = start_driver(tmp_path / "profile")
    width, height = 1400, 900
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        open_offline(driver, page.resolve().as_uri())
        for km in KEY_METRICS:
            key = f"{km.file}:{km.key}"
            el = driver.find_element(By.CSS_SELECTOR, f'#headline div[data-key="{key}"]')
            left, top, right, bottom = driver.execute_script(BOX, el)
            assert left >= 0 and top >= 0 and right <= width and bottom <= height, key
            assert el.is_displayed() and el.text.strip()
        head = driver.execute_script(BOX, driver.find_element(By.ID, "headline"))
        meta = driver.execute_script(BOX, driver.find_element(By.ID, "metadata"))
        assert head[3] <= meta[1]  # above the provenance tables
        Path("/tmp/salve_report_first_screen.png").write_bytes(driver.get_screenshot_as_png())
    finally:
        driver.quit()
