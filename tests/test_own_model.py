"""Explain your own model: a trained torchvision classifier other than the built-in backbones,
taken as it is (`finetune.epochs: 0`, `finetune.weights: weights/<file>.safetensors`), through
the whole pipeline on an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_PARAMS, make_project, run_pipeline

pytestmark = pytest.mark.slow

SIZE = 32
# Two families, each with the Grad-FAM layer `auto` picks at 32 px (the deepest grid of at
# least 4x4): MobileNet's inverted residuals, and ShuffleNet v2's channel-shuffle units, whose
# stage2 has stride 8 (conv1 and max pool halve twice, stage2 once: 32 / 8 = 4) and stage3
# stride 16 (2x2, too coarse). (resnet50, layer2 at 4x4, passes too: 100 s instead of 41 s.)
ARCHS = {"mobilenet_v3_small": ("features.", None), "shufflenet_v2_x0_5": ("stage2", [4, 4])}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def own_model_project(request, tmp_path_factory) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    from salve.models import build_model

    arch = request.param

    params = {s: dict(v) for s, v in TINY_PARAMS.items()}
    params["data"] |= {
        "source": "imagefolder",
        "path": "data/shapes",
        "image_size": SIZE,
        "min_val_per_class": 1,
    }
    params["finetune"] |= {"arch": arch, "weights": "weights/mine.safetensors", "epochs": 0}
    params["edit"] |= {"checkpoint_class": 1}
    params["evaluate"] = {"seeds": 2}
    root = make_project(tmp_path_factory.mktemp(f"own_{arch}") / "project", params)
    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "b", "c")):
        (root / "data/shapes" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3)) // 4 + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data/shapes" / name / f"{i}.png")
    # A stand-in for the user's trained model: a few steps of training on these images (a
    # freshly initialised network maps every image to nearly the same head input).
    torch.manual_seed(3)
    model = build_model(arch, 3, image_size=SIZE)
    files = sorted((root / "data/shapes").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    y = torch.tensor([("a", "b", "c").index(f.parent.name) for f in files])
    x = (x.float() / 255 - 0.45) / 0.25
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(40):
        idx = torch.arange(8) + 8 * (step % 3)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # BatchNorm statistics of these images (MobileNet's BN momentum is 0.01: 40 steps leave
    # them at their initial values), as a converged training run would have them.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass below
    with torch.no_grad():
        model(x)
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "weights" / "mine.safetensors"))
    statuses = run_pipeline(root)
    return root, {"statuses": statuses, "state": state, "arch": arch}


def test_the_whole_pipeline_runs_on_the_users_model_as_it_is(own_model_project) -> None:
    root, info = own_model_project
    assert set(info["statuses"].values()) == {"ran"}
    from salve.io import load_tensors

    # epochs 0: the checkpoint is the user's weights, bit for bit (nothing was trained)
    saved = load_tensors(root / "results/finetune/model.safetensors")
    assert saved.keys() == info["state"].keys()
    assert all(torch.equal(saved[k], info["state"][k]) for k in saved)
    finetune = json.loads((root / "metrics/finetune.json").read_text())
    assert finetune["arch"] == info["arch"] and finetune["epochs_run"] == 0


def test_activations_are_the_head_input_and_edits_load_into_plain_torchvision(own_model_project):
    root, info = own_model_project
    from salve.data import normalise
    from salve.io import load_tensors
    from salve.models import head_of, load_checkpoint
    from salve.tv import import_torchvision

    model, sidecar = load_checkpoint(root / "results/finetune/model.safetensors")
    images = load_tensors(root / "results/fetch/val.safetensors")["images"]
    acts = load_tensors(root / "results/extract/val.safetensors")["acts"]
    norm = sidecar["normalisation"]
    with torch.no_grad():
        logits = model(normalise(images, tuple(norm["mean"]), tuple(norm["std"])))
        assert torch.allclose(head_of(model)(acts), logits, atol=1e-5)
    plain = import_torchvision().models.get_model(info["arch"], num_classes=3)
    plain.load_state_dict(load_tensors(root / "results/edit/model.safetensors"), strict=True)


def test_gradfam_uses_a_spatial_map_of_this_architecture(own_model_project) -> None:
    root, info = own_model_project
    gradfam = json.loads((root / "metrics/gradfam.json").read_text())
    latents = json.loads((root / "results/gradfam/latents.json").read_text())
    layer, grid = ARCHS[info["arch"]]
    assert gradfam["layer"] == latents["layer"] and gradfam["layer"].startswith(layer)
    assert len(gradfam["map_grid"]) == 2 and min(gradfam["map_grid"]) >= 2
    if grid is not None:
        assert gradfam["map_grid"] == grid
    assert len(latents["latents"]) == TINY_PARAMS["sae"]["width"]
