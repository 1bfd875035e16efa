"""Batched eval-mode passes over uint8 images: penultimate activations (the exact head input)
and anything else computed per batch.

The images are a tensor, or a `salve.io.TensorRows` (a file's tensor read by row slices), so a
split of any size passes through with one batch of images in memory at a time.

A batch holds at most `FORWARD_MEMORY_MB` of activations at once (`images_per_forward`): at
224 px a ResNet-18 batch of 256 held 1.5 GiB in its first layers alone, the largest allocation
of an explain-as-is run; capped at 83 images, extract ran as fast (benchmarks/bench_paper_scale.py
at 4k images: 0.73 bare passes, against 0.76 to 0.82 with batches of 256).

The passes run channels-last (model and batches, the model restored after): a ResNet-18 at
224 px ran 1.6x faster on CPU than in the default layout, whichever kernel mode
(benchmarks/bench_kernels.py); a ViT has one convolution and is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from salve.data import normalise
from salve.io import TensorRows
from salve.models import penultimate

FORWARD_MEMORY_MB = 512


def forward_bytes_per_image(
    model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], image_shape: tuple[int, ...]
) -> int:
    """The most any one leaf module holds for one image in an inference pass of ``fn``: its
    inputs plus its output, the two alive together (ResNet-18 at 224 px: 6.1 MiB, its first
    BatchNorm). A batch's transient memory grows by about this much per image."""
    most = 0

    def hold(_module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal most
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        most = max(most, sum(t.numel() * t.element_size() for t in tensors))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hold) for m in leaves]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            fn(torch.zeros(1, *image_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return most


def images_per_forward(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    image_shape: tuple[int, ...],
    batch_size: int,
) -> int:
    """``batch_size``, lowered so that a batch's activations fit in ``FORWARD_MEMORY_MB``."""
    per_image = forward_bytes_per_image(model, fn, image_shape)
    return max(1, min(batch_size, int(FORWARD_MEMORY_MB * 2**20) // max(per_image, 1)))


@contextmanager
def channels_last(model: nn.Module) -> Iterator[None]:
    """The model's 4-d weights channels-last inside the block, contiguous again after."""
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def batched_forward(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    images_u8: torch.Tensor | TensorRows,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "forward",
) -> torch.Tensor:
    """`fn(normalised batch)` per batch in eval mode (restored after), concatenated on CPU.

    Only `images_u8[start : start + batch_size]` is taken from the images, batch by batch: a
    `TensorRows` reads each batch from its file when it is needed.
    """
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    chunks = []
    try:
        if images_u8.shape[0] > 1:
            batch_size = images_per_forward(model, fn, tuple(images_u8.shape[1:]), batch_size)
        # The layout changes outside inference mode: parameters made in it could not be used
        # by autograd afterwards (training, Grad-FAM).
        with channels_last(model), torch.inference_mode():
            for start in tqdm(
                range(0, images_u8.shape[0], batch_size),
                desc=desc,
                disable=not progress,
                leave=False,
            ):
                x = normalise(images_u8[start : start + batch_size], mean, std).to(device)
                chunks.append(fn(x.contiguous(memory_format=torch.channels_last)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def extract_activations(
    model: nn.Module,
    images_u8: torch.Tensor | TensorRows,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "extract",
) -> torch.Tensor:
    """[N, M] float32 activations, the exact input of the head."""
    return batched_forward(
        model,
        lambda x: penultimate(model, x).float(),
        images_u8,
        mean,
        std,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc=desc,
    )
