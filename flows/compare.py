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
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

from tasks import STAGES
from tasks.dvcrepo import (
    WORKSPACE,
    DvcError,
    experiments,
    find_root,
    metrics_diff,
    params_diff,
    read_bytes_at,
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
    from salve.present.compare.page import RevisionData

    return RevisionData(
        label=label,
        sha=sha,
        finetune_epochs=_csv_rows(read_text_at(root, sha, "plots/finetune/epochs.csv")),
        edit_curve_rows=_csv_rows(read_text_at(root, sha, "plots/edit/curves.csv")),
        edit_metrics=_json(read_text_at(root, sha, "metrics/edit.json")),
        alpha_samples=_csv_rows(read_text_at(root, sha, "plots/alpha_crit/samples.csv")),
    )


def _rel(stage: str, role: str) -> str:
    return f"{STAGES[stage].out_dir}/{STAGES[stage].files[role]}"


SAE_FILE, SAE_SIDECAR = _rel("fit_sae", "sae"), _rel("fit_sae", "sidecar")
RANKING, VAL_ACTS = _rel("rank", "ranking"), _rel("extract", "val")
BROWSER, REPORT = _rel("report", "latents"), _rel("report", "report")


def _strip(latent: int) -> str:
    """A latent's Grad-FAM strip (tasks/gradfam.py names it so)."""
    return f"{STAGES['gradfam'].out_dir}/latent_{latent}.png"


def _lock_stages(text: str | None) -> dict:
    from ruamel.yaml import YAMLError

    from salve.params_file import yaml_load

    try:
        lock = yaml_load(text) if text else {}
    except YAMLError:
        return {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    return stages if isinstance(stages, dict) else {}


def _recorded(stages: dict, stage: str, kind: str, path: str) -> str | None:
    """The md5 dvc.lock records for ``path`` among ``stage``'s outs or deps."""
    entries = (stages.get(stage) or {}).get(kind) or []
    return next((str(e["md5"]) for e in entries if e.get("path") == path and e.get("md5")), None)


def _made_from_this_sae(stages: dict, stage: str) -> bool:
    """Whether ``stage``'s recorded outputs were made from the SAE dvc.lock records (a stage
    run before the last fit_sae describes another SAE). Unrecorded: assumed so."""
    sae = STAGES["fit_sae"].out_dir
    used, made = _recorded(stages, stage, "deps", sae), _recorded(stages, "fit_sae", "outs", sae)
    return used is None or made is None or used == made


def load_features(root: Path, label: str, sha: str, page_dir: Path | None = None):
    """What the feature matching needs of one revision: its SAE's decoder, its codes on its val
    activations, its ranking and which activations it read (dvc.lock). With ``page_dir`` (where
    the compare page goes), a link to its latent browser too."""
    import torch
    from safetensors.torch import load as load_safetensors

    from salve.present.compare.features import FeatureSide
    from salve.sae import sae_from_tensors

    stages = _lock_stages(read_text_at(root, sha, "dvc.lock"))
    wanted = [SAE_FILE, SAE_SIDECAR, RANKING, VAL_ACTS]
    if page_dir is not None:
        wanted += [BROWSER, REPORT]
    data = read_bytes_at(root, sha, wanted)
    side = FeatureSide(
        stage_outputs={
            s: md5 for s in STAGES if (md5 := _recorded(stages, s, "outs", STAGES[s].out_dir))
        }
    )
    sae = None
    if data[SAE_FILE]:
        tensors = load_safetensors(data[SAE_FILE])
        if "decoder.weight" in tensors:  # W_dec [M, L] (salve.sae.base.WEIGHT_TENSORS)
            side.decoder_ml = tensors["decoder.weight"].to(torch.float64)
        try:  # its codes need its encode rule: an SAE salve cannot rebuild has none
            info = json.loads(data[SAE_SIDECAR] or b"{}")
            sae = sae_from_tensors(tensors, info.get("encode") or info["kind"], info.get("k", 0))
        except (ValueError, KeyError, RuntimeError):
            sae = None
    if data[RANKING] and _made_from_this_sae(stages, "rank"):
        ranking = json.loads(data[RANKING])
        side.classes = [str(c) for c in ranking["classes"]]
        dominant = sorted(ranking["dominant"], key=lambda d: int(d["class"]))
        side.dominant = [int(d["feature"]) for d in dominant]
        side.cross_class = list(ranking.get("cross_class") or [])
    acts = load_safetensors(data[VAL_ACTS]).get("acts") if data[VAL_ACTS] else None
    if sae is not None and acts is not None and acts.shape[1] == sae.W_dec.shape[0]:
        with torch.no_grad():
            side.val_codes_nl = sae.encode_batched(acts.to(torch.float32)).to(torch.float64)
    if page_dir is not None:
        side.browser, side.browser_note = _browser(root, label, sha, page_dir, data)
    if not _made_from_this_sae(stages, "gradfam"):
        side.strips_note = "not available: gradfam at this revision ran on another SAE"
    return side


def _browser(
    root: Path, label: str, sha: str, page_dir: Path, data: dict
) -> tuple[str | None, str]:
    """The href of a revision's latent browser from the compare page, or where it is.

    The workspace's own browser when the revision's is the same file (or the revision is the
    workspace); else the revision's, read from DVC's cache and written beside the page
    (``revisions/<sha>/``, with its report and pictures, so the browser's links work); else a
    sentence."""
    here = root / BROWSER
    if sha == WORKSPACE or (
        data.get(BROWSER) and here.is_file() and here.read_bytes() == data[BROWSER]
    ):
        if here.is_file():
            return os.path.relpath(here, page_dir), ""
        return None, f"none in the workspace: run `salve run` to make {BROWSER}"
    if not data.get(BROWSER):
        return None, (
            f"not in this workspace or DVC's cache: check {label} out (`git checkout {sha[:10]}"
            f" && dvc checkout`, or `dvc exp apply {label}` for an experiment) and open {BROWSER}"
        )
    from salve.io import write_bytes
    from salve.present.latent_browser import page_images

    folder = page_dir / "revisions" / sha[:12]
    for rel in (BROWSER, REPORT):
        if data.get(rel):
            write_bytes(folder / Path(rel).name, data[rel])
    # Its pictures are files beside it (reports/latest/latents/): copied with it.
    out_dir = Path(BROWSER).parent
    pictures = [(out_dir / src).as_posix() for src in page_images(data[BROWSER].decode())]
    got = read_bytes_at(root, sha, pictures) if pictures else {}
    for rel, blob in got.items():
        if blob:
            write_bytes(folder / Path(rel).relative_to(out_dir), blob)
    return os.path.relpath(folder / Path(BROWSER).name, page_dir), ""


def _digest(blob: bytes | None) -> str | None:
    """A digest of a split's images and labels (not of the file: its header may differ)."""
    if not blob:
        return None
    from safetensors.torch import load as load_safetensors

    t = load_safetensors(blob)
    h = hashlib.sha256()
    for name in ("images", "labels"):
        if name not in t:
            return None
        h.update(t[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def shared_val_images(root: Path, sha_a: str, sha_b: str, fa, fb) -> bool:
    """Whether both revisions hold the same val images in the same order (fetch's outputs equal,
    else the images themselves compared)."""
    x, y = fa.stage_outputs.get("fetch"), fb.stage_outputs.get("fetch")
    if x is not None and x == y:
        return True
    val = _rel("fetch", "val")
    da = _digest(read_bytes_at(root, sha_a, [val])[val])
    return da is not None and da == _digest(read_bytes_at(root, sha_b, [val])[val])


def feature_matches(root: Path, revs: tuple[tuple[str, str], tuple[str, str]], page_dir=None):
    """Load both revisions' features and match them: ``revs`` is ((label, sha), (label, sha)).
    Returns the two RevisionData-ready FeatureSides and the FeatureMatches."""
    from salve.present.compare.features import match_features
    from salve.present.compare.page import RevisionData

    (la, sa), (lb, sb) = revs
    fa, fb = load_features(root, la, sa, page_dir), load_features(root, lb, sb, page_dir)
    shared = None
    if fa.val_codes_nl is not None and fb.val_codes_nl is not None:
        shared = shared_val_images(root, sa, sb, fa, fb)
    fm = match_features(
        RevisionData(la, sa, features=fa),
        RevisionData(lb, sb, features=fb),
        shared_val_images=shared,
    )
    if page_dir is not None:
        want_a, want_b = fm.strip_latents()
        for f, sha, want in ((fa, sa, want_a), (fb, sb, want_b)):
            if want and not f.strips_note:
                got = read_bytes_at(root, sha, [_strip(lat) for lat in sorted(want)])
                f.strips = {lat: got[_strip(lat)] for lat in want if got[_strip(lat)]}
                if len(f.strips) < len(want):
                    f.strips_note = "not available at this revision"
    return fa, fb, fm


def dominant_survival(root: Path, rev_a: str, rev_b: str = WORKSPACE) -> str:
    """One Markdown line: how many classes' dominant features in ``rev_a`` survived in
    ``rev_b`` (the nightly artifact's)."""
    from salve.present.compare.features import features_markdown

    root = find_root(root)
    sha_a = resolve_revision(root, rev_a)
    sha_b = resolve_revision(root, rev_b)
    _, _, fm = feature_matches(root, ((rev_a, sha_a), (rev_b, sha_b)))
    return features_markdown(fm, rev_a)


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
    from salve.io import write_text
    from salve.present.compare.page import build_compare_page
    from tasks.keymetrics import metrics_files

    root = find_root(root)
    if rev_a == WORKSPACE:
        raise DvcError("`workspace` can only be the second revision (compare REV workspace)")
    sha_a = resolve_revision(root, rev_a)
    sha_b = resolve_revision(root, rev_b)
    path = Path(out) if out else default_output(root, rev_a, rev_b)
    a, b = load_revision(root, rev_a, sha_a), load_revision(root, rev_b, sha_b)
    a.features, b.features, features = feature_matches(
        root, ((rev_a, sha_a), (rev_b, sha_b)), path.resolve().parent
    )
    page = build_compare_page(
        a,
        b,
        params_diff(root, sha_a, sha_b),
        metrics_diff(root, sha_a, sha_b, unchanged=True),  # key metrics show both values
        key_metrics_for(root, sha_a, sha_b),
        file_order=metrics_files(),
        features=features,
    )
    write_text(path, page)
    return path


def diff_text(
    root: Path, rev: str = "HEAD", *, show_all: bool = False, markdown: bool = False
) -> str:
    """`salve diff`: REV against the workspace, as terminal text (or Markdown)."""
    from salve.present.compare.text import metrics_diff_markdown, metrics_diff_text
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
    from salve.present.compare.experiments import experiments_table
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
