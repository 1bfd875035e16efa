"""Bit-identity check for performance changes to salve/sae/fit.py: fit every SAE kind (with and
without decoder normalisation) on a fixed input, save every weight and the loss history, or
compare them with a saved set (torch.equal, tensor by tensor). Run it before the change with
``save``, after it with ``check``, at each thread count and kernel mode that matters:

    python benchmarks/check_sae_identity.py OUT.safetensors THREADS pinned|base save   # before
    python benchmarks/check_sae_identity.py OUT.safetensors THREADS pinned|base check  # after

``pinned``: common.reproducible's AVX2 kernel paths; ``base``: the CPU's own (salve.runtime).
Exit status 1 when any tensor differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def fit_all(threads: int) -> dict:
    import torch

    from salve.config import SaeConfig
    from salve.sae import SAE_KINDS, fit_sae

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    acts = (torch.randn(700, 64, generator=g) + 0.3).relu() * 2
    out = {}
    for kind in SAE_KINDS:
        for normalise in (True, False):
            aux_l1 = 0.01 if kind == "topk" else 0.0
            cfg = SaeConfig(kind=kind, width=96, k=8, epochs=6, batch_size=128, l1=0.01,
                            normalise_decoder=normalise, aux_l1=aux_l1)  # fmt: skip
            sae, history = fit_sae(acts, cfg, seed=3, progress=False)
            for name, t in sae.state_dict().items():
                out[f"{kind}.{normalise}.{name}"] = t.contiguous()
            rows = [[h[key] for key in sorted(h)] for h in history]
            out[f"{kind}.{normalise}.history"] = torch.tensor(rows, dtype=torch.float64)
    return out


def main(argv: list[str]) -> int:
    path, threads, mode, action = argv
    from salve.runtime import pin_cpu_kernels

    pin_cpu_kernels(mode == "pinned")  # before the first tensor operation
    import torch
    from safetensors.torch import load_file, save_file

    out = fit_all(int(threads))
    if action == "save":
        save_file(out, path)
        print(f"saved {len(out)} tensors to {path}")
        return 0
    ref = load_file(path)
    differ = [k for k in ref if k not in out or not torch.equal(ref[k], out[k])]
    print(f"threads {threads}, {mode} kernels: {len(ref)} tensors, {len(differ)} differ:", differ)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
