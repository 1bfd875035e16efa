"""The CPU kernel settings (salve/runtime.py), checked in fresh processes started from a shell
that sets none of them, as a user's would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from salve.runtime import OPENBLAS_ENV, PINNED_ENV, THREAD_ENV
from tests.conftest import cpu_flags


def _run(code: str) -> subprocess.CompletedProcess:
    strip = PINNED_ENV.keys() | OPENBLAS_ENV.keys() | THREAD_ENV.keys()
    env = {k: v for k, v in os.environ.items() if k not in strip}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="needs a CPU with AVX-512")
def test_pin_after_a_tensor_operation_is_refused() -> None:
    """ATen fixed its AVX-512 choice at the first operation: the pin cannot take effect."""
    done = _run(
        "import torch; torch.ones(64).sum()\n"
        "from salve.runtime import KernelModeError, pin_cpu_kernels\n"
        "try:\n    pin_cpu_kernels(True)\nexcept KernelModeError as e:\n    print('refused', e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused ATen already runs its AVX512"), done.stdout


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="needs an x86-64 CPU with AVX2")
def test_pin_first_gives_avx2_kernels_and_one_openblas_path() -> None:
    done = _run(
        "from salve.runtime import pin_cpu_kernels\n"
        "pin_cpu_kernels(True)\n"
        "import numpy, scipy.linalg, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "torch.ones(64).sum()\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
        "for i in threadpool_info():\n"
        "    if i['internal_api'] == 'openblas':\n"
        "        print(i['architecture'], i['num_threads'])\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "AVX2"
    openblas = [line for line in lines[1:] if line]
    assert openblas and set(openblas) == {"Haswell 1"}, done.stdout


def test_kernel_mode_names_what_made_the_numbers() -> None:
    from salve.runtime import kernel_mode

    assert kernel_mode(True) == "cross-CPU pin"
    assert kernel_mode(False) == "this CPU's fastest"
    assert kernel_mode(True, "cuda") == kernel_mode(False, "cuda") == "cuda"
