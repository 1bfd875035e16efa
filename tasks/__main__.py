"""`python -m tasks STAGE`: run one stage's body, as dvc.yaml's commands do (no Prefect)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from salve.config import ConfigError, load
from tasks import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import importlib

    from tasks.runner import user_errors

    root = Path(args.params).resolve().parent
    try:
        summary = importlib.import_module(f"tasks.{args.stage}").run(
            cfg, root, progress=not args.no_progress
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
