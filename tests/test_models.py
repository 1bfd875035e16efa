"""salve.models: any torchvision classifier, the head-input split is exact, checkpoints are plain
torchvision state dicts, weights files are checked with one clear error each."""

from __future__ import annotations

import copy
import json
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from salve.io import ArtifactError, save_tensors
from salve.models import (
    WeightsFileError,
    WeightsUnavailableError,
    arch_of,
    build_model,
    check_architecture,
    check_weights_file,
    feature_fn,
    head_of,
    head_path,
    load_checkpoint,
    load_classifier,
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


def _settle_batchnorm(model: torch.nn.Module, size: int, seed: int) -> torch.nn.Module:
    """Move BatchNorm running statistics away from their defaults, so a checkpoint that lost
    them would give different logits."""
    model.train()
    with torch.no_grad():
        model(_images(8, size, seed=seed + 100) * 3 + 1)
    return model.eval()


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _settle_batchnorm(build_model("resnet18", K, image_size=64), 64, seed)


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
        # independently: the global average of layer4, as torchvision's forward computes it
        m = resnet
        body = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        pooled = m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(body))))).flatten(1)
        assert torch.equal(feats, pooled)
    assert (feats >= 0).all()  # pooled post-ReLU features
    assert arch_of(resnet) == "resnet18"
    assert head_path(resnet) == "fc" and head_of(resnet) is resnet.fc
    assert head_of(resnet).out_features == K
    assert not any(m._forward_pre_hooks for m in resnet.modules())  # the capture hook is gone


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
    assert head_path(vit) == "heads.head" and head_of(vit).out_features == K


def test_penultimate_is_not_a_constant(resnet) -> None:
    with torch.no_grad():
        a, b = penultimate(resnet, _images(1, 64, 5)), penultimate(resnet, _images(1, 64, 6))
    assert not torch.equal(a, b)


def test_penultimate_removes_its_hook_when_the_forward_raises(resnet) -> None:
    with pytest.raises(RuntimeError):
        penultimate(resnet, torch.zeros(1, 5, 64, 64))  # wrong channel count
    assert not resnet.fc._forward_pre_hooks


# --- Other architectures, end to end from a saved checkpoint ------------------------------

OTHER_ARCHS = {  # arch -> (image size, head path)
    "mobilenet_v3_small": (32, "classifier.3"),
    "resnet50": (32, "fc"),
    "vit_b_16": (32, "heads.head"),
}


@pytest.fixture(scope="module", params=sorted(OTHER_ARCHS))
def saved(request, tmp_path_factory):
    """(arch, size, model, checkpoint path) for a model saved as finetune saves it."""
    arch = request.param
    size, _ = OTHER_ARCHS[arch]
    torch.manual_seed(3)
    model = _settle_batchnorm(build_model(arch, K, image_size=size), size, seed=3)
    path = tmp_path_factory.mktemp(arch) / "model.safetensors"
    classes = [f"c{i}" for i in range(K)]
    save_checkpoint(path, model, {"classes": classes, "image_size": size})
    return arch, size, model, path


def test_any_architecture_round_trips_and_head_of_acts_is_the_logits(saved) -> None:
    arch, size, model, path = saved
    x = _images(3, size, seed=9)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["architecture"] == arch and sidecar["head"] == OTHER_ARCHS[arch][1]
    rebuilt, side = load_checkpoint(path)
    assert (
        not rebuilt.training and arch_of(rebuilt) == arch and side["classes"] == sidecar["classes"]
    )
    with torch.no_grad():
        logits = model(x)
        acts = penultimate(rebuilt, x)
        assert acts.ndim == 2 and acts.shape[1] == head_of(rebuilt).in_features
        assert torch.equal(head_of(rebuilt)(acts), rebuilt(x))
        assert torch.equal(rebuilt(x), logits)


def test_edited_checkpoint_loads_strictly_into_plain_torchvision(saved) -> None:
    arch, size, model, path = saved
    edited = load_classifier(path)
    with torch.no_grad():
        head_of(edited).weight.mul_(0.5)  # an edit of the head, as the edit stage makes
    out = path.with_name("edited.safetensors")
    # the edit stage passes no architecture: the model knows its own
    save_checkpoint(out, edited, {"classes": list("abcd"), "image_size": size, "edit": {}})
    tv = import_torchvision()
    extra = {"image_size": size} if arch.startswith("vit") else {}
    with torch.device("meta"):  # no time spent on an initialisation that is overwritten
        plain = tv.models.get_model(arch, num_classes=K, **extra)
    plain.load_state_dict(load_file(str(out)), strict=True, assign=True)
    plain.eval()
    x = _images(2, size, seed=4)
    with torch.no_grad():
        assert torch.equal(plain(x), edited(x))
        assert not torch.equal(plain(x), model(x))
    assert type(load_classifier(out)) is type(plain)


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
    assert sidecar["classes"] == classes and sidecar["extra"] == 7 and sidecar["head"] == "fc"

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

    sidecar_path(path).write_text(json.dumps(side | {"head": "classifier.1"}))
    with pytest.raises(ArtifactError, match="classifier.1"):
        load_checkpoint(path)

    sidecar_path(path).write_text(json.dumps(side))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        load_checkpoint(path)


def test_save_checkpoint_needs_an_architecture_name(tmp_path: Path) -> None:
    plain = import_torchvision().models.resnet18(num_classes=K)
    with pytest.raises(ValueError, match="architecture"):
        save_checkpoint(tmp_path / "m.safetensors", plain, {"classes": list("abcd")})
    save_checkpoint(
        tmp_path / "m.safetensors", plain, {"classes": list("abcd"), "architecture": "resnet18"}
    )
    assert json.loads((tmp_path / "m.json").read_text())["head"] == "fc"


# --- Weights files ------------------------------------------------------------------------


def test_backbone_weights_are_loaded_and_head_replaced(resnet, tmp_path: Path) -> None:
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
    # a backbone without any head loads as well
    no_head = tmp_path / "nohead.safetensors"
    save_tensors(no_head, {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc")})
    assert build_model("resnet18", 6, weights=str(no_head)).fc.out_features == 6


def test_full_model_with_matching_head_is_used_as_is(resnet, tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    save_tensors(path, resnet.state_dict())
    spec = check_weights_file(path, "resnet18", K, keep_head=True, image_size=64)
    assert spec.head == "fc"
    model = build_model("resnet18", K, image_size=64, weights=str(path), keep_head=True).eval()
    for key, value in resnet.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = _images(2, 64, seed=8)
    with torch.no_grad():
        assert torch.equal(model(x), resnet(x))


def test_weights_file_errors_name_the_problem_and_fix(resnet, tmp_path: Path) -> None:
    mine = tmp_path / "mine.safetensors"
    save_tensors(mine, resnet.state_dict())

    with pytest.raises(WeightsFileError, match=r"4 outputs.*10 classes.*finetune.epochs > 0"):
        check_weights_file(mine, "resnet18", 10, keep_head=True)
    with pytest.raises(WeightsFileError, match="4 outputs"):
        build_model("resnet18", 10, weights=str(mine), keep_head=True)
    check_weights_file(mine, "resnet18", 10, keep_head=False)  # the head is replaced: fine

    with pytest.raises(WeightsFileError, match="does not exist"):
        check_weights_file(tmp_path / "absent.safetensors", "resnet18", K, keep_head=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsFileError, match="not a readable safetensors"):
        check_weights_file(garbage, "resnet18", K, keep_head=False)

    # a resnet18 file named as a mobilenet: missing and unexpected keys are named
    with pytest.raises(WeightsFileError) as info:
        check_weights_file(mine, "mobilenet_v3_small", K, keep_head=False)
    msg = str(info.value)
    assert "does not match mobilenet_v3_small" in msg and "features.0.0.weight" in msg
    assert "bn1.bias" in msg and "finetune.arch" in msg

    resnet34_like = tmp_path / "shapes.safetensors"
    state = dict(resnet.state_dict()) | {"conv1.weight": torch.zeros(64, 3, 3, 3)}
    save_tensors(resnet34_like, state)
    with pytest.raises(WeightsFileError, match=r"conv1.weight \[64, 3, 3, 3\]"):
        check_weights_file(resnet34_like, "resnet18", K, keep_head=False)

    no_head = tmp_path / "nohead.safetensors"
    save_tensors(no_head, {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc")})
    with pytest.raises(WeightsFileError, match=r"no complete head \(fc.bias, fc.weight missing"):
        check_weights_file(no_head, "resnet18", K, keep_head=True)
    with pytest.raises(ValueError, match="keep_head needs a weights file"):
        build_model("resnet18", K, weights="imagenet", keep_head=True)


def test_non_finite_weights_are_found_when_loaded_not_from_the_header(
    resnet, tmp_path: Path
) -> None:
    path = tmp_path / "nan.safetensors"
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_tensors(path, state)
    check_weights_file(path, "resnet18", K, keep_head=True)  # the header is fine
    with pytest.raises(WeightsFileError) as info:
        build_model("resnet18", K, weights=str(path), keep_head=True)
    msg = str(info.value)
    assert str(path) in msg and "finetune.weights" in msg and "layer2.0.conv1.weight" in msg
    assert "learning rate" not in msg and "lr" not in msg.split()


def test_vit_backbone_from_another_image_size_is_interpolated(vit, tmp_path: Path) -> None:
    path = tmp_path / "vit32.safetensors"
    save_tensors(path, vit.state_dict())
    with pytest.raises(WeightsFileError, match="encoder.pos_embedding"):
        check_weights_file(path, "vit_b_16", K, keep_head=True, image_size=48)
    model = build_model("vit_b_16", K, image_size=48, weights=str(path))
    assert model.encoder.pos_embedding.shape == (1, 1 + 9, 768)
    assert torch.equal(model.conv_proj.weight, vit.conv_proj.weight)


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


# --- Architecture checks --------------------------------------------------------------------


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet19'.*resnet18"):
        check_architecture("resnet19")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("not_a_model", K)


def test_model_without_a_linear_head_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"squeezenet1_0.*no nn.Linear.*resnet18"):
        check_architecture("squeezenet1_0")
    with pytest.raises(ValueError, match="no nn.Linear"):
        build_model("squeezenet1_1", K)


def test_image_size_an_architecture_cannot_take_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vit_b_16 cannot take 40 px images.*data.image_size"):
        check_architecture("vit_b_16", image_size=40)
    check_architecture("mobilenet_v3_small", image_size=32)


def test_building_leaves_the_global_rng_as_a_plain_build_would() -> None:
    """The skeleton used to validate the architecture draws no random numbers."""
    torch.manual_seed(11)
    model = build_model("resnet18", K)
    torch.manual_seed(11)
    plain = import_torchvision().models.resnet18()
    plain.fc = torch.nn.Linear(512, K)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _count_builds(monkeypatch) -> list[str]:
    """Every model the skeleton builder returns (a refused keyword builds nothing); an empty
    spec cache, restored after."""
    import salve.models

    built: list[str] = []
    real = salve.models._skeleton

    def counting(arch: str, **kwargs):
        model = real(arch, **kwargs)
        built.append(arch)
        return model

    monkeypatch.setattr(salve.models, "_skeleton", counting)
    monkeypatch.setattr(salve.models, "_SPECS", {})
    return built


def test_an_architecture_is_built_once_to_check_it(monkeypatch) -> None:
    """A ViT is built for the image size directly (its builder takes it), not once at 224 px
    first; any other family refuses the keyword before building."""
    from salve.models import arch_spec

    built = _count_builds(monkeypatch)
    vit = arch_spec("vit_b_32", 64)
    assert built == ["vit_b_32"] and vit.builder_kwargs == {"image_size": 64}
    assert vit.shapes["encoder.pos_embedding"] == (1, 1 + 2 * 2, 768)
    resnet = arch_spec("resnet18", 48)
    assert built == ["vit_b_32", "resnet18"] and resnet.builder_kwargs == {}
    arch_spec("resnet18", 48)
    assert len(built) == 2  # cached


def test_skeleton_validates_and_describes_from_one_build(monkeypatch) -> None:
    from salve.models import arch_spec, skeleton

    built = _count_builds(monkeypatch)
    torch.manual_seed(5)
    model = skeleton("resnet18", 32)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # the global RNG is untouched
    spec = arch_spec("resnet18", 32)
    assert built == ["resnet18"] and not model.training
    assert spec.modules == tuple(name for name, _ in model.named_modules() if name)
    assert {"layer3", "layer3.1", "fc"} <= set(spec.modules)
    assert skeleton("resnet18", 32) is not model and len(built) == 2  # a fresh one each call
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        skeleton("resnet19")


def test_read_head_reads_the_head_alone(resnet, tmp_path: Path) -> None:
    from salve.models import read_head

    path = tmp_path / "m.safetensors"
    save_tensors(path, resnet.state_dict())
    head = read_head(path, "resnet18", 64)
    assert sorted(head) == ["fc.bias", "fc.weight"]
    assert torch.equal(head["fc.weight"], resnet.fc.weight) and head["fc.weight"].shape == (K, 512)
    assert torch.equal(head["fc.bias"], resnet.fc.bias)


# --- A steered model (salve.steering), saved and loaded -------------------------------------


def _steer_sae(kind: str, d_in: int = 512, width: int = 16, seed: int = 0):
    """A random float32 SAE over the resnet's 512 head inputs, biased so latents fire."""
    from salve.sae import build_sae

    g = torch.Generator().manual_seed(seed)
    sae = build_sae(kind, d_in, width, k=4).eval()
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.randn(width, d_in, generator=g) / d_in**0.5)
        sae.encoder.bias.fill_(0.05)
        sae.decoder.weight.copy_(torch.randn(d_in, width, generator=g))
        sae.decoder.weight.div_(sae.decoder.weight.norm(dim=0))
        sae.decoder.bias.zero_()
    return sae


def _rule_logits(resnet, sae, x, steps) -> torch.Tensor:
    """The rule from the classifier's head input, the SAE and the original head (float64)."""
    with torch.no_grad():
        a = penultimate(resnet, x).double()
        sae64 = __import__("copy").deepcopy(sae).double()
        for s in steps:
            z = sae64.encode(a)[:, s.latent]
            delta = (s.clamp - z) if s.clamp is not None else (s.gain - 1.0) * z
            a = a + delta.unsqueeze(1) * sae64.W_dec[:, s.latent]
        head = head_of(resnet)
        return a @ head.weight.double().T + head.bias.double()


@pytest.mark.parametrize("kind", ("relu", "topk"))
def test_steered_model_round_trip_gives_the_rule(resnet, tmp_path: Path, kind: str) -> None:
    from salve.steering import (
        Steer,
        SteeredClassifier,
        load_steered,
        save_steered,
        steered_classifier,
    )

    sae = _steer_sae(kind)
    steps = [Steer(5, 1.0, "suppress"), Steer(9, 0.5, "enhance"), Steer(5, clamp=0.25)]
    model = steered_classifier(resnet, sae, steps)
    path = tmp_path / "steered.safetensors"
    side = {"classes": list("abcd"), "image_size": 64, "normalisation": {"mean": [0.5] * 3}}
    save_steered(path, model, side)
    x = _images(3, 64, seed=21)

    loaded = load_classifier(path)
    assert isinstance(loaded, SteeredClassifier) and not loaded.training
    assert head_of(loaded) is head_of(loaded.classifier)  # the head is still found
    with torch.no_grad():
        got = loaded(x)
        assert torch.equal(got, model(x))
    want = _rule_logits(resnet, sae, x, steps)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got.double(), resnet(x).double(), atol=1e-3)  # it steers
    assert isinstance(resnet.fc, torch.nn.Linear)  # the wrapped classifier was copied
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in loaded.modules())
    with torch.no_grad():  # the head's input, as penultimate sees it, is a'
        assert torch.equal(head_of(loaded)(penultimate(loaded, x)), got)

    # the file: the classifier's state dict, plus only what the rule needs of the SAE
    state = load_file(str(path))
    steer_keys = {k for k in state if k.startswith("steer.")}
    assert set(state) - steer_keys == set(resnet.state_dict())
    rows = 2 if kind == "relu" else 16  # relu: latents 5 and 9; topk selects among all
    assert state["steer.encoder.weight"].shape == (rows, 512)
    assert state["steer.columns"].shape == (512, 3) and "steer.decoder.weight" not in state
    assert torch.equal(state["steer.columns"][:, 1], sae.W_dec[:, 9].detach())
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["format"] == "salve-steered-classifier" and sidecar["architecture"] == "resnet18"
    assert sidecar["steering"]["encode"]["kind"] == kind and sidecar["classes"] == list("abcd")
    assert load_steered(path)[1]["steering"]["steps"][1] == {
        "latent": 9, "alpha": 0.5, "sign": "enhance", "gain": 1.5
    }  # fmt: skip
    with pytest.raises(ArtifactError, match="steered"):
        load_checkpoint(path)


def test_steered_model_at_alpha_zero_is_the_classifier_bit_for_bit(resnet, tmp_path) -> None:
    from salve.steering import Steer, save_steered, steered_classifier

    sae = _steer_sae("relu", seed=3)
    path = tmp_path / "zero.safetensors"
    save_steered(
        path,
        steered_classifier(resnet, sae, [Steer(2, 0.0, "suppress"), Steer(7, 0.0, "enhance")]),
        {"classes": list("abcd"), "image_size": 64},
    )
    loaded = load_classifier(path)
    x = _images(4, 64, seed=22)
    with torch.no_grad():
        assert torch.equal(loaded(x), resnet(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_steered_model_runs_on_cuda(resnet, tmp_path) -> None:
    import copy

    from salve.steering import Steer, save_steered, steered_classifier

    sae = _steer_sae("jumprelu", seed=4)
    path = tmp_path / "cuda.safetensors"
    steps = [Steer(1, 1.0, "suppress")]
    save_steered(
        path, steered_classifier(resnet, sae, steps), {"classes": list("abcd"), "image_size": 64}
    )
    loaded = load_classifier(path).to("cuda")
    x = _images(2, 64, seed=23)
    with torch.no_grad():
        got = loaded(x.cuda()).cpu().double()
        zero = load_classifier(path)
        zero.steer.steers = (Steer(1, 0.0),)
        zero = zero.to("cuda")
        base = copy.deepcopy(resnet).to("cuda")
        assert torch.equal(zero(x.cuda()), base(x.cuda()))
    torch.testing.assert_close(got, _rule_logits(resnet, sae, x, steps), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ("linear", "relu", "topk", "batchtopk", "jumprelu"))
def test_steering_part_round_trips_for_every_sae_kind(kind: str) -> None:
    """The steering tensors and record rebuild the same rule (encode of the recorded kind over
    the kept rows, thresholds included); a tampered rule is refused."""
    from salve.steering import LatentSteer, Steer

    sae = _steer_sae(kind, d_in=12, width=6, seed=5)
    with torch.no_grad():
        if kind == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(-3.0, -1.0, 6))
        if kind == "batchtopk":
            sae.batchtopk_threshold.fill_(0.02)
    steps = [Steer(4, 1.0), Steer(1, 0.75, "enhance"), Steer(4, clamp=-0.5)]
    steer = LatentSteer.from_sae(sae, steps)
    tensors = {k: v.clone() for k, v in steer.tensors().items()}
    record = json.loads(json.dumps(steer.describe()))  # through JSON, as the sidecar holds it
    rebuilt = LatentSteer.from_tensors(tensors, record)
    acts = torch.randn(30, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(rebuilt(acts), steer(acts))
        assert not torch.equal(steer(acts), acts)
    assert record["encoder_rows"] == ([4, 1] if kind in ("linear", "relu", "jumprelu") else
                                      list(range(6)))  # fmt: skip
    bad = copy.deepcopy(record)
    bad["encode"]["kind"] = "relu" if kind != "relu" else "linear"
    with pytest.raises(ValueError, match="disagrees"):
        LatentSteer.from_tensors(tensors, bad)
