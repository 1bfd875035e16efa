"""Hash what a run produced, to check that another machine reproduces it byte for byte.

`dvc.lock` cannot answer that alone: stage outputs that are folders include each artifact's
provenance sidecar (git revision, times), which differs between any two runs. This hashes what
must not differ: every stage's tensor files and metrics file (tasks.STAGES).

    .venv/bin/python benchmarks/fingerprint.py --write   # record this machine's run
    .venv/bin/python benchmarks/fingerprint.py --check   # compare this run with the record

The run is made for the purpose: the committed HEAD is cloned into a scratch folder and runs
the default pipeline there on the cross-CPU kernel pin (`salve run --set
common.reproducible=true`; the default, false, takes each CPU's fastest kernels and repeats
only on one machine), about 10 minutes on 2 cores. `--root DIR` hashes what DIR holds instead.
The record (benchmarks/fingerprint.json) names the CPU it was made on. Compare runs of the
same commit (the same num_threads). Exit status of --check: 0 identical, 1 some file differs or
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from salve.download import file_checksums
from tasks import STAGE_ORDER, STAGES

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "fingerprint.json"


def fingerprint(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every stage's tensors and metrics file, sorted by path."""
    files: set[Path] = set()
    for spec in (STAGES[name] for name in STAGE_ORDER):  # the pipeline's, not the study's
        files.update((root / spec.out_dir).glob("**/*.safetensors"))
        files.add(root / spec.metrics_file)
    return {
        p.relative_to(root).as_posix(): file_checksums(p, sha256=True)["sha256"]
        for p in sorted(files)
        if p.is_file()
    }


def pinned_run(scratch: Path) -> Path:
    """Clone HEAD into ``scratch`` and run the default pipeline there on the cross-CPU pin."""
    root = scratch / "salve"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(root)], check=True)
    (root / ".venv").symlink_to(Path(sys.prefix))
    env = dict(os.environ, PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "--root", str(root), "run", "--no-progress",
         "--set", "common.reproducible=true"],
        cwd=root, env=env, check=True,
    )  # fmt: skip
    return root


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per file that differs, is missing here, or is new here."""
    lines = []
    for path in sorted(recorded.keys() | current.keys()):
        if path not in current:
            lines.append(f"missing here: {path}")
        elif path not in recorded:
            lines.append(f"not in the record: {path}")
        elif recorded[path] != current[path]:
            lines.append(f"differs: {path}")
    return lines


def machine() -> dict[str, str]:
    """The CPU (model, family, AVX-512 or not) from the first block of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        for line in first_cpu.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name", platform.processor() or "unknown CPU")
    avx512 = "avx512f" in fields.get("flags", "").split()
    return {
        "cpu": f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, "
        f"{'with' if avx512 else 'without'} AVX-512)",
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="record this run's hashes")
    mode.add_argument("--check", action="store_true", help="compare this run with the record")
    parser.add_argument(
        "--root", type=Path, help="hash this project's results (default: a pinned run of HEAD)"
    )
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args(argv)
    if args.root is None:
        with tempfile.TemporaryDirectory(prefix="salve-fingerprint-") as scratch:
            args.root = pinned_run(Path(scratch))
            return compare_or_record(args)
    return compare_or_record(args)


def compare_or_record(args: argparse.Namespace) -> int:
    current = fingerprint(args.root)
    if not current:
        print(f"no results under {args.root}: run the pipeline first (make run)", file=sys.stderr)
        return 1
    if args.write:
        args.record.write_text(
            json.dumps({"machine": machine(), "files": current}, indent=2) + "\n",
            encoding="utf-8",
        )
        print(f"recorded {len(current)} files in {args.record}")
        return 0
    record = json.loads(args.record.read_text(encoding="utf-8"))
    lines = differences(record["files"], current)
    made_on = record["machine"]["cpu"]
    if lines:
        print(
            f"{len(lines)} of {len(record['files'])} files differ from the run made on {made_on}:"
        )
        print("\n".join(f"  {line}" for line in lines))
        return 1
    print(f"all {len(current)} files identical to the run made on {made_on}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
