"""Grad-FAM: closed form vs autograd, ViT grid and tap, hook hygiene, normalisation, ranking."""

from __future__ import annotations

import time

import pytest
import torch

from salve.gradfam import (
    VIT_TAPS,
    gradfam_autograd,
    gradfam_closed_form,
    top_activating,
    upsample_normalise,
    vit_grid,
)
from salve.models import build_model, feature_map_module, head_of, penultimate
from salve.sae import SparseAutoencoder


def _resnet(size_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", size_classes).double()


def _vit(image_size: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("vit_b_16", 5, image_size=image_size).double()


def _sae(d_in: int, kind: str, d_latent: int = 48, seed: int = 1, **kw) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(d_in, d_latent, kind, **kw).double()


def _layer4_and_acts(model, images):
    """layer4 output (the oracle's input) captured by an independent hook, and the head input."""
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, a, o: store.__setitem__("A", o))
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
    fmaps, acts = _layer4_and_acts(model, images)
    return model, images, fmaps, acts


@pytest.mark.parametrize("kind", ["relu", "linear", "topk", "jumprelu"])
def test_closed_form_equals_autograd_resnet(resnet_case, kind):
    model, images, fmaps, acts = resnet_case
    kw = {"k": 8} if kind == "topk" else {}
    sae = _sae(512, kind, **kw)
    features = [0, 3, 7, 11, 20, 47]
    closed = gradfam_closed_form(fmaps, sae, features)
    auto = gradfam_autograd(model, sae, images, features, batch_size=2)  # 3 batches
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


def test_autograd_leaves_model_and_sae_untouched(resnet_case):
    model, images, _, _ = resnet_case
    sae = _sae(512, "relu")
    model.train()
    sae.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradfam_autograd(model, sae, images[:2], [1, 2])
    assert model.training and sae.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in sae.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats not updated either
    model.eval()


def _hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _ExplodingSAE(SparseAutoencoder):
    def encode(self, acts_nm):
        raise RuntimeError("boom inside encode")


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_hooks_removed_after_success_and_exception(arch):
    model = _resnet() if arch == "resnet18" else _vit()
    d = head_of(model).in_features
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert _hook_counts(model) == 0
    taps = ["block_input"] if arch == "resnet18" else list(VIT_TAPS)
    for tap in taps:
        gradfam_autograd(model, _sae(d, "relu"), images, [0], vit_tap=tap)
        assert _hook_counts(model) == 0
        torch.manual_seed(0)
        bad = _ExplodingSAE(d, 8, "relu").double()
        model.train()
        with pytest.raises(RuntimeError, match="boom inside encode"):
            gradfam_autograd(model, bad, images, [0], vit_tap=tap)
        assert _hook_counts(model) == 0
        assert len(feature_map_module(model)._forward_hooks) == 0
        assert model.training  # restored even on the error path


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


def test_vit_grid_2x2_zero_feature_and_degenerate_output_tap():
    model = _vit(image_size=32)  # 2 x 2 grid
    sae = _sae(768, "relu", d_latent=6)
    with torch.no_grad():
        sae.encoder.weight[4].zero_()  # latent 4 is a constant: no dependence on the input
        sae.encoder.bias[4] = 1.0  # ... and on, so its derivative is 1, not masked to 0
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for tap in ("block_input", "block_ln1"):
        maps = gradfam_autograd(model, sae, images, [0, 1, 2, 3, 4, 5], vit_tap=tap)
        assert maps.shape == (3, 6, 2, 2)
        assert (maps >= 0).all()
        assert (maps[:, 4] == 0).all()
        assert maps.amax() > 0
    # The head reads LayerNorm(class token) only, so the last block's *output* patch tokens get
    # exactly zero gradient: the documented reason the default tap is the block input.
    lin = _sae(768, "linear", d_latent=6)
    assert (gradfam_autograd(model, lin, images, [0, 1], vit_tap="block_output") == 0).all()
    with pytest.raises(ValueError, match="vit_tap"):
        gradfam_autograd(model, lin, images, [0], vit_tap="nope")


def test_feature_out_of_range_raises(resnet_case):
    model, images, fmaps, _ = resnet_case
    sae = _sae(512, "relu", d_latent=4)
    with pytest.raises(ValueError, match="out of range"):
        gradfam_closed_form(fmaps, sae, [4])
    with pytest.raises(ValueError, match="out of range"):
        gradfam_autograd(model, sae, images, [-1])


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
    # positive scaling does not change a normalised map
    assert torch.allclose(upsample_normalise(maps * 7.0, 32), up, atol=1e-6)


def test_top_activating():
    codes = torch.tensor([[0.1, -3.0], [2.0, 1.0], [-5.0, 0.5], [2.0, 0.0]])
    assert top_activating(codes, 0, 2).tolist() == [1, 3]  # tie broken by index
    assert top_activating(codes, 0, 10).tolist() == [1, 3, 0, 2]
    assert top_activating(codes, 0, 1, by="abs").tolist() == [2]
    assert top_activating(codes, 1, 2).tolist() == [1, 2]
    assert top_activating(-codes, 1, 1).tolist() == [0]  # the negative direction of a signed code


def test_benchmark_closed_form_vs_autograd_resnet_64px():
    """Not asserted: printed for the report (run with -s). Best of 3 after a warm-up."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    sae = SparseAutoencoder(512, 256, "relu")
    images = torch.randn(16, 3, 64, 64)
    features = list(range(16))
    n = images.shape[0]

    fmaps, _ = _layer4_and_acts(model, images)

    def forward_only():
        return _layer4_and_acts(model, images)[0]

    def closed_form_only():
        return gradfam_closed_form(fmaps, sae, features)

    def autograd():
        return gradfam_autograd(model, sae, images, features, batch_size=16)

    timings = {}
    fns = (("forward", forward_only), ("closed", closed_form_only), ("autograd", autograd))
    for name, fn in fns:
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = (best, out)
    ms = {k: 1e3 * v[0] / n for k, v in timings.items()}
    print(
        f"\n[gradfam benchmark] resnet18 64px, {len(features)} features, N={n}, "
        f"{torch.get_num_threads()} threads, best of 5, ms/image: no-grad forward "
        f"{ms['forward']:.2f} + closed form {ms['closed']:.3f} "
        f"= {ms['forward'] + ms['closed']:.2f}; autograd {ms['autograd']:.2f}"
    )
    closed, auto = timings["closed"][1], timings["autograd"][1]
    assert torch.allclose(closed, auto, atol=1e-4 * float(closed.amax().clamp_min(1)))
