"""Benchmark the control stage's two shortcuts, each against the naive way, in one run.

1. alpha_crit: vectorised breakpoint walk (``alpha_exact``) vs a per-sample scipy ``brentq`` loop
   (``alpha_brentq``) on random samples (default N = 10,000, M = 512).
2. Suppression sweep: ``accuracy_curves`` on cached head inputs over a 21-alpha grid vs re-running
   a backbone for every alpha. The backbone baseline is a torchvision resnet18 (num_classes = 10)
   timed on a few hundred random images at a small size; its per-image cost is scaled to N images
   x A alphas. The cached path is reported with and without the one backbone pass that caches
   the activations.

Ratios are measured within the same run on the same machine; nothing here asserts on time.

    python benchmarks/bench_control.py --n 10000 --out bench_control.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from salve.alpha_crit import alpha_brentq, alpha_exact, class_rows
from salve.editing import accuracy_curves
from salve.tv import import_torchvision


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (seconds): the least noisy estimate of the cost."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_problem(n: int, m: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Post-ReLU-like activations, a random head, labels and a unit-norm decoder column.

    Head weights have a positive mean and the biases are negative, so for most samples the
    true-class logit starts positive and ends (every dimension clamped) at ``b < 0``: a real
    root, so brentq does real work rather than returning early.
    """
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, m, generator=g).relu()
    weight = (torch.randn(k, m, generator=g) + 0.5) / m**0.5
    bias = -torch.rand(k, generator=g) - 0.5
    labels = torch.randint(0, k, (n,), generator=g)
    col = torch.randn(m, generator=g)
    return {"acts": acts, "weight": weight, "bias": bias, "labels": labels, "col": col / col.norm()}


def bench_alpha_crit(p: dict[str, torch.Tensor], brentq_n: int, repeats: int) -> dict[str, Any]:
    w_nm, b_n = class_rows(p["weight"], p["bias"], p["labels"])
    args = (p["acts"], w_nm, b_n, p["col"])
    n = p["acts"].shape[0]
    exact = alpha_exact(*args)
    t_exact = best_of(lambda: alpha_exact(*args), repeats)
    sub = min(n, brentq_n)
    sub_args = tuple(x[:sub] for x in args[:3]) + (args[3],)
    start = time.perf_counter()
    ref = alpha_brentq(*sub_args)
    t_brentq_sub = time.perf_counter() - start
    t_brentq = t_brentq_sub * n / sub  # per-sample loop: cost is linear in N
    both = torch.isfinite(ref) & torch.isfinite(exact[:sub])
    diff = (exact[:sub][both] - ref[both]).abs()
    return {
        "n": n,
        "m": p["acts"].shape[1],
        "exact_s": t_exact,
        "brentq_s": t_brentq,
        "brentq_measured_on": sub,
        "ratio_brentq_over_exact": t_brentq / t_exact,
        "frac_finite_exact": float(torch.isfinite(exact).double().mean()),
        "frac_agree_1e-6_where_brentq_finite": float((diff <= 1e-6).double().mean())
        if diff.numel()
        else None,
    }


def bench_sweep(
    p: dict[str, torch.Tensor],
    n_alpha: int,
    alpha_max: float,
    images: int,
    image_size: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    n, k = p["acts"].shape[0], p["weight"].shape[0]
    grid = torch.linspace(0.0, alpha_max, n_alpha, dtype=torch.float64)

    def sweep() -> None:
        accuracy_curves(
            p["acts"], p["labels"], p["weight"], p["bias"], p["col"], grid, -1, num_classes=k
        )

    t_sweep = best_of(sweep, repeats)

    tv = import_torchvision()
    model = tv.models.resnet18(weights=None, num_classes=k).eval()
    x = torch.randn(images, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))

    def forward_all() -> None:
        with torch.inference_mode():
            for start in range(0, images, batch_size):
                model(x[start : start + batch_size])

    with torch.inference_mode():
        model(x[:batch_size])  # warm-up
    t_images = best_of(forward_all, max(1, repeats // 2))
    per_image = t_images / images
    t_cache = per_image * n  # one backbone pass over N images, then the head is all that changes
    t_rerun = per_image * n * n_alpha  # a fresh backbone pass for every alpha
    return {
        "n": n,
        "alphas": n_alpha,
        "sweep_cached_s": t_sweep,
        "backbone_per_image_s": per_image,
        "backbone_images_timed": images,
        "image_size": image_size,
        "batch_size": batch_size,
        "cache_pass_s": t_cache,
        "rerun_per_alpha_s": t_rerun,
        "ratio_rerun_over_sweep": t_rerun / t_sweep,
        "ratio_rerun_over_cache_plus_sweep": t_rerun / (t_cache + t_sweep),
    }


def markdown(alpha: dict[str, Any], sweep: dict[str, Any]) -> str:
    rows = [
        ("alpha_exact, vectorised", f"{alpha['exact_s']:.4f} s", ""),
        (
            "alpha_brentq, per-sample loop",
            f"{alpha['brentq_s']:.3f} s",
            f"x{alpha['ratio_brentq_over_exact']:.0f} vs exact"
            + (
                f" (timed on {alpha['brentq_measured_on']}, scaled)"
                if alpha["brentq_measured_on"] < alpha["n"]
                else ""
            ),
        ),
        (f"sweep, cached acts, {sweep['alphas']} alphas", f"{sweep['sweep_cached_s']:.4f} s", ""),
        (
            f"backbone pass to cache acts ({sweep['image_size']} px)",
            f"{sweep['cache_pass_s']:.2f} s",
            f"{sweep['backbone_per_image_s'] * 1e3:.2f} ms/image",
        ),
        (
            "sweep, backbone re-run per alpha",
            f"{sweep['rerun_per_alpha_s']:.1f} s",
            f"x{sweep['ratio_rerun_over_sweep']:.0f} vs cached sweep, "
            f"x{sweep['ratio_rerun_over_cache_plus_sweep']:.1f} vs cache pass + sweep",
        ),
    ]
    lines = [
        f"N = {alpha['n']}, M = {alpha['m']}, torch threads = {torch.get_num_threads()}",
        "",
        "| measurement | time | note |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="samples (cached activations)")
    ap.add_argument("--m", type=int, default=512, help="activation width (resnet18: 512)")
    ap.add_argument("--k", type=int, default=10, help="classes")
    ap.add_argument("--alphas", type=int, default=21, help="sweep grid size")
    ap.add_argument("--alpha-max", type=float, default=50.0, help="sweep grid upper end")
    ap.add_argument("--brentq-n", type=int, default=None, help="time brentq on a subset, scale")
    ap.add_argument("--images", type=int, default=256, help="images to time the backbone on")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    problem = random_problem(args.n, args.m, args.k, args.seed)
    alpha = bench_alpha_crit(problem, args.brentq_n or args.n, args.repeats)
    sweep = bench_sweep(
        problem,
        args.alphas,
        args.alpha_max,
        args.images,
        args.image_size,
        args.batch_size,
        args.repeats,
    )
    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "alpha_crit": alpha,
        "sweep": sweep,
    }
    print(markdown(alpha, sweep))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
