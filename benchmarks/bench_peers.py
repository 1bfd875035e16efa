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
  Then time to the same FVU: the target is the FVU salve's fit reaches at the epoch budget, and
  each library trains until its FVU first reaches it (checked after every epoch, the checks off
  the clock), up to ``max_epochs``: per-epoch speed alone says nothing of how much an epoch buys.
- Activation extraction vs a bare ``torch.inference_mode`` forward (bench_pipeline.bench_extract).

Every ratio is peer time / salve time (> 1: salve faster), both sides interleaved in the same
process and run. A peer that is not installed, or does not import, is skipped with the reason.
Peer packages come from the optional ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
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


class StopFit(Exception):
    """Raised from a data iterator to end a trainer's fit there (target FVU reached, or the cap)."""


def _batches(
    acts: torch.Tensor,
    batch_size: int,
    epochs: int,
    seed: int,
    after_epoch: Callable[[], bool] | None = None,
) -> Iterator[torch.Tensor]:
    """Shuffled batches, epoch after epoch (SAELens reads its data from an iterator).

    ``after_epoch`` runs when the consumer asks for the batch after an epoch's last one, so the
    step on that batch is done: the only epoch boundary a trainer that pulls its data exposes.
    It returning True raises StopFit. A consumer that stops after the last epoch never gets there:
    it calls ``after_epoch`` itself."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0], batch_size):
            yield acts[order[start : start + batch_size]]
        if after_epoch is not None and after_epoch():
            raise StopFit


class EpochClock:
    """Training seconds until the FVU first reaches a target, checked at every epoch boundary.

    The checks are off the clock: an FVU pass over all the activations costs about an epoch's
    forwards, and counted it would bill the measuring to the library measured."""

    def __init__(
        self, target_fvu: float, max_epochs: int, current_fvu: Callable[[], float]
    ) -> None:
        self.target_fvu, self.max_epochs, self._current_fvu = target_fvu, max_epochs, current_fvu
        self.epochs, self.seconds, self.check_seconds = 0, 0.0, 0.0
        self.fvu = float("nan")
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    @property
    def reached(self) -> bool:
        return self.fvu <= self.target_fvu  # False while unchecked (NaN)

    @property
    def done(self) -> bool:
        return self.reached or self.epochs >= self.max_epochs

    def epoch_done(self) -> bool:
        """Stop the clock, check the FVU, restart the clock; True when training should stop."""
        if self._since is None:
            raise RuntimeError("EpochClock.start() was not called")
        stopped = time.perf_counter()
        self.seconds += stopped - self._since
        self.epochs += 1
        self.fvu = self._current_fvu()
        self._since = time.perf_counter()
        self.check_seconds += self._since - stopped
        return self.done

    def row(self) -> dict[str, Any]:
        return {"reached": self.reached, "epochs": self.epochs, "seconds": self.seconds,
                "fvu": self.fvu, "fvu_check_seconds": self.check_seconds}  # fmt: skip


def time_epochs_to_fvu(
    train_epoch: Callable[[], Any],
    current_fvu: Callable[[], float],
    target_fvu: float,
    max_epochs: int,
) -> dict[str, Any]:
    """One continuous run driven here: ``train_epoch`` (one epoch on the same model and
    optimizer each call) until the FVU reaches the target or ``max_epochs``."""
    clock = EpochClock(target_fvu, max_epochs, current_fvu)
    clock.start()
    while True:
        train_epoch()
        if clock.epoch_done():
            return clock.row()


def time_pulled_fit_to_fvu(
    make_fit: Callable[[Iterator[torch.Tensor]], Callable[[], Any]],
    acts: torch.Tensor,
    batch_size: int,
    current_fvu: Callable[[], float],
    target_fvu: float,
    max_epochs: int,
    seed: int = 0,
) -> dict[str, Any]:
    """One continuous run driven by a trainer that pulls its batches: ``make_fit(batches)``
    builds it (off the clock) and returns its fit, set for ``max_epochs`` epochs of ``batches``.
    The FVU is checked in the iterator between epochs; reaching the target ends the fit."""
    clock = EpochClock(target_fvu, max_epochs, current_fvu)
    fit = make_fit(_batches(acts, batch_size, max_epochs, seed, after_epoch=clock.epoch_done))
    clock.start()
    with contextlib.suppress(StopFit):  # the iterator ended the fit: target reached, or the cap
        fit()
    # the trainer stopped after the last epoch without asking for more: checked here, its
    # end-of-fit bookkeeping (SAELens: sparsity statistics into the metadata) on the clock
    if not clock.done:
        clock.epoch_done()
    return clock.row()


def time_separate_fits_to_fvu(
    fit: Callable[[int], Any],
    current_fvu: Callable[[Any], float],
    target_fvu: float,
    max_epochs: int,
) -> dict[str, Any]:
    """Independent fits of 1, 2, ... epochs until one reaches the target: for a fit without a
    per-epoch hook. Seconds: the whole fit that first reached it (what a user who knew that epoch
    count would pay), or the one of ``max_epochs`` epochs; the FVU checks are off the clock."""
    seconds_by_epochs: list[float] = []
    fvu_by_epochs: list[float] = []
    check_seconds = 0.0
    for epochs in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        model = fit(epochs)
        t1 = time.perf_counter()
        fvu_by_epochs.append(current_fvu(model))
        check_seconds += time.perf_counter() - t1
        seconds_by_epochs.append(t1 - t0)
        if fvu_by_epochs[-1] <= target_fvu:
            break
    return {
        "reached": fvu_by_epochs[-1] <= target_fvu,
        "epochs": len(fvu_by_epochs),
        "seconds": seconds_by_epochs[-1],
        "fvu": fvu_by_epochs[-1],
        "fvu_check_seconds": check_seconds,
        "seconds_by_epochs": seconds_by_epochs,
        "fvu_by_epochs": fvu_by_epochs,
    }


def _eval_fvu(model: torch.nn.Module, acts: torch.Tensor, recon: Callable[[Any], Any]) -> float:
    """FVU of ``recon(model(acts))`` in eval mode without gradients; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return fvu(acts, recon(model(acts)))
    finally:
        model.train(was_training)


def bench_sae_vs_peers(
    acts: torch.Tensor,
    width: int,
    k: int,
    epochs: int,
    batch_size: int,
    lr: float,
    repeats: int,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """TopK SAE, the same activations and settings for every library; samples/s and FVU at
    ``epochs``, then the training seconds each needs to reach the FVU salve reaches at
    ``epochs`` (up to ``max_epochs``, default 10 x ``epochs``): "time_to_fvu"."""
    from torch.utils.data import DataLoader, TensorDataset

    from salve.config import SaeConfig
    from salve.sae import fit_sae

    n, d = acts.shape
    max_epochs = max_epochs or 10 * epochs
    cfg = SaeConfig(
        kind="topk", width=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=0
    )  # the same epochs as the peers
    results: dict[str, torch.Tensor] = {}
    fns: dict[str, Callable[[], Any]] = {}
    # per library: target FVU -> its time-to-FVU row (the protocol under "protocol")
    to_fvu: dict[str, Callable[[float], dict[str, Any]]] = {}
    peers: dict[str, dict[str, Any]] = {}

    def salve_fit() -> None:
        sae, _ = fit_sae(acts, cfg, seed=0, progress=False)
        with torch.no_grad():
            results["salve"] = sae(acts)[0]

    def salve_to_fvu(target: float) -> dict[str, Any]:
        def fit(e: int) -> torch.nn.Module:
            return fit_sae(acts, replace(cfg, epochs=e), seed=0, progress=False)[0]

        row = time_separate_fits_to_fvu(
            fit, lambda sae: _eval_fvu(sae, acts, lambda out: out[0]), target, epochs
        )
        return row | {
            "protocol": "separate fits of 1, 2, ... epochs (fit_sae has no per-epoch hook), "
            "each timed whole (init, fit, calibration); seconds of the first that reaches"
        }

    fns["salve"], to_fvu["salve"] = salve_fit, salve_to_fvu

    overcomplete, peers["overcomplete"] = import_peer("overcomplete")
    if overcomplete is not None:
        from overcomplete.sae import TopKSAE, train_sae

        def mse(x, x_hat, *_):
            return (x - x_hat).square().mean()

        def overcomplete_setup() -> tuple[torch.nn.Module, DataLoader, torch.optim.Optimizer]:
            torch.manual_seed(0)
            model = TopKSAE(d, nb_concepts=width, top_k=k, device="cpu")
            loader = DataLoader(
                TensorDataset(acts),
                batch_size=batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
            return model, loader, torch.optim.Adam(model.parameters(), lr=lr)

        def overcomplete_fit() -> None:
            model, loader, opt = overcomplete_setup()
            train_sae(model, loader, mse, opt, nb_epochs=epochs, monitoring=0)
            model.eval()
            with torch.no_grad():
                results["overcomplete"] = model(acts)[2]

        def overcomplete_to_fvu(target: float) -> dict[str, Any]:
            model, loader, opt = overcomplete_setup()
            row = time_epochs_to_fvu(
                lambda: train_sae(model, loader, mse, opt, nb_epochs=1, monitoring=0),
                lambda: _eval_fvu(model, acts, lambda out: out[2]),
                target,
                max_epochs,
            )
            return row | {
                "protocol": "one run: train_sae(nb_epochs=1) called per epoch on the same model "
                "and optimizer, FVU checked between calls (off the clock)"
            }

        fns["overcomplete"], to_fvu["overcomplete"] = overcomplete_fit, overcomplete_to_fvu
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

        def sae_lens_setup(batches: Iterator[torch.Tensor], fit_epochs: int):
            torch.manual_seed(0)
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, device="cpu"))
            trainer = sae_trainer.SAETrainer(
                cfg=SAETrainerConfig(
                    total_training_samples=n * fit_epochs,
                    train_batch_size_samples=batch_size,
                    lr=lr,
                    lr_end=lr / 10,  # what SAELens's runner config sets (unused: constant lr)
                    device="cpu",
                ),
                sae=sae,
                data_provider=batches,
            )
            return sae, trainer

        def sae_lens_fit() -> None:
            sae, trainer = sae_lens_setup(_batches(acts, batch_size, epochs, seed=0), epochs)
            trainer.fit()
            sae.eval()
            with torch.no_grad():
                results["SAELens"] = sae(acts)

        def sae_lens_to_fvu(target: float) -> dict[str, Any]:
            state: dict[str, torch.nn.Module] = {}

            def make_fit(batches: Iterator[torch.Tensor]) -> Callable[[], Any]:
                state["sae"], trainer = sae_lens_setup(batches, max_epochs)
                return trainer.fit

            row = time_pulled_fit_to_fvu(
                make_fit,
                acts,
                batch_size,
                lambda: _eval_fvu(state["sae"], acts, lambda out: out),
                target,
                max_epochs,
            )
            return row | {
                "protocol": f"one run: SAETrainer.fit set for {max_epochs} epochs, FVU checked "
                "in its data iterator at each epoch boundary (off the clock), stopped there "
                "once reached"
            }

        fns["SAELens"], to_fvu["SAELens"] = sae_lens_fit, sae_lens_to_fvu
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
    info = {"salve": {}} | {name: peers[name] for name in ("overcomplete", "SAELens")}
    time_to_fvu = time_to_salve_fvu(
        to_fvu, info, fvu(acts, results["salve"]), epochs, max_epochs
    )  # after the timings above: the target is the FVU of salve's fit at the epoch budget
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
        "time_to_fvu": time_to_fvu,
    }


def time_to_salve_fvu(
    to_fvu: dict[str, Callable[[float], dict[str, Any]]],
    info: dict[str, dict[str, Any]],
    target_fvu: float,
    epochs: int,
    max_epochs: int,
) -> dict[str, Any]:
    """Every library of ``info`` (name -> peer info; "salve" first) but the skipped ones timed to
    ``target_fvu`` with its ``to_fvu``. Ratio: peer seconds / salve seconds, a lower bound when
    the peer did not reach the target (its seconds are those to the cap)."""
    rows: list[dict[str, Any]] = []
    for name, about in info.items():
        if "skipped" in about:
            rows.append({"library": name, "skipped": about["skipped"]})
            continue
        head = {"library": name} | ({"version": about["version"]} if "version" in about else {})
        try:
            rows.append(head | to_fvu[name](target_fvu))
        except Exception as exc:  # noqa: BLE001 - reported in the table; salve's is fatal
            if name == "salve":
                raise
            rows.append(head | {"error": f"{type(exc).__name__}: {exc}"[:300],
                                "traceback": traceback.format_exc(limit=4)})  # fmt: skip
    salve = rows[0]
    for row in rows[1:]:
        if "seconds" in row and salve["reached"]:
            row["ratio_peer_over_salve"] = row["seconds"] / salve["seconds"]
            row["ratio_is_lower_bound"] = not row["reached"]
    return {"target_fvu": target_fvu, "epochs": epochs, "max_epochs": max_epochs, "rows": rows}


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
