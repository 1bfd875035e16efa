"""Pipeline benchmarks: stages cold and warm, extraction, SAE fitting, Grad-FAM, Prefect overhead,
fine-tuning throughput. `benchmarks/run_all.py` runs them all and writes the tables.

Every function returns a JSON-able dict; every ratio is computed from measurements taken in the
same run. Timings are wall-clock (`time.perf_counter`); the best of `repeats` runs is reported
where a measurement is repeated (the least noisy estimate of the cost on a shared machine).
Nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PROJECT_FILES = ("salve", "tasks", "flows", "dvc.yaml", "prefect.toml", "pyproject.toml")

# --quick: a project small enough to run every stage in well under a minute.
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "data": {"image_size": 32, "max_per_class": 12},
    "finetune": {"epochs": 1},
    "sae": {"width": 32, "epochs": 20, "batch_size": 64},
    "rank": {"top_n": 3},
    "edit": {"alpha_steps": 6},
    "alpha_crit": {"grid_steps": 11, "verify_samples": 8},
    "gradfam": {"top_k": 2, "am_steps": 3},
}


# --------------------------------------------------------------------------------------------
# Machine and timing helpers
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    from salve.tv import import_torchvision

    torchvision = import_torchvision()
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PYTHONUNBUFFERED="1",
    )
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env.setdefault(key, "salve-bench")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(key, "bench@salve.invalid")
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


# Forks and execs the command from a bare interpreter, then reports its wait4 figures. Started
# straight from this process instead, a child would report at least *our* resident size: Linux
# carries the forking process's peak into the child's ru_maxrss at exec (torch makes that ~300 MiB).
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    fh.write(f"{wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(
    cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: float = 3600
) -> dict[str, Any]:
    """Run `cmd`; wall time, exit status and peak RSS (ru_maxrss from wait4, in MiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as result, open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            [PYTHON, "-S", "-c", _LAUNCHER, result.name, *cmd],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"wall_s": timeout, "maxrss_mib": float("nan"), "rc": "timeout"}
        wall, maxrss_kib, rc = result.read().split()
    return {"wall_s": float(wall), "maxrss_mib": int(maxrss_kib) / 1024, "rc": int(rc)}


def log_tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Projects
# --------------------------------------------------------------------------------------------


def make_project(dest: Path, overlay: dict[str, dict[str, Any]] | None, log: Path) -> Path:
    """A fresh git + DVC repository with this project's code and params.yaml (+ overlay)."""
    from ruamel.yaml import YAML

    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    yaml = YAML()
    params = yaml.load((REPO / "params.yaml").read_text())
    for section, values in (overlay or {}).items():
        for key, value in values.items():
            params[section][key] = value
    with open(dest / "params.yaml", "w") as fh:
        yaml.dump(params, fh)
    env = child_env()
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        [PYTHON, "-m", "dvc", "init", "-q"],
        [PYTHON, "-m", "dvc", "config", "core.autostage", "true"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "benchmark project"],
    ):
        out = run_measured(cmd, cwd=dest, env=env, log=log, timeout=300)
        if out["rc"]:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log_tail(log)}")
    return dest


def stage_names() -> list[str]:
    from tasks import STAGE_ORDER

    return list(STAGE_ORDER)


def bench_stages(workdir: Path, overlay: dict | None) -> tuple[dict[str, Any], Path, list[str]]:
    """Cold: `python -m tasks NAME` per stage, each in its own process, in DAG order, then
    `dvc commit`. Warm: `salve run` with everything fresh, and `salve stage NAME` per stage.

    Returns the results, the project (every stage fresh) and the stages that ran.
    """
    log = workdir / "stages.log"
    root = make_project(workdir / "project", overlay, log)
    env = child_env(PREFECT_HOME=str(workdir / "prefect-home"))
    cold, ran = [], []
    for name in stage_names():
        if not (REPO / "tasks" / f"{name}.py").exists():
            cold.append({"stage": name, "error": "no tasks module"})
            break
        m = run_measured([PYTHON, "-m", "tasks", name, "--no-progress"], cwd=root, env=env, log=log)
        row = {"stage": name} | m
        if m["rc"]:
            row["error"] = log_tail(log, 600)
            cold.append(row)
            break
        cold.append(row)
        ran.append(name)
    commit = run_measured(
        [PYTHON, "-m", "dvc", "commit", "-f", *ran], cwd=root, env=env, log=log, timeout=900
    )
    warm_run = run_measured(
        [PYTHON, "-m", "flows.cli", "--root", str(root), "run", "--stages", *ran, "--no-progress"],
        cwd=root,
        env=env,
        log=log,
    )
    warm = []
    for name in ran:
        m = run_measured(
            [PYTHON, "-m", "flows.cli", "--root", str(root), "stage", name, "--no-progress"],
            cwd=root,
            env=env,
            log=log,
        )
        warm.append({"stage": name} | m)
    params = json.loads(
        subprocess.run(
            [PYTHON, "-c", "import json; from salve.config import load; "
             "print(json.dumps(load('params.yaml').to_dict()))"],
            cwd=root, capture_output=True, text=True, check=True, env=env,
        ).stdout
    )  # fmt: skip
    result = {
        "params": params,
        "cold": cold,
        "dvc_commit": commit,
        "warm_salve_run": warm_run,
        "warm_per_stage": warm,
        "cold_total_s": sum(r.get("wall_s", 0.0) for r in cold),
    }
    return result, root, ran


# --------------------------------------------------------------------------------------------
# Activation extraction vs the bare forward
# --------------------------------------------------------------------------------------------


def bench_extract(n: int, batch_size: int, image_size: int, repeats: int) -> dict[str, Any]:
    """salve.activations.extract_activations (uint8 in, normalised batch by batch, [N, 512] out)
    vs the bare forward: the same resnet18 with `fc = Identity` on already-normalised float
    batches, under `torch.inference_mode()`, at the same batch size."""
    from torch import nn

    from salve.activations import extract_activations
    from salve.data import IMAGENET_MEAN, IMAGENET_STD, normalise
    from salve.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=image_size).eval()
    bare = copy.deepcopy(model).eval()
    bare.fc = nn.Identity()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    x_all = normalise(images, IMAGENET_MEAN, IMAGENET_STD)

    def salve_path() -> torch.Tensor:
        return extract_activations(
            model, images, IMAGENET_MEAN, IMAGENET_STD, batch_size=batch_size, progress=False
        )

    def bare_path() -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                out.append(bare(x_all[start : start + batch_size]))
        return torch.cat(out)

    a, b = salve_path(), bare_path()  # warm-up, and the two must agree
    max_diff = float((a - b).abs().max())
    t_salve = t_bare = float("inf")
    for _ in range(max(1, repeats)):  # interleaved, so drifting load hits both alike
        t_salve = min(t_salve, best_of(salve_path, 1))
        t_bare = min(t_bare, best_of(bare_path, 1))
    return {
        "n": n,
        "batch_size": batch_size,
        "image_size": image_size,
        "salve_s": t_salve,
        "bare_s": t_bare,
        "salve_images_per_s": n / t_salve,
        "bare_images_per_s": n / t_bare,
        "throughput_ratio_salve_over_bare": t_bare / t_salve,
        "max_abs_diff": max_diff,
    }


# --------------------------------------------------------------------------------------------
# SAE fitting
# --------------------------------------------------------------------------------------------


def bench_sae(n: int, d: int, width: int, epochs: int, batch_size: int, k: int) -> dict[str, Any]:
    """salve.sae.fit_sae on post-ReLU-like random activations [n, d], every variant."""
    from salve.config import SaeConfig
    from salve.sae import SAE_KINDS, fit_sae

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(n, d, generator=g).relu()
    warm_up = SaeConfig(epochs=1, width=width)
    fit_sae(acts[:batch_size], warm_up, seed=0, progress=False)
    rows = []
    for kind in SAE_KINDS:
        s = SaeConfig(
            kind=kind, width=width, epochs=epochs, batch_size=batch_size, k=k, max_steps=0
        )
        t0 = time.perf_counter()
        fit_sae(acts, s, seed=0, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({"kind": kind, "seconds": seconds, "samples_per_s": n * epochs / seconds})
    info = {"n": n, "d": d, "width": width, "epochs": epochs, "batch_size": batch_size, "k": k}
    return info | {"rows": rows}


# --------------------------------------------------------------------------------------------
# Control: cached sweep vs backbone re-runs, exact alpha_crit vs brentq (bench_control.py)
# --------------------------------------------------------------------------------------------


def bench_control(workdir: Path, args: list[str]) -> dict[str, Any]:
    out = workdir / "bench_control.json"
    log = workdir / "bench_control.log"
    m = run_measured(
        [PYTHON, str(REPO / "benchmarks" / "bench_control.py"), "--out", str(out), *args],
        cwd=REPO,
        env=child_env(),
        log=log,
    )
    if m["rc"]:
        raise RuntimeError(f"bench_control.py failed:\n{log_tail(log)}")
    return json.loads(out.read_text()) | {"wall_s": m["wall_s"]}


# --------------------------------------------------------------------------------------------
# Grad-FAM: closed form vs autograd
# --------------------------------------------------------------------------------------------


def bench_gradfam(
    n: int, image_size: int, width: int, n_features: int, batch_size: int, repeats: int
) -> dict[str, Any]:
    """Per image: feature_maps + gradfam_closed_form vs gradfam_autograd (resnet18, relu SAE)."""
    from salve.config import SaeConfig
    from salve.gradfam import feature_maps, gradfam_autograd, gradfam_closed_form
    from salve.models import build_model, penultimate
    from salve.sae import init_sae

    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=image_size).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, image_size, image_size, generator=g)
    with torch.no_grad():
        acts = penultimate(model, x)
    sae = init_sae(acts, SaeConfig(kind="relu", width=width), seed=0).eval()
    feats = list(range(n_features))

    def closed() -> torch.Tensor:
        return torch.cat(
            [
                gradfam_closed_form(feature_maps(model, x[i : i + batch_size]), sae, feats)
                for i in range(0, n, batch_size)
            ]
        )

    def autograd() -> torch.Tensor:
        return gradfam_autograd(model, sae, x, feats, batch_size=batch_size, layer="pooled")

    a, b = closed(), autograd()
    scale = float(b.abs().max()) or 1.0
    t_closed = t_auto = float("inf")
    for _ in range(max(1, repeats)):
        t_closed = min(t_closed, best_of(closed, 1))
        t_auto = min(t_auto, best_of(autograd, 1))
    return {
        "n_images": n,
        "image_size": image_size,
        "features": n_features,
        "batch_size": batch_size,
        "closed_form_ms_per_image": 1e3 * t_closed / n,
        "autograd_ms_per_image": 1e3 * t_auto / n,
        "speedup_closed_over_autograd": t_auto / t_closed,
        "max_rel_diff": float((a - b).abs().max()) / scale,
        "nonzero_fraction": float((b > 0).double().mean()),
    }


# --------------------------------------------------------------------------------------------
# Prefect overhead
# --------------------------------------------------------------------------------------------

_FLOW_CHILD = """
import json, sys, time
t0 = time.perf_counter()
root, stages, mode = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
if mode == "none":
    from pathlib import Path
    from salve.config import load
    from tasks.runner import run_stage
    t1 = time.perf_counter()
    cfg = load(Path(root) / "params.yaml")
    statuses = [run_stage(s, cfg, Path(root), progress=False).status for s in stages]
else:
    from flows.pipeline import pipeline
    t1 = time.perf_counter()
    statuses = [r["status"] for r in pipeline(root=root, stages=stages, progress=False)]
t2 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "statuses": statuses}))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(workdir: Path, timeout: float = 120) -> Iterator[tuple[str, float]]:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; (api_url, start seconds).

    Bounded: gives up after `timeout` s; stopped with SIGTERM, then its process group SIGKILLed.
    """
    import httpx

    home = workdir / "server-home"
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = child_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.pop("PREFECT_API_URL", None)
    log = workdir / "prefect-server.log"
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [str(Path(PYTHON).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"prefect server not healthy in {timeout:.0f} s")
            time.sleep(0.25)
        yield api, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _flow_once(root: Path, stages: list[str], mode: str, env: dict, log: Path) -> dict[str, Any]:
    with open(log, "ab") as fh:
        fh.write(f"\n--- {mode}\n".encode())
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-c", _FLOW_CHILD, str(root), ",".join(stages), mode],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t0
    with open(log, "a") as fh:
        fh.write(proc.stdout + proc.stderr)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"flow child ({mode}) failed:\n{(proc.stdout + proc.stderr)[-1500:]}")
    out = json.loads(line[len("RESULT ") :])
    if set(out["statuses"]) != {"skipped"}:
        raise RuntimeError(f"expected every stage skipped, got {out['statuses']}")
    return {"wall_s": wall, "import_s": out["import_s"], "call_s": out["call_s"]}


def bench_prefect(workdir: Path, root: Path, stages: list[str], repeats: int) -> dict[str, Any]:
    """The flow with every stage skipped: no Prefect (the runner alone), Prefect's temporary
    API (started by the process itself), and a running `prefect server start`."""
    log = workdir / "prefect.log"
    best: dict[str, dict[str, float]] = {}

    def keep(mode: str, m: dict[str, float]) -> None:
        if mode not in best or m["wall_s"] < best[mode]["wall_s"]:
            best[mode] = m

    base_env = child_env()
    base_env.pop("PREFECT_API_URL", None)
    for i in range(max(1, repeats)):
        keep("none", _flow_once(root, stages, "none", base_env, log))
        home = workdir / f"ephemeral-home-{i}"  # a fresh home: a first-run cost, as in CI
        env = base_env | {"PREFECT_HOME": str(home)}
        keep("temporary_api", _flow_once(root, stages, "temporary_api", env, log))
    with prefect_server(workdir) as (api, start_s):
        env = base_env | {"PREFECT_API_URL": api, "PREFECT_HOME": str(workdir / "client-home")}
        for _ in range(max(1, repeats)):
            keep("server", _flow_once(root, stages, "server", env, log))
    none = best["none"]
    out: dict[str, Any] = {"stages": stages, "server_start_s": start_s, "modes": best}
    for mode in ("temporary_api", "server"):
        out[f"{mode}_overhead_call_s"] = best[mode]["call_s"] - none["call_s"]
        out[f"{mode}_overhead_wall_s"] = best[mode]["wall_s"] - none["wall_s"]
        out[f"{mode}_overhead_call_per_stage_s"] = out[f"{mode}_overhead_call_s"] / len(stages)
    return out


# --------------------------------------------------------------------------------------------
# Fine-tuning throughput
# --------------------------------------------------------------------------------------------


def _train_batches(model, images, labels, k: int, settings) -> None:
    """train_classifier on the first k batches (one epoch), no validation set."""
    from salve.data import IMAGENET_MEAN, IMAGENET_STD
    from salve.train import train_classifier

    n = k * settings.batch_size
    train_classifier(
        model,
        images[:n],
        labels[:n],
        images[:0],
        labels[:0],
        settings,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        device=torch.device("cpu"),
        progress=False,
    )


def bench_finetune(
    cases: list[tuple[str, int]], batch_size: int, steps: int, num_classes: int = 10
) -> dict[str, Any]:
    """Images/s of salve.train.train_classifier (forward, backward, AdamW step), `steps` batches,
    after one warm-up batch; no validation set."""
    from salve.models import build_model
    from salve.train import TrainSettings

    rows = []
    settings = TrainSettings(epochs=1, batch_size=batch_size, lr=1e-4)
    for arch, size in cases:
        torch.manual_seed(0)
        model = build_model(arch, num_classes, image_size=size)
        g = torch.Generator().manual_seed(0)
        n = batch_size * steps
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        _train_batches(model, images, labels, 1, settings)  # warm-up
        t0 = time.perf_counter()
        _train_batches(model, images, labels, steps, settings)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "arch": arch,
                "image_size": size,
                "batch_size": batch_size,
                "steps": steps,
                "seconds": seconds,
                "images_per_s": n / seconds,
            }
        )
        del model
    return {"rows": rows}


def temp_workdir(prefix: str = "salve-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
