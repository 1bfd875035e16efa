"""Fine-tuning loop: small batches, per-epoch validation, resumable, divergence-checked."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from salve.data import normalise


class DivergenceError(RuntimeError):
    """The loss became NaN/inf or exploded; the stage fails and earlier artifacts stay as they
    were."""


# An epoch whose mean cross-entropy exceeds this multiple of the chance-level loss ln(K) has
# diverged (a huge learning rate gives finite but exploding losses, not NaN).
EXPLOSION_FACTOR = 100.0


def finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    augment: bool = False
    mixed_precision: bool = True
    seed: int = 0


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def augment_batch(images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crop and horizontal flip, driven by `gen` so runs are reproducible."""
    n, _, h, w = images_u8.shape
    pad = 4
    padded = nn.functional.pad(images_u8, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def predict(
    model: nn.Module,
    images_u8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Argmax predictions for uint8 images, in eval mode."""
    from salve.activations import batched_forward

    preds = batched_forward(
        model,
        lambda x: model(x).argmax(dim=1),
        images_u8,
        mean,
        std,
        batch_size=batch_size,
        device=device,
    )
    return preds if len(preds) else torch.empty(0, dtype=torch.long)


def train_classifier(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    settings: TrainSettings,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    history: list[EpochRecord] | None = None,
    on_epoch_end: Callable[[int, nn.Module, torch.optim.Optimizer, list[EpochRecord]], None]
    | None = None,
    progress: bool = True,
) -> list[EpochRecord]:
    """Train with cross-entropy. Each epoch's shuffle is seeded by (seed, epoch), so resuming
    from an epoch checkpoint reproduces an uninterrupted run exactly."""
    model.to(device)
    optimizer = optimizer or make_optimizer(model, settings)
    history = list(history or [])
    use_amp = settings.mixed_precision and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    n = train_images.shape[0]
    for epoch in range(start_epoch, settings.epochs):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        total_loss = 0.0
        correct = 0
        bar = tqdm(
            range(0, n, settings.batch_size),
            desc=f"finetune epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            leave=False,
        )
        for start in bar:
            idx = order[start : start + settings.batch_size]
            batch = train_images[idx]
            if settings.augment:
                batch = augment_batch(batch, gen)
            x = normalise(batch, mean, std).to(device, non_blocking=True)
            y = train_labels[idx].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"fine-tuning diverged at epoch {epoch + 1}, "
                    f"batch {start // settings.batch_size} (loss {float(loss.detach())}). "
                    f"Lower finetune.lr (now {settings.lr}); the previous checkpoint, if any, "
                    "is kept."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(dim=1) == y).sum())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        chance = math.log(max(int(logits.shape[1]), 2))
        if total_loss / n > EXPLOSION_FACTOR * chance or not finite_parameters(model):
            raise DivergenceError(
                f"fine-tuning diverged at epoch {epoch + 1}: mean training loss "
                f"{total_loss / n:.4g} is over {EXPLOSION_FACTOR:g}x the chance-level loss "
                f"{chance:.3g}, or the weights are no longer finite. Lower finetune.lr (now "
                f"{settings.lr}); the previous checkpoint, if any, is kept."
            )
        val_pred = predict(model, val_images, mean, std, device=device)
        val_acc = float((val_pred == val_labels).double().mean()) if len(val_labels) else math.nan
        history.append(
            EpochRecord(
                epoch=epoch + 1,
                train_loss=total_loss / n,
                train_accuracy=correct / n,
                val_accuracy=val_acc,
                seconds=time.perf_counter() - t0,
            )
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model, optimizer, history)
    return history


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state into named tensors (safetensors-friendly)."""
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{idx}.{key}"] = torch.as_tensor(value).clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)
