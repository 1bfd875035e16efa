"""Memory at scale: fetch + extract on N synthetic images, each stage in a fresh process.

    .venv/bin/python benchmarks/bench_memory.py                        # N = 2000, 8000, 32000
    .venv/bin/python benchmarks/bench_memory.py --sizes 200 --threads 1   # smoke run
    .venv/bin/python benchmarks/bench_memory.py --compare-in-memory --write

For every N, a folder of N images (the `shapes` family of benchmarks/synthetic_images.py, six
classes, JPEG at --image-size px) is drawn once under --work and kept there as a cache (each
N's folder hard-links the first files of one shared pool). A bare project (params.yaml, data.source
imagefolder, data.path that folder, data.image_size the same size) then runs:

- **fetch**: `tasks.fetch.run` in a fresh process (folder sources stream into the split files);
- **extract**: `tasks.extract.run` in a fresh process, on a seeded untrained --arch saved as
  results/finetune expects it (checkpoint + sidecar; the quality gate is set to pass it: the
  model's accuracy does not change what extraction costs).

Per stage: peak resident memory of the process (`ru_maxrss` from wait4, as the stage benchmark
measures it), the stage call's own seconds (imports excluded) and the process's wall time.
Per N: images/s of each stage, the images files' size (train + val) and the activation
matrices' size, both in MiB. `--compare-in-memory` adds, at the smallest N, the path before
streaming (fetch: `prepare_dataset` then `save_tensors`; extract: both splits loaded whole, then
`extract_activations`), so the table shows what streaming saves. A `baseline` row gives the
peak of a process that only imports the stages and builds the model: the floor under every row.

`--write` puts the results under the `memory` key of benchmarks/results.json (the other sections
kept; this one records its own run and machine) and regenerates benchmarks/RESULTS.md from it,
as `run_all.py --merge` does. Timings are wall-clock; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_pipeline as bp  # noqa: E402
from benchmarks.synthetic_images import SHAPES, fill_folder  # noqa: E402

DEFAULT_SIZES = (2000, 8000, 32000)
FAMILY = "shapes"
MIB = 2**20

# --------------------------------------------------------------------------------------------
# Inside a child process: one stage, timed, its result written as JSON
# --------------------------------------------------------------------------------------------


def _child(mode: str, root: Path, out: Path) -> None:
    from salve.config import load
    from salve.runtime import pin_cpu_kernels

    cfg = load(root / "params.yaml")
    pin_cpu_kernels(cfg.common.reproducible)  # as `python -m tasks` does, before any tensor op
    if mode == "baseline":  # what every stage process holds before it touches data
        import tasks.extract  # noqa: F401
        import tasks.fetch  # noqa: F401
        from salve.models import build_model

        t0 = time.perf_counter()
        build_model(cfg.finetune.arch, len(SHAPES), image_size=cfg.data.image_size)
        result: dict[str, Any] = {}
    else:
        run = {
            "fetch": _stage("fetch"),
            "extract": _stage("extract"),
            "fetch-in-memory": _fetch_in_memory,
            "extract-in-memory": _extract_in_memory,
        }[mode]
        t0 = time.perf_counter()
        result = run(cfg, root)
    out.write_text(json.dumps({"seconds": time.perf_counter() - t0, "result": result}))


def _stage(name: str):
    import importlib

    module = importlib.import_module(f"tasks.{name}")
    return lambda cfg, root: module.run(cfg, root, progress=False)


def _fetch_in_memory(cfg, root: Path) -> dict[str, Any]:
    """fetch before streaming: every image decoded into memory, then saved."""
    from salve.data import check_prepared, prepare_dataset
    from salve.io import save_tensors
    from tasks import STAGES

    d = cfg.data
    data = prepare_dataset(
        d.source,
        image_size=d.image_size,
        raw_dir=Path(d.path),
        path=d.path,
        val_fraction=d.val_fraction,
        max_per_class=d.max_per_class,
        min_val_per_class=d.min_val_per_class,
        seed=cfg.common.seed,
        progress=False,
    )
    check_prepared(data)
    for split in ("train", "val"):
        x, y = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        save_tensors(STAGES["fetch"].path(root, split), {"images": x, "labels": y})
    return {"train_samples": len(data.train_labels), "val_samples": len(data.val_labels)}


def _extract_in_memory(cfg, root: Path) -> dict[str, Any]:
    """extract before streaming: each split loaded whole, then a batched forward."""
    from salve.activations import extract_activations
    from salve.io import save_tensors
    from salve.runtime import seed_everything
    from tasks import STAGES
    from tasks.artifacts import load_model, load_split

    seed_everything(cfg.common.seed, num_threads=cfg.common.num_threads)
    model, sidecar = load_model(root)
    norm = sidecar["normalisation"]
    out = {}
    for split in ("train", "val"):
        images, labels = load_split(root, split)
        acts = extract_activations(
            model,
            images,
            tuple(norm["mean"]),
            tuple(norm["std"]),
            batch_size=cfg.extract.batch_size,
            progress=False,
        )
        save_tensors(STAGES["extract"].path(root, split), {"acts": acts, "labels": labels})
        out[f"{split}_samples"] = int(acts.shape[0])
    return out


# --------------------------------------------------------------------------------------------
# In the parent: folders, projects, measured children
# --------------------------------------------------------------------------------------------


def class_counts(n: int) -> dict[str, int]:
    """N images over the six classes, as even as N allows."""
    k = len(SHAPES)
    return {name: n // k + (i < n % k) for i, name in enumerate(SHAPES)}


def image_folder(work: Path, n: int, size: int) -> tuple[Path, float]:
    """The folder of N images (drawn into the shared pool when missing, then hard-linked);
    returns it and the seconds spent drawing (0 when everything was cached)."""
    pool = work / f"pool-{FAMILY}-{size}px"
    counts = class_counts(n)
    t0 = time.perf_counter()
    drawn = fill_folder(FAMILY, pool, counts, size=size, ext=".jpg")
    seconds = time.perf_counter() - t0 if drawn else 0.0
    folder = work / f"images-{FAMILY}-{size}px-n{n}"
    for name, count in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            link = folder / name / f"{i:06d}.jpg"
            if not link.exists():
                os.link(pool / name / link.name, link)
    return folder, seconds


def make_project(root: Path, folder: Path, args: argparse.Namespace) -> Path:
    """A bare project: params.yaml and a seeded untrained checkpoint where finetune puts it."""
    import torch

    from salve.config import Config
    from salve.data import IMAGENET_MEAN, IMAGENET_STD
    from salve.models import build_model, save_checkpoint
    from salve.params_file import yaml_dump
    from tasks import STAGES

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    params = Config().to_dict()
    params["common"] |= {"seed": 0, "num_threads": args.threads, "device": "cpu"}
    params["data"] |= {"source": "imagefolder", "path": str(folder), "image_size": args.image_size}
    params["finetune"] |= {"arch": args.arch, "min_val_accuracy": 0.0, "min_class_accuracy": 0.0}
    params["extract"] |= {"batch_size": args.batch_size}
    (root / "params.yaml").write_text(yaml_dump(params))
    torch.manual_seed(0)
    model = build_model(args.arch, len(SHAPES), image_size=args.image_size)
    sidecar = {
        "classes": list(SHAPES),
        "image_size": args.image_size,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "val_accuracy": 0.0,  # untrained; the gate above is set to let it through
        "val_class_accuracy": dict.fromkeys(SHAPES, 0.0),
    }
    save_checkpoint(STAGES["finetune"].path(root, "model"), model, sidecar)
    return root


def measure(mode: str, root: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    out = root / f".bench-{mode}.json"
    out.unlink(missing_ok=True)
    cmd = [bp.PYTHON, str(Path(__file__).resolve()), "--child", mode, "--root", str(root)]
    threads = str(args.threads)
    env = bp.child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["PYTHONPATH"] = str(bp.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    m = bp.run_measured(cmd, cwd=root, env=env, log=log, timeout=args.timeout)
    row = {"process_s": m["wall_s"], "peak_mib": m["maxrss_mib"]}
    if m["rc"] != 0 or not out.exists():
        return row | {"error": f"exit status {m['rc']}: {bp.log_tail(log, 600)}"}
    child = json.loads(out.read_text())
    return row | {"seconds": child["seconds"], "result": child["result"]}


def _files_mib(root: Path, stage: str) -> float:
    from tasks import STAGES

    return sum(STAGES[stage].path(root, s).stat().st_size for s in ("train", "val")) / MIB


def bench_one(n: int, args: argparse.Namespace, in_memory: bool) -> dict[str, Any]:
    folder, draw_s = image_folder(args.work, n, args.image_size)
    root = make_project(args.work / f"project-n{n}" / ("in-memory" if in_memory else "streamed"),
                        folder, args)  # fmt: skip
    log = root / "bench.log"
    row: dict[str, Any] = {"n": n, "path": "in memory" if in_memory else "streamed",
                           "draw_s": draw_s}  # fmt: skip
    suffix = "-in-memory" if in_memory else ""
    for stage in ("fetch", "extract"):
        m = measure(stage + suffix, root, args, log)
        row[stage] = m
        if "error" in m:
            row["error"] = f"{stage}: {m['error']}"
            break
        m["images_per_s"] = n / m["seconds"] if m["seconds"] > 0 else float("nan")
    if "error" not in row:
        row["images_file_mib"] = _files_mib(root, "fetch")
        row["acts_file_mib"] = _files_mib(root, "extract")
        from salve.io import tensor_info
        from tasks import STAGES

        dims = [tensor_info(STAGES["extract"].path(root, s))["acts"][1] for s in ("train", "val")]
        row["acts_mib"] = sum(d[0] * d[1] * 4 for d in dims) / MIB  # float32 [N, M] in memory
        row["dim"] = dims[0][1]
    if not args.keep:
        shutil.rmtree(root.parent, ignore_errors=True)
    return row


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    rows = []
    # The floor: a process that imports the stages and builds the model, nothing else.
    folder, _ = image_folder(args.work, sizes[0], args.image_size)
    base_root = make_project(args.work / "project-baseline", folder, args)
    baseline = measure("baseline", base_root, args, base_root / "bench.log")
    shutil.rmtree(base_root, ignore_errors=True)
    for n in sizes:
        for in_memory in (False, True) if args.compare_in_memory and n == sizes[0] else (False,):
            print(f"[memory] N={n} {'in memory' if in_memory else 'streamed'} ...", flush=True)
            row = bench_one(n, args, in_memory)
            rows.append(row)
            print("[memory] " + _row_line(row), flush=True)
    return {
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "family": FAMILY,
        "baseline_peak_mib": baseline.get("peak_mib"),
        "baseline_error": baseline.get("error"),
        "rows": rows,
    }


def _row_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"N={r['n']} {r['path']}: error {r['error'][-300:]}"
    f, e = r["fetch"], r["extract"]
    return (
        f"N={r['n']} {r['path']}: fetch {f['seconds']:.1f} s, peak {f['peak_mib']:.0f} MiB; "
        f"extract {e['seconds']:.1f} s ({e['images_per_s']:.1f} img/s), peak "
        f"{e['peak_mib']:.0f} MiB; images file {r['images_file_mib']:.0f} MiB, activations "
        f"{r['acts_mib']:.1f} MiB"
    )


# --------------------------------------------------------------------------------------------
# The RESULTS.md section (run_all.markdown calls it for the `memory` key)
# --------------------------------------------------------------------------------------------


def render(m: dict[str, Any]) -> list[str]:
    from benchmarks.run_all import _table

    rows = []
    for r in m["rows"]:
        if "error" in r:
            rows.append([r["n"], r["path"], "error", r["error"].splitlines()[-1][:120], *[""] * 7])
            continue
        f, e = r["fetch"], r["extract"]
        rows.append([r["n"], r["path"], _int(f["peak_mib"]), _int(e["peak_mib"]),
                     f"{f['seconds']:.2f}", _int(f["images_per_s"]), f"{e['seconds']:.1f}",
                     f"{e['images_per_s']:.1f}", _int(r["images_file_mib"]),
                     f"{r['acts_mib']:.1f}",
                     f"{f['process_s']:.1f} / {e['process_s']:.1f}"])  # fmt: skip
    floor = _mib_or_na(m["baseline_peak_mib"])
    return [
        "## Memory: fetch + extract at scale",
        "",
        f"`benchmarks/bench_memory.py`: {m['family']} images (JPEG) at {m['image_size']} px, "
        f"{m['arch']} (seeded, untrained), extract batch {m['batch_size']}, {m['threads']} "
        "torch thread(s). Each stage in a fresh process; peak = its `ru_maxrss`. A process that "
        f"only imports the stages and builds the model peaks at {floor} "
        "MiB. Seconds are the stage call's own (imports excluded; process wall time in the last "
        "column).",
        "",
        *_table(
            [
                "N",
                "path",
                "fetch peak MiB",
                "extract peak MiB",
                "fetch s",
                "fetch img/s",
                "extract s",
                "extract img/s",
                "images file MiB",
                "activations MiB",
                "process s (fetch / extract)",
            ],
            rows,
        ),  # fmt: skip
    ]


def _mib_or_na(x: Any) -> str:
    return "n/a" if x is None else _int(x)


def _int(x: float) -> str:
    return f"{x:,.0f}"


def write_section(
    out_dir: Path, key: str, started: str, machine: dict[str, Any], result: dict[str, Any]
) -> None:
    """Merge `result` as section `key` of results.json (the others kept; this one records its
    own run and machine) and regenerate RESULTS.md."""
    from benchmarks import run_all

    new = {"quick": False, "started": started, "seconds": result["bench_seconds"],
           "machine": machine, "results": {key: result}}  # fmt: skip
    old_path = out_dir / "results.json"
    doc = run_all.merge(json.loads(old_path.read_text()), new) if old_path.exists() else new
    out_dir.mkdir(parents=True, exist_ok=True)
    old_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out_dir / "RESULTS.md").write_text(run_all.markdown(doc))
    print(f"[{key}] wrote {out_dir / 'RESULTS.md'} and {old_path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="N values")
    ap.add_argument("--arch", default="resnet18", help="e.g. mobilenet_v3_small (faster)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256, help="extract.batch_size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: params.yaml)")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/salve-bench-memory"),
        help="image folders (a cache, kept) and projects (removed after each N)",
    )
    ap.add_argument(
        "--compare-in-memory",
        action="store_true",
        help="also run the path before streaming at the smallest N",
    )
    ap.add_argument(
        "--write",
        action="store_true",
        help="merge into --out-dir's results.json and regenerate its RESULTS.md",
    )
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--keep", action="store_true", help="keep each N's project (results/)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per stage process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.root, args.root / f".bench-{args.child}.json")
        return 0
    import torch

    from salve.config import load

    threads = args.threads or load(bp.REPO / "params.yaml").common.num_threads
    args.threads = threads or torch.get_num_threads()  # 0 in params.yaml: torch's default
    torch.set_num_threads(args.threads)  # what machine_info reports; the children get the same
    args.work = args.work.resolve()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = bp.machine_info()
    t0 = time.perf_counter()
    result = bench_memory(args)
    result["bench_seconds"] = time.perf_counter() - t0
    print("\n".join(render(result)))
    if args.write:
        write_section(args.out_dir, "memory", started, machine, result)
    return 1 if any("error" in r for r in result["rows"]) or result["baseline_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
