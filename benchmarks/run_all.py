"""Run every benchmark and write benchmarks/RESULTS.md (tables) and benchmarks/results.json.

    .venv/bin/python benchmarks/run_all.py            # full run (default params; long)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run: tiny sizes, a few minutes
    .venv/bin/python benchmarks/run_all.py --only extract sae --out-dir /tmp/bench

See benchmarks/README.md for what each row means. A benchmark that fails is reported as an
error in both files; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_kernels as bk  # noqa: E402
from benchmarks import bench_memory as bm  # noqa: E402
from benchmarks import bench_paper_scale as bps  # noqa: E402
from benchmarks import bench_peers as bpe  # noqa: E402
from benchmarks import bench_pipeline as bp  # noqa: E402

BENCHMARKS = ("stages", "extract", "sae", "control", "gradfam", "prefect", "finetune", "peers")
# Sections written by their own script and merged in (bench_memory.py --write), rendered here too.
MERGED_ONLY = ("memory", "kernels", "paper_scale")

# Sizes per mode. "full" measures the real thing (the default params, the real shapes).
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "stages_overlay": None,
        "extract": {"n": 2048, "batch_size": 256, "image_size": 64, "repeats": 3},
        "sae": {"n": 8192, "d": 512, "width": 64, "epochs": 10, "batch_size": 256, "k": 8},
        "control": [],
        "gradfam": {"n": 64, "image_size": 64, "width": 64, "n_features": 8, "batch_size": 32,
                    "repeats": 3},
        "prefect_repeats": 3,
        "finetune": {"cases": [("resnet18", 64), ("resnet18", 224), ("vit_b_16", 64),
                               ("vit_b_16", 224)], "batch_size": 16, "steps": 3},
        # the issue's comparison: 32 images x 8 latents; TopK SAE width 512, k 16, 20 epochs;
        # time to salve's FVU at 20 epochs: the peers get up to 200
        "peers": {"gradfam": {"image_sizes": [224, 64], "n_images": 32, "n_features": 8,
                              "width": 64, "repeats": 2},
                  "sae": {"width": 512, "k": 16, "epochs": 20, "batch_size": 256, "lr": 1e-3,
                          "repeats": 3, "max_epochs": 200}},
    },
    "quick": {
        "stages_overlay": bp.QUICK_PARAMS,
        "extract": {"n": 256, "batch_size": 64, "image_size": 64, "repeats": 3},
        "sae": {"n": 1024, "d": 512, "width": 64, "epochs": 1, "batch_size": 256, "k": 8},
        "control": ["--n", "2000", "--brentq-n", "200", "--images", "64", "--repeats", "1"],
        "gradfam": {"n": 8, "image_size": 64, "width": 64, "n_features": 4, "batch_size": 8,
                    "repeats": 1},
        "prefect_repeats": 1,
        "finetune": {"cases": [("resnet18", 64), ("resnet18", 224), ("vit_b_16", 64),
                               ("vit_b_16", 224)], "batch_size": 2, "steps": 1},
        "peers": {"gradfam": {"image_sizes": [64], "n_images": 4, "n_features": 2, "width": 32,
                              "repeats": 1},
                  "sae": {"width": 64, "k": 4, "epochs": 2, "batch_size": 256, "lr": 1e-3,
                          "repeats": 1, "max_epochs": 6}},
    },
}  # fmt: skip


def run(names: list[str], quick: bool, workdir: Path) -> dict[str, Any]:
    sizes = SIZES["quick" if quick else "full"]
    results: dict[str, Any] = {}
    project: tuple[Path, list[str]] | None = None

    def timed(name: str, fn) -> None:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported, and the other benchmarks still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback":
                             traceback.format_exc(limit=6)}  # fmt: skip
        results[name]["bench_seconds"] = time.perf_counter() - t0
        status = "error" if "error" in results[name] else "done"
        print(f"[bench] {name} {status} in {results[name]['bench_seconds']:.1f} s", flush=True)

    def stages() -> dict[str, Any]:
        nonlocal project
        out, root, ran = bp.bench_stages(workdir / "stages", sizes["stages_overlay"])
        project = (root, ran)
        return out

    def prefect() -> dict[str, Any]:
        nonlocal project
        if project is None:  # --only prefect: a fresh quick project, built without timing
            _, root, ran = bp.bench_stages(workdir / "stages", bp.QUICK_PARAMS)
            project = (root, ran)
        root, ran = project
        return bp.bench_prefect(workdir / "prefect", root, ran, sizes["prefect_repeats"])

    def finetune() -> dict[str, Any]:
        f = sizes["finetune"]
        return bp.bench_finetune([tuple(c) for c in f["cases"]], f["batch_size"], f["steps"])

    def peers() -> dict[str, Any]:
        return bpe.bench_peers(
            **sizes["peers"],
            extract=results.get("extract"),
            project=project[0] if project else None,
            extract_sizes=sizes["extract"],
        )

    jobs = {
        "stages": stages,
        "extract": lambda: bp.bench_extract(**sizes["extract"]),
        "sae": lambda: bp.bench_sae(**sizes["sae"]),
        "control": lambda: bp.bench_control(workdir, sizes["control"]),
        "gradfam": lambda: bp.bench_gradfam(**sizes["gradfam"]),
        "prefect": prefect,
        "finetune": finetune,
        "peers": peers,
    }
    (workdir / "prefect").mkdir(parents=True, exist_ok=True)
    for name in BENCHMARKS:
        if name in names:
            timed(name, jobs[name])
    return results


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        if x != x:  # NaN
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out + [""]


def markdown(doc: dict[str, Any]) -> str:
    m, r = doc["machine"], doc["results"]
    lines = [
        "# SALVE benchmarks",
        "",
        f"Generated by `benchmarks/run_all.py{' --quick' if doc['quick'] else ''}` on "
        f"{doc['started']} in {doc['seconds']:.0f} s."
        + (" **Quick smoke run: tiny sizes, not representative.**" if doc["quick"] else ""),
        "See benchmarks/README.md for what each row means. Ratios are measured within this run.",
        "",
        "## Machine",
        "",
    ]
    lines += _table(
        ["CPU", "cores (usable)", "memory GiB", "torch threads", "torch", "python", "load avg"],
        [[m["cpu_model"], f"{m['logical_cores']} ({m['usable_cores']})", m["memory_gib"],
          m["torch_threads"], m["torch"], m["python"],
          " / ".join(str(x) for x in m["load_average_at_start"])]],
    )  # fmt: skip
    for name in (*BENCHMARKS, *MERGED_ONLY):
        if name not in r:
            continue
        res = r[name]
        if "error" in res:
            lines += [f"## {name}", "", f"**error**: `{res['error']}`", ""]
            continue
        section = RENDER[name](res)
        if "run" in res:  # merged from another run: say which, under the section's title
            section[2:2] = _run_note(res["run"])
        lines += section
    return "\n".join(lines)


def _render_stages(s: dict) -> list[str]:
    p = s["params"]
    lines = [
        "## Stages, cold and warm",
        "",
        f"Params: data {p['data']['source']} {p['data']['image_size']} px "
        f"(max_per_class {p['data']['max_per_class']}), finetune {p['finetune']['arch']} "
        f"{p['finetune']['epochs']} epochs, SAE {p['sae']['kind']} width {p['sae']['width']} "
        f"{p['sae']['epochs']} epochs, threads {p['common']['num_threads']}.",
        "",
    ]
    warm = {w["stage"]: w for w in s["warm_per_stage"]}
    rows = []
    for c in s["cold"]:
        w = warm.get(c["stage"], {})
        rows.append([c["stage"], c.get("wall_s", "-"), c.get("maxrss_mib", "-"),
                     w.get("wall_s", "-"), w.get("maxrss_mib", "-"),
                     c.get("error", "").splitlines()[-1] if c.get("error") else ""])  # fmt: skip
    lines += _table(
        ["stage", "cold s", "cold peak MiB", "warm s (`salve stage`)", "warm peak MiB", "error"],
        rows,
    )
    wr, dc = s["warm_salve_run"], s["dvc_commit"]
    lines += _table(
        ["whole pipeline", "s", "peak MiB"],
        [
            ["cold: sum of `python -m tasks` runs", s["cold_total_s"], max(
                (c.get("maxrss_mib", 0) for c in s["cold"]), default=0)],
            ["`dvc commit` of every stage", dc["wall_s"], dc["maxrss_mib"]],
            ["warm: `salve run`, everything fresh", wr["wall_s"], wr["maxrss_mib"]],
        ],
    )  # fmt: skip
    return lines


def _render_extract(e: dict) -> list[str]:
    return [
        "## Activation extraction vs bare forward",
        "",
        *_table(
            ["path", "images/s", "seconds"],
            [
                ["salve extract_activations", e["salve_images_per_s"], e["salve_s"]],
                ["bare inference_mode forward", e["bare_images_per_s"], e["bare_s"]],
            ],
        ),
        f"resnet18, {e['n']} images at {e['image_size']} px, batch {e['batch_size']}: "
        f"throughput ratio salve/bare = **{e['throughput_ratio_salve_over_bare']:.3f}** "
        f"(aim >= 0.95); max |difference| {e['max_abs_diff']:.2g}.",
        "",
    ]


def _render_sae(s: dict) -> list[str]:
    return [
        "## SAE fitting throughput",
        "",
        f"{s['n']} x {s['d']} activations, width {s['width']}, batch {s['batch_size']}, "
        f"{s['epochs']} epoch(s), k {s['k']} (top-k variants).",
        "",
        *_table(
            ["variant", "samples/s", "seconds"],
            [[r["kind"], r["samples_per_s"], r["seconds"]] for r in s["rows"]],
        ),
    ]


def _render_control(c: dict) -> list[str]:
    a, s = c["alpha_crit"], c["sweep"]
    return [
        "## Control: cached sweep and exact alpha_crit (bench_control.py)",
        "",
        *_table(
            ["measurement", "seconds", "ratio"],
            [
                [f"alpha_exact, N={a['n']}", a["exact_s"], ""],
                [
                    f"alpha_brentq loop (timed on {a['brentq_measured_on']}, scaled)",
                    a["brentq_s"],
                    f"x{a['ratio_brentq_over_exact']:.0f} vs exact",
                ],
                [f"sweep on cached acts, {s['alphas']} alphas", s["sweep_cached_s"], ""],
                ["one backbone pass to cache acts", s["cache_pass_s"], ""],
                [
                    "backbone re-run per alpha",
                    s["rerun_per_alpha_s"],
                    f"x{s['ratio_rerun_over_sweep']:.0f} vs cached sweep, "
                    f"x{s['ratio_rerun_over_cache_plus_sweep']:.1f} vs cache pass + sweep",
                ],
            ],
        ),  # fmt: skip
        f"exact and brentq agree within 1e-6 on {_pct(a['frac_agree_1e-6_where_brentq_finite'])} "
        "of the samples where brentq finds a root.",
        "",
    ]


def _render_gradfam(g: dict) -> list[str]:
    return [
        "## Grad-FAM: closed form vs autograd",
        "",
        *_table(
            ["method", "ms / image"],
            [
                ["closed form (feature_maps + einsum)", g["closed_form_ms_per_image"]],
                ["autograd (one backward per feature)", g["autograd_ms_per_image"]],
            ],
        ),
        f"resnet18 at {g['image_size']} px, {g['n_images']} images, {g['features']} features, "
        f"batch {g['batch_size']}: speedup of the closed form **x"
        f"{g['speedup_closed_over_autograd']:.2f}**; max relative difference "
        f"{g['max_rel_diff']:.2g} ({g['nonzero_fraction']:.0%} of map cells non-zero).",
        "",
    ]


def _render_prefect(p: dict) -> list[str]:
    modes = p["modes"]
    names = {
        "none": "no Prefect (tasks.runner only)",
        "temporary_api": "Prefect, temporary API",
        "server": "Prefect, running `prefect server start`",
    }
    rows = []
    for key, label in names.items():
        m = modes[key]
        over = "" if key == "none" else _f(p[f"{key}_overhead_call_s"])
        rows.append([label, m["wall_s"], m["import_s"], m["call_s"], over])
    return [
        "## Prefect overhead (every stage skipped)",
        "",
        f"Stages: {', '.join(p['stages'])}. Server start-up: {p['server_start_s']:.1f} s "
        "(not counted below).",
        "",
        *_table(["mode", "process s", "import s", "flow call s", "overhead vs no Prefect s"], rows),
    ]


def _render_finetune(f: dict) -> list[str]:
    return [
        "## Fine-tuning throughput (train loop)",
        "",
        *_table(
            ["arch", "image px", "batch", "steps", "images/s", "seconds"],
            [
                [
                    r["arch"],
                    r["image_size"],
                    r["batch_size"],
                    r["steps"],
                    r["images_per_s"],
                    r["seconds"],
                ]
                for r in f["rows"]
            ],
        ),  # fmt: skip
    ]


def _int(x: float) -> str:
    return f"{x:,.0f}"


def _ratio(x: Any) -> str:
    return "n/a" if x is None else f"**x{x:.2f}**"


def _render_time_to_fvu(t: dict) -> list[str]:
    """The second SAE peers table: training seconds to the FVU salve reaches at the budget."""
    rows = []
    for r in t["rows"]:
        name = f"{r['library']} {r.get('version', '')}".strip()
        if "skipped" in r or "error" in r:
            what = "skipped" if "skipped" in r else "error"
            rows.append([name, what, "", "", "", r.get("skipped") or f"`{r['error']}`"])
            continue
        bound = "" if r["reached"] else ">= "
        reached = (
            f"yes, in {r['epochs']} epochs (FVU {r['fvu']:.4g})"
            if r["reached"]
            else f"not reached in {r['epochs']} epochs (FVU {r['fvu']:.4g} at the cap)"
        )
        ratio = r.get("ratio_peer_over_salve")
        ratio_text = "" if r["library"] == "salve" else _ratio(ratio)
        if ratio is not None and r.get("ratio_is_lower_bound"):
            ratio_text = f">= {ratio_text}"
        rows.append([name, reached, f"{bound}{r['seconds']:.3g}", ratio_text,
                     f"{r['fvu_check_seconds']:.3g}", r["protocol"]])  # fmt: skip
    header = ["library", "reached", "train seconds", "ratio", "check seconds (excluded)",
              "protocol"]  # fmt: skip
    return [
        f"#### Time to reach salve's FVU at {t['epochs']} epochs (FVU <= {t['target_fvu']:.4g})",
        "",
        *_table(header, rows),
        "The same activations and settings as above; training wall seconds until the FVU on "
        "the training activations first reaches salve's at the epoch budget, checked after every "
        f"epoch up to {t['max_epochs']}, the checks not counted. Not reached: the seconds to the "
        "cap, and the ratio, are lower bounds.",
        "",
    ]


def _render_peers(p: dict) -> list[str]:
    lines = [
        "## Peers: salve vs what users would pick instead",
        "",
        "Every ratio is the peer's time over salve's (> 1: salve faster), both measured in this "
        "run, interleaved, best of the repeats. Load average "
        f"{' / '.join(map(str, p['load_average_before']))} before, "
        f"{' / '.join(map(str, p['load_average_after']))} after; torch threads "
        f"{p['torch_threads']}; OMP_WAIT_POLICY {p.get('omp_wait_policy') or 'unset'}; CPU kernels "
        + ", ".join(f"{k}={v or 'unset'}" for k, v in p["kernel_settings"].items())
        + ".",
        "",
    ]
    if p.get("contention_before"):
        lines += [f"**Measured on a busy machine**: {p['contention_before']}", ""]
    g = p.get("gradfam", {})
    lines += ["### Grad-FAM vs pytorch-grad-cam `GradCAM` (latent as target)", ""]
    if "error" in g:
        lines += [f"**error**: `{g['error']}`", ""]
    elif "skipped" in g["peer"]:
        lines += [f"pytorch-grad-cam skipped: {g['peer']['skipped']}.", ""]
    else:
        lines += _table(
            ["image px", "images x latents", "salve ms", "grad-cam ms", "ratio",
             "maps: correlation", "max abs diff"],
            [[r["image_size"], f"{r['images']} x {r['latents']}", _int(r["salve_ms"]),
              _int(r["peer_ms"]),
              _ratio(r["ratio_peer_over_salve"]), f"{r['check_correlation']:.6f}",
              f"{r['check_max_abs_diff']:.1g}"] for r in g["rows"]],
        )  # fmt: skip
        lines += [
            f"grad-cam {g['peer']['version']}. resnet18 (seeded, untrained), ReLU SAE width "
            "64 on its activations, digits validation images, the most active latents. salve: "
            '`gradfam_maps(layer="pooled")` (closed form, layer resolved per call) + '
            "`upsample_normalise` to the input size; grad-cam: `GradCAM(target_layers=[layer4])`, "
            "one call per latent with that latent's code as the target. Check: salve's raw maps "
            "through grad-cam's own post-processing (ReLU, `scale_cam_image` to the input size, "
            "twice as its layer aggregation does) against grad-cam's maps, over every pixel.",
            "",
        ]
    s = p.get("sae", {})
    lines += ["### TopK SAE fitting vs overcomplete and SAELens", ""]
    if "error" in s:
        lines += [f"**error**: `{s['error']}`", ""]
    else:
        rows = []
        for r in s["rows"]:
            if "skipped" in r:
                rows.append([r["library"], "", "", "", "", "skipped", r["skipped"]])
                continue
            note = "; ".join(x for x in (r.get("setup"), r.get("note")) if x)
            rows.append([f"{r['library']} {r.get('version', '')}".strip(), _int(r["samples_per_s"]),
                         r["fvu"], r["gflop_per_s"], r["seconds"],
                         _ratio(r.get("ratio_peer_over_salve")) if r["library"] != "salve"
                         else "", note])  # fmt: skip
        floor = s["n"] * s["epochs"] / s["matmul_floor_s"]
        rows.append(["matmul floor (the 6 products alone)", _int(floor), "", s[
            "matmul_floor_gflop_per_s"], s["matmul_floor_s"], "", ""])  # fmt: skip
        lines += _table(
            ["library", "samples/s", "FVU", "GFLOP/s", "seconds", "ratio", "setup"], rows
        )
        lines += [
            f"{s['n']} x {s['d']} activations ({s['activations']}), width {s['width']}, "
            f"k {s['k']}, {s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g}. FVU: "
            "salve's definition on the training activations. GFLOP/s counts the six matrix "
            "products of a step (12 x d x width per sample); salve reaches "
            f"**{s['salve_fraction_of_matmul_floor']:.0%}** of the matmul floor.",
            "",
        ]
        if "time_to_fvu" in s:  # absent from results measured before it existed
            lines += _render_time_to_fvu(s["time_to_fvu"])
    e = p.get("extract", {})
    lines += ["### Activation extraction vs a bare `torch.inference_mode` forward", ""]
    if "error" in e:
        lines += [f"**error**: `{e['error']}`", ""]
    else:
        lines += _table(
            ["path", "images/s", "ratio"],
            [["salve extract_activations", _int(e["salve_images_per_s"]),
              _ratio(e["throughput_ratio_salve_over_bare"])],
             ["bare inference_mode forward", _int(e["bare_images_per_s"]), ""]],
        )  # fmt: skip
        lines += [
            f"resnet18, {e['n']} images at {e['image_size']} px, batch {e['batch_size']} "
            "(the extraction benchmark's measurement); max |difference| "
            f"{e['max_abs_diff']:.2g}.",
            "",
        ]
    return lines


RENDER = {
    "stages": _render_stages,
    "extract": _render_extract,
    "sae": _render_sae,
    "control": _render_control,
    "gradfam": _render_gradfam,
    "prefect": _render_prefect,
    "finetune": _render_finetune,
    "peers": _render_peers,
    "memory": bm.render,
    "kernels": bk.render,
    "paper_scale": bps.render,
}


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the sections of ``new`` replacing theirs; each of those records the run it
    came from (time, machine), since the document's own machine is the old run's."""
    out = dict(old)
    out["results"] = dict(old["results"])
    for name, res in new["results"].items():
        out["results"][name] = res | {"run": {"started": new["started"], "quick": new["quick"],
                                              "machine": new["machine"]}}  # fmt: skip
    return out


def _run_note(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    return [
        f"*Measured in a separate run on {run['started']}"
        + (" (quick)" if run["quick"] else "")
        + f": {m['cpu_model']}, {m['logical_cores']} cores, torch threads {m['torch_threads']}, "
        f"load average {' / '.join(str(x) for x in m['load_average_at_start'])} at its start.*",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads here (default: params.yaml's)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other sections of --out-dir's results.json; the ones run here replace "
        "theirs and carry this run's machine and time",
    )
    args = ap.parse_args(argv)

    from salve.config import load

    threads = args.threads or load(bp.REPO / "params.yaml").common.num_threads
    if threads:
        torch.set_num_threads(threads)
    names = list(args.only or BENCHMARKS)
    workdir = bp.temp_workdir()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    try:
        machine = bp.machine_info()
        results = run(names, args.quick, workdir)
    finally:
        if args.keep:
            print(f"[bench] work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "quick": args.quick,
        "started": started,
        "seconds": time.perf_counter() - t0,
        "machine": machine,
        "results": results,
    }
    old_path = args.out_dir / "results.json"
    if args.merge and old_path.exists():
        doc = merge(json.loads(old_path.read_text()), doc)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (args.out_dir / "RESULTS.md").write_text(markdown(doc))
    print(f"[bench] wrote {args.out_dir / 'RESULTS.md'} and {args.out_dir / 'results.json'}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
