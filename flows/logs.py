"""Where `salve run`'s log records go: a file per repository, one line per stage on the terminal.

Prefect logs every task failure with its traceback and every state change ("Finished in state
Completed()"), and DVC logs "Updating lock file" per stage; on a terminal that buried the one line
that mattered (a truncated PNG gave 190 lines). `configure` points Prefect's logging config
(flows/logging.yml) at `.salve/logs/run.log` before Prefect is imported; `--debug` keeps Prefect's
console output and prints tracebacks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_ENV = "SALVE_RUN_LOG"
CONFIG = Path(__file__).with_name("logging.yml")


def run_log_path(root: Path) -> Path:
    return Path(root) / ".salve" / "logs" / "run.log"


class RunLogHandler(logging.FileHandler):
    """Appends to the file named by $SALVE_RUN_LOG (set by `configure`)."""

    def __init__(self, *args, **kwargs) -> None:
        path = Path(os.environ.get(LOG_ENV) or run_log_path(Path.cwd()))
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, mode="a", encoding="utf-8", delay=True)


def configure(root: Path, *, debug: bool) -> Path | None:
    """Route Prefect's and DVC's logging to the run log; call before importing Prefect."""
    if debug:
        return None
    path = run_log_path(root)
    os.environ[LOG_ENV] = str(path)
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(CONFIG)
    if "prefect" in __import__("sys").modules:  # already configured: apply ours now
        from prefect.logging.configuration import setup_logging

        setup_logging(incremental=False)
    return path
