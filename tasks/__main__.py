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
from tasks.preflight import preflight
from tasks.runner import exit_code_reporting_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run() -> int:
        root = Path(args.params).resolve().parent
        cfg = load(args.params)
        pin_cpu_kernels(cfg.common.reproducible)  # before any tensor operation (preflight's too)
        preflight(cfg, root)
        module = importlib.import_module(f"tasks.{args.stage}")
        summary = module.run(cfg, root, progress=not args.no_progress)
        print(json.dumps(summary, indent=1, default=str))
        return 0

    return exit_code_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
