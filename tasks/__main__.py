"""`python -m tasks STAGE`: run one stage's body, as dvc.yaml's commands do (no Prefect)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from salve.config import load
from salve.runtime import pin_cpu_kernels
from tasks import STAGES
from tasks.dvcrepo import restore_recorded_outputs
from tasks.preflight import preflight
from tasks.runner import exit_code_reporting_errors, pipeline_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    root = Path(args.params).resolve().parent

    def run() -> int:
        # The same lock as `salve run`: a `dvc repro` started while salve runs refuses here.
        with pipeline_lock(root):
            try:
                cfg = load(args.params)
                pin_cpu_kernels(cfg.common.reproducible)  # before any tensor operation
                preflight(cfg, root)
                module = importlib.import_module(f"tasks.{args.stage}")
                summary = module.run(cfg, root, progress=not args.no_progress)
            except BaseException:
                # `dvc repro` deleted this stage's outputs before running this command: a
                # refused or failed run puts back what dvc.lock records, so nothing is lost.
                restored = restore_recorded_outputs(root, args.stage)
                if restored:
                    print(
                        f"restored {', '.join(restored)} as dvc.lock records them",
                        file=sys.stderr,
                    )
                raise
        print(json.dumps(summary, indent=1, default=str))
        return 0

    return exit_code_reporting_errors(run, root=root)


if __name__ == "__main__":
    sys.exit(main())
