"""`salve compare REV_A REV_B`: one HTML page comparing two runs of the pipeline.

A revision is anything `git rev-parse` understands (a commit, branch, tag, `HEAD~1`) or the name
of a DVC experiment (`dvc exp show --json`); `workspace` may be given as the second one. The page
leads with the parameter diff (`dvc params diff`), then the key metrics (`tasks.report.KEY_METRICS`)
with direction and judgement, then the rest of the metric diff (`dvc metrics diff`) by stage,
collapsed, and the key figures of both revisions side by side, redrawn from the plots files
committed at each revision (they are git-tracked) with the report's own figure functions
(`salve.compare`, `salve.figures`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKSPACE = "workspace"
DVC_TIMEOUT_S = 300
GIT_TIMEOUT_S = 60


class CompareError(RuntimeError):
    """A comparison that cannot be made (unknown revision, failing DVC command)."""


def _env() -> dict[str, str]:
    return os.environ | {"DVC_NO_ANALYTICS": "1"}


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        env=_env(),
    )


def _dvc_json(root: Path, *args: str) -> Any:
    """Run `dvc ARGS --json` in root and parse its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args, "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=DVC_TIMEOUT_S,
        env=_env(),
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise CompareError(f"`dvc {' '.join(args)}` failed: {last}")
    text = proc.stdout.strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise CompareError(f"`dvc {' '.join(args)}` printed no JSON ({exc})") from None


def _experiment_revs(node: Any, name: str) -> list[str]:
    """Commit shas of the experiments called ``name`` anywhere in `dvc exp show --json`."""
    found: list[str] = []
    if isinstance(node, list):
        for item in node:
            found += _experiment_revs(item, name)
    elif isinstance(node, dict):
        for rev in node.get("revs") or []:
            if isinstance(rev, dict) and rev.get("name") == name and rev.get("rev"):
                found.append(str(rev["rev"]))
        for item in node.get("experiments") or []:
            found += _experiment_revs(item, name)
    return found


def resolve_revision(root: Path, rev: str) -> str:
    """The commit sha of a git revision or DVC experiment name; CompareError when neither."""
    if rev == WORKSPACE:
        return WORKSPACE
    if rev and not rev.startswith("-"):
        proc = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
        if _git(root, "rev-parse", "--git-dir").returncode == 0:
            for extra in ((), ("--all-commits",)):
                try:
                    shown = _dvc_json(root, "exp", "show", *extra)
                except CompareError:
                    shown = []
                shas = sorted(set(_experiment_revs(shown, rev)))
                if len(shas) == 1:
                    return shas[0]
                if len(shas) > 1:
                    raise CompareError(
                        f"revision {rev!r} is ambiguous: DVC experiments {', '.join(shas)}"
                    )
    raise CompareError(f"unknown revision {rev!r}: not a git revision or DVC experiment in {root}")


def read_at(root: Path, sha: str, path: str) -> str | None:
    """The text of ``path`` at revision ``sha`` (the working tree for `workspace`), or None."""
    if sha == WORKSPACE:
        p = root / path
        return p.read_text(encoding="utf-8") if p.exists() else None
    proc = _git(root, "show", f"{sha}:./{path}")
    if proc.returncode == 0:
        return proc.stdout
    try:  # not in git: a DVC-tracked file
        import dvc.api

        with dvc.api.open(path, repo=str(root), rev=sha, encoding="utf-8") as fh:
            return fh.read()
    except Exception:  # noqa: BLE001 - absent at this revision: the page says so
        return None


def _csv_rows(text: str | None) -> list[dict] | None:
    if not text:
        return None
    return list(csv.DictReader(io.StringIO(text)))


def _json(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def load_revision(root: Path, label: str, sha: str):
    from salve.compare import RevisionData

    return RevisionData(
        label=label,
        sha=sha,
        finetune_epochs=_csv_rows(read_at(root, sha, "plots/finetune/epochs.csv")),
        edit_curve_rows=_csv_rows(read_at(root, sha, "plots/edit/curves.csv")),
        edit_metrics=_json(read_at(root, sha, "metrics/edit.json")),
        alpha_samples=_csv_rows(read_at(root, sha, "plots/alpha_crit/samples.csv")),
    )


def _slug(rev: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rev).strip("_.") or "rev"


def default_output(root: Path, rev_a: str, rev_b: str) -> Path:
    return root / "reports" / "compare" / f"{_slug(rev_a)}_vs_{_slug(rev_b)}.html"


def compare(root: Path, rev_a: str, rev_b: str, out: Path | None = None) -> Path:
    """Write the comparison page of ``rev_a`` and ``rev_b``; returns its path."""
    from salve.compare import build_compare_page
    from salve.io import write_text
    from tasks import STAGE_ORDER, STAGES
    from tasks.report import KEY_METRICS

    root = Path(root).resolve()
    if rev_a == WORKSPACE:
        raise CompareError("`workspace` can only be the second revision (compare REV workspace)")
    sha_a = resolve_revision(root, rev_a)
    sha_b = resolve_revision(root, rev_b)
    revs = [sha_a] if sha_b == WORKSPACE else [sha_a, sha_b]
    params_diff = _dvc_json(root, "params", "diff", *revs)
    metrics_diff = _dvc_json(root, "metrics", "diff", *revs)
    page = build_compare_page(
        load_revision(root, rev_a, sha_a),
        load_revision(root, rev_b, sha_b),
        params_diff or {},
        metrics_diff or {},
        KEY_METRICS,
        file_order=[STAGES[s].metrics_file for s in STAGE_ORDER],
    )
    path = Path(out) if out else default_output(root, rev_a, rev_b)
    write_text(path, page)
    return path


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        path = compare(Path(args.root), args.rev_a, args.rev_b, args.out)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"error: `{' '.join(map(str, exc.cmd))}` timed out", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve compare` on the CLI's subparsers."""
    c = sub.add_parser(
        "compare",
        help="compare two revisions or DVC experiments in one HTML page",
        description=(
            "Compare two runs: parameter and metric diffs and key figures side by side. "
            "REV_A and REV_B are git revisions (commit, branch, tag, HEAD~1) or DVC experiment "
            "names; REV_B may be `workspace`."
        ),
    )
    c.add_argument("rev_a", metavar="REV_A")
    c.add_argument("rev_b", metavar="REV_B")
    c.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="output file (default: reports/compare/<REV_A>_vs_<REV_B>.html under --root)",
    )
    c.set_defaults(func=cmd_compare)
    return c
