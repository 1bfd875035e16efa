"""Fine-tuning: warm-up then decay, augmentation, early stopping on val accuracy, best epoch kept.

A from-scratch ResNet trained at a constant learning rate for a fixed number of epochs did not
converge on new data (val accuracy 0.48 / 0.69 / 0.59 / 0.64 per epoch on a simple 6-class folder,
one class never predicted). The recipe here: the learning rate rises linearly over the first
``warmup`` share of the step budget, then decays (one-cycle: cosine to lr/1e4; cosine: to 0);
train-time augmentation (random crops, plus horizontal flips where they keep the label); the val
accuracy is measured after every epoch, the best epoch's weights are kept, and training stops
after ``patience`` epochs without improvement (counted from 3/4 of the epoch budget on). The
budget is ``epochs``, raised to reach ``min_steps`` optimiser steps on small datasets. Everything
is seeded by (seed, epoch), and the schedule is a pure function of the step, so a run resumed
from an epoch checkpoint reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from salve.config import FinetuneConfig
from salve.data import normalise
from salve.errors import SalveUserError
from salve.io import TensorRows


class DivergenceError(SalveUserError, RuntimeError):
    """The loss became NaN/inf or exploded; the stage fails and earlier artifacts stay as they
    were."""


class QualityGateError(SalveUserError, RuntimeError):
    """The fine-tuned classifier is too weak to explain; the message names the weak classes."""


# An epoch whose mean cross-entropy exceeds this multiple of the chance-level loss ln(K) has
# diverged (a huge learning rate gives finite but exploding losses, not NaN).
EXPLOSION_FACTOR = 100.0
# One-cycle: start at lr / WARMUP_DIV, end at lr / FINAL_DIV.
WARMUP_DIV = 25.0
FINAL_DIV = 1e4
CROP_PAD = 4  # pixels of replicate padding before a random crop back to the image size


def finite_parameters(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    lr: float
    seconds: float
    val_class_accuracy: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# finetune.min_steps "auto": one step budget for any data, so the epochs follow from the
# training-set size alone (epoch_budget). 360 steps left 768-image 6-class folders at 59-66 % val
# accuracy where 960 reached 96 %; the digits reach 99.7 % in 360 and lose nothing with more. No
# rule of size and class count told the two apart (digits: 1,438 images, 10 classes; the folders:
# 768, 6): what differs is how hard the images are, which no count measures (docs/METHOD.md).
AUTO_MIN_STEPS = 960


def resolve_min_steps(min_steps: int | str) -> int:
    """`auto`: AUTO_MIN_STEPS, whatever the data."""
    return AUTO_MIN_STEPS if min_steps == "auto" else int(min_steps)


def resolve_augment(augment: str, source: str) -> str:
    """`auto`: crops only for digits (a flipped digit is another glyph), crops and flips else."""
    if augment == "auto":
        return "crop" if source == "digits" else "crop_flip"
    return augment


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
    # fused: one kernel per step for every parameter (CPU defaults to a Python loop over them):
    # a ResNet-18 train step at 64 px, batch 16, took 223 ms instead of 255 ms here.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None
    )


def learning_rate(step: int, total_steps: int, cfg: FinetuneConfig) -> float:
    """The learning rate of optimiser step ``step`` (0-based) out of ``total_steps``."""
    warm = int(round(cfg.warmup * total_steps))
    if step < warm:
        start = cfg.lr / WARMUP_DIV if cfg.schedule == "onecycle" else 0.0
        return start + (cfg.lr - start) * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr / FINAL_DIV if cfg.schedule == "onecycle" else 0.0
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches(n: int, batch_size: int, order: torch.Tensor) -> list[torch.Tensor]:
    """Index batches of ``order``; a final batch of one sample joins the one before it.

    BatchNorm cannot normalise a batch of one in training mode, so the rule is deterministic:
    a last batch of size 1 is merged (that batch holds batch_size + 1 samples). A batch size
    above n gives one batch of all samples.
    """
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images, got {n}")
    cuts = list(range(0, n, batch_size)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(batches(n, batch_size, torch.arange(n)))


def epoch_budget(n: int, cfg: FinetuneConfig) -> int:
    """Epochs to train on ``n`` images: ``cfg.epochs``, raised until the run takes at least
    ``cfg.min_steps`` optimiser steps (0 stays 0: no training).

    A from-scratch ResNet needs a number of updates, not of passes: 4 epochs of a 768-image
    folder are only 192 steps, and it ended far below the same folder trained for 960.
    """
    if cfg.epochs == 0:
        return 0
    if not isinstance(cfg.min_steps, int):
        raise ValueError(
            f"min_steps {cfg.min_steps!r}: resolve it with resolve_min_steps(min_steps)"
        )
    return max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch(n, cfg.batch_size)))


def augment_batch(images_u8: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop after replicate padding, plus a horizontal flip for half the images when
    ``mode`` is crop_flip. Driven by ``gen`` so runs are reproducible."""
    if mode == "none":
        return images_u8
    n, _, h, w = images_u8.shape
    padded = nn.functional.pad(images_u8, (CROP_PAD,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if mode == "crop_flip":
        out[flip] = out[flip].flip(-1)
    return out


def predict(
    model: nn.Module,
    images_u8: torch.Tensor | TensorRows,
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


def class_accuracy(pred_n: torch.Tensor, labels_n: torch.Tensor, num_classes: int) -> list[float]:
    """Per-class accuracy (NaN for a class without samples)."""
    hits = torch.zeros(num_classes, dtype=torch.float64)
    hits.index_add_(0, labels_n, (pred_n == labels_n).to(torch.float64))
    counts = torch.bincount(labels_n, minlength=num_classes).to(torch.float64)
    return (hits / counts).tolist()


@dataclass
class TrainState:
    """What a resumed run needs besides the model and optimiser: history and the best epoch."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def best_accuracy(self) -> float:
        return self.history[self.best_epoch - 1].val_accuracy if self.best_epoch else -1.0

    def stopped_early(self, patience: int, not_before: int = 0) -> bool:
        """``patience`` epochs without a better val accuracy, from epoch ``not_before`` on."""
        return (
            bool(patience)
            and bool(self.history)
            and self.history[-1].epoch >= not_before
            and (self.history[-1].epoch - self.best_epoch >= patience)
        )


def train_classifier(
    model: nn.Module,
    train_images: torch.Tensor | TensorRows,
    train_labels: torch.Tensor,
    val_images: torch.Tensor | TensorRows,
    val_labels: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    seed: int,
    augment: str,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[nn.Module, torch.optim.Optimizer, TrainState], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train with cross-entropy for at most ``epoch_budget`` epochs; returns the history and the
    best epoch's weights (the model itself holds the last epoch's). ``augment`` is resolved
    (see resolve_augment). Continues from ``state`` when resuming. The images may be
    ``TensorRows`` (read batch by batch from the file, any dataset size)."""
    model.to(device)
    optimizer = optimizer or make_optimizer(model, cfg)
    state = state or TrainState()
    use_amp = cfg.mixed_precision and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    n = train_images.shape[0]
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    epochs = epoch_budget(n, cfg)
    total = per_epoch * epochs
    chance = math.log(max(num_classes, 2))
    for epoch in range(len(state.history), epochs):
        # Not before three quarters of the budget, where the learning rate has decayed to a
        # fifth of its peak: before, val accuracy wobbles while the model still learns (a
        # 960-image folder: 0.19 0.29 0.25 0.29 over the first 4 of 8 epochs, stopped by
        # patience 2 at 29 % when counted from the start or from half the budget).
        if state.stopped_early(cfg.patience, not_before=math.ceil(0.75 * epochs)):
            break
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        parts = batches(n, cfg.batch_size, order)
        bar = tqdm(
            parts,
            desc=f"finetune epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for i, idx in enumerate(bar):
            lr = learning_rate(epoch * per_epoch + i, total, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = augment_batch(train_images[idx], augment, gen)
            x = normalise(batch, mean, std).to(device, non_blocking=True)
            y = train_labels[idx].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise DivergenceError(
                    f"fine-tuning diverged at epoch {epoch + 1}, batch {i} "
                    f"(loss {float(loss.detach())}). Lower finetune.lr (now {cfg.lr}); the "
                    "previous checkpoint, if any, is kept."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(dim=1) == y).sum())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if total_loss / n > EXPLOSION_FACTOR * chance or not finite_parameters(model):
            raise DivergenceError(
                f"fine-tuning diverged at epoch {epoch + 1}: mean training loss "
                f"{total_loss / n:.4g} is over {EXPLOSION_FACTOR:g}x the chance-level loss "
                f"{chance:.3g}, or the weights are no longer finite. Lower finetune.lr (now "
                f"{cfg.lr}); the previous checkpoint, if any, is kept."
            )
        val_pred = predict(model, val_images, mean, std, device=device)
        val_acc = float((val_pred == val_labels).double().mean()) if len(val_labels) else math.nan
        state.history.append(
            EpochRecord(
                epoch=epoch + 1,
                train_loss=total_loss / n,
                train_accuracy=correct / n,
                val_accuracy=val_acc,
                lr=lr,
                seconds=time.perf_counter() - t0,
                val_class_accuracy=class_accuracy(val_pred, val_labels, num_classes),
            )
        )
        if val_acc > state.best_accuracy:
            state.best_epoch = epoch + 1
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(model, optimizer, state)
    return state


def quality_gate(
    val_accuracy: float,
    class_accuracy: dict[str, float],
    *,
    min_val_accuracy: float,
    min_class_accuracy: float,
) -> str | None:
    """Why the classifier is not worth explaining (None when it passes).

    Everything downstream (features, edits, alpha_crit) is computed on this classifier: on a 64 %
    model with a never-predicted class every figure looks like a result and is not.
    """
    weak = {c: a for c, a in class_accuracy.items() if not a >= min_class_accuracy}
    if val_accuracy >= min_val_accuracy and not weak:
        return None
    listed = ", ".join(f"{c} {a:.0%}" for c, a in sorted(weak.items(), key=lambda kv: kv[1]))
    classes = (
        f"; classes below finetune.min_class_accuracy {min_class_accuracy:.0%}: {listed}"
        if weak
        else ""
    )
    return (
        f"quality gate: the classifier reaches {val_accuracy:.1%} val accuracy "
        f"(finetune.min_val_accuracy {min_val_accuracy:.0%}){classes}. Fixes: more optimiser "
        "steps (e.g. --set finetune.min_steps=2000; 960 instead of 360 took a 768-image "
        "6-class folder from 59-66% to 96%), pretrained weights (finetune.weights), more or "
        "cleaner images; to explain it anyway set "
        "finetune.min_val_accuracy=0 and finetune.min_class_accuracy=0. The fine-tuned model "
        "is kept in results/finetune."
    )


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


def as_is_state(model, val_x, val_y, num_classes: int, mean, std, device) -> TrainState:
    """The given model explained as it is (``finetune.epochs: 0``): one epoch-0 record with its
    val accuracy and nothing trained."""
    pred = predict(model, val_x, mean, std, device=device)
    record = EpochRecord(
        epoch=0,
        train_loss=float("nan"),
        train_accuracy=float("nan"),
        val_accuracy=float((pred == val_y).double().mean()),
        lr=0.0,
        seconds=0.0,
        val_class_accuracy=class_accuracy(pred, val_y, num_classes),
    )
    return TrainState([record], 0, None)


def finetune_summary(
    state: TrainState, best: EpochRecord, f: FinetuneConfig, n_train: int, val_class: dict, device
) -> dict:
    """metrics/finetune.json: the kept epoch's numbers, and whether early stopping ended it."""
    last = state.history[-1]
    budget = epoch_budget(n_train, f)
    return {
        "arch": f.arch,
        "val_accuracy": best.val_accuracy,
        "best_epoch": state.best_epoch,
        "epochs_run": last.epoch,
        "last_val_accuracy": last.val_accuracy,
        "epoch_budget": budget,
        "stopped_early": last.epoch < budget,
        "train_accuracy": best.train_accuracy,
        "train_loss": best.train_loss,
        "min_class_val_accuracy": min(best.val_class_accuracy),
        "val_class_accuracy": val_class,
        "device": str(device),
    }
