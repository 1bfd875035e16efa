"""Device choice, seeding and every determinism setting, in one place.

CPU kernels. Four libraries choose their code path from the CPU, lazily, at their first use in a
process, and each reads an environment variable then:

- MKL (matrix products, and the convolutions PyTorch runs as im2col + GEMM): without conditional
  numerical reproducibility (``MKL_CBWR``) its AVX-512 GEMM sums in an order that depends on the
  memory alignment of its buffers, so the same product can differ in the last bits from call to
  call. Measured on an Intel Xeon (AVX-512, AMX): the input gradient of a ResNet-18 at batch 1,
  32 px differed in 10-33 of 60 identical calls with two threads, which made activation
  maximisation, and so ``results/gradfam``, differ between runs. ``MKL_CBWR=AUTO`` (same code
  path, alignment-independent order) makes every call identical, for about 4 % of speed.
- oneDNN (most convolutions): ``ONEDNN_MAX_CPU_ISA`` caps the instruction set of its JIT kernels.
- ATen's vectorised kernels (batch norm, reductions, optimisers): ``ATEN_CPU_CAPABILITY``.
- OpenBLAS (numpy and scipy's BLAS: the logistic probes of ``evaluate``, a few dot products in
  ``alpha_crit``): chooses its kernels per CPU at load (SkylakeX on a Zen 4, Zen on a Zen 3), so
  ``OPENBLAS_CORETYPE=Haswell`` (AVX2) is always set on x86-64 CPUs with AVX2, in both modes: its
  work here is small. It runs on one thread (``OPENBLAS_NUM_THREADS=1``): with two, a probe fit
  took 0.26 s instead of 0.02 s here, its threads competing with torch's.

``pin_cpu_kernels`` sets these before any of them has run. ATen fixes its choice at its first
vectorised operation, which must come after the pin: a check that builds a model on the CPU
before it (the start-up checks once did) leaves the process on AVX-512 kernels; the pin raises
KernelModeError when it finds that.

Always ``MKL_CBWR=AUTO``: the same bytes from run to run on one machine. With
``common.reproducible`` (the default) the aim is the same bytes on every x86-64 CPU, so each
library gets a path that does not depend on the CPU:

- MKL: ``MKL_CBWR=COMPATIBLE`` (SSE2 code, Intel's documented branch for identical results on
  Intel and non-Intel CPUs). An ISA branch such as ``AVX2`` is honoured on Intel only: on AMD,
  MKL_VERBOSE reports ``CNR:AUTO`` for it, so Intel and AMD would run different GEMM code.
- oneDNN and ATen: capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``).

With the ``AVX2`` MKL branch an AMD Zen 3 (no AVX-512) and a Zen 4 (AVX-512) gave identical
results (both fell back to ``CNR:AUTO``); the ``COMPATIBLE`` pin repeats byte for byte on one
machine and is not yet compared across CPUs (docs/REPRODUCIBILITY.md). Thread counts must
match too (``common.num_threads``): float reductions are split by thread.

The variables must be set before the first tensor operation of the process: the entry points
(``salve``, ``python -m tasks``, the test suite) call ``pin_cpu_kernels`` first thing, and
``import salve`` applies the always-on part.
"""

from __future__ import annotations

import os
import platform
import random
import sys

from salve.errors import SalveUserError

# Always set: run-to-run identical MKL results on this CPU (its fastest path otherwise).
BASE_ENV = {"MKL_CBWR": "AUTO"}
# Set unless the environment says otherwise, before torch loads its OpenMP runtime (at import):
# idle OpenMP threads sleep instead of spinning. With more runnable threads than cores (the
# flow's concurrent stages, Dask workers, another job), spinning threads starve the ones doing
# work: 10 training steps took 27.1 s instead of 7.0 s with this (load 6 on 2 cores).
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
# numpy's and scipy's OpenBLAS on its AVX2 kernels, read when numpy loads (docstring above).
OPENBLAS_ENV = {"OPENBLAS_CORETYPE": "Haswell"}
# common.reproducible: code paths that every x86-64 CPU with AVX2 runs the same way.
PINNED_ENV = {
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}

_MODE: bool | None = None  # the mode this process pinned, once chosen


class KernelModeError(SalveUserError, RuntimeError):
    """The CPU kernel mode was asked to change after the kernels were chosen in this process."""


def pin_cpu_kernels(reproducible: bool) -> dict[str, str]:
    """Choose the CPU kernel paths for this process; call before any tensor operation.

    Idempotent for the same mode. Asking for the other mode later raises KernelModeError: the
    libraries have already read their settings, so only a new process can change them.
    """
    global _MODE
    if _MODE is not None and reproducible != _MODE:
        raise KernelModeError(
            f"common.reproducible={reproducible} was asked for, but this process already chose "
            f"its CPU kernels with common.reproducible={_MODE}; start a new process (salve run "
            "and python -m tasks do) to change it."
        )
    env = PINNED_ENV if reproducible else BASE_ENV
    for key, value in env.items():
        os.environ[key] = value
    if not reproducible:
        for key in PINNED_ENV.keys() - BASE_ENV.keys():
            os.environ.pop(key, None)
    _MODE = reproducible
    if reproducible and "torch" in sys.modules:
        capability = aten_capability()
        if capability.startswith("AVX512"):
            raise KernelModeError(
                f"ATen already runs its {capability} kernels in this process: a tensor operation "
                "ran before pin_cpu_kernels, so common.reproducible cannot take effect. Call "
                "pin_cpu_kernels before any tensor operation (salve's entry points do)."
            )
    return kernel_settings()


def kernel_mode(reproducible: bool, device_type: str = "cpu") -> str:
    """What made a result's numbers, for sidecars and the report: on CPU, the cross-CPU pin or
    this machine's fastest kernels (the same bytes from run to run on this machine only)."""
    if device_type != "cpu":
        return device_type
    return "cross-CPU pin" if reproducible else "this CPU's fastest"


def aten_capability() -> str:
    """The instruction set ATen's vectorised kernels run with in this process (fixes it)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:  # not Linux: leave OpenBLAS to choose
        return False


def apply_base_settings() -> None:
    """The always-on part (run-to-run identical MKL, sleeping OpenMP threads), unless the
    environment already says; `import salve` runs it, before torch is imported."""
    env = BASE_ENV | THREAD_ENV
    if platform.machine().lower() in ("x86_64", "amd64") and _has_avx2():
        env = env | OPENBLAS_ENV
    for key, value in env.items():
        os.environ.setdefault(key, value)


def kernel_settings() -> dict[str, str]:
    """The kernel settings in force, for provenance records."""
    keys = sorted(PINNED_ENV.keys() | BASE_ENV.keys() | THREAD_ENV.keys() | OPENBLAS_ENV.keys())
    return {k: os.environ.get(k, "") for k in keys} | {
        "reproducible": "unset" if _MODE is None else str(_MODE).lower()
    }


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "common.device is 'cuda' but no CUDA device is available: set it to 'auto' or 'cpu'."
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, *, num_threads: int = 0) -> None:
    """Seed every RNG and ask torch for deterministic kernels.

    On CPU this makes runs bit-reproducible for a fixed thread count (with the kernel settings
    above). On CUDA deterministic algorithms are requested too, but atomics in some backward
    kernels and autocast may still differ across GPUs and driver versions (docs/REPRODUCIBILITY.md).
    """
    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    _deterministic_kernels(torch)
    torch.backends.cudnn.benchmark = False


def _deterministic_kernels(torch) -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of the
    compiler: the public function also sets `torch._inductor.config.deterministic`, and importing
    that loads inductor and dynamo (6.7 s of every stage process on a 2-core machine). SALVE
    compiles nothing, so the eager flag is what matters; once inductor is loaded (someone
    compiles), the public function is used.

    The flag also makes torch fill every new tensor (``torch.empty``) with NaN, a guard against
    kernels that read memory they never wrote. None of SALVE's does: every stage's outputs are
    byte-identical without the fill (benchmarks/fingerprint.py), which took 4-6 % of a ResNet-18
    training step here (413 fills, 8-12 ms per step at batch 16 in torch.profiler)."""
    import sys

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if "torch._inductor.config" in sys.modules or setter is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
