"""Comparing versions of the pipeline: `salve compare`, `salve diff` and `salve exps`.

- `salve compare REV_A REV_B`: one HTML page (reports/compare/, git-ignored). It leads with the
  parameter diff, then every key metric (tasks/keymetrics.py) with direction and judgement, then
  the rest of the metric diff by stage, collapsed, and the key figures of both revisions side by
  side, redrawn from the plots files committed at each revision.
- `salve diff [REV]`: the same story on the terminal, REV (default HEAD) against the workspace.
- `salve exps`: DVC experiments (and their baseline commits) as one table holding only the
  parameters that differ between them and the key metrics; plain text within 100 columns, or
  Markdown with --md.

A revision is anything `git rev-parse` understands (commit, branch, tag, HEAD~1) or the name of a
DVC experiment. Every DVC operation goes through tasks/dvcrepo.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

from tasks.dvcrepo import (
    WORKSPACE,
    DvcError,
    experiments,
    find_root,
    metrics_diff,
    params_diff,
    read_text_at,
    resolve_revision,
)
from tasks.runner import PipelineBusyError


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
        finetune_epochs=_csv_rows(read_text_at(root, sha, "plots/finetune/epochs.csv")),
        edit_curve_rows=_csv_rows(read_text_at(root, sha, "plots/edit/curves.csv")),
        edit_metrics=_json(read_text_at(root, sha, "metrics/edit.json")),
        alpha_samples=_csv_rows(read_text_at(root, sha, "plots/alpha_crit/samples.csv")),
    )


def key_metrics_for(root: Path, *revs: str):
    """The key metrics with accuracy-like noise floors set from N_val at these revisions."""
    from tasks.keymetrics import VAL_SAMPLES, key_metrics, val_samples

    file = VAL_SAMPLES[0]
    return key_metrics(val_samples(*({file: _json(read_text_at(root, r, file))} for r in revs)))


def _slug(rev: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rev).strip("_.") or "rev"


def default_output(root: Path, rev_a: str, rev_b: str) -> Path:
    return root / "reports" / "compare" / f"{_slug(rev_a)}_vs_{_slug(rev_b)}.html"


def compare(root: Path, rev_a: str, rev_b: str, out: Path | None = None) -> Path:
    """Write the comparison page of ``rev_a`` and ``rev_b``; returns its path."""
    from salve.compare import build_compare_page
    from salve.io import write_text
    from tasks.keymetrics import metrics_files

    root = find_root(root)
    if rev_a == WORKSPACE:
        raise DvcError("`workspace` can only be the second revision (compare REV workspace)")
    sha_a = resolve_revision(root, rev_a)
    sha_b = resolve_revision(root, rev_b)
    page = build_compare_page(
        load_revision(root, rev_a, sha_a),
        load_revision(root, rev_b, sha_b),
        params_diff(root, sha_a, sha_b),
        metrics_diff(root, sha_a, sha_b, unchanged=True),  # key metrics show both values
        key_metrics_for(root, sha_a, sha_b),
        file_order=metrics_files(),
    )
    path = Path(out) if out else default_output(root, rev_a, rev_b)
    write_text(path, page)
    return path


def diff_text(
    root: Path, rev: str = "HEAD", *, show_all: bool = False, markdown: bool = False
) -> str:
    """`salve diff`: REV against the workspace, as terminal text (or Markdown)."""
    from salve.compare import metrics_diff_markdown, metrics_diff_text
    from tasks.keymetrics import metrics_files

    root = find_root(root)
    sha = resolve_revision(root, rev)
    if sha == WORKSPACE:
        raise DvcError("`salve diff` compares a revision with the workspace: name a revision")
    args = (
        params_diff(root, sha, WORKSPACE),
        metrics_diff(root, sha, WORKSPACE, unchanged=True),
        key_metrics_for(root, sha, WORKSPACE),
    )
    labels = {"old_label": rev, "new_label": WORKSPACE, "file_order": metrics_files()}
    if markdown:
        return metrics_diff_markdown(*args, **labels)
    head = f"{rev} ({sha[:10]}) -> workspace\n\n"
    return head + metrics_diff_text(*args, **labels, show_all=show_all)


def exps_text(
    root: Path, rev: str = "HEAD", num: int = 1, all_commits: bool = False, markdown: bool = False
) -> str:
    """`salve exps`: the experiments of ``num`` commits from ``rev`` by their key metrics."""
    from salve.compare import experiments_table
    from tasks.keymetrics import key_metrics, val_samples

    rows = experiments(root, rev=rev, num=num, all_commits=all_commits)
    # The workspace only when it holds something its baseline does not.
    work = [r for r in rows if r.name == WORKSPACE]
    base = next((r for r in rows if r.baseline and r.name != WORKSPACE), None)
    if work and base and (work[0].params, work[0].metrics) == (base.params, base.metrics):
        rows = [r for r in rows if r.name != WORKSPACE]
    kms = key_metrics(val_samples(*(r.metrics for r in rows)))
    return experiments_table(rows, kms, markdown=markdown)


def _run(fn, *args, **kwargs) -> int:
    """One line on stderr and exit status 1 for the errors a user can act on."""
    try:
        result = fn(*args, **kwargs)
    except (DvcError, PipelineBusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result, end="" if str(result).endswith("\n") else "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    def run() -> str:
        path = compare(Path(args.root), args.rev_a, args.rev_b, args.out)
        return f"wrote {path}"

    return _run(run)


def cmd_diff(args: argparse.Namespace) -> int:
    return _run(diff_text, Path(args.root), args.rev, show_all=args.all, markdown=args.md)


def cmd_exps(args: argparse.Namespace) -> int:
    return _run(
        exps_text,
        Path(args.root),
        rev=args.rev,
        num=args.num,
        all_commits=args.all_commits,
        markdown=args.md,
    )


def add_compare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve compare` on the CLI's subparsers."""
    c = sub.add_parser(
        "compare",
        help="compare two revisions or DVC experiments in one HTML page",
        description=(
            "Compare two runs: parameter changes, key metrics, the other metric changes by "
            "stage and key figures side by side. REV_A and REV_B are git revisions (commit, "
            "branch, tag, HEAD~1) or DVC experiment names; REV_B may be `workspace`."
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


def add_diff_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve diff` on the CLI's subparsers."""
    d = sub.add_parser(
        "diff",
        help="what changed between a revision and the workspace: params, key metrics, the rest",
        description=(
            "Compare REV (default HEAD) with the workspace on the terminal: the parameter "
            "changes, every key metric with direction and judgement, then one line per stage "
            "for the other metric changes."
        ),
    )
    d.add_argument("rev", nargs="?", default="HEAD", metavar="REV")
    d.add_argument("--all", action="store_true", help="list every other metric change too")
    d.add_argument("--md", action="store_true", help="Markdown (as the nightly artifact)")
    d.set_defaults(func=cmd_diff)
    return d


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive number of commits")
    return value


def add_exps_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve exps` on the CLI's subparsers."""
    e = sub.add_parser(
        "exps",
        help="DVC experiments by their changed parameters and key metrics",
        description=(
            "List DVC experiments (and their baseline commits) with only the parameters that "
            "differ between them and the key metrics: plain text within 100 columns, or "
            "Markdown with --md."
        ),
    )
    e.add_argument("--rev", default="HEAD", help="baseline commit (default: %(default)s)")
    e.add_argument(
        "-n",
        "--num",
        type=_positive_int,
        default=1,
        metavar="N",
        help="experiments of the last N commits from --rev (default: %(default)s)",
    )
    e.add_argument("--all-commits", action="store_true", help="experiments of every commit")
    e.add_argument("--md", action="store_true", help="one Markdown table")
    e.set_defaults(func=cmd_exps)
    return e
