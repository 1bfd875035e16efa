"""salve.models: the head-input split is exact; checkpoints are plain torchvision state dicts."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salve.io import ArtifactError, save_tensors
from salve.models import (
    WeightsUnavailableError,
    arch_of,
    build_model,
    feature_fn,
    feature_map_module,
    head_of,
    load_checkpoint,
    penultimate,
    save_checkpoint,
    sidecar_path,
)
from salve.tv import import_torchvision

K = 4


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Two CPU threads, as CPU runs use; restored after (the setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18", K)
    # Move BatchNorm running statistics away from their defaults, so a checkpoint that lost
    # them would give different logits.
    model.train()
    with torch.no_grad():
        model(_images(8, 64, seed=seed + 100) * 3 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return _resnet()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("vit_b_16", K, image_size=32).eval()


def test_resnet_head_of_penultimate_is_the_model_exactly(resnet) -> None:
    x = _images(3, 64)
    with torch.no_grad():
        feats = penultimate(resnet, x)
        assert feats.shape == (3, 512)
        assert torch.equal(head_of(resnet)(feats), resnet(x))
        assert torch.equal(feature_fn(resnet)(x), feats)
    assert (feats >= 0).all()  # pooled post-ReLU features
    assert arch_of(resnet) == "resnet18"
    assert head_of(resnet) is resnet.fc and head_of(resnet).out_features == K
    assert feature_map_module(resnet) is resnet.layer4


def test_vit_head_of_penultimate_is_the_model_exactly(vit) -> None:
    x = _images(2, 32, seed=1)
    with torch.no_grad():
        feats = penultimate(vit, x)
        assert feats.shape == (2, 768)
        assert torch.equal(head_of(vit)(feats), vit(x))
        # it is the class token after the final LayerNorm: the LN's output statistics hold
        ln = vit.encoder.ln
        normed = (feats - ln.bias) / ln.weight
        assert torch.allclose(normed.mean(dim=1), torch.zeros(2), atol=1e-4)
    assert arch_of(vit) == "vit_b_16"
    assert head_of(vit) is vit.heads.head and head_of(vit).out_features == K
    assert feature_map_module(vit) is vit.encoder.layers[-1]


def test_penultimate_is_not_a_constant(resnet) -> None:
    with torch.no_grad():
        a, b = penultimate(resnet, _images(1, 64, 5)), penultimate(resnet, _images(1, 64, 6))
    assert not torch.equal(a, b)


def test_checkpoint_loads_into_plain_torchvision_with_identical_logits(
    resnet, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    classes = [f"c{i}" for i in range(K)]
    save_checkpoint(path, resnet, {"classes": classes, "image_size": 64, "extra": 7})

    state = load_file(str(path))
    assert set(state) == set(resnet.state_dict())
    plain = import_torchvision().models.resnet18(num_classes=K)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    x = _images(4, 64, seed=3)
    with torch.no_grad():
        expected = resnet(x)
        assert torch.equal(plain(x), expected)

    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == tmp_path / "model.json"
    assert sidecar["format"] == "salve-classifier" and sidecar["architecture"] == "resnet18"
    assert sidecar["classes"] == classes and sidecar["extra"] == 7

    rebuilt, side = load_checkpoint(path)
    assert not rebuilt.training and side["classes"] == classes
    assert arch_of(rebuilt) == "resnet18"
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    for key, value in resnet.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_load_checkpoint_errors(resnet, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, resnet, {"classes": list("abcd"), "image_size": 64})
    side = json.loads(sidecar_path(path).read_text())

    # the sidecar claims 5 classes but the weights have 4
    sidecar_path(path).write_text(json.dumps(side | {"classes": list("abcde")}))
    with pytest.raises(ArtifactError, match="5 classes"):
        load_checkpoint(path)

    sidecar_path(path).write_text(json.dumps({k: v for k, v in side.items() if k != "classes"}))
    with pytest.raises(ArtifactError, match="classes"):
        load_checkpoint(path)

    sidecar_path(path).write_text(json.dumps(side))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        load_checkpoint(path)


def test_local_backbone_weights_are_loaded_and_head_replaced(resnet, tmp_path: Path) -> None:
    path = tmp_path / "backbone.safetensors"
    save_tensors(path, resnet.state_dict())
    torch.manual_seed(7)
    model = build_model("resnet18", 6, weights=str(path)).eval()
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.out_features == 6
    with torch.no_grad():
        x = _images(2, 64)
        assert torch.equal(penultimate(model, x), penultimate(resnet, x))

    wrong = tmp_path / "wrong.safetensors"
    save_tensors(wrong, {"conv1.weight": torch.zeros(1)})
    with pytest.raises((ValueError, RuntimeError)):
        build_model("resnet18", 6, weights=str(wrong))


def test_imagenet_weights_offline_gives_actionable_error(monkeypatch) -> None:
    tv = import_torchvision()
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", K, weights="imagenet")
    msg = str(info.value)
    assert "finetune.weights" in msg and "'none'" in msg and ".safetensors" in msg
    assert "URLError" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert len(calls) == 1 and calls[0].startswith("https://")


def test_unknown_arch_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'.*resnet18"):
        build_model("resnet50", K)
