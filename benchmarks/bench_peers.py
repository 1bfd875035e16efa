"""salve against what users would pick instead, side by side, measured in one run.

- Grad-FAM (closed form at the pooled layer, maps upsampled and normalised) vs pytorch-grad-cam's
  ``GradCAM`` with the SAE latent as the target (one forward and backward per latent): the same
  resnet18, SAE, images and latents. The maps are checked equal: salve's raw maps are put through
  pytorch-grad-cam's own post-processing (ReLU, ``scale_cam_image`` to the input size, then
  again as its layer aggregation does) and compared with its output: Pearson correlation over
  every pixel, and the largest absolute difference.
- TopK SAE fitting vs overcomplete (``TopKSAE`` + ``train_sae``) and SAELens
  (``TopKTrainingSAE`` + ``SAETrainer`` fed from an iterator): the same activations, kind,
  width, k, epochs, batch size and learning rate; samples/s and FVU (salve's definition, on the
  training activations, float64 sums). Plus the matmul floor: the six matrix products a batch
  needs (encoder and decoder forward, their weight and input gradients) timed alone, so the
  FLOP rate salve achieves can be read against what the machine does on the same shapes.
- Activation extraction vs a bare ``torch.inference_mode`` forward (bench_pipeline.bench_extract).

Every ratio is peer time / salve time (> 1: salve faster), both sides interleaved in the same
process and run. A peer that is not installed, or does not import, is skipped with the reason.
Peer packages come from the optional ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# name shown, module imported, distribution (pip name)
PEERS = {
    "pytorch-grad-cam": ("pytorch_grad_cam", "grad-cam"),
    "overcomplete": ("overcomplete", "overcomplete"),
    "SAELens": ("sae_lens", "sae-lens"),
}


# --------------------------------------------------------------------------------------------
# Peers: import or say why not
# --------------------------------------------------------------------------------------------


def _matplotlib_get_cmap_shim() -> str | None:
    """overcomplete 0.3.0 calls ``matplotlib.cm.get_cmap`` at import; matplotlib 3.9 removed it.
    Restore it from the colormap registry; returns what was done (None when not needed)."""
    try:
        import matplotlib
        import matplotlib.cm
    except ImportError:
        return None
    if hasattr(matplotlib.cm, "get_cmap"):
        return None
    matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    return f"matplotlib {matplotlib.__version__} lacks cm.get_cmap: shimmed for the import"


def import_peer(name: str) -> tuple[Any | None, dict[str, Any]]:
    """(module or None, {"version", "note"} or {"skipped": reason})."""
    module_name, dist = PEERS[name]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None, {"skipped": f"not installed (`pip install -e '.[bench]'` brings {dist})"}
    from salve.tv import import_torchvision

    import_torchvision()  # the peers import torchvision; its CUDA-built ops need the stub here
    note = _matplotlib_get_cmap_shim() if name == "overcomplete" else None
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip, reported
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, {"skipped": f"{dist} {version} does not import: {type(exc).__name__}: {first}"}
    info: dict[str, Any] = {"version": version}
    if note:
        info["note"] = note
    return module, info


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds, the functions interleaved within
    a round so that a drifting load hits every side alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, repeats)):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------
# Grad-FAM vs pytorch-grad-cam
# --------------------------------------------------------------------------------------------


def reference_postprocess(maps_nfhw: torch.Tensor, size: int, scale_cam_image) -> torch.Tensor:
    """What pytorch-grad-cam does to a raw map of one target layer: ReLU, min-max scaling and
    resizing to the input (``scale_cam_image``), then the layer aggregation's ReLU and second
    min-max scaling. Applied to salve's raw maps to compare like with like: [N, F, S, S]."""
    import numpy as np

    n, f = maps_nfhw.shape[:2]
    raw = np.maximum(maps_nfhw.detach().double().numpy(), 0).reshape(n * f, *maps_nfhw.shape[2:])
    once = scale_cam_image(raw.astype(np.float32), (size, size))
    twice = scale_cam_image(np.maximum(once, 0))
    return torch.from_numpy(np.asarray(twice)).view(n, f, size, size)


def map_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Pearson correlation over every pixel, and the largest absolute difference."""
    a, b = ours.double().flatten(), theirs.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    corr = float(a @ b) / denom if denom > 0 else float("nan")
    diff = float((ours.double() - theirs.double()).abs().max())
    return {"correlation": corr, "max_abs_diff": diff}


def _digits_images(n: int, size: int) -> torch.Tensor:
    """``n`` validation images of the built-in digits set (offline), normalised, [n, 3, S, S]."""
    import tempfile

    from salve.data import IMAGENET_MEAN, IMAGENET_STD, normalise, prepare_dataset

    with tempfile.TemporaryDirectory() as raw:
        data = prepare_dataset("digits", image_size=size, raw_dir=Path(raw), progress=False)
    return normalise(data.val_images[:n], IMAGENET_MEAN, IMAGENET_STD)


def bench_gradfam_vs_gradcam(
    image_sizes: list[int], n_images: int, n_features: int, width: int, repeats: int
) -> dict[str, Any]:
    """Per image size: salve's ``gradfam_maps(layer="pooled")`` + ``upsample_normalise`` vs
    pytorch-grad-cam's ``GradCAM`` called once per latent (target: that latent's code)."""
    import numpy as np
    from torch import nn

    from salve.config import SaeConfig
    from salve.gradfam import gradfam_maps, upsample_normalise
    from salve.models import build_model, penultimate
    from salve.sae import init_sae

    gradcam, info = import_peer("pytorch-grad-cam")
    out: dict[str, Any] = {"peer": info, "rows": []}
    if gradcam is None:
        return out
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class LatentCodes(nn.Module):
        """The classifier's backbone followed by the SAE encoder: outputs are the latent codes,
        so a "class" target of pytorch-grad-cam is one latent."""

        def __init__(self, model: nn.Module, sae: nn.Module) -> None:
            super().__init__()
            self.model, self.sae = model, sae

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sae.encode(penultimate(self.model, x))

    for size in image_sizes:
        torch.manual_seed(0)
        model = build_model("resnet18", 10, image_size=size).eval()
        x = _digits_images(n_images, size)
        with torch.no_grad():
            acts = penultimate(model, x)
        sae = init_sae(acts, SaeConfig(kind="relu", width=width), seed=0).eval()
        with torch.no_grad():
            mean_code = sae.encode(acts).mean(0)
        feats = mean_code.argsort(descending=True)[:n_features].tolist()  # the busiest latents
        cam = GradCAM(model=LatentCodes(model, sae), target_layers=[model.layer4])

        def salve_maps(model=model, sae=sae, x=x, feats=feats, size=size):
            raw = gradfam_maps(model, sae, x, feats, layer="pooled", batch_size=n_images)
            return raw, upsample_normalise(raw, size)

        def peer_maps(cam=cam, x=x, feats=feats):
            per_latent = [cam(input_tensor=x, targets=[ClassifierOutputTarget(f)] * len(x))
                          for f in feats]  # fmt: skip
            return torch.from_numpy(np.stack(per_latent, axis=1))

        raw, ours = salve_maps()  # warm-up, and the maps to compare
        theirs = peer_maps()
        check = map_agreement(reference_postprocess(raw, size, scale_cam_image), theirs)
        own = map_agreement(ours, theirs)
        best = _interleaved({"salve": salve_maps, "peer": peer_maps}, repeats)
        out["rows"].append(
            {
                "image_size": size,
                "images": n_images,
                "latents": n_features,
                "grid": list(raw.shape[2:]),
                "salve_ms": 1e3 * best["salve"],
                "peer_ms": 1e3 * best["peer"],
                "ratio_peer_over_salve": best["peer"] / best["salve"],
                "check_correlation": check["correlation"],
                "check_max_abs_diff": check["max_abs_diff"],
                "own_postprocess_correlation": own["correlation"],
                "nonzero_fraction": float((theirs > 0).double().mean()),
            }
        )
        del cam
    return out


# --------------------------------------------------------------------------------------------
# SAE fitting vs overcomplete and SAELens
# --------------------------------------------------------------------------------------------


def fvu(acts_nm: torch.Tensor, recon_nm: torch.Tensor) -> float:
    """Fraction of variance unexplained, salve's definition: sum ||a - a_hat||^2 over
    sum ||a - mean a||^2, in float64."""
    a, r = acts_nm.double(), recon_nm.double()
    return float((a - r).pow(2).sum() / (a - a.mean(0)).pow(2).sum())


def sae_flops_per_sample(d: int, width: int) -> int:
    """Multiply-adds x 2 of one sample through an SAE fit step: encoder and decoder forward, the
    decoder's weight and input gradients, the encoder's weight and input gradients (the input
    gradient is needed: the input is centred on the decoder bias, a parameter)."""
    return 6 * 2 * d * width


def matmul_floor(n: int, d: int, width: int, epochs: int, batch_size: int) -> float:
    """Seconds for the six products of every batch of a fit, alone, on preallocated operands of
    the same shapes: the floor a fit of this size approaches on this machine."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, d, generator=g)
    w_enc, w_dec = torch.randn(width, d, generator=g), torch.randn(d, width, generator=g)
    grad_recon = torch.randn(batch_size, d, generator=g)
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    t0 = time.perf_counter()
    for _ in range(epochs):
        for m in sizes:
            xb, gr = x[:m], grad_recon[:m]
            codes = xb @ w_enc.T  # encoder
            _ = codes @ w_dec.T  # decoder
            _ = gr.T @ codes  # decoder weight gradient
            grad_codes = gr @ w_dec  # decoder input gradient
            _ = grad_codes.T @ xb  # encoder weight gradient
            _ = grad_codes @ w_enc  # encoder input gradient
    return time.perf_counter() - t0


def _batches(acts: torch.Tensor, batch_size: int, epochs: int, seed: int):
    """Shuffled batches, epoch after epoch (SAELens reads its data from an iterator)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0], batch_size):
            yield acts[order[start : start + batch_size]]


def bench_sae_vs_peers(
    acts: torch.Tensor, width: int, k: int, epochs: int, batch_size: int, lr: float, repeats: int
) -> dict[str, Any]:
    """TopK SAE, the same activations and settings for every library; samples/s and FVU."""
    from torch.utils.data import DataLoader, TensorDataset

    from salve.config import SaeConfig
    from salve.sae import fit_sae

    n, d = acts.shape
    cfg = SaeConfig(
        kind="topk", width=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=0
    )  # the same epochs as the peers
    results: dict[str, torch.Tensor] = {}
    fns: dict[str, Callable[[], Any]] = {}
    peers: dict[str, dict[str, Any]] = {}

    def salve_fit() -> None:
        sae, _ = fit_sae(acts, cfg, seed=0, progress=False)
        with torch.no_grad():
            results["salve"] = sae(acts)[0]

    fns["salve"] = salve_fit

    overcomplete, peers["overcomplete"] = import_peer("overcomplete")
    if overcomplete is not None:
        from overcomplete.sae import TopKSAE, train_sae

        def overcomplete_fit() -> None:
            torch.manual_seed(0)
            model = TopKSAE(d, nb_concepts=width, top_k=k, device="cpu")
            loader = DataLoader(
                TensorDataset(acts),
                batch_size=batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
            opt = torch.optim.Adam(model.parameters(), lr=lr)

            def mse(x, x_hat, *_):
                return (x - x_hat).square().mean()

            train_sae(model, loader, mse, opt, nb_epochs=epochs, monitoring=0)
            model.eval()
            with torch.no_grad():
                results["overcomplete"] = model(acts)[2]

        fns["overcomplete"] = overcomplete_fit
        peers["overcomplete"]["setup"] = (
            "default encoder (Linear + BatchNorm), Adam, MSE loss, train_sae(monitoring=0, "
            "clip_grad=1.0 default)"
        )

    sae_lens, peers["SAELens"] = import_peer("SAELens")
    if sae_lens is not None:
        import functools

        import tqdm
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training import sae_trainer

        sae_trainer.tqdm = functools.partial(tqdm.tqdm, disable=True)  # no bar in the log

        def sae_lens_fit() -> None:
            torch.manual_seed(0)
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, device="cpu"))
            trainer = sae_trainer.SAETrainer(
                cfg=SAETrainerConfig(
                    total_training_samples=n * epochs,
                    train_batch_size_samples=batch_size,
                    lr=lr,
                    lr_end=lr / 10,  # what SAELens's runner config sets (unused: constant lr)
                    device="cpu",
                ),
                sae=sae,
                data_provider=_batches(acts, batch_size, epochs, seed=0),
            )
            trainer.fit()
            sae.eval()
            with torch.no_grad():
                results["SAELens"] = sae(acts)

        fns["SAELens"] = sae_lens_fit
        peers["SAELens"]["setup"] = (
            "TopKTrainingSAE defaults (aux loss on dead latents, decoder-norm rescaling), "
            "SAETrainer with Adam, constant lr, grad-norm clipping 1.0"
        )

    for name, fn in list(fns.items()):  # warm-up; a peer that fails here is skipped, said why
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            if name == "salve":
                raise
            peers[name] = {"skipped": f"fit failed: {type(exc).__name__}: {exc}"[:300],
                           "traceback": traceback.format_exc(limit=4)}  # fmt: skip
            del fns[name]
    best = _interleaved(fns, repeats)
    floor_s = min(matmul_floor(n, d, width, epochs, batch_size) for _ in range(max(1, repeats)))
    flops = sae_flops_per_sample(d, width) * n * epochs
    rows = []
    for name in ("salve", "overcomplete", "SAELens"):
        if name not in fns:
            rows.append({"library": name} | peers[name])
            continue
        row = {
            "library": name,
            "seconds": best[name],
            "samples_per_s": n * epochs / best[name],
            "fvu": fvu(acts, results[name]),
            "gflop_per_s": flops / best[name] / 1e9,
        }
        if name != "salve":
            row |= peers[name] | {"ratio_peer_over_salve": best[name] / best["salve"]}
        rows.append(row)
    return {
        "n": n,
        "d": d,
        "width": width,
        "k": k,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "rows": rows,
        "matmul_floor_s": floor_s,
        "matmul_floor_gflop_per_s": flops / floor_s / 1e9,
        "salve_fraction_of_matmul_floor": floor_s / best["salve"],
    }


# --------------------------------------------------------------------------------------------
# Activations for the SAE comparison
# --------------------------------------------------------------------------------------------


def default_run_activations(project: Path | None) -> tuple[torch.Tensor, str]:
    """The default run's training activations when a project has them (the stage benchmark's),
    else those of a seeded, untrained resnet18 on the digits training images at 64 px."""
    if project is not None:
        path = project / "results" / "extract" / "train.safetensors"
        if path.exists():
            from safetensors.torch import load_file

            return load_file(str(path))["acts"], f"the default run's extract output ({path.name})"
    import tempfile

    from salve.activations import extract_activations
    from salve.data import IMAGENET_MEAN, IMAGENET_STD, prepare_dataset
    from salve.models import build_model

    with tempfile.TemporaryDirectory() as raw:
        data = prepare_dataset("digits", image_size=64, raw_dir=Path(raw), progress=False)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=64)
    acts = extract_activations(
        model, data.train_images, IMAGENET_MEAN, IMAGENET_STD, batch_size=256, progress=False
    )
    return acts, "an untrained seeded resnet18 on the digits training images at 64 px"


# --------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------


def bench_peers(
    gradfam: dict[str, Any],
    sae: dict[str, Any],
    extract: dict[str, Any] | None,
    project: Path | None = None,
    extract_sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every peer comparison; ``extract`` is the extraction benchmark's result when it ran in
    this run (else it is measured here with ``extract_sizes``)."""
    from flows.contention import cpu_contention
    from salve.runtime import kernel_settings

    out: dict[str, Any] = {
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "contention_before": cpu_contention(),
        "kernel_settings": kernel_settings(),
        "torch_threads": torch.get_num_threads(),
        # how idle OpenMP threads wait: on a shared CPU the default spinning costs a lot
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    reuse = extract is not None and "error" not in extract
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "gradfam": lambda: bench_gradfam_vs_gradcam(**gradfam),
        "sae": lambda: _sae_section(sae, project),
        "extract": lambda: extract if reuse else _extract(extract_sizes),
    }
    for name, fn in sections.items():
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - reported; the other sections still run
            out[name] = {"error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=6)}  # fmt: skip
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _sae_section(sizes: dict[str, Any], project: Path | None) -> dict[str, Any]:
    acts, source = default_run_activations(project)
    return {"activations": source} | bench_sae_vs_peers(acts, **sizes)


def _extract(sizes: dict[str, Any] | None) -> dict[str, Any]:
    from benchmarks import bench_pipeline as bp

    if not sizes:
        raise ValueError("the extraction benchmark did not run and no sizes were given for it")
    return bp.bench_extract(**sizes)
