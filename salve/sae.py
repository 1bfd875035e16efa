"""Sparse autoencoders on penultimate activations, their fitting loop and quality metrics.

Variants (METHOD.md, "SAE"):
- ``linear``: the paper's two linear layers with no nonlinearity (signed codes), l1 on codes.
- ``relu``: the usual ReLU SAE, l1 on codes.
- ``topk``: keep the k largest pre-activations per sample (after ReLU).
- ``batchtopk``: keep the k*N largest over the batch during training; at inference a single
  threshold (estimated on the training set and saved with the weights) replaces the batch rule.
- ``jumprelu``: z = pre * [pre > theta], theta a learned per-latent threshold (straight-through
  estimator with a rectangle kernel for the threshold gradient).
For the top-k family two optional regularisers act before the top-k selection: ``aux_l1`` (l1 on
the pre-activations outside the top-k support) and ``l1_l2_ratio`` (scale-invariant
||z||_1/||z||_2).

Every variant encodes ``pre = (a - b_dec) @ W_enc.T + b_enc``, so the encoder gradient with respect
to the activations is ``W_enc`` scaled by ``code_derivative`` (used by Grad-FAM's closed form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SAE_KINDS = ("linear", "relu", "topk", "batchtopk", "jumprelu")
# fit_sae fails when an epoch's reconstruction error exceeds this multiple of the data variance.
EXPLOSION_FVU = 100.0


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_latent: int,
        kind: str = "relu",
        *,
        k: int = 0,
        jump_threshold: float = 0.01,
        jump_bandwidth: float = 0.05,
    ) -> None:
        super().__init__()
        if kind not in SAE_KINDS:
            raise ValueError(f"unknown SAE kind {kind!r}; allowed: {', '.join(SAE_KINDS)}")
        if kind in ("topk", "batchtopk") and not 0 < k <= d_latent:
            raise ValueError(f"{kind} SAE needs 0 < k <= d_latent, got k={k}")
        self.kind = kind
        self.k = k
        self.jump_bandwidth = jump_bandwidth
        self.encoder = nn.Linear(d_in, d_latent)
        self.decoder = nn.Linear(d_latent, d_in)
        # Inference statistics saved with the weights (see module docstring).
        self.register_buffer("batchtopk_threshold", torch.zeros(()))
        self.log_threshold = (
            nn.Parameter(torch.full((d_latent,), math.log(jump_threshold)))
            if kind == "jumprelu"
            else None
        )

    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 - the method's notation
        return self.encoder.weight

    @property
    def b_enc(self) -> torch.Tensor:
        return self.encoder.bias

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        return self.decoder.weight

    @property
    def b_dec(self) -> torch.Tensor:
        return self.decoder.bias

    @property
    def d_latent(self) -> int:
        return self.encoder.out_features

    def pre_activation(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.encoder(acts_nm - self.b_dec)

    def _support(self, pre_nl: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the latents that are on (for the piecewise-linear variants)."""
        if self.kind == "relu":
            return pre_nl > 0
        if self.kind == "jumprelu":
            return pre_nl > self.log_threshold.exp()
        if self.kind == "topk":
            idx = pre_nl.topk(self.k, dim=-1).indices
            mask = torch.zeros_like(pre_nl, dtype=torch.bool).scatter_(-1, idx, True)
            return mask & (pre_nl > 0)
        # batchtopk
        if self.training:
            n_keep = min(self.k * pre_nl.shape[0], pre_nl.numel())
            flat = pre_nl.flatten()
            idx = flat.topk(n_keep).indices
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True)
            return mask.view_as(pre_nl) & (pre_nl > 0)
        return pre_nl > self.batchtopk_threshold

    def codes_from_pre(self, pre_nl: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return pre_nl
        if self.kind == "jumprelu":
            return _JumpReLU.apply(pre_nl, self.log_threshold, self.jump_bandwidth)
        return pre_nl * self._support(pre_nl)

    def encode(self, acts_nm: torch.Tensor) -> torch.Tensor:
        return self.codes_from_pre(self.pre_activation(acts_nm))

    def code_derivative(self, acts_nm: torch.Tensor) -> torch.Tensor:
        """Diagonal of d codes / d pre (selection and thresholds held fixed), [N, L]."""
        pre = self.pre_activation(acts_nm)
        if self.kind == "linear":
            return torch.ones_like(pre)
        return self._support(pre).to(pre.dtype)

    def decode(self, codes_nl: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes_nl)

    def forward(self, acts_nm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre_activation(acts_nm)
        codes = self.codes_from_pre(pre)
        return self.decode(codes), codes, pre

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Scale decoder columns to unit norm and encoder rows inversely: the same function.

        With unit columns, alpha in the head edit has one scale across features (METHOD.md).
        A batchtopk threshold must be recalibrated afterwards.
        """
        norms = self.W_dec.norm(dim=0).clamp_min(1e-12)
        self.decoder.weight.div_(norms)
        self.encoder.weight.mul_(norms[:, None])
        self.encoder.bias.mul_(norms)
        if self.log_threshold is not None:
            self.log_threshold.add_(norms.log())

    @torch.no_grad()
    def calibrate_batchtopk_(self, acts_nm: torch.Tensor, batch_size: int = 4096) -> None:
        """Set the inference threshold: mean over batches of the smallest kept pre-activation."""
        if self.kind != "batchtopk":
            return
        was_training = self.training
        self.train()
        mins = []
        for start in range(0, acts_nm.shape[0], batch_size):
            pre = self.pre_activation(acts_nm[start : start + batch_size])
            mask = self._support(pre)
            if mask.any():
                mins.append(pre[mask].min())
        self.batchtopk_threshold.fill_(torch.stack(mins).mean() if mins else 0.0)
        self.train(was_training)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); straight-through rectangle-kernel gradient for theta."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):  # noqa: ANN001
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        # d/dtheta of pre*H(pre-theta) ~ -theta/bw * rect((pre-theta)/bw); chain rule to log theta.
        grad_theta = -(threshold / bw) * near * grad_out
        grad_log = (grad_theta * threshold).sum(dim=0)
        return grad_pre, grad_log, None


@dataclass(frozen=True)
class SaeLossWeights:
    l1: float = 1e-3
    aux_l1: float = 0.0
    l1_l2_ratio: float = 0.0


def sae_loss(
    sae: SparseAutoencoder, acts_nm: torch.Tensor, weights: SaeLossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = mean_n ||a - a_hat||^2 + l1 * mean_n ||z||_1 (+ top-k regularisers)."""
    recon, codes, pre = sae(acts_nm)
    mse = (recon - acts_nm).pow(2).sum(dim=1).mean()
    loss = mse
    parts = {"mse": float(mse.detach())}
    if sae.kind in ("linear", "relu", "jumprelu") and weights.l1 > 0:
        l1 = codes.abs().sum(dim=1).mean()
        loss = loss + weights.l1 * l1
        parts["l1"] = float(l1.detach())
    if sae.kind in ("topk", "batchtopk"):
        relu_pre = torch.relu(pre)
        if weights.aux_l1 > 0:
            outside = relu_pre * (codes == 0)
            loss = loss + weights.aux_l1 * outside.sum(dim=1).mean()
        if weights.l1_l2_ratio > 0:
            ratio = relu_pre.sum(dim=1) / relu_pre.norm(dim=1).clamp_min(1e-8)
            loss = loss + weights.l1_l2_ratio * ratio.mean()
    return loss, parts


@torch.no_grad()
def quality_metrics(
    sae: SparseAutoencoder,
    acts_nm: torch.Tensor,
    *,
    head: nn.Linear | None = None,
    labels_n: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> dict[str, float]:
    """FVU, explained variance, L0, dead fraction and splice metrics, exactly as METHOD.md defines.

    Sums are accumulated in float64 over the whole set (never an average of per-batch ratios).
    """
    was_training = sae.training
    sae.eval()
    n = acts_nm.shape[0]
    mean_m = acts_nm.double().mean(dim=0)
    sse = torch.zeros((), dtype=torch.float64)
    sst = torch.zeros((), dtype=torch.float64)
    nonzero = torch.zeros((), dtype=torch.float64)
    ever_active = torch.zeros(sae.d_latent, dtype=torch.bool)
    correct_orig = correct_splice = agree = 0
    for start in range(0, n, batch_size):
        a = acts_nm[start : start + batch_size]
        recon, codes, _ = sae(a)
        sse += (a.double() - recon.double()).pow(2).sum()
        sst += (a.double() - mean_m).pow(2).sum()
        active = codes != 0
        nonzero += active.sum(dtype=torch.float64)
        ever_active |= active.any(dim=0)
        if head is not None and labels_n is not None:
            y = labels_n[start : start + batch_size]
            pred_orig = head(a).argmax(dim=1)
            pred_splice = head(recon).argmax(dim=1)
            correct_orig += int((pred_orig == y).sum())
            correct_splice += int((pred_splice == y).sum())
            agree += int((pred_orig == pred_splice).sum())
    sae.train(was_training)
    fvu = float(sse / sst) if sst > 0 else float("nan")
    metrics = {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(nonzero / n),
        "dead_fraction": float((~ever_active).double().mean()),
        "n_samples": n,
    }
    if head is not None and labels_n is not None:
        metrics |= {
            "accuracy_original": correct_orig / n,
            "splice_accuracy": correct_splice / n,
            "splice_agreement": agree / n,
        }
    return metrics


@dataclass(frozen=True)
class SaeSettings:
    kind: str = "relu"
    width: int = 64
    l1: float = 3e-3
    k: int = 8
    aux_l1: float = 0.0
    l1_l2_ratio: float = 0.0
    lr: float = 1e-3
    epochs: int = 300
    batch_size: int = 256
    normalise_decoder: bool = True
    seed: int = 0


def init_sae(acts_nm: torch.Tensor, s: SaeSettings) -> SparseAutoencoder:
    """Unit-norm random decoder, tied-transpose encoder, decoder bias at the data mean."""
    gen = torch.Generator().manual_seed(s.seed)
    d_in = acts_nm.shape[1]
    sae = SparseAutoencoder(d_in, s.width, s.kind, k=s.k if s.kind in ("topk", "batchtopk") else 0)
    with torch.no_grad():
        w_dec = torch.randn(d_in, s.width, generator=gen)
        w_dec /= w_dec.norm(dim=0, keepdim=True)
        sae.decoder.weight.copy_(w_dec)
        sae.encoder.weight.copy_(w_dec.T)
        sae.encoder.bias.zero_()
        sae.decoder.bias.copy_(acts_nm.double().mean(dim=0).float())
    return sae


def fit_sae(
    acts_nm: torch.Tensor,
    s: SaeSettings,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Fit on activations with Adam. Losses are scale-free: the reconstruction error is divided
    by the data's mean squared deviation and the l1 term by its root, so lambda_1 means the same
    across backbones and datasets. Raises DivergenceError on a non-finite loss."""
    from tqdm.auto import tqdm

    from salve.train import DivergenceError

    device = device or torch.device("cpu")
    sae = init_sae(acts_nm, s).to(device)
    acts = acts_nm.to(device)
    scale_sq = float((acts_nm.double() - acts_nm.double().mean(0)).pow(2).sum(1).mean())
    scale_sq = scale_sq if scale_sq > 0 else 1.0
    weights = SaeLossWeights(
        l1=s.l1 / math.sqrt(scale_sq) * scale_sq,
        aux_l1=s.aux_l1 / math.sqrt(scale_sq) * scale_sq,
        l1_l2_ratio=s.l1_l2_ratio * scale_sq,
    )
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed + 1)
    n = acts.shape[0]
    history = []
    sae.train()
    bar = tqdm(range(s.epochs), desc=f"fit_sae ({s.kind})", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=gen).to(device)
        sums = {"loss": 0.0, "mse": 0.0, "l1": 0.0}
        for start in range(0, n, s.batch_size):
            batch = acts[order[start : start + s.batch_size]]
            loss, parts = sae_loss(sae, batch, weights)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"SAE fitting diverged at epoch {epoch + 1} (loss {float(loss.detach())}). "
                    f"Lower sae.lr (now {s.lr}) or sae.l1 (now {s.l1})."
                )
            opt.zero_grad(set_to_none=True)
            (loss / scale_sq).backward()
            opt.step()
            if s.normalise_decoder:
                with torch.no_grad():
                    sae.decoder.weight.div_(sae.decoder.weight.norm(dim=0).clamp_min(1e-12))
            m = len(batch)
            sums["loss"] += float(loss.detach()) / scale_sq * m
            sums["mse"] += parts["mse"] / scale_sq * m
            sums["l1"] += parts.get("l1", 0.0) / math.sqrt(scale_sq) * m
        record = {"epoch": epoch + 1} | {k: v / n for k, v in sums.items()}
        # mse is relative to the data's variance (predicting the mean gives 1): far above it,
        # the fit has exploded (a huge lr gives finite but useless weights, not NaN).
        if record["mse"] > EXPLOSION_FVU or not all(
            bool(torch.isfinite(p).all()) for p in sae.parameters()
        ):
            raise DivergenceError(
                f"SAE fitting diverged at epoch {epoch + 1}: reconstruction error "
                f"{record['mse']:.4g} x the data variance (over {EXPLOSION_FVU:g}), or the "
                f"weights are no longer finite. Lower sae.lr (now {s.lr})."
            )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
    sae.calibrate_batchtopk_(acts)
    sae.eval()
    return sae.cpu(), history


def sae_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sae.state_dict().items()}


def sae_from_tensors(tensors: dict[str, torch.Tensor], kind: str, k: int = 0) -> SparseAutoencoder:
    d_latent, d_in = tensors["encoder.weight"].shape
    sae = SparseAutoencoder(d_in, d_latent, kind, k=k)
    sae.load_state_dict(tensors)
    return sae.eval()
