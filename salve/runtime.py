"""Device choice, seeding and every determinism setting, in one place.

CPU kernels. Three libraries choose their code path from the CPU, lazily, at their first use in a
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

``pin_cpu_kernels`` sets these before any of them has run. Always ``MKL_CBWR=AUTO``: the same
bytes from run to run on one machine. With ``common.reproducible`` (the default) all three are
pinned to the AVX2 code paths that every x86-64 CPU of the last decade runs the same way (Intel
and AMD, with or without AVX-512), so results are meant to match across such CPUs, at a measured
cost of about 1.5x on CPU training. Thread counts must match too (``common.num_threads``): float
reductions are split by thread. See README, "Reproducibility", for what was verified where.

The variables must be set before the first tensor operation of the process: the entry points
(``salve``, ``python -m tasks``, the test suite) call ``pin_cpu_kernels`` first thing, and
``import salve`` applies the always-on part.
"""

from __future__ import annotations

import os
import random

# Always set: run-to-run identical MKL results on this CPU (its fastest path otherwise).
BASE_ENV = {"MKL_CBWR": "AUTO"}
# Set unless the environment says otherwise, before torch loads its OpenMP runtime (at import):
# idle OpenMP threads sleep instead of spinning. With more runnable threads than cores (the
# flow's concurrent stages, Dask workers, another job), spinning threads starve the ones doing
# work: 10 training steps took 27.1 s instead of 7.0 s with this (load 6 on 2 cores).
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# common.reproducible: the same code paths on every x86-64 CPU with AVX2.
PINNED_ENV = {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

_MODE: bool | None = None  # the mode this process pinned, once chosen


class KernelModeError(RuntimeError):
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
    return kernel_settings()


def apply_base_settings() -> None:
    """The always-on part (run-to-run identical MKL, sleeping OpenMP threads), unless the
    environment already says; `import salve` runs it, before torch is imported."""
    for key, value in (BASE_ENV | THREAD_ENV).items():
        os.environ.setdefault(key, value)


def kernel_settings() -> dict[str, str]:
    """The kernel settings in force, for provenance records."""
    keys = sorted(PINNED_ENV.keys() | BASE_ENV.keys() | THREAD_ENV.keys())
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
    kernels and autocast may still differ across GPUs and driver versions (README).
    """
    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
