"""The `salve` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

from salve.config import Config
from salve.params_file import apply_overrides, fill_missing
from tasks import STAGE_ORDER, STAGES
from tasks.runner import StageOutcome, exit_code_reporting_errors


def _prepare(args: argparse.Namespace) -> tuple[Path, Config]:
    """Validate params.yaml with the --set overrides and the user's files, then write them.

    Nothing is written unless everything validated: a failed start leaves params.yaml as it was.
    The CPU kernels are pinned (salve/runtime.py) first, before any tensor operation.
    """
    from salve.runtime import pin_cpu_kernels
    from tasks.preflight import preflight

    root = Path(args.root).resolve()
    params = root / "params.yaml"

    def validate(c: Config) -> None:
        pin_cpu_kernels(c.common.reproducible)  # before any tensor operation (preflight's too)
        preflight(c, root)

    cfg = apply_overrides(params, args.set, check=validate)
    if args.set:
        print(f"params.yaml updated: {', '.join(args.set)}")
    added = fill_missing(params)
    if added:
        print(f"params.yaml: added missing keys with their defaults: {', '.join(added)}")
    from flows.contention import cpu_contention

    check = os.environ.get("SALVE_CPU_CHECK", "1") != "0"  # 0: the tests, which run side by side
    busy = check and cpu_contention(threads=cfg.common.num_threads or None)
    # torch's threads then compete with other work: say so (docs/PIPELINE.md, "Side by side")
    if busy:
        logging.getLogger("salve").warning(busy)
    return root, cfg


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal by default: in logs (cron, CI, files) every update would be a
    line. --progress forces them on, --no-progress off."""
    if args.progress is not None:
        return args.progress
    return sys.stderr.isatty()


def _print_total(seconds: float, root: Path) -> None:
    report = root / STAGES["report"].out_dir / "index.html"
    where = f"; report: {report.relative_to(root)}" if report.exists() else ""
    print(f"total {seconds:.1f} s{where}", flush=True)


def _all_fresh(root: Path, wanted: list[str]) -> list[StageOutcome] | None:
    """Outcomes of a no-op run when DVC finds every wanted stage up to date, else None.

    Starting a Prefect flow costs 7-14 s with no server running (its temporary API); when
    nothing is stale there is nothing for it to orchestrate, so none is started.
    """
    from tasks.dvcrepo import stale_stages

    t0 = time.perf_counter()
    if stale_stages(root, wanted):
        return None
    seconds = (time.perf_counter() - t0) / max(len(wanted), 1)
    outcomes = []
    for name in wanted:
        metrics = root / STAGES[name].metrics_file
        summary = json.loads(metrics.read_text()) if metrics.exists() else {}
        outcomes.append(StageOutcome(name, "skipped", seconds, summary))
    return outcomes


def _start(args: argparse.Namespace) -> Path:
    """Before anything else: the run log (Prefect not yet imported) and the signal handlers."""
    from flows import interrupt, logs

    root = Path(args.root).resolve()
    logs.configure(root, debug=args.debug)
    interrupt.install()
    return root


def _surely_stale(root: Path, wanted: list[str]) -> bool:
    """True when a wanted stage's output is missing (a fresh clone): no need to ask DVC."""
    return any(
        not (root / STAGES[s].out_dir).exists() or not (root / STAGES[s].metrics_file).exists()
        for s in wanted
    )


def _fresh_before_checks(root: Path, wanted: list[str]) -> list[StageOutcome] | None:
    """`_all_fresh` before the input is validated: None (a flow will likely run) when it cannot
    tell; a broken params.yaml is then reported by the checks, in their words."""
    if _surely_stale(root, wanted):
        return None
    try:
        return _all_fresh(root, wanted)
    except Exception:  # noqa: BLE001 - the start-up checks name the problem
        return None


def _import_for_the_flow(wanted: list[str]) -> None:
    """Import what the flow and its stages will, while Prefect's temporary API starts: in a
    fresh clone that server takes ~15 s and this process waited ~13 s of them idle, then
    compiled these modules' bytecode stage by stage."""
    import importlib

    from salve.tv import import_torchvision

    modules = ["prefect.flow_engine", "prefect.task_engine", "dvc.repo", "tasks.dvcrepo"]
    modules += [f"tasks.{name}" for name in wanted]
    if "fetch" in wanted:
        modules += ["sklearn.datasets"]  # the built-in digits
    if "evaluate" in wanted:
        modules += ["prefect_dask", "distributed", "sklearn.linear_model"]
    for name in modules:
        importlib.import_module(name)
    import_torchvision()


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def cmd_run(args: argparse.Namespace) -> int:
    from flows.api import TemporaryApi
    from tasks.runner import pipeline_lock

    root = _start(args)
    with pipeline_lock(root):  # before params.yaml is touched: runs must not overlap
        os.chdir(root)  # Prefect reads its settings (prefect.toml) from here
        t0 = time.perf_counter()
        wanted = [s for s in STAGE_ORDER if not args.stages or s in args.stages]
        may_skip = not (args.force or args.always_flow or args.set)
        fresh = _fresh_before_checks(root, wanted) if may_skip else None
        params_before = _read_bytes(root / "params.yaml")
        # A flow will run: its temporary API comes up on the other core while the checks run.
        api = TemporaryApi.launch_if_needed(root) if fresh is None else None
        try:
            _prepare(args)
        except BaseException:
            if api is not None:
                api.stop()
            raise
        if fresh is not None and _read_bytes(root / "params.yaml") != params_before:
            fresh = _all_fresh(root, wanted)  # the checks added missing keys: ask again
        if fresh is not None:
            for outcome in fresh:
                print(outcome.line())
            _print_total(time.perf_counter() - t0, root)
            print("every stage is up to date: no flow started (--always-flow to start one)")
            return 0
        from flows.pipeline import pipeline

        meanwhile = functools.partial(_import_for_the_flow, wanted)
        with api.serving(meanwhile) if api is not None else contextlib.nullcontext():
            pipeline(
                root=str(root),
                stages=args.stages or None,
                force=args.force or None,
                progress=_progress(args),
            )
    _print_total(time.perf_counter() - t0, root)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.runner import pipeline_lock, run_stage

    root = _start(args)
    with pipeline_lock(root):
        _, cfg = _prepare(args)
        outcome = run_stage(
            args.name,
            cfg,
            root,
            force=args.force,
            progress=_progress(args),
        )
    print(outcome.line())
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from tasks.dvcfile import render_all

    rendered = {Path(args.root) / rel: text for rel, text in render_all().items()}
    if args.check:
        stale = [p for p, text in rendered.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path} is out of date: run `salve dvc-yaml`", file=sys.stderr)
        return 1 if stale else 0
    from salve.io import write_text

    for path, text in rendered.items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, text)
            print(f"wrote {path}")
    return 0


START, END = "<!-- params-doc:start -->", "<!-- params-doc:end -->"


def cmd_params_doc(args: argparse.Namespace) -> int:
    from salve.config import params_markdown

    text = params_markdown()
    if not args.write:
        print(text)
        return 0
    path = Path(args.write)
    doc = path.read_text(encoding="utf-8")
    if START not in doc or END not in doc:
        print(f"error: {path} has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = doc.split(START, 1)
    tail = rest.split(END, 1)[1]
    from salve.io import write_text

    write_text(path, f"{head}{START}\n{text}\n{END}{tail}")
    print(f"updated the parameter reference in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="salve",
        description="SALVE pipeline: fine-tune, extract, fit an SAE, rank, edit, report.",
    )
    p.add_argument("--root", default=".", help="repository root (holds params.yaml)")
    p.add_argument(
        "--debug",
        action="store_true",
        help="Prefect's log and full tracebacks on the terminal (else in .salve/logs/run.log)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="validate, then write into params.yaml (as `dvc exp run -S`)",
        )
        sp.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show progress bars (default: only when stderr is a terminal)",
        )

    r = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    common(r)
    r.add_argument("--stages", nargs="+", choices=STAGE_ORDER, help="only these stages")
    r.add_argument(
        "--force",
        nargs="+",
        choices=STAGE_ORDER,
        default=[],
        help="rerun these stages even if up to date",
    )
    r.add_argument(
        "--always-flow",
        action="store_true",
        help="start a Prefect flow run even when every stage is up to date",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", help="run one stage (no Prefect), skipping it when up to date")
    common(s)
    s.add_argument("name", choices=list(STAGES))
    s.add_argument("--force", action="store_true", help="rerun even if up to date")
    s.set_defaults(func=cmd_stage)

    d = sub.add_parser(
        "dvc-yaml", help="regenerate dvc.yaml and study/dvc.yaml from the stage registry"
    )
    d.add_argument("--check", action="store_true", help="exit 1 if either is out of date")
    d.set_defaults(func=cmd_dvc_yaml)

    pd = sub.add_parser("params-doc", help="print the parameter reference as Markdown")
    pd.add_argument("--write", metavar="FILE", help="replace the marked block in FILE instead")
    pd.set_defaults(func=cmd_params_doc)

    from flows.schedule import add_schedule_parser

    add_schedule_parser(sub)
    from flows.compare import add_compare_parser, add_diff_parser, add_exps_parser

    add_compare_parser(sub)
    from flows.study import add_study_parser

    add_study_parser(sub)
    add_diff_parser(sub)
    add_exps_parser(sub)
    from flows.docs import add_docs_parser

    add_docs_parser(sub)
    return p


def _salve_console_logging() -> None:
    """salve's own warnings (e.g. fetch's one-line scan summary) on the terminal; its info
    records only in the run log."""
    log = logging.getLogger("salve")
    log.setLevel(logging.INFO)
    if not any(getattr(h, "salve_console", False) for h in log.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("warning: %(message)s"))
        console.salve_console = True
        log.addHandler(console)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _salve_console_logging()
    root = Path(getattr(args, "root", ".")).resolve()
    return exit_code_reporting_errors(lambda: args.func(args), debug=args.debug, root=root)


if __name__ == "__main__":
    sys.exit(main())
