"""`salve schedule`: serve the nightly flow (flows/nightly.py) on a cron or interval schedule.

Schedules live on a Prefect server: `flow.serve` registers a deployment there and then polls it for
due runs, executing each in a subprocess in the repository. The temporary API that plain flow runs
start cannot schedule, so this command refuses at once, with instructions, when PREFECT_API_URL is
not set or the server does not answer.

Its deployment is `salve-nightly/scheduled` by default, apart from the work-pool deployments that
`prefect deploy --all` creates from prefect.yaml (`salve-nightly/salve-nightly`, ...): Prefect
identifies a deployment by flow and name, so two sources using one name would silently overwrite
each other. Choosing such a name with --name, or one the server already holds for a work pool,
prints a warning naming the deployment that would be taken over.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

DEFAULT_DEPLOYMENT = "scheduled"
FLOW_NAME = "salve-nightly"
HEALTH_TIMEOUT_S = 5.0

_HOW_TO = (
    "start one with `prefect server start` (UI and API on http://127.0.0.1:4200) and point this "
    "shell at it: `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
    "(or `prefect config set PREFECT_API_URL=...`). See docs/OPERATIONS.md."
)


class ServerUnavailableError(RuntimeError):
    """No reachable Prefect server: schedules cannot be served."""


def check_server(timeout: float = HEALTH_TIMEOUT_S) -> str:
    """Return the configured API URL after its `/health` endpoint answered, else raise."""
    import httpx
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    url = (api.url or "").rstrip("/")
    if not url:
        raise ServerUnavailableError(
            "PREFECT_API_URL is not set: `salve schedule` needs a running Prefect server "
            "(the temporary API of a plain `salve run` cannot schedule); " + _HOW_TO
        )
    headers = {}
    if api.key is not None:
        headers["Authorization"] = f"Bearer {api.key.get_secret_value()}"
    elif api.auth_string is not None:
        token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        resp = httpx.get(f"{url}/health", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServerUnavailableError(
            f"the Prefect server at PREFECT_API_URL={url} is not reachable "
            f"({type(exc).__name__}: {exc}); " + _HOW_TO
        ) from exc
    if resp.status_code != 200:
        raise ServerUnavailableError(
            f"the Prefect server at PREFECT_API_URL={url} answered /health with HTTP "
            f"{resp.status_code}; is this the API URL (ending in /api)? " + _HOW_TO
        )
    return url


def _check_cron(expr: str, timezone: str) -> str | None:
    """An error message for an invalid cron expression or timezone, else None."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=expr, timezone=timezone)
    except ValidationError as exc:
        return "; ".join(e["msg"] for e in exc.errors())
    return None


def prefect_yaml_deployments(root: Path) -> dict[str, str]:
    """Deployment name -> flow entrypoint declared in ``root``/prefect.yaml (empty if none)."""
    from salve.params_file import yaml_load

    path = root / "prefect.yaml"
    if not path.is_file():
        return {}
    spec = yaml_load(path.read_text(encoding="utf-8")) or {}
    return {
        str(d.get("name")): str(d.get("entrypoint", ""))
        for d in spec.get("deployments") or []
        if isinstance(d, dict)
    }


def takeover_warnings(root: Path, name: str, existing_pool: str | None = None) -> list[str]:
    """Why serving `salve-nightly/NAME` would replace a deployment someone else manages:
    prefect.yaml declares that name for the nightly flow, or the server holds it on a work pool
    (``existing_pool``, as `prefect deploy` leaves it; served deployments have none)."""
    full = f"{FLOW_NAME}/{name}"
    out = []
    entry = prefect_yaml_deployments(root).get(name)
    if entry is not None and entry.endswith(":nightly"):
        out.append(
            f"deployment {full} is also declared in prefect.yaml: `prefect deploy --all` and "
            f"`salve schedule --name {name}` would overwrite each other (keep the default "
            f"--name {DEFAULT_DEPLOYMENT} for a served schedule)"
        )
    if existing_pool:
        out.append(
            f"deployment {full} exists on the server on work pool {existing_pool!r}: serving "
            "it here takes it over (its runs would stop going to that pool's workers)"
        )
    return out


def _existing_pool(name: str) -> str | None:
    """The work pool of the server's deployment `salve-nightly/NAME`, None if absent or served."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{FLOW_NAME}/{name}").work_pool_name
        except ObjectNotFound:
            return None


def cmd_schedule(args: argparse.Namespace) -> int:
    from salve.config import load

    root = Path(args.root).resolve()
    load(root / "params.yaml")  # validate before registering anything
    if args.cron and (problem := _check_cron(args.cron, args.timezone)):
        print(f"error: --cron {args.cron!r} --timezone {args.timezone}: {problem}", file=sys.stderr)
        return 2
    # Served runs execute in subprocesses that inherit this working directory, and Prefect
    # reads this repository's prefect.toml (its home, .prefect) from here.
    os.chdir(root)
    try:
        url = check_server()
    except ServerUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    for warning in takeover_warnings(root, args.name, _existing_pool(args.name)):
        print(f"warning: {warning}", file=sys.stderr)

    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    from flows.nightly import nightly

    if args.cron:
        schedule = Cron(args.cron, timezone=args.timezone)
        when = f"cron {args.cron!r} {args.timezone}"
    else:
        schedule = Interval(args.interval)
        when = f"every {args.interval:g} s"
    print(f"serving deployment {FLOW_NAME}/{args.name} ({when}) for {root} against {url}")
    print("stop with Ctrl-C (its schedule is paused on shutdown)", flush=True)
    nightly.serve(
        name=args.name,
        schedule=schedule,
        parameters={
            "root": str(root),
            "remote": args.remote,
            "push": not args.no_push,
            "with_study": args.with_study,
        },
        limit=1,  # one run at a time: overlapping runs would share the workspace and DVC cache
        description=f"SALVE nightly rerun of {root}",
        tags=["salve"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return 0


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--interval must be a positive number of seconds")
    return value


def add_schedule_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `salve schedule` on the CLI's subparsers."""
    s = sub.add_parser(
        "schedule",
        help="serve the nightly flow (pull, run, push, metrics diff) on a schedule",
        description=(
            "Serve the nightly flow on a cron or interval schedule. Needs a running Prefect "
            "server (`prefect server start`) and PREFECT_API_URL pointing at it."
        ),
    )
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help='cron expression, e.g. "0 3 * * *"')
    when.add_argument(
        "--interval", type=_positive_seconds, metavar="SECONDS", help="run every SECONDS seconds"
    )
    s.add_argument(
        "--timezone",
        default="UTC",
        metavar="TZ",
        help="IANA timezone of --cron, e.g. Europe/Paris (default: %(default)s)",
    )
    s.add_argument(
        "--name",
        default=DEFAULT_DEPLOYMENT,
        help=f"deployment name, served as {FLOW_NAME}/NAME (default: %(default)s; prefect.yaml's "
        f"work-pool deployment is {FLOW_NAME}/{FLOW_NAME})",
    )
    s.add_argument(
        "--remote",
        default=None,
        help="DVC remote to pull from and push to (default: the repository's default remote)",
    )
    s.add_argument("--no-push", action="store_true", help="do not `dvc push` after the run")
    s.add_argument(
        "--with-study",
        action="store_true",
        help="also run the study's stages (`salve study`) after the pipeline, before the push",
    )
    s.set_defaults(func=cmd_schedule)
    return s
