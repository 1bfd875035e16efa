"""The report stage (one self-contained HTML page) and `salve compare`."""

from __future__ import annotations

import base64
import html
import io
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from salve.config import apply_overrides, load
from salve.io import read_json, write_json
from salve.report import (
    COMPARE_SECTIONS,
    REPORT_SECTIONS,
    build_report,
    delta_class,
    fmt,
    metric_direction,
    mpl_text,
)
from tasks.runner import run_stage
from tests.conftest import git, run_pipeline

# A class name that must come out as text: markup, an attribute that would fetch a file if it
# were parsed, and a `$...$` pair that matplotlib would try to read as mathtext.
EVIL_CLASS = '<script>console.error("salve-xss")</script><img src=x onerror="alert(1)"> $\\frac{$'
REPORT = Path("reports/latest/index.html")


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


def assert_self_contained(text: str) -> int:
    """No scripts, no external references; every <img> a valid embedded PNG. Returns the
    number of images."""
    tags = parse_tags(text)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
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
                assert value.startswith("#"), value  # in-page links only
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
# Pure helpers
# ------------------------------------------------------------------------------------------


def test_metric_directions_and_delta_colours():
    assert metric_direction("val_accuracy") == 1
    assert metric_direction("val_fvu") == -1
    assert metric_direction("per_class.3.target_acc_full_suppression") == -1
    assert metric_direction("per_class.3.target_acc_base") == 1
    assert metric_direction("median_exact") == 0
    assert delta_class("train_splice_accuracy", 0.01) == "better"
    assert delta_class("train_loss", 0.01) == "worse"
    assert delta_class("l0", 3.0) == "neutral"
    assert delta_class("val_accuracy", 0) == "neutral"
    assert delta_class("val_accuracy", None) == "neutral"
    assert delta_class("val_accuracy", math.nan) == "neutral"


def test_formatting_and_matplotlib_text():
    assert fmt(None) == "–" and fmt(math.inf) == "∞" and fmt(-0.0) == "0"
    assert fmt(0.123456) == "0.1235" and fmt(True) == "yes" and fmt(3) == "3"
    assert mpl_text("$x$") == r"\$x\$"
    assert len(mpl_text("x" * 100, 10)) == 10


def test_report_is_deterministic(built_project_template: Path):
    """The same inputs give the same page, byte for byte (figures included)."""
    from tasks.report import load_inputs

    inputs = load_inputs(built_project_template)  # reads only: the template is shared
    first, stats = build_report(inputs)
    second, _ = build_report(inputs)
    assert first == second
    assert stats["sections"] == len(REPORT_SECTIONS)


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
    assert html.escape(EVIL_CLASS) in text
    assert EVIL_CLASS not in text
    assert "<script" not in text.lower()

    metrics = read_json(root / "metrics" / "report.json")
    assert "bytes" not in metrics  # varies with the embedded stage times
    assert metrics["sections"] == len(REPORT_SECTIONS)
    assert images == metrics["figures"] + metrics["images"]
    assert metrics["figures"] >= 6  # curves, SAE loss, heatmap, edit x2, alpha_crit (+ cross)
    ranking = read_json(root / "results" / "rank" / "ranking.json")
    for d in ranking["dominant"]:  # one card per class, its images embedded
        assert f'id="class-{d["class"]}"' in text
    assert metrics["images"] >= len(ranking["dominant"])  # overlays (+ AM images)

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
    assert_self_contained(text)

    # The changed parameter, with both values.
    assert "edit.alpha_max" in text
    params = text[text.index('id="params-diff"') : text.index('id="metrics-diff"')]
    assert "<td>1.5</td>" in params and "<td>1</td>" in params
    # A metric delta: the sweep's recorded grid maximum moved by -0.5.
    metrics = text[text.index('id="metrics-diff"') : text.index('id="figures"')]
    assert "alpha_grid.max" in metrics and "-0.5" in metrics
    assert 'class="better"' in metrics or 'class="worse"' in metrics  # coloured deltas
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
