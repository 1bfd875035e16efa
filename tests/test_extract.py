"""extract reads fetch's images one batch at a time: the same bytes as extracting from the whole
split in memory, and no split is ever loaded whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import salve.io
from salve.activations import extract_activations
from salve.config import from_dict
from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.io import ArtifactError, TensorRows, load_tensors, save_tensors
from salve.models import build_model, load_checkpoint, save_checkpoint
from tasks import STAGES

CLASSES = ["a", "b", "c"]
SIZE = 16


def _project(root: Path, counts: dict[str, int]) -> Path:
    """fetch's split files (random images) and a seeded, untrained finetune checkpoint."""
    g = torch.Generator().manual_seed(0)
    for split, n in counts.items():
        images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
        labels = torch.arange(n) % len(CLASSES)
        save_tensors(STAGES["fetch"].path(root, split), {"images": images, "labels": labels})
    torch.manual_seed(0)
    sidecar = {
        "classes": CLASSES,
        "image_size": SIZE,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "val_accuracy": 1.0,
        "val_class_accuracy": dict.fromkeys(CLASSES, 1.0),
    }
    model = build_model("resnet18", len(CLASSES), image_size=SIZE)
    save_checkpoint(STAGES["finetune"].path(root, "model"), model, sidecar)
    return root


def _cfg(batch_size: int):
    return from_dict({"common": {"num_threads": 1}, "extract": {"batch_size": batch_size}})


def test_extract_streams_batches_and_writes_the_bytes_of_the_in_memory_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import extract

    root = _project(tmp_path / "repo", {"train": 11, "val": 6})
    loaded: list[Path] = []  # every safetensors file loaded whole
    real_load = salve.io.load_file
    monkeypatch.setattr(salve.io, "load_file", lambda p: loaded.append(Path(p)) or real_load(p))
    reads: list[tuple[str, int]] = []
    real_rows = TensorRows.__getitem__

    def rows_read(self: TensorRows, index: slice) -> torch.Tensor:
        out = real_rows(self, index)
        reads.append((self.name, len(out)))
        return out

    monkeypatch.setattr(TensorRows, "__getitem__", rows_read)
    summary = extract.run(_cfg(batch_size=4), root, progress=False)
    monkeypatch.undo()

    fetch_dir = root / "results" / "fetch"
    assert not [p for p in loaded if p.is_relative_to(fetch_dir)], loaded
    image_reads = [n for name, n in reads if name == "images"]
    assert image_reads == [4, 4, 3, 4, 2]  # train in batches of 4, then val
    assert summary["train_samples"] == 11 and summary["val_samples"] == 6

    model, _ = load_checkpoint(STAGES["finetune"].path(root, "model"))
    for split in ("train", "val"):
        t = load_tensors(STAGES["fetch"].path(root, split))
        acts = extract_activations(
            model, t["images"], IMAGENET_MEAN, IMAGENET_STD, batch_size=4, progress=False
        )
        want = tmp_path / f"{split}.safetensors"
        save_tensors(want, {"acts": acts, "labels": t["labels"]})
        got = STAGES["extract"].path(root, split)
        assert got.read_bytes() == want.read_bytes(), split


def test_extract_names_fetch_when_its_split_is_missing_or_corrupt(tmp_path: Path) -> None:
    from tasks import extract

    root = _project(tmp_path / "repo", {"train": 3, "val": 3})
    val = STAGES["fetch"].path(root, "val")
    val.write_bytes(val.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="val.safetensors: not a readable safetensors file"):
        extract.run(_cfg(batch_size=4), root, progress=False)
    val.unlink()
    with pytest.raises(ArtifactError, match="val.safetensors is missing: .* stage fetch"):
        extract.run(_cfg(batch_size=4), root, progress=False)


def test_forward_passes_run_channels_last_and_leave_the_model_trainable() -> None:
    """batched_forward switches the layout outside inference mode: the model comes back
    contiguous, with ordinary (not inference) parameters that autograd can use, and its outputs
    are the contiguous model's up to float rounding."""
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), image_size=SIZE).eval()
    images = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    seen = []
    conv = model.conv1

    def layout(_module, args, _out):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))

    handle = conv.register_forward_hook(layout)
    acts = extract_activations(model, images, IMAGENET_MEAN, IMAGENET_STD, batch_size=2)
    handle.remove()
    assert seen[1:] == [True, True, True]  # seen[0]: images_per_forward's one-image sizing pass
    for p in model.parameters():
        assert not p.is_inference() and p.is_contiguous()
    from salve.data import normalise
    from salve.models import penultimate

    x = normalise(images, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        expected = penultimate(model.eval(), x)
    torch.testing.assert_close(acts, expected, rtol=1e-4, atol=1e-5)
    model.train()
    model(x).sum().backward()  # raises on an inference-mode parameter
    assert conv.weight.grad is not None


def test_forward_bytes_per_image_is_the_largest_layer_input_plus_output() -> None:
    """Hand-computed on 4x4 images: the conv takes 3x4x4 floats (192 bytes) and gives 8x4x4
    (512); the ReLU (not in place) and the Flatten each hold 512 in and 512 out, the most (1024);
    the Linear 512 in and 2 x 4 out."""
    from salve.activations import forward_bytes_per_image

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(128, 2),
    ).eval()  # fmt: skip
    assert forward_bytes_per_image(model, model, (3, 4, 4)) == 1024


def test_batches_capped_by_memory_give_the_same_outputs(monkeypatch) -> None:
    """A budget that admits 3 images a batch cuts 7 images into batches of 3, 3 and 1, and the
    outputs are those of one batch of 7."""
    import salve.activations as activations

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES), image_size=SIZE).eval()
    images = torch.randint(0, 256, (7, 3, SIZE, SIZE), dtype=torch.uint8)
    whole = extract_activations(model, images, IMAGENET_MEAN, IMAGENET_STD, progress=False)
    per_image = activations.forward_bytes_per_image(
        model, lambda x: activations.penultimate(model, x), (3, SIZE, SIZE)
    )
    monkeypatch.setattr(activations, "FORWARD_MEMORY_MB", 3.5 * per_image / 2**20)
    sizes = []
    handle = model.conv1.register_forward_hook(lambda _m, args, _o: sizes.append(len(args[0])))
    capped = extract_activations(model, images, IMAGENET_MEAN, IMAGENET_STD, progress=False)
    handle.remove()
    assert sizes == [1, 3, 3, 1]  # the sizing pass, then the batches
    torch.testing.assert_close(capped, whole, rtol=1e-4, atol=1e-5)
