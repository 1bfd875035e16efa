"""Grad-FAM: layer selection, closed form vs autograd, independent Jacobian oracles, hook
hygiene, the deletion test on a model whose true saliency is known, and the stage's outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from salve.faithfulness import (
    deletion_auc,
    deletion_counts,
    deletion_curves,
    deletion_latents,
    deletion_test,
    random_order,
    saliency_order,
    top_activating,
    top_images,
)
from salve.feature_layers import layer_candidates, select_layer, vit_grid
from salve.gradfam import (
    _image_batches,
    feature_maps,
    gradfam_autograd,
    gradfam_closed_form,
    gradfam_maps,
    gradfam_pairs,
    gradfam_shared,
    upsample_normalise,
)
from salve.models import build_model, head_of, penultimate
from salve.sae import ReluSAE, SparseAutoencoder, build_sae


def _resnet(size_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", size_classes).double()


def _vit(image_size: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("vit_b_16", 5, image_size=image_size).double()


def _sae(d_in: int, kind: str, d_latent: int = 48, seed: int = 1, **kw) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return build_sae(kind, d_in, d_latent, **kw).double()


def _output_of(model, name, images):
    """A module's output captured by an independent hook, and the head input."""
    store = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, o: store.__setitem__("A", o)
    )
    try:
        model.eval()
        with torch.no_grad():
            acts = penultimate(model, images)
    finally:
        handle.remove()
    return store["A"], acts


@pytest.fixture(scope="module")
def resnet_case():
    model = _resnet()
    torch.manual_seed(2)
    images = torch.randn(5, 3, 96, 96, dtype=torch.float64)  # layer4 is 3 x 3
    fmaps, acts = _output_of(model, "layer4", images)
    return model, images, fmaps, acts


# --- Layer selection ----------------------------------------------------------------------


def test_auto_layer_is_the_deepest_with_a_grid_of_at_least_4x4():
    model = _resnet()
    at64 = select_layer(model, 64)
    assert (at64.name, at64.grid, at64.layout, at64.channels) == ("layer3", (4, 4), "nchw", 256)
    assert not at64.pooled
    at224 = select_layer(model, 224)
    assert (at224.name, at224.grid, at224.pooled) == ("layer4", (7, 7), True)
    assert select_layer(model, 64, "pooled").name == "layer4"
    names = [c.name for c in layer_candidates(model, 64)]
    assert names.index("layer1") < names.index("layer2") < names.index("layer3")
    grids = {c.name: c.grid for c in layer_candidates(model, 64)}
    assert grids["layer1"] == (16, 16) and grids["layer4"] == (2, 2) and "avgpool" not in grids


def test_named_layers_are_honoured_and_bad_names_listed():
    model = _resnet()
    assert select_layer(model, 64, "layer2").grid == (8, 8)
    deep = select_layer(model, 64, "layer3.0.conv1")  # not a stage, but a spatial map
    assert (deep.grid, deep.channels) == ((4, 4), 256)
    with pytest.raises(ValueError, match=r"'layer9' is not a module.*layer3 \(4x4\)"):
        select_layer(model, 64, "layer9")
    with pytest.raises(ValueError, match=r"'avgpool' gives no usable feature map.*layer2 \(8x8\)"):
        select_layer(model, 64, "avgpool")  # 1 x 1: not spatial
    with pytest.raises(ValueError, match="is the head"):
        select_layer(model, 64, "fc")
    with pytest.raises(ValueError, match="runs more than once"):
        select_layer(model, 64, "layer1.0.relu")  # a BasicBlock applies its ReLU twice


def test_mobilenet_grids_for_auto_and_a_named_layer():
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, image_size=64).eval()
    # strides: features.0, .1, .2 and .4 halve the side; .9 halves 4 -> 2
    auto = select_layer(model, 64)
    assert (auto.name, auto.grid) == ("features.8", (4, 4))
    assert select_layer(model, 64, "features.3").grid == (8, 8)
    sae = build_sae("linear", head_of(model).in_features, 6).eval()
    images = torch.randn(2, 3, 64, 64)
    assert gradfam_maps(model, sae, images, [0, 1]).shape == (2, 2, 4, 4)
    maps = gradfam_maps(model, sae, images, [0, 1], layer="features.3")
    assert maps.shape == (2, 2, 8, 8) and maps.amax() > 0


def test_vit_layers_tokens_grid_and_the_degenerate_last_block():
    torch.manual_seed(0)
    model = build_model("vit_b_16", 5, image_size=64).eval()  # 4 x 4 patches
    candidates = {c.name: c for c in layer_candidates(model, 64)}
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert all(
        candidates[b].layout == "tokens" and candidates[b].grid == (4, 4) for b in blocks[:-1]
    )
    assert candidates["conv_proj"].layout == "nchw" and candidates["conv_proj"].grid == (4, 4)
    # The head reads LayerNorm(class token) only, so the last block's output patch tokens get
    # exactly zero gradient: that layer is no candidate, and naming it is refused.
    assert blocks[-1] not in candidates and "encoder.ln" not in candidates
    auto = select_layer(model, 64)
    assert (auto.name, auto.grid, auto.layout, auto.channels) == (blocks[-2], (4, 4), "tokens", 768)
    with pytest.raises(ValueError, match=r"no usable feature map.*encoder_layer_10 \(4x4\)"):
        select_layer(model, 64, blocks[-1])


def test_swin_grid_is_read_channels_last():
    torch.manual_seed(0)
    model = build_model("swin_t", 3, image_size=64).eval()
    auto = select_layer(model, 64)
    assert (auto.name, auto.grid, auto.layout, auto.channels) == ("features.5", (4, 4), "nhwc", 384)
    pooled = select_layer(model, 64, "pooled")
    assert pooled.pooled and pooled.grid == (2, 2)
    sae = build_sae("linear", 768, 4).eval()
    images = torch.randn(1, 3, 64, 64)
    maps = gradfam_maps(model, sae, images, [0, 1, 2])
    assert maps.shape == (1, 3, 4, 4) and maps.amax() > 0
    # closed form and autograd agree on the layer the pool reads, in either layout
    closed = gradfam_maps(model, sae, images, [0, 1, 2], layer=pooled)
    auto_grad = gradfam_autograd(model, sae, images, [0, 1, 2], layer=pooled)
    assert torch.allclose(closed, auto_grad, atol=1e-5 * float(closed.amax()), rtol=1e-4)


# --- Closed form vs autograd --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "linear", "topk", "jumprelu"])
def test_closed_form_equals_autograd_resnet(resnet_case, kind):
    model, images, fmaps, acts = resnet_case
    kw = {"k": 8} if kind == "topk" else {}
    sae = _sae(512, kind, **kw)
    features = [0, 3, 7, 11, 20, 47]
    closed = gradfam_closed_form(fmaps, sae, features)
    auto = gradfam_autograd(model, sae, images, features, layer="layer4", batch_size=2)
    assert closed.shape == auto.shape == (5, len(features), 3, 3)
    assert torch.allclose(closed, auto, atol=1e-5, rtol=0)
    assert (closed >= 0).all()
    # not a vacuous comparison: some maps are non-zero, and for ReLU-like SAEs some are zero
    assert closed.amax() > 1e-3
    if kind == "relu":
        codes = sae.encode(acts)[:, features]
        inactive = codes <= 0
        assert inactive.any() and (~inactive).any()
        assert (closed[inactive] == 0).all()
    # the dispatcher takes the closed form at the pooled layer; chunked features agree too
    assert torch.allclose(gradfam_maps(model, sae, images, features, layer="layer4"), closed)
    chunked = gradfam_autograd(model, sae, images, features, layer="layer4", feature_chunk=4)
    assert torch.allclose(chunked, auto, atol=1e-12, rtol=0)


def test_closed_form_matches_definition_by_hand(resnet_case):
    """Tiny hand-built SAE: one linear latent reading channel 0 only -> map = ReLU(A[0]) / (H*W)."""
    _, _, fmaps, _ = resnet_case
    sae = _sae(512, "linear", d_latent=2)
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[0, 0] = 1.0
        sae.encoder.weight[1, 5] = -2.0
    maps = gradfam_closed_form(fmaps, sae, [0, 1])
    hw = fmaps.shape[2] * fmaps.shape[3]
    assert torch.allclose(maps[:, 0], torch.relu(fmaps[:, 0]) / hw)
    assert torch.allclose(maps[:, 1], torch.relu(-2.0 * fmaps[:, 5]) / hw)


def test_autograd_at_an_inner_layer_matches_a_jacobian_oracle():
    """layer3 of ResNet-18 (not pooled): the Jacobian of the codes w.r.t. layer3's output, taken
    through layer4, the pool and the SAE by torch.autograd.functional, independently."""
    model = _resnet().eval()
    sae = _sae(512, "relu", d_latent=10)
    torch.manual_seed(5)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    features = [1, 4, 9]
    a3, _ = _output_of(model, "layer3", images)

    def codes_of(t):
        return sae.encode(model.avgpool(model.layer4(t)).flatten(1))

    oracle = []
    for n in range(2):
        jac = torch.autograd.functional.jacobian(lambda t, n=n: codes_of(t)[0], a3[n : n + 1])
        weights = jac[features, 0].mean(dim=(2, 3))  # [F, C]
        oracle.append(torch.relu(torch.einsum("fc,chw->fhw", weights, a3[n])))
    oracle = torch.stack(oracle)
    maps = gradfam_autograd(model, sae, images, features)  # auto: layer3 at 64 px
    assert maps.shape == oracle.shape == (2, 3, 4, 4)
    assert oracle.amax() > 0
    assert torch.allclose(maps, oracle, atol=1e-10)
    # each image with its own feature: one backward per batch gives the same maps
    own = torch.tensor([4, 9])
    pairs = gradfam_pairs(model, sae, images, own, batch_size=2)
    assert torch.allclose(pairs, oracle[[0, 1], [1, 2]], atol=1e-10)


def test_pairs_match_the_grid_with_closed_form_and_autograd(resnet_case):
    model, images, fmaps, _ = resnet_case
    sae = _sae(512, "relu")
    feats = torch.tensor([3, 3, 20, 7, 47])
    grid = gradfam_closed_form(fmaps, sae, feats.tolist())  # [N, F, h, w]
    diagonal = grid[torch.arange(5), torch.arange(5)]
    closed = gradfam_pairs(model, sae, images, feats, layer="layer4", batch_size=2)
    auto = gradfam_pairs(model, sae, images, feats, layer="layer4", batch_size=3, closed_form=False)
    assert torch.allclose(closed, diagonal, atol=1e-12)
    assert torch.allclose(auto, diagonal, atol=1e-5)
    with pytest.raises(ValueError, match="4 features for 5 images"):
        gradfam_pairs(model, sae, images, feats[:4], layer="layer4")


@pytest.mark.parametrize("kind", ["relu", "topk", "linear"])
@pytest.mark.parametrize("layer", ["layer3", "layer4"])  # autograd (3 x 3 at 96 px); pooled
def test_shared_maps_are_the_pairs_maps_bit_for_bit(kind, layer):
    """One forward per distinct image (uint8 rows, normalised per batch), pairs grouped by image
    into backward slots, off latents skipped: by autograd the same bits as gradfam_pairs on each
    pair. The closed form is taken pair by pair, so its bits do not depend on which pairs share
    a batch (gradfam_pairs' einsum over a batch's features does, by an ulp: compared to 1e-12)."""
    from salve.data import IMAGENET_MEAN, IMAGENET_STD, normalise

    model = _resnet().eval()
    sae = _sae(512, kind, d_latent=40, **({"k": 6} if kind == "topk" else {}))
    with torch.no_grad():
        sae.encoder.bias.fill_(0.05)
    gen = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (9, 3, 96, 96), generator=gen, dtype=torch.uint8)
    rows = torch.randint(0, 9, (40,), generator=gen)  # repeats: up to 8 pairs on one image
    feats = torch.randint(0, 40, (40,), generator=gen)
    rows[:3], feats[:3] = 4, torch.tensor([7, 7, 7])  # the same pair three times

    def norm(x):
        return normalise(x, IMAGENET_MEAN, IMAGENET_STD).double()

    old = gradfam_pairs(model, sae, norm(images[rows]), feats, layer=layer, batch_size=4)
    if layer == "layer4":
        fmaps = feature_maps(model, norm(images), layer)
        one_by_one = [
            gradfam_closed_form(fmaps[r : r + 1], sae, [f])[0, 0]
            for r, f in zip(rows.tolist(), feats.tolist(), strict=True)
        ]
        assert torch.allclose(old, torch.stack(one_by_one), rtol=0, atol=1e-12)
        old = torch.stack(one_by_one)
    hint = torch.rand(40, generator=gen) > 0.5  # groups images only: the maps do not change
    for batch_size, pair_rows, on_hint in [(4, 4, None), (3, 256, hint), (32, 1, None)]:
        new = gradfam_shared(
            model, sae, images, rows, feats, layer=layer, batch_size=batch_size,
            transform=norm, pair_rows=pair_rows, on_hint=on_hint,
        )  # fmt: skip
        assert new.dtype == old.dtype and torch.equal(new, old)
    on = sae.encode(penultimate(model, norm(images)))[rows, feats] != 0
    assert old.amax() > 0 and (kind == "linear" or (~on).any())
    assert (old[~on] == 0).all()
    assert gradfam_shared(model, sae, images, [], [], layer=layer).shape == (0, *old.shape[1:])
    with pytest.raises(ValueError, match="3 features for 2 image rows"):
        gradfam_shared(model, sae, images, [0, 1], [0, 1, 2], layer=layer)


def test_shared_maps_for_vit_tokens():
    model = _vit(image_size=32)
    sae = _sae(768, "relu", d_latent=12)
    torch.manual_seed(6)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    rows, feats = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([5, 5, 11, 0, 3])
    old = gradfam_pairs(model, sae, images[rows], feats, batch_size=2)
    new = gradfam_shared(model, sae, images, rows, feats, batch_size=2)
    assert new.shape == (5, 2, 2) and torch.allclose(new, old, atol=1e-12, rtol=0)


def test_image_batches_group_like_counts_and_leave_no_single_image():
    def sizes(counts, batch_size):
        return _image_batches(torch.tensor(counts, dtype=torch.float64), batch_size)

    assert sizes([9, 8, 7, 6, 5, 4, 3, 3, 1, 1, 1], 4) == [3, 2, 3, 3]  # 7 >= 3/4 * 9; 6 is not
    assert sizes([50, 1, 1, 1], 8) == [2, 2]  # two at least, then the rest
    assert sizes([1] * 9, 4) == [4, 3, 2]
    assert sizes([3], 4) == [1] and sizes([2, 2], 1) == [1, 1]
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 60):
        counts = sorted(torch.randint(0, 20, (n,), generator=gen).tolist(), reverse=True)
        got = sizes(counts, 7)
        assert sum(got) == n and max(got) <= 7 and (n == 1 or min(got) > 1)


def test_autograd_leaves_model_and_sae_untouched(resnet_case):
    model, images, _, _ = resnet_case
    sae = _sae(512, "relu")
    model.train()
    sae.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradfam_autograd(model, sae, images[:2], [1, 2], layer="layer3")
    gradfam_pairs(model, sae, images[:2], [1, 2], layer="layer3")
    assert model.training and sae.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in sae.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats not updated either
    model.eval()


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _ExplodingSAE(ReluSAE):
    def encode(self, acts_nm):
        raise RuntimeError("boom inside encode")


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_hooks_removed_after_success_and_exception(arch):
    model = _resnet() if arch == "resnet18" else _vit()
    d = head_of(model).in_features
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _hook_counts(model) == 0
    layers = (
        ["layer2", "layer3"]  # 4x4 and 2x2 at 32 px
        if arch == "resnet18"
        else ["auto", "encoder.layers.encoder_layer_11.ln_1"]
    )
    for name in layers:
        layer = select_layer(model, 32, name)  # a dry run with hooks of its own
        assert _hook_counts(model) == 0
        gradfam_autograd(model, _sae(d, "relu"), images, [0], layer=layer)
        assert _hook_counts(model) == 0
        torch.manual_seed(0)
        bad = _ExplodingSAE(d, 8).double()
        model.train()
        for fn in (gradfam_autograd, gradfam_pairs):
            with pytest.raises(RuntimeError, match="boom inside encode"):
                fn(model, bad, images, [0, 0], layer=layer)
            assert _hook_counts(model) == 0
            assert model.training  # restored even on the error path
        with pytest.raises(RuntimeError, match="boom inside encode"):
            deletion_curves(model, bad, images, [0, 0], random_order(2, 1024, seed=0), steps=2)
        assert _hook_counts(model) == 0 and model.training


def _vit_tokens_oracle(model, sae, images, features):
    """Independent ViT oracle: Jacobian of codes w.r.t. the tokens entering the last block."""
    model.eval()
    with torch.no_grad():
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + model.encoder.pos_embedding
        for layer in model.encoder.layers[:-1]:
            x = layer(x)
    tokens = x

    def codes_of(t):
        out = model.encoder.ln(model.encoder.layers[-1](t))[:, 0]
        return sae.encode(out)

    assert torch.allclose(codes_of(tokens), sae.encode(penultimate(model, images)), atol=1e-10)
    g = vit_grid(model)
    maps = []
    for n in range(images.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda t, n=n: codes_of(t)[0], tokens[n : n + 1])
        jac = jac[features, 0]  # [F, 1+P, D]
        weights = jac[:, 1:].mean(dim=1)  # [F, D]
        maps.append(torch.relu(weights @ tokens[n, 1:].T).reshape(len(features), g, g))
    return torch.stack(maps)


def test_vit_matches_jacobian_oracle_and_grid_from_model():
    model = _vit(image_size=48)  # patch 16 -> 3 x 3 grid
    sae = _sae(768, "linear", d_latent=12)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    features = [0, 5, 11]
    maps = gradfam_autograd(model, sae, images, features)
    assert vit_grid(model) == 3
    assert maps.shape == (2, 3, 3, 3)  # 9 patches, the class token is not in the map
    assert (maps >= 0).all() and maps.amax() > 0
    oracle = _vit_tokens_oracle(model, sae, images, features)
    assert torch.allclose(maps, oracle, atol=1e-8)
    pairs = gradfam_pairs(model, sae, images, [5, 11])
    assert torch.allclose(pairs, oracle[[0, 1], [1, 2]], atol=1e-8)


def test_vit_grid_2x2_and_a_feature_that_ignores_the_image():
    model = _vit(image_size=32)  # 2 x 2 grid: no layer reaches 4 x 4, the deepest is taken
    assert select_layer(model, 32).name == "encoder.layers.encoder_layer_10"
    sae = _sae(768, "relu", d_latent=6)
    with torch.no_grad():
        sae.encoder.weight[4].zero_()  # latent 4 is a constant: no dependence on the input
        sae.encoder.bias[4] = 1.0  # ... and on, so its derivative is 1, not masked to 0
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for layer in ("auto", "encoder.layers.encoder_layer_11.ln_1"):
        maps = gradfam_autograd(model, sae, images, [0, 1, 2, 3, 4, 5], layer=layer)
        assert maps.shape == (3, 6, 2, 2)
        assert (maps >= 0).all()
        assert (maps[:, 4] == 0).all()
        assert maps.amax() > 0


def test_feature_out_of_range_raises(resnet_case):
    model, images, fmaps, _ = resnet_case
    sae = _sae(512, "relu", d_latent=4)
    with pytest.raises(ValueError, match="out of range"):
        gradfam_closed_form(fmaps, sae, [4])
    with pytest.raises(ValueError, match="out of range"):
        gradfam_autograd(model, sae, images, [-1])
    with pytest.raises(ValueError, match="out of range"):
        gradfam_pairs(model, sae, images[:1], [4])


def test_feature_maps_default_to_the_pooled_layer(resnet_case):
    model, images, fmaps, _ = resnet_case
    assert torch.equal(feature_maps(model, images), fmaps)


def test_upsample_normalise_range_max_and_zero():
    torch.manual_seed(0)
    maps = torch.relu(torch.randn(3, 4, 3, 3))
    maps[1, 2] = 0.0
    maps[0, 0] = 0.0
    maps[0, 0, 1, 1] = 5.0  # single peak
    up = upsample_normalise(maps, 32)
    assert up.shape == (3, 4, 32, 32)
    assert (up >= 0).all() and (up <= 1).all()
    peaks = up.amax(dim=(2, 3))
    nonzero = maps.amax(dim=(2, 3)) > 0
    assert torch.allclose(peaks[nonzero], torch.ones_like(peaks[nonzero]))
    assert (up[1, 2] == 0).all()
    # the peak lands in the middle of the image for a centred single peak
    r, c = divmod(int(up[0, 0].argmax()), 32)
    assert 10 <= r <= 21 and 10 <= c <= 21
    # smooth, not blocky: neighbouring pixels inside one grid cell differ
    assert up[0, 0, 12, 12] != up[0, 0, 12, 13]
    # positive scaling does not change a normalised map
    assert torch.allclose(upsample_normalise(maps * 7.0, 32), up, atol=1e-6)


def test_top_activating():
    codes = torch.tensor([[0.1, -3.0], [2.0, 1.0], [-5.0, 0.5], [2.0, 0.0]])
    assert top_activating(codes, 0, 2).tolist() == [1, 3]  # tie broken by index
    assert top_activating(codes, 0, 10).tolist() == [1, 3, 0, 2]
    assert top_activating(codes, 0, 1, by="abs").tolist() == [2]
    assert top_activating(codes, 1, 2).tolist() == [1, 2]
    assert top_activating(-codes, 1, 1).tolist() == [0]  # the negative direction of a signed code


# --- Faithfulness: a model whose true saliency is known ------------------------------------

HOT = (1, 6, 9, 14)  # row-major pixels of a 4 x 4 image that carry the feature
HOT_VALUE, BACKGROUND, THRESHOLD = 1.0, 0.2, 0.3


class _ThresholdNet(nn.Module):
    """features: A = ReLU(mean over colours - 0.3) (channel 0) and a distractor (channel 1);
    global average pool; a linear head. The SAE latent 0 reads channel 0, so
    z = mean_pixels ReLU(x - 0.3): hot pixels give 0.7, the background 0, the mean colour 0.1."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, dtype=torch.float64)
        with torch.no_grad():
            w = torch.tensor([[1.0, 1, 1], [-1.0, 0, 0]], dtype=torch.float64) / 3
            conv.weight.copy_(w.view(2, 3, 1, 1))
            conv.bias.copy_(torch.tensor([-THRESHOLD, 0.5], dtype=torch.float64))
        self.features = nn.Sequential(conv, nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3, dtype=torch.float64)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _threshold_case():
    model = _ThresholdNet().eval()
    sae = build_sae("linear", 2, 2).double().eval()
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    image = torch.full((16,), BACKGROUND, dtype=torch.float64)
    image[list(HOT)] = HOT_VALUE
    images = image.view(1, 1, 4, 4).expand(1, 3, 4, 4).clone()
    return model, sae, images


def _curve_by_hand(order: list[int], steps: int) -> list[float]:
    """z after deleting the first d pixels of ``order``, of which h are hot, over z(unmasked):
    ((4 - h) * 0.7 + d * 0.1) / (4 * 0.7); the mean colour is (4 * 1 + 12 * 0.2) / 16 = 0.4."""
    mean_colour = (len(HOT) * HOT_VALUE + (16 - len(HOT)) * BACKGROUND) / 16
    hot_on, fill_on = HOT_VALUE - THRESHOLD, max(mean_colour - THRESHOLD, 0.0)
    curve = []
    for k in range(steps + 1):
        deleted = order[: k * 16 // steps]
        h = sum(p in HOT for p in deleted)
        curve.append(((len(HOT) - h) * hot_on + len(deleted) * fill_on) / (len(HOT) * hot_on))
    return curve


def _trapezoid(curve: list[float]) -> float:
    steps = len(curve) - 1
    return sum((a + b) / 2 / steps for a, b in zip(curve, curve[1:], strict=False))


def test_deletion_auc_of_the_true_saliency_computed_by_hand():
    model, sae, images = _threshold_case()
    layer = select_layer(model, 4)
    assert (layer.name, layer.grid, layer.pooled) == ("features", (4, 4), True)
    # Grad-FAM of latent 0 is exactly the hot pixels, by the closed form and by autograd
    maps = gradfam_pairs(model, sae, images, [0], layer=layer)
    assert torch.equal(maps[0].flatten() > 0, torch.isin(torch.arange(16), torch.tensor(HOT)))
    auto = gradfam_pairs(model, sae, images, [0], layer=layer, closed_form=False)
    assert torch.allclose(auto, maps, atol=1e-12)
    saliency = upsample_normalise(maps[:, None], 4)[:, 0]
    assert saliency_order(saliency)[0, :4].tolist() == list(HOT)

    result = deletion_test(model, sae, images, [0], saliency, steps=4, seed=3, batch_size=3)
    # saliency order: [1, 1/7, 2/7, 3/7, 4/7] -> AUC = 23/56
    expected = _curve_by_hand([*HOT, *[p for p in range(16) if p not in HOT]], 4)
    assert expected == pytest.approx([1, 1 / 7, 2 / 7, 3 / 7, 4 / 7])
    assert result.curves[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert float(result.auc[0]) == pytest.approx(23 / 56, abs=1e-12)
    # the random order, recomputed by hand from the same seeded permutation
    perm = random_order(1, 16, seed=3)[0].tolist()
    by_hand = _curve_by_hand(perm, 4)
    assert result.curves_random[0].tolist() == pytest.approx(by_hand, abs=1e-12)
    assert float(result.auc_random[0]) == pytest.approx(_trapezoid(by_hand), abs=1e-12)
    assert float(result.auc[0]) < float(result.auc_random[0])
    # the random orders may be given instead of drawn from the seed
    given = deletion_test(
        model, sae, images, [0], saliency, steps=4, seed=0, random_orders=torch.tensor([perm])
    )
    assert torch.equal(given.curves_random, result.curves_random)
    with pytest.raises(ValueError, match="one feature and one order"):
        deletion_test(
            model, sae, images, [0], saliency, steps=4, seed=0, random_orders=torch.tensor([[0]])
        )


def test_deletion_beats_random_on_average_and_reverse_order_is_worst():
    model, sae, images = _threshold_case()
    many = images.expand(32, 3, 4, 4)
    saliency = gradfam_pairs(model, sae, many, [0] * 32)
    result = deletion_test(model, sae, many, [0] * 32, saliency, steps=4, seed=0)
    assert torch.allclose(result.auc, torch.full((32,), 23 / 56, dtype=torch.float64))
    assert float(result.auc_random.mean()) > float(result.auc.mean()) + 0.1
    assert len(set(result.auc_random.tolist())) > 1  # each image has its own random order
    # deleting the hot pixels last: [1, 1 + 4*0.1/2.8, ...] stays high
    backwards = torch.tensor([[p for p in range(16) if p not in HOT] + list(HOT)])
    curve = deletion_curves(model, sae, images, [0], backwards, steps=4)
    assert curve[0].tolist() == pytest.approx(_curve_by_hand(backwards[0].tolist(), 4))
    assert float(deletion_auc(curve, 16)[0]) > float(result.auc_random.max())


def test_deletion_in_one_step_is_the_same_for_every_order():
    # nothing deleted, then everything: the random order shares both points with the saliency
    # order, and deletion_test runs no pass of its own for it
    model, sae, images = _threshold_case()
    saliency = gradfam_pairs(model, sae, images, [0])
    result = deletion_test(model, sae, images, [0], saliency, steps=1, seed=0)
    by_hand = _curve_by_hand(list(range(16)), 1)
    assert result.curves[0].tolist() == pytest.approx(by_hand, abs=1e-12)
    assert result.curves_random[0].tolist() == pytest.approx(by_hand, abs=1e-12)


def test_deletion_counts_and_a_code_that_is_off():
    assert deletion_counts(10, 4).tolist() == [0, 3, 5, 8, 10]  # round half up: 2.5 -> 3
    assert deletion_counts(4096, 20)[[0, 1, -1]].tolist() == [0, 205, 4096]
    model, sae, images = _threshold_case()
    with torch.no_grad():
        sae.encoder.weight[0].neg_()  # latent 0 is now <= 0 on every image: nothing to delete
    curves = deletion_curves(model, sae, images, [0], random_order(1, 16, seed=0), steps=4)
    assert torch.isnan(curves).all()
    with pytest.raises(ValueError, match="one feature and one order"):
        deletion_curves(model, sae, images, [0, 1], random_order(1, 16, seed=0), steps=4)


# --- The stage -----------------------------------------------------------------------------


def _fake_root(tmp_path: Path) -> Path:
    """The inputs the gradfam stage reads, made directly: a 32 px ResNet-18 with 3 classes, 12
    val images, its activations, an 8-latent ReLU SAE and a ranking."""
    from salve.activations import extract_activations
    from salve.data import IMAGENET_MEAN, IMAGENET_STD
    from salve.io import save_tensors, write_json
    from salve.models import save_checkpoint
    from salve.sae import sae_tensors

    root = tmp_path
    res = root / "results"
    classes = ["a", "b", "c"]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    save_tensors(res / "fetch" / "val.safetensors", {"images": images, "labels": labels})
    write_json(res / "fetch" / "meta.json", {"classes": classes, "info": {}})
    model = build_model("resnet18", 3, image_size=32).eval()
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    save_checkpoint(
        res / "finetune" / "model.safetensors",
        model,
        {"classes": classes, "image_size": 32, "normalisation": norm},
    )
    acts = extract_activations(model, images, IMAGENET_MEAN, IMAGENET_STD, progress=False)
    save_tensors(res / "extract" / "val.safetensors", {"acts": acts, "labels": labels})
    sae = build_sae("relu", 512, 8)
    with torch.no_grad():
        sae.decoder.bias.copy_(acts.mean(0))
        sae.encoder.bias.fill_(0.01)
        sae.encoder.weight[7].zero_()
        sae.encoder.bias[7] = -1.0  # latent 7 never fires: a dead latent
    save_tensors(res / "fit_sae" / "sae.safetensors", sae_tensors(sae))
    write_json(res / "fit_sae" / "sae.json", {"kind": "relu", "k": 0})
    ranking = {  # the rank stage's record (tasks/records.py Ranking)
        "classes": classes,
        "dominant": [
            {"feature": 2, "name": "a", "class": 0, "class_mean": 1.0},
            {"feature": 5, "name": "b", "class": 1, "class_mean": 1.0},
        ],
        "top": {},
        "cross_class": [{"feature": 3, "classes": [1, 2], "class_means": [1.0, 0.9], "ratio": 0.9}],
        "rule": {},
    }
    write_json(res / "rank" / "ranking.json", ranking)
    return root


def test_stage_writes_every_latent(tmp_path):
    from salve.config import from_dict
    from salve.io import load_tensors
    from tasks import gradfam as stage

    root = _fake_root(tmp_path)
    params = {
        "common": {"device": "cpu"},
        "data": {"image_size": 32},
        "gradfam": {
            "top_k": 2,
            "am_steps": 2,
            "deletion_steps": 4,
            "batch_size": 8,
            "deletion_sample": 2,
        },
    }
    out = root / "results" / "gradfam"
    out.mkdir(parents=True)
    (out / "latent_99.png").write_bytes(b"left by a run at another SAE width")
    summary = stage.run(from_dict(params), root, progress=False)
    assert not (out / "latent_99.png").exists()
    latents = json.loads((out / "latents.json").read_text())
    assert latents["image_size"] == 32 and latents["layer"] == "layer2"  # layer3 is 2x2 at 32 px
    assert latents["map_grid"] == [4, 4]
    entries = latents["latents"]
    assert [e["latent"] for e in entries] == list(range(8))
    dead = entries[7]  # never active on val: no images, marked
    assert dead["dead"] and dead["frequency"] == 0.0 and dead["top"] == []
    assert dead["overlay"] is None and dead["deletion_auc"] is None
    assert not (out / "latent_7.png").exists()
    live = [e for e in entries if not e["dead"]]
    assert len(live) == 7 and all(e["frequency"] > 0 for e in live)
    for e in live:
        assert len(e["top"]) == 2 and (out / e["overlay"]).is_file()
        assert e["top"][0]["code"] >= e["top"][1]["code"]
        assert e["top"][0]["class"] in ("a", "b", "c")
        assert (e["am"] is not None) == (e["latent"] in (2, 5))  # dominant only, as shown
    # the deletion test: the three roles and two other live latents, no more
    metrics = json.loads((root / "metrics" / "gradfam.json").read_text())
    assert metrics == summary
    tested = metrics["deletion_latents"]
    assert set(tested) >= {2, 3, 5} and len(tested) == 5 and 7 not in tested
    assert tested == sorted(tested)
    scored = [e for e in entries if e["deletion_auc"] is not None]
    assert {e["latent"] for e in scored} <= set(tested)
    assert scored and all(math.isfinite(e["deletion_auc"]) for e in scored)
    index = json.loads((out / "index.json").read_text())
    assert [f["feature"] for f in index["features"]] == [2, 5, 3]
    assert all((out / f["overlay"]).is_file() for f in index["features"])
    assert [(out / f["am"]).is_file() for f in index["features"] if "am" in f] == [True, True]
    assert not (out / "am_3.png").exists()  # a cross-class feature: the report shows no AM
    assert metrics["map_grid"] == [4, 4] and metrics["layer"] == "layer2"
    assert metrics["dead_latents"] == 1 and metrics["am_images"] == 2
    assert metrics["latents_without_auc"] == len(tested) - len(scored)
    assert metrics["deletion_auc"] == pytest.approx(
        sum(e["deletion_auc"] for e in scored) / len(scored)
    )
    worse = sum(e["deletion_auc"] >= e["deletion_auc_random"] for e in scored)
    assert metrics["maps_no_better_than_random"] == worse
    t = load_tensors(out / "gradfam.safetensors")
    assert t["deletion_latents"].tolist() == tested
    assert (t["top"][7] == -1).all() and (t["maps"][7] == 0).all()
    untested = [lat for lat in range(8) if lat not in tested]
    assert torch.isnan(t["deletion_auc"][untested]).all()
    # the stage is deterministic: a second run writes the same bytes
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    stage.run(from_dict(params), root, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_stage_maps_and_strips_are_those_of_each_latent_alone(tmp_path):
    """The shared pass gives every latent's top images the maps gradfam_pairs gives them one
    latent at a time, and its strips the pixels of overlay_strip_png."""
    import io

    import numpy as np
    from PIL import Image

    from salve.config import from_dict
    from salve.data import normalise
    from salve.io import load_tensors
    from salve.present.images import overlay_strip_png
    from tasks import gradfam as stage
    from tasks.artifacts import load_model, load_sae, open_split

    root = _fake_root(tmp_path)
    params = {"common": {"device": "cpu"}, "data": {"image_size": 32}}
    params["gradfam"] = {"top_k": 3, "am_steps": 0, "deletion_steps": 2, "deletion_sample": 0}
    stage.run(from_dict(params), root, progress=False)
    out = root / "results" / "gradfam"
    t = load_tensors(out / "gradfam.safetensors")
    model, sidecar = load_model(root)
    sae, _ = load_sae(root)
    images, _ = open_split(root, "val")
    mean, std = sidecar["normalisation"]["mean"], sidecar["normalisation"]["std"]
    peaks = t["maps"][:7].flatten(2).amax(2)
    assert (peaks == 0).any() and (peaks > 0).any()  # tiles copied and tiles blended
    for lat in range(7):
        rows = t["top"][lat]
        x = normalise(images[rows], mean, std)
        maps = gradfam_pairs(model, sae, x, [lat] * 3, layer="layer2")
        assert torch.equal(t["maps"][lat], maps.float())
        saliency = upsample_normalise(maps[:, None].float(), 32)[:, 0]
        expected = overlay_strip_png(images[rows], saliency, scale=4)
        pixels = [
            np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            for png in (expected, (out / f"latent_{lat}.png").read_bytes())
        ]
        assert pixels[0].shape == pixels[1].shape == (128, 3 * 128 + 2 * 2, 3)
        assert (pixels[0] == pixels[1]).all()


def test_top_images_and_the_deletion_sample():

    gen = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(30, 12, generator=gen)).round(decimals=1)  # ties
    top = top_images(codes, 4)
    assert top.tolist() == [top_activating(codes, f, 4).tolist() for f in range(12)]
    assert top_images(codes, 99).shape == (12, 30)
    live = torch.ones(12, dtype=torch.bool)
    live[[0, 5]] = False
    picked = deletion_latents([3, 9], [], live, 4, seed=1)
    assert len(picked) == 6 and {3, 9} <= set(picked) and not {0, 5} & set(picked)
    assert picked == deletion_latents([3, 9], [], live, 4, seed=1) == sorted(picked)
    assert picked != deletion_latents([3, 9], [], live, 4, seed=2)
    assert deletion_latents([3, 9], [], live, 100, seed=1) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert deletion_latents([3, 5], [], live, 0, seed=1) == [3]  # a role never active: no test
    # Cross-class features: all of them up to the sample, then a seeded sample of that size
    cross = [1, 2, 4, 6, 7]
    assert deletion_latents([3], cross, live, 0, seed=1) == [3]
    assert set(deletion_latents([3], cross, live, 5, seed=1)) >= {1, 2, 3, 4, 6, 7}
    few = deletion_latents([3], cross, live, 2, seed=1)
    assert len(few) == 1 + 2 + 2 and len(set(few) & set(cross)) >= 2
    assert len(set(few) - set(cross) - {3}) <= 2


def test_backward_state_per_image_scales_with_the_pixels_and_bounds_the_batch() -> None:
    """A ResNet's saved activations are proportional to the image's area (the weights, saved
    once, cancel in the two-minus-one measurement); the batch shrinks to fit the budget."""
    from salve.feature_layers import backward_bytes_per_image, images_per_pass

    torch.manual_seed(0)
    model = build_model("resnet18", 3, image_size=64)
    small, large = backward_bytes_per_image(model, 32), backward_bytes_per_image(model, 64)
    assert small > 0 and large / small == pytest.approx(4.0, rel=0.05)
    assert not any(p.grad is not None for p in model.parameters())
    assert images_per_pass(model, 64, 32, 10_000) == 32
    assert images_per_pass(model, 64, 32, 1) == 1
    mb = 5 * large // 2**20 + 1  # room for five images, not six
    assert images_per_pass(model, 64, 32, mb) == (mb * 2**20) // large


def test_strips_of_images_larger_than_a_tile_are_thumbnails(tmp_path, monkeypatch):
    """Above STRIP_TILE px the browser's strips hold area-reduced tiles of that side (at 224 px
    a third of the pixels to composite and encode per latent); where a latent's map is zero the
    tile is exactly the reduced image."""
    import io

    import numpy as np
    import torch.nn.functional as F  # noqa: N812
    from PIL import Image

    from salve.config import from_dict
    from salve.io import load_tensors
    from tasks import gradfam as stage

    root = _fake_root(tmp_path)
    monkeypatch.setattr(stage, "STRIP_TILE", 16)  # the fake images are 32 px
    params = {
        "common": {"device": "cpu"},
        "data": {"image_size": 32},
        "gradfam": {"top_k": 2, "am_steps": 0, "deletion_steps": 2, "deletion_sample": 0},
    }
    stage.run(from_dict(params), root, progress=False)
    out = root / "results" / "gradfam"
    strip = np.asarray(Image.open(io.BytesIO((out / "latent_0.png").read_bytes())))
    assert strip.shape == (16, 2 * 16 + 2, 3)  # two tiles and the gap
    t = load_tensors(out / "gradfam.safetensors")
    images = load_tensors(root / "results" / "fetch" / "val.safetensors")["images"]
    checked = 0
    for lat in range(7):
        for j in range(2):
            if (t["maps"][lat, j] == 0).all():
                checked += 1
                small = F.interpolate(images[t["top"][lat, j]][None].float(), size=16, mode="area")
                png = np.asarray(Image.open(io.BytesIO((out / f"latent_{lat}.png").read_bytes())))
                tile = png[:, j * 18 : j * 18 + 16]
                expected = small[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
                assert np.array_equal(tile, expected.numpy())
    assert checked
    overlay = Image.open(io.BytesIO((out / "overlay_2.png").read_bytes()))
    assert overlay.size[0] > 2 * 16  # the report's figure keeps the full size
