"""What the cross-CPU kernel pin costs at 224 px, and what channels-last and bf16 buy.

    .venv/bin/python benchmarks/bench_kernels.py                  # ResNet-18 + ViT-B/16, 3 rounds
    .venv/bin/python benchmarks/bench_kernels.py --archs resnet18 --rounds 1 --images 64  # smoke
    .venv/bin/python benchmarks/bench_kernels.py --write          # into results.json

Each measurement is a fresh process (the kernel settings are read once per process, before the
first tensor operation): a seeded, untrained model in eval mode, `inference_mode`, the same
threads, random uint8 images normalised per batch as extract does, a warm-up batch, then
images/s over --images images. The variants run in turn, round after round, so a change in the
machine's speed shows as spread across rounds rather than as a difference between variants:

- ``pinned``: common.reproducible (salve.runtime.PINNED_ENV: MKL COMPATIBLE, oneDNN and ATen
  at AVX2), the same bytes across x86-64 CPUs;
- ``pinned-mkl``/``pinned-isa``: narrower pins (only MKL's, or only oneDNN's and ATen's);
- ``+cl``: the model and the batches channels-last;
- ``fastest``: the CPU's own kernels (run-to-run identical on one machine: MKL_CBWR=AUTO);
- ``fastest+bf16``: the same under CPU bf16 autocast (where the CPU has bf16 instructions).

The cost of a mode is the median over rounds of (fastest images/s) / (mode images/s), each ratio
taken within one round. Nothing here asserts on time; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_memory as bm  # noqa: E402
from benchmarks import bench_pipeline as bp  # noqa: E402
from salve.runtime import BASE_ENV, PINNED_ENV  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "pinned": {"env": PINNED_ENV},
    "pinned-mkl": {"env": {"MKL_CBWR": PINNED_ENV["MKL_CBWR"]}},
    "pinned-isa": {"env": BASE_ENV | {k: v for k, v in PINNED_ENV.items() if k != "MKL_CBWR"}},
    "pinned+cl": {"env": PINNED_ENV, "channels_last": True},
    "pinned-mkl+cl": {"env": {"MKL_CBWR": PINNED_ENV["MKL_CBWR"]}, "channels_last": True},
    "fastest": {"env": BASE_ENV},
    "fastest+cl": {"env": BASE_ENV, "channels_last": True},
    "fastest+bf16": {"env": BASE_ENV, "bf16": True},
}

# argv: arch, size, threads, images, batch, channels_last, bf16. Prints images/s and a checksum.
FORWARD = """
import sys, time, torch
import salve.tv  # noqa: F401
from salve.data import normalise
from salve.models import build_model, penultimate
arch, size, threads, n, batch = sys.argv[1], *map(int, sys.argv[2:6])
channels_last, bf16 = sys.argv[6] == "1", sys.argv[7] == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(arch, 6, image_size=size).eval()
fmt = torch.channels_last if channels_last else torch.contiguous_format
model = model.to(memory_format=fmt)
images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
def step():
    x = normalise(images, mean, std).contiguous(memory_format=fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return penultimate(model, x).float()
with torch.inference_mode():
    out = step()  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        out = step()
        done += batch
    print(done / (time.perf_counter() - t0), float(out.double().sum()))
"""


def has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure(arch: str, variant: str, args: argparse.Namespace) -> dict[str, float]:
    spec = VARIANTS[variant]
    env = bp.child_env(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in PINNED_ENV:
        env.pop(key, None)
    env.update(spec["env"])
    batch = args.batch if arch.startswith("resnet") else max(8, args.batch // 4)
    argv = [arch, args.image_size, args.threads, args.images_for(arch), batch,
            int(spec.get("channels_last", False)), int(spec.get("bf16", False))]  # fmt: skip
    out = subprocess.run(
        [bp.PYTHON, "-c", FORWARD, *map(str, argv)],
        capture_output=True, text=True, env=env, check=True, timeout=3600,
    )  # fmt: skip
    ips, checksum = out.stdout.split()[-2:]
    return {"images_per_s": float(ips), "checksum": float(checksum)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    variants = [v for v in args.variants if v != "fastest+bf16" or has_bf16()]
    out: dict[str, Any] = {"image_size": args.image_size, "threads": args.threads, "archs": {}}
    for arch in args.archs:
        rounds = []
        for r in range(args.rounds):
            row = {v: measure(arch, v, args) for v in variants}
            rounds.append(row)
            speeds = ", ".join(f"{v} {m['images_per_s']:.1f}/s" for v, m in row.items())
            print(f"[kernels] {arch} round {r + 1}: {speeds}", flush=True)
        cost = {
            v: statistics.median(
                rd["fastest"]["images_per_s"] / rd[v]["images_per_s"] for rd in rounds
            )
            for v in variants
        }
        out["archs"][arch] = {"rounds": rounds, "cost_vs_fastest": cost}
    return out


def render(m: dict[str, Any]) -> list[str]:
    lines = [
        "## CPU kernels: the reproducibility pin's cost, channels-last, bf16",
        "",
        f"Forward passes at {m['image_size']} px, {m['threads']} threads, each variant in a fresh "
        "process, round after round. Cells: median over rounds of the fastest kernels' images/s "
        "over the variant's, each ratio within one round (above 1: slower than the fastest).",
        "",
    ]
    variants = list(next(iter(m["archs"].values()))["cost_vs_fastest"])
    lines += ["| model | fastest images/s | " + " | ".join(variants) + " |",
              "|---|---|" + "---|" * len(variants)]  # fmt: skip
    for arch, r in m["archs"].items():
        fastest = statistics.median(rd["fastest"]["images_per_s"] for rd in r["rounds"])
        cells = " | ".join(f"{r['cost_vs_fastest'][v]:.2f}x" for v in variants)
        lines.append(f"| {arch} | {fastest:.1f} | {cells} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["resnet18", "vit_b_16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=256, help="images timed per ResNet run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--write", action="store_true", help="merge into benchmarks/results.json")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(argv)
    # A ViT-B/16 forward is about 6x a ResNet-18's: a quarter of the images.
    args.images_for = lambda arch: args.images if arch.startswith("resnet") else args.images // 4
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    result = bench(args)
    result["bench_seconds"] = time.perf_counter() - t0
    print("\n".join(render(result)))
    print(json.dumps({a: r["cost_vs_fastest"] for a, r in result["archs"].items()}, indent=1))
    if args.write:
        bm.write_section(args.out_dir, "kernels", started, bp.machine_info(), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
