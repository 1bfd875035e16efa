"""The pipeline at the scale users work at: 224 px, thousands of images, wide SAEs.

    .venv/bin/python benchmarks/bench_paper_scale.py                   # N 1k/4k/16k x width 64/4096
    .venv/bin/python benchmarks/bench_paper_scale.py --sizes 120 --widths 64 --image-size 64
    .venv/bin/python benchmarks/bench_paper_scale.py --write           # into results.json

Explain-as-is, as a new user starts: a seeded ResNet-18 (--arch) saved as safetensors under
weights/, `finetune.epochs: 0` (--finetune-epochs: fine-tune it first; on CUDA in bf16 autocast,
as make bench-gpu does), the quality gate off, a synthetic image folder of N images (the `shapes`
family of benchmarks/synthetic_images.py, six classes, JPEG, cached under --work). A run counts
only when its outputs check out (`check_outputs`: counts, finite numbers, the report).
For every (N, width) a fresh git + DVC project runs `salve run` (the real path: Prefect, the
Dask fan-out, concurrent stages) in its own process group, while a sampler adds up the
anonymous resident memory (RssAnon: file-backed pages of memory-mapped tensors excluded) of
every process in that group every 0.2 s.

The unit is one bare forward pass over the same N images: the model in `inference_mode`, batch
64, the same threads, measured in a separate process right before and right after each
pipeline run (their mean; both are kept), on images already decoded (so fetch's decoding is
charged to fetch). Each stage's seconds (.salve/timings) and the
whole run are reported as multiples of it. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_memory as bm  # noqa: E402
from benchmarks import bench_pipeline as bp  # noqa: E402
from benchmarks.synthetic_images import SHAPES  # noqa: E402

DEFAULT_SIZES = (1000, 4000, 16000)
DEFAULT_WIDTHS = (64, 4096)
MIB = 2**20

# Measures images/s of a bare forward pass at the given size (argv: arch, size, threads, n).
BARE_FORWARD = """
import sys, time, torch
import salve.tv  # noqa: F401
from salve.models import build_model
arch, device = sys.argv[1], sys.argv[5]
size, threads, n = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(arch, 6, image_size=size).eval().to(device)
x = torch.rand(64, 3, size, size, device=device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
with torch.inference_mode():
    for _ in range(3):
        model(x)  # warm-up (cuDNN autotuning on CUDA)
    sync()
    t0 = time.perf_counter()
    done = 0
    while done < n:
        model(x)
        done += 64
    sync()
    print(done / (time.perf_counter() - t0))
"""


def process_role(pid: str) -> str:
    """A short name for what a process in the run is, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    line = " ".join(a.decode(errors="replace") for a in argv if a)
    for needle, role in (
        ("flows.api", "prefect server"),  # salve run's temporary Prefect API
        ("prefect server", "prefect server"),
        ("resource_tracker", "multiprocessing resource tracker"),
        ("spawn_main", "dask worker"),  # the local cluster's workers are spawned processes
        ("flows.cli", "salve run (flow)"),
    ):
        if needle in line:
            return role
    return line[:60] or "?"


def rss_anon_by_pid(pgid: int) -> dict[str, float]:
    """Anonymous resident memory (MiB) of every live process in a process group."""
    by_pid = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    by_pid[pid] = int(line.split()[1]) / 1024
        except (OSError, ValueError):
            continue
    return by_pid


class PeakSampler:
    """The peak of a process group's summed anonymous RSS, sampled in a thread.

    Besides the peak it keeps who held it (each process's share at that moment, by role) and
    every process's own peak: the sum's peak depends on which stages overlap, the roles' on
    what each one holds.
    """

    def __init__(self, pgid: int, interval_s: float = 0.2) -> None:
        self.pgid, self.interval_s, self.peak, self.peak_time = pgid, interval_s, 0.0, 0.0
        self.at_peak: dict[str, float] = {}
        self.timeline: list[tuple[float, float]] = []  # (wall time, summed MiB), 1 s apart
        self.own_peaks: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            by_pid = rss_anon_by_pid(self.pgid)
            for pid, mib in by_pid.items():
                role, before = self.own_peaks.get(pid, (None, 0.0))
                if mib > before:
                    self.own_peaks[pid] = (role or process_role(pid), mib)
            total = sum(by_pid.values())
            now = time.time()
            if not self.timeline or now - self.timeline[-1][0] >= 1.0:
                self.timeline.append((now, total))
            elif total > self.timeline[-1][1]:
                self.timeline[-1] = (self.timeline[-1][0], total)
            if total > self.peak:
                self.peak, self.peak_time = total, now
                self.at_peak = {}
                for pid, mib in by_pid.items():
                    role = self.own_peaks[pid][0] if pid in self.own_peaks else "?"
                    self.at_peak[role] = self.at_peak.get(role, 0.0) + mib
            self._stop.wait(self.interval_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak

    def breakdown(self) -> dict[str, Any]:
        """MiB at the peak by role, and each process's own peak (largest first)."""
        own = sorted(self.own_peaks.items(), key=lambda kv: -kv[1][1])
        return {
            "at_peak_mib": {k: round(v) for k, v in sorted(self.at_peak.items())},
            "own_peaks_mib": [[role, round(mib)] for _, (role, mib) in own[:12]],
            "timeline": [[round(t, 1), round(mib)] for t, mib in self.timeline],
        }


def bare_forward_ips(args: argparse.Namespace) -> float:
    env = bp.child_env(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(
        [bp.PYTHON, "-c", BARE_FORWARD, args.arch, str(args.image_size), str(args.threads),
         str(args.bare_images), args.device],
        capture_output=True, text=True, env=env, check=True, timeout=3600,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def make_project(root: Path, folder: Path, width: int, args: argparse.Namespace) -> Path:
    """A git + DVC project explaining a seeded --arch as it is, on `folder`."""
    import torch

    from salve.io import save_tensors
    from salve.models import build_model

    overlay = {
        "common": {"seed": 0, "num_threads": args.threads, "device": args.device},
        "data": {"source": "imagefolder", "path": str(folder), "image_size": args.image_size},
        "finetune": {"arch": args.arch, "epochs": args.finetune_epochs, "min_steps": 0,
                     "weights": "weights/model.safetensors",
                     "min_val_accuracy": 0.0, "min_class_accuracy": 0.0},
        "sae": {"width": width},
        "edit": {"min_base_accuracy": 0.0},
    }  # fmt: skip
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    bp.make_project(root, overlay, root.parent / f"{root.name}.setup.log")
    torch.manual_seed(0)
    model = build_model(args.arch, len(SHAPES), image_size=args.image_size)
    save_tensors(root / "weights" / "model.safetensors", model.state_dict())
    return root


def run_pipeline(root: Path, n_images: int, args: argparse.Namespace) -> dict[str, Any]:
    log = root / "bench.log"
    env = bp.child_env(SALVE_CPU_CHECK="0")
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [bp.PYTHON, "-m", "flows.cli", "--root", str(root), "run", "--no-progress"],
            cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        sampler = PeakSampler(proc.pid)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "timeout"
        finally:
            peak = sampler.stop()
        wall = time.perf_counter() - t0
    stages, running_at_peak = {}, []
    for path in sorted((root / ".salve" / "timings").glob("*.json")):
        record = json.loads(path.read_text())
        stages[record["stage"]] = record["seconds"]
        if record["finished"] - record["seconds"] <= sampler.peak_time <= record["finished"]:
            running_at_peak.append(record["stage"])
    parts = {}  # the stages' own breakdown (tasks.common.PartTimes, in their run records)
    for stage in PART_STAGES:
        record = root / ".salve" / "runs" / f"{stage}.json"
        if record.is_file():
            parts[stage] = json.loads(record.read_text()).get("part_seconds", {})
    memory = sampler.breakdown() | {"stages_running_at_peak": running_at_peak}
    row = {"wall_s": wall, "peak_anon_mib": peak, "memory": memory}
    row |= {"stages": stages, "parts": parts, "rc": rc}
    if rc != 0:
        row["error"] = f"exit status {rc}: {bp.log_tail(log, 800)}"
    elif problems := check_outputs(root, n_images):
        row["error"] = "outputs: " + "; ".join(problems)
    return row


def check_outputs(root: Path, n_images: int) -> list[str]:
    """What a finished run must have produced, as problems (none: all holds): every image in
    fetch's and extract's counts, an SAE that reconstructs (finite FVU under 1), finite deletion
    AUCs and AM counts that add up, every edit method evaluated, the report."""
    problems: list[str] = []

    def metrics(stage: str) -> dict[str, Any]:
        path = root / "metrics" / f"{stage}.json"
        if not path.is_file():
            problems.append(f"metrics/{stage}.json is missing")
            return {}
        return json.loads(path.read_text())

    def finite(value: Any) -> bool:
        return isinstance(value, int | float) and math.isfinite(value)

    fetch, extract = metrics("fetch"), metrics("extract")
    counts = (fetch.get("train_samples", 0), fetch.get("val_samples", 0))
    if fetch and sum(counts) != n_images:
        problems.append(f"fetch found {sum(counts)} images, not {n_images}")
    if extract and (extract.get("train_samples"), extract.get("val_samples")) != counts:
        problems.append(f"extract's samples differ from fetch's {counts}")
    fvu = metrics("fit_sae").get("train_fvu")
    if not (finite(fvu) and 0 <= fvu < 1):
        problems.append(f"fit_sae's train FVU is {fvu}")
    gradfam = metrics("gradfam")
    for key in ("deletion_auc", "deletion_auc_random"):
        if gradfam and not finite(gradfam.get(key)):
            problems.append(f"gradfam's {key} is {gradfam.get(key)}")
    if gradfam and not 0 <= gradfam.get("am_activating", -1) <= gradfam.get("am_features", -1):
        problems.append("gradfam's AM counts do not add up")
    methods = metrics("evaluate").get("methods", {})
    efficacies = [m.get("efficacy", {}).get("mean") for m in methods.values()]
    if not methods or not all(finite(e) for e in efficacies):
        problems.append(f"evaluate's efficacies are {efficacies}")
    if not (root / "reports" / "latest" / "index.html").is_file():
        problems.append("reports/latest/index.html is missing")
    return problems


def bench(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    rows, references = [], []
    for n, width in args.runs:
        folder, _ = bm.image_folder(args.work, n, args.image_size)
        root = make_project(args.work / f"project-n{n}-w{width}", folder, width, args)
        # The reference right before and right after the run: this machine's speed drifts (a
        # bare ResNet-18 pass measured 29 to 44 images/s here within an hour), so each row is
        # read against the mean of the two around it.
        before = references[-1] if references else bare_forward_ips(args)
        print(f"[paper_scale] N {n}, width {width} ...", flush=True)
        row = {"n": n, "width": width} | run_pipeline(root, n, args)
        after = bare_forward_ips(args)
        references += [after] if references else [before, after]
        ips = (before + after) / 2
        row["bare_forward_images_per_s"] = {"before": before, "after": after, "used": ips}
        one_pass = n / ips
        row["bare_pass_s"] = one_pass
        row["passes"] = {s: sec / one_pass for s, sec in row["stages"].items()}
        row["total_passes"] = row["wall_s"] / one_pass
        rows.append(row)
        print("\n".join(render_rows([row]) + [""] + render_parts([row])), flush=True)
        (args.work / f"row-n{n}-w{width}.json").write_text(json.dumps(row))  # with the timeline
        shown = {k: v for k, v in row["memory"].items() if k != "timeline"}
        print(f"[paper_scale] memory: {json.dumps(shown)}", flush=True)
        if not args.keep and "error" not in row:  # a failed run is kept, to be read
            shutil.rmtree(root, ignore_errors=True)
    return {
        "arch": args.arch,
        "image_size": args.image_size,
        "threads": args.threads,
        "device": args.device,
        "bare_forward_images_per_s": statistics.median(references),
        "bare_forward_measurements": references,
        "rows": rows,
    }


STAGE_COLUMNS = ("fetch", "finetune", "extract", "fit_sae", "gradfam", "evaluate", "report")
PART_STAGES = ("gradfam", "evaluate")


def render_rows(rows: list[dict[str, Any]]) -> list[str]:
    head = "| images | width | total | " + " | ".join(STAGE_COLUMNS) + " | peak anon RSS |"
    lines = [head, "|" + "---|" * (4 + len(STAGE_COLUMNS))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']:,} | {r['width']} | error: {r['error'][:80]} |")
            continue
        cells = [f"{r['passes'].get(s, float('nan')):.2f}" for s in STAGE_COLUMNS]
        lines.append(
            f"| {r['n']:,} | {r['width']} | {r['total_passes']:.2f} ({r['wall_s']:.0f} s) | "
            + " | ".join(cells)
            + f" | {r['peak_anon_mib']:,.0f} MiB |"
        )
    return lines


def render_parts(rows: list[dict[str, Any]]) -> list[str]:
    """What dominates gradfam and evaluate: each part's seconds over one bare pass."""
    lines = ["| images | width | " + " | ".join(PART_STAGES) + " |", "|---|---|" + "---|" * 2]
    for r in rows:
        if "error" in r or not r.get("parts"):
            continue
        cells = [
            ", ".join(f"{part} {sec / r['bare_pass_s']:.2f}" for part, sec in r["parts"][s].items())
            if s in r["parts"]
            else "–"
            for s in PART_STAGES
        ]
        lines.append(f"| {r['n']:,} | {r['width']} | " + " | ".join(cells) + " |")
    return lines


def _spread(m: dict[str, Any]) -> str:
    refs = m.get("bare_forward_measurements") or [m["bare_forward_images_per_s"]]
    return f"{min(refs):.1f} to {max(refs):.1f} images/s"


def render(m: dict[str, Any]) -> list[str]:
    """The section for RESULTS.md: seconds as multiples of one bare forward pass."""
    return [
        "## Paper scale: the pipeline at 224 px, thousands of images, wide SAEs",
        "",
        f"Explain-as-is of a seeded {m['arch']} at {m['image_size']} px on "
        f"{m.get('device', 'cpu')}, {m['threads']} threads; "
        f"one bare forward pass: {m['bare_forward_images_per_s']:.1f} images/s (inference_mode, "
        "batch 64, contiguous layout; the median of measurements before and after every run, "
        f"which ranged {_spread(m)}). Cells: stage seconds / one bare pass over the same images, "
        "each row against the mean of the measurements right before and after it.",
        "",
        *render_rows(m["rows"]),
        *[f"\n- {r['n']:,} x {r['width']}: {r['note']}" for r in m["rows"] if r.get("note")],
        *([f"\n{m['note']}"] if m.get("note") else []),
        "",
        "Inside gradfam and evaluate (their run records), in bare passes:",
        "",
        *render_parts(m["rows"]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    ap.add_argument(
        "--runs",
        nargs="+",
        metavar="NxW",
        help="these (images x width) runs instead of every --sizes x --widths, e.g. 4000x4096",
    )
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="make bench-gpu: cuda")
    ap.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="0: explain the seeded model as it is; make bench-gpu: 1 (bf16 autocast on CUDA)",
    )
    ap.add_argument("--bare-images", type=int, default=512, help="images the reference times")
    ap.add_argument("--work", type=Path, default=Path("/tmp/salve-bench-paper-scale"))
    ap.add_argument("--keep", action="store_true", help="keep each project")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per pipeline run")
    ap.add_argument("--write", action="store_true", help="merge into benchmarks/results.json")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if args.runs:
        try:
            args.runs = [tuple(int(v) for v in r.lower().split("x")) for r in args.runs]
        except ValueError:
            ap.error(f"--runs takes IMAGESxWIDTH, e.g. 4000x4096: got {args.runs}")
    else:
        args.runs = [(n, w) for n in sorted(args.sizes) for w in args.widths]
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    result = bench(args)
    result["bench_seconds"] = time.perf_counter() - t0
    print("\n".join(render(result)))
    if args.write:
        bm.write_section(args.out_dir, "paper_scale", started, bp.machine_info(), result)
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
