"""Oracle tests for salve.study: closed-form adversarial distances, scipy's Spearman, exact
identities of the deeper edit, SAE variant settings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from salve.config import SaeConfig
from salve.data import normalise
from salve.sae import quality_metrics
from salve.study.adversarial import (
    input_box,
    minimal_perturbation,
    perturbation_bracket,
    pgd_attack,
    pixel_space,
)
from salve.study.deeper import (
    edit_block_output,
    edited_accuracy,
    pooled_activations,
    resolve_block,
)
from salve.study.stats import spearman_ci, spearman_ci_per_class
from salve.study.variants import SAE_VARIANTS, fit_variant, match_l0_by_l1, sae_variants
from salve.tv import import_torchvision

F64 = torch.float64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# 1. Minimal adversarial perturbation
# --------------------------------------------------------------------------------------------


class FlatLinear(nn.Module):
    """A linear classifier on flattened [N, C, H, W] inputs: closed-form flip distances."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def _linear_case(k: int, seed: int = 0, n: int = 14):
    torch.manual_seed(seed)
    model = FlatLinear(48, k).double()
    x = torch.randn(n, 3, 4, 4, generator=_gen(seed + 1), dtype=F64)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    y[:2] = z[:2].argmin(1)  # two misclassified samples
    return model, x, y, z


def _closed_form(model: FlatLinear, z: torch.Tensor, y: torch.Tensor, dual_p: float):
    """min over j != y of (z_y - z_j) / ||w_y - w_j||_q (q = 2 for L2, q = 1 for L-inf)."""
    w = model.lin.weight.detach()
    best = torch.full((len(y),), math.inf, dtype=F64)
    z_y = z.gather(1, y[:, None])[:, 0]
    for j in range(z.shape[1]):
        dist = (z_y - z[:, j]) / (w[y] - w[j]).norm(p=dual_p, dim=1)
        best = torch.where(y == j, best, torch.minimum(best, dist))
    return best.clamp_min(0.0)  # misclassified: 0


@pytest.mark.parametrize(("norm", "dual_p"), [("l2", 2.0), ("linf", 1.0)])
def test_linear_classifier_matches_closed_form(norm: str, dual_p: float) -> None:
    model, x, y, z = _linear_case(k=3)
    true = _closed_form(model, z, y, dual_p)
    finite = true[2:].sort().values
    eps_max = float((finite[-3] + finite[-2]) / 2)  # the two largest stay out of reach
    bisection_steps = 12
    tol = eps_max / 2**bisection_steps
    lo, hi = perturbation_bracket(
        model, x, y, norm=norm, eps_max=eps_max, steps=10, bisection_steps=bisection_steps,
        batch_size=5, n_targets=2,
    )  # fmt: skip
    assert torch.equal(hi[:2], torch.zeros(2, dtype=F64))  # already wrong
    out = true > eps_max
    assert int(out.sum()) == 2 and bool(torch.isinf(hi[out]).all())
    assert bool((lo[out] == eps_max).all())
    inside = ~out
    inside[:2] = False
    assert bool((hi[inside] >= true[inside] - 1e-9).all())
    assert bool((hi[inside] - true[inside] <= tol + 1e-9).all())
    assert bool((lo[inside] <= true[inside] + 1e-9).all())
    assert torch.allclose(hi[inside] - lo[inside], torch.full_like(hi[inside], tol), rtol=1e-9)
    # The public entry point returns hi.
    found = minimal_perturbation(
        model, x, y, norm=norm, eps_max=eps_max, steps=10, bisection_steps=bisection_steps,
        batch_size=5, n_targets=2,
    )  # fmt: skip
    assert torch.equal(found, hi)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_binary_untargeted_matches_closed_form(norm: str, loss: str) -> None:
    model, x, y, z = _linear_case(k=2, seed=3)
    true = _closed_form(model, z, y, 2.0 if norm == "l2" else 1.0)
    eps_max = float(true.max()) * 1.5
    found = minimal_perturbation(
        model, x, y, norm=norm, eps_max=eps_max, steps=10, bisection_steps=10, loss=loss
    )
    tol = eps_max / 2**10
    assert bool(((found - true) >= -1e-9).all()) and bool(((found - true) <= tol + 1e-9).all())


def test_untargeted_is_an_upper_bound_and_targets_make_it_exact() -> None:
    """No attack flips below the true minimum. The untargeted margin is concave, so its PGD can
    settle on the wrong runner-up and stop above it; targeted runs on every class are exact."""
    model, x, y, z = _linear_case(k=5, seed=0, n=20)
    true = _closed_form(model, z, y, 2.0)
    eps_max = float(true.max()) * 1.2
    tol = eps_max / 2**10
    untargeted = minimal_perturbation(model, x, y, norm="l2", eps_max=eps_max, steps=10)
    targeted = minimal_perturbation(model, x, y, norm="l2", eps_max=eps_max, steps=10, n_targets=4)
    assert bool(torch.isfinite(untargeted).all())
    assert bool((untargeted >= true - 1e-9).all())
    assert bool((untargeted - true > tol).any())  # this seed has a sample where it overshoots
    assert bool(((targeted - true).abs() <= tol + 1e-9).all())


def test_clamp_box_is_respected_and_only_makes_flips_harder() -> None:
    model, x, y, z = _linear_case(k=3, seed=7)
    x = x.clamp(-1.0, 1.0)
    with torch.no_grad():
        y = model(x).argmax(1)
    box = (torch.tensor([-1.2, -1.0, -1.1], dtype=F64).view(1, 3, 1, 1), 1.05)
    kw = dict(norm="linf", eps_max=3.0, steps=10, bisection_steps=10, n_targets=2)
    free = minimal_perturbation(model, x, y, **kw)
    boxed = minimal_perturbation(model, x, y, clamp=box, **kw)
    assert bool((boxed >= free - 3.0 / 2**10 - 1e-12).all())
    assert bool((boxed > free).any())  # the box binds somewhere
    eps = torch.full((len(y),), 0.4, dtype=F64)
    flipped, delta = pgd_attack(model, x, y, eps, norm="linf", steps=10, clamp=box)
    adv = x + delta
    assert bool((adv >= box[0] - 1e-12).all()) and bool((adv <= box[1] + 1e-12).all())
    assert float(delta.abs().amax()) <= 0.4 + 1e-12
    with torch.no_grad():
        assert torch.equal(flipped, model(adv).argmax(1) != y)
    flipped2, delta2 = pgd_attack(model, x, y, 0.4, norm="l2", steps=10, clamp=box)
    assert float(delta2.flatten(1).norm(dim=1).max()) <= 0.4 + 1e-12


def _tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    with torch.no_grad():
        net[1].running_mean.normal_(0, 0.1, generator=_gen(seed + 9))
        net[1].running_var.uniform_(0.5, 2.0, generator=_gen(seed + 10))
    return net


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_convnet_bracket_is_monotone(norm: str) -> None:
    """PGD of the found size flips, PGD of the size just below it (same attack) does not."""
    net = _tiny_convnet()
    x = torch.randn(10, 3, 16, 16, generator=_gen(4), dtype=F64)
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
    eps_max = 20.0 if norm == "l2" else 2.0
    kw = dict(norm=norm, steps=15, n_targets=2)
    lo, hi = perturbation_bracket(net, x, y, eps_max=eps_max, bisection_steps=8, **kw)
    ok = torch.isfinite(hi)
    assert int(ok.sum()) >= 6
    assert torch.allclose(hi[ok] - lo[ok], torch.full_like(hi[ok], eps_max / 2**8))
    flip_hi, delta = pgd_attack(net, x[ok], y[ok], hi[ok], **kw)
    flip_lo, _ = pgd_attack(net, x[ok], y[ok], lo[ok], **kw)
    assert bool(flip_hi.all()) and not bool(flip_lo.any())
    with torch.no_grad():  # the returned perturbation really flips and has the found size at most
        assert bool((net(x[ok] + delta).argmax(1) != y[ok]).all())
    size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(dim=1)
    assert bool((size <= hi[ok] + 1e-12).all())


def test_attack_hygiene_mode_grads_determinism() -> None:
    net = _tiny_convnet(seed=1)
    x = torch.randn(6, 3, 16, 16, generator=_gen(2), dtype=F64)
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reference = minimal_perturbation(net, x, y, norm="linf", eps_max=2.0, steps=5)
    net.train()  # BN would use batch statistics in train mode: the attack must not
    again = minimal_perturbation(net, x, y, norm="linf", eps_max=2.0, steps=5, batch_size=4)
    assert net.training
    assert torch.equal(reference, again)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    r1 = minimal_perturbation(net, x, y, norm="l2", eps_max=9.0, steps=5, random_start=True, seed=3)
    r2 = minimal_perturbation(net, x, y, norm="l2", eps_max=9.0, steps=5, random_start=True, seed=3)
    assert torch.equal(r1, r2)


def test_attack_bad_inputs() -> None:
    model, x, y, _ = _linear_case(k=3)
    with pytest.raises(ValueError, match="norm"):
        minimal_perturbation(model, x, y, norm="l3", eps_max=1.0)
    with pytest.raises(ValueError, match="eps_max"):
        minimal_perturbation(model, x, y, norm="l2", eps_max=0.0)
    with pytest.raises(ValueError, match="clamp bounds"):
        minimal_perturbation(model, x, y, norm="l2", eps_max=1.0, clamp=(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match="outside the clamp box"):
        minimal_perturbation(model, x, y, norm="l2", eps_max=1.0, clamp=(-0.1, 0.1))
    with pytest.raises(ValueError, match="float"):
        minimal_perturbation(model, x.to(torch.uint8), y, norm="l2", eps_max=1.0)


def test_input_box_and_pixel_space() -> None:
    u8 = torch.randint(0, 256, (4, 3, 8, 8), generator=_gen(0), dtype=torch.uint8)
    u8[0] = 0
    u8[1] = 255
    lo, hi = input_box(MEAN, STD)
    x = normalise(u8, MEAN, STD)
    assert torch.equal(x[0], lo[0].expand(3, 8, 8)) and torch.equal(x[1], hi[0].expand(3, 8, 8))
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    net = _tiny_convnet().float().eval()
    wrapped = pixel_space(net, MEAN, STD)
    with torch.no_grad():
        assert torch.allclose(wrapped(u8.float() / 255), net(x), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Spearman with bootstrap CI
# --------------------------------------------------------------------------------------------


def test_spearman_monotone_is_one_with_tight_ci() -> None:
    x = np.linspace(0.0, 1.0, 40)
    out = spearman_ci(x, np.exp(3 * x), n_boot=200, seed=0)
    assert out["n"] == 40 and out["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert out["ci95"] == pytest.approx([1.0, 1.0], abs=1e-12)
    anti = spearman_ci(x, -x, n_boot=50, seed=0)
    assert anti["spearman"] == pytest.approx(-1.0, abs=1e-12)


def test_spearman_equals_scipy_and_ci_covers_it() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    y[:20] = np.round(y[:20])  # some ties
    out = spearman_ci(torch.tensor(x), y, n_boot=500, seed=4)
    assert out["spearman"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    lo, hi = out["ci95"]
    assert lo < out["spearman"] < hi and hi - lo < 0.4
    assert spearman_ci(x, y, n_boot=500, seed=4) == out  # seeded


def test_spearman_inf_ranks_last_and_nan_pairs_drop() -> None:
    x = np.array([0.3, math.inf, 0.1, math.inf, 2.0, np.nan, 0.7])
    y = np.array([1.0, 9.0, 0.5, 8.0, 3.0, 100.0, np.nan])
    out = spearman_ci(x, y, n_boot=0)
    keep = slice(0, 5)
    big = np.where(np.isinf(x[keep]), 1e300, x[keep])  # inf as the largest value, ties shared
    assert out["n"] == 5
    assert out["spearman"] == pytest.approx(spearmanr(big, y[keep]).statistic, abs=1e-12)
    assert math.isnan(out["ci95"][0])
    few = spearman_ci([1.0, 2.0], [2.0, 1.0])
    assert few["n"] == 2 and math.isnan(few["spearman"])


def test_spearman_per_class() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=60), rng.normal(size=60)
    labels = np.repeat([0, 2], 30)
    out = spearman_ci_per_class(x, y, labels, num_classes=3, n_boot=100, seed=0)
    assert set(out) == {0, 1, 2}
    for c in (0, 2):
        sel = labels == c
        assert out[c]["n"] == 30
        assert out[c]["spearman"] == pytest.approx(spearmanr(x[sel], y[sel]).statistic, abs=1e-12)
    assert out[1]["n"] == 0 and math.isnan(out[1]["spearman"])
    with pytest.raises(ValueError, match="labels"):
        spearman_ci_per_class(x, y, labels, num_classes=2)


# --------------------------------------------------------------------------------------------
# 2. SAE variants
# --------------------------------------------------------------------------------------------


def test_sae_variants_settings() -> None:
    base = SaeConfig(kind="relu", width=16, k=3, l1=0.02, aux_l1=0.5, epochs=7)
    variants = sae_variants(base, target_l0=5.4)
    assert [v["name"] for v in variants] == list(SAE_VARIANTS)
    by = {v["name"]: v for v in variants}
    for name in ("topk", "batchtopk", "topk_aux_l1", "topk_l1_l2_ratio"):
        assert by[name]["sae"].k == 5 and by[name]["l0_rule"] == "k"
    assert by["topk"]["sae"].aux_l1 == 0.0 == by["topk"]["sae"].l1_l2_ratio
    assert by["topk_aux_l1"]["sae"].aux_l1 == 0.03 and by["topk_aux_l1"]["sae"].kind == "topk"
    assert by["topk_l1_l2_ratio"]["sae"].l1_l2_ratio == 0.01
    assert by["relu"]["l0_rule"] == "achieved" and by["relu"]["sae"].l1 == 0.02
    assert all(v["sae"].width == 16 and v["sae"].epochs == 7 for v in variants)
    assert sae_variants(base, 100.0, names=("topk",))[0]["sae"].k == 16  # clipped to width
    with pytest.raises(ValueError):
        sae_variants(base, 0.0)
    with pytest.raises(ValueError, match="among"):
        sae_variants(base, 4.0, names=("gated",))


@pytest.fixture(scope="module")
def tiny_acts() -> torch.Tensor:
    g = _gen(0)
    basis = torch.randn(6, 10, generator=g)
    codes = torch.relu(torch.randn(160, 6, generator=g))
    return codes @ basis + 0.05 * torch.randn(160, 10, generator=g)


def test_fit_variants_reach_their_sparsity(tiny_acts: torch.Tensor) -> None:
    base = SaeConfig(width=12, epochs=8, batch_size=32, lr=3e-3)
    variants = sae_variants(base, target_l0=3.0)
    weights = {}
    for v in variants:
        sae, history = fit_variant(tiny_acts, v["sae"], seed=0)
        assert sae.kind == v["sae"].kind and len(history) == 8
        l0 = quality_metrics(sae, tiny_acts)["l0"]
        if v["name"] in ("topk", "topk_aux_l1", "topk_l1_l2_ratio"):
            assert l0 <= 3.0
        if v["name"] == "linear":
            assert l0 > 11.0  # signed codes are dense
        weights[v["name"]] = sae.encoder.weight.detach().clone()
    # The regularisers act: same seed and k, different weights.
    assert not torch.equal(weights["topk"], weights["topk_aux_l1"])
    assert not torch.equal(weights["topk"], weights["topk_l1_l2_ratio"])
    again, _ = fit_variant(tiny_acts, variants[2]["sae"], seed=0)
    assert torch.equal(again.encoder.weight, weights[variants[2]["name"]])


def test_match_l0_by_l1(tiny_acts: torch.Tensor) -> None:
    cfg = SaeConfig(kind="relu", width=12, epochs=15, batch_size=32, lr=3e-3, l1=0.1)
    low, _ = fit_variant(tiny_acts, dataclasses.replace(cfg, l1=0.1 / 30), seed=0)
    high, _ = fit_variant(tiny_acts, dataclasses.replace(cfg, l1=0.1 * 30), seed=0)
    l0_low, l0_high = (quality_metrics(s, tiny_acts)["l0"] for s in (low, high))
    assert l0_low > l0_high
    target = (l0_low + l0_high) / 2
    best_cfg, best_sae, trace = match_l0_by_l1(tiny_acts, cfg, target, seed=0, fits=5)
    assert len(trace) == 5
    errors = [abs(t["l0"] - target) for t in trace]
    assert best_cfg.l1 == trace[int(np.argmin(errors))]["l1"]
    assert abs(quality_metrics(best_sae, tiny_acts)["l0"] - target) == pytest.approx(
        min(errors), abs=0
    )
    assert min(errors) < abs(l0_low - target) and min(errors) < abs(l0_high - target)
    # Bisection: each step moves towards the target's side.
    for prev, nxt in zip(trace, trace[1:], strict=False):
        assert (nxt["l1"] > prev["l1"]) == (prev["l0"] > target)
    with pytest.raises(ValueError, match="l1-sparse"):
        match_l0_by_l1(tiny_acts, dataclasses.replace(cfg, kind="topk"), 3.0, seed=0)


# --------------------------------------------------------------------------------------------
# 3. Deeper edits
# --------------------------------------------------------------------------------------------


def _randomise_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.2)


class TinyResNet(nn.Module):
    """Stem, one stage of two torchvision basic blocks (the second with a downsample), head."""

    def __init__(self) -> None:
        super().__init__()
        block = import_torchvision().models.resnet.BasicBlock
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(block(4, 4), block(4, 8, stride=2, downsample=down))
        self.fc = nn.Linear(8, 3)
        for i, m in enumerate(self.modules()):
            if isinstance(m, nn.BatchNorm2d):
                _randomise_bn(m, seed=i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(torch.relu(self.stem(x))).mean(dim=(2, 3)))


def _capture(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    store = {}
    handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("out", o.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store["out"]


def _apply_channels(p_cc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nc...->no...", p_cc, v) if v.dim() == 4 else v @ p_cc.T


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("sign", "alpha", "with_centre"), [(-1, 1.0, False), (1, 0.7, True)])
def test_resnet_block_edit_identity(dtype, sign, alpha, with_centre) -> None:
    torch.manual_seed(0)
    model = TinyResNet().to(dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = torch.randn(8, generator=_gen(1), dtype=F64)
    centre = torch.randn(8, generator=_gen(2), dtype=F64) if with_centre else None
    edited = edit_block_output(model, "layer1", d, alpha, sign, centre_c=centre).eval()
    x = torch.randn(3, 3, 16, 16, generator=_gen(3), dtype=F64).to(dtype)
    v = _capture(model.layer1[1].bn2, model, x).to(F64)
    v_new = _capture(edited.layer1[1].bn2, edited, x).to(F64)
    u = d / d.norm()
    p = torch.eye(8, dtype=F64) + sign * alpha * torch.outer(u, u)
    m = (centre if with_centre else model.layer1[1].bn2.bias.detach().to(F64)).view(1, 8, 1, 1)
    expect = _apply_channels(p, v - m) + m
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert torch.allclose(v_new, expect, atol=tol, rtol=tol)
    # Only conv2's weight and bn2's bias of the stage's last block change; the input model not.
    after = edited.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layer1.1.conv2.weight", "layer1.1.bn2.bias"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resnet_block_edit_removes_deviation_along_d() -> None:
    """alpha = 1 suppression: the BN output's component along d is the centre's, everywhere."""
    model = TinyResNet().double().eval()
    d = torch.randn(8, generator=_gen(5), dtype=F64)
    edited = edit_block_output(model, "layer1.1", d, 1.0).eval()
    x = torch.randn(2, 3, 16, 16, generator=_gen(6), dtype=F64)
    v_new = _capture(edited.layer1[1].bn2, edited, x)
    u = d / d.norm()
    along = torch.einsum("c,nchw->nhw", u, v_new)
    beta = model.layer1[1].bn2.bias.detach()
    assert torch.allclose(along, torch.full_like(along, float(u @ beta)))


def test_alpha_zero_is_bit_identical_and_bad_inputs() -> None:
    model = TinyResNet().eval()
    same = edit_block_output(model, "layer1", torch.ones(8), 0.0)
    assert same is not model
    for (k, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), k
    with pytest.raises(ValueError, match="8 entries"):
        edit_block_output(model, "layer1", torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="no module"):
        edit_block_output(model, "layer9", torch.ones(8), 1.0)
    with pytest.raises(ValueError, match="not an editable"):
        edit_block_output(model, "fc", torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        edit_block_output(model, "layer1", torch.ones(8), -1.0)
    with torch.no_grad():
        model.layer1[1].bn2.weight[3] = 0.0
    with pytest.raises(ValueError, match="gamma is 0"):
        edit_block_output(model, "layer1", torch.ones(8), 1.0)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = import_torchvision().models.resnet18(num_classes=3).eval()
    for i, m in enumerate(model.layer3.modules()):
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m, seed=100 + i)
    return model


def test_resnet18_pooled_layer3_and_edit(resnet18: nn.Module) -> None:
    u8 = torch.randint(0, 256, (4, 3, 32, 32), generator=_gen(0), dtype=torch.uint8)
    pooled = pooled_activations(resnet18, u8, "layer3", MEAN, STD, batch_size=3)
    m = resnet18
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(normalise(u8, MEAN, STD)))))
        expect = m.layer3(m.layer2(m.layer1(h))).mean(dim=(2, 3))
    assert pooled.shape == (4, 256) and torch.allclose(pooled, expect, atol=1e-5)
    assert not m.layer3._forward_hooks
    assert resolve_block(m, "layer3") is m.layer3[1]
    d = torch.randn(256, generator=_gen(1))
    edited = edit_block_output(m, "layer3", d, 1.0).eval()
    x = normalise(u8, MEAN, STD)
    v = _capture(m.layer3[1].bn2, m, x).double()
    v_new = _capture(edited.layer3[1].bn2, edited, x).double()
    u = (d / d.norm()).double()
    beta = m.layer3[1].bn2.bias.detach().double().view(1, -1, 1, 1)
    p = torch.eye(256, dtype=F64) - torch.outer(u, u)
    assert torch.allclose(v_new, _apply_channels(p, v - beta) + beta, atol=1e-4)
    for name in ("layer3.0", "layer3.1.conv1", "layer3.1.bn1", "layer4", "fc"):
        a, b = m.get_submodule(name).state_dict(), edited.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    tv = import_torchvision()
    return tv.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
        num_classes=3,
    ).double().eval()  # fmt: skip


def test_vit_pooled_patch_mean_and_mlp_edit() -> None:
    vit = _tiny_vit()
    u8 = torch.randint(0, 256, (3, 3, 32, 32), generator=_gen(0), dtype=torch.uint8)
    name = "encoder.layers.encoder_layer_0"
    pooled = pooled_activations(vit.float(), u8, name, MEAN, STD)
    vit = vit.double()
    x = normalise(u8, MEAN, STD).double()
    with torch.no_grad():
        tokens = vit._process_input(x)
        tokens = torch.cat([vit.class_token.expand(3, -1, -1), tokens], dim=1)
        out0 = vit.encoder.layers[0](tokens + vit.encoder.pos_embedding)
    assert pooled.shape == (3, 16)
    assert torch.allclose(pooled.double(), out0[:, 1:].mean(dim=1), atol=1e-5)
    d = torch.randn(16, generator=_gen(1), dtype=F64)
    u = d / d.norm()
    p = torch.eye(16, dtype=F64) - 0.8 * torch.outer(u, u)
    block = vit.encoder.layers[1]
    for centre in (None, torch.randn(16, generator=_gen(2), dtype=F64)):
        edited = edit_block_output(vit, "encoder.layers", d, 0.8, centre_c=centre).eval()
        out = _capture(block.mlp, vit, x)
        out_new = _capture(edited.encoder.layers[1].mlp, edited, x)
        m = block.mlp[3].bias.detach() if centre is None else centre
        assert torch.allclose(out_new, (out - m) @ p.T + m, atol=1e-12)
        assert torch.equal(edited.encoder.layers[1].ln_2.weight, block.ln_2.weight)


def test_edited_accuracy_per_class() -> None:
    model = TinyResNet().eval()
    u8 = torch.randint(0, 256, (10, 3, 16, 16), generator=_gen(0), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    with torch.no_grad():
        preds = model(normalise(u8, MEAN, STD)).argmax(1)
    acc = edited_accuracy(model, u8, labels, MEAN, STD, batch_size=4, num_classes=3)
    for k in (0, 1):
        sel = labels == k
        assert float(acc[k]) == float((preds[sel] == k).double().mean())
    assert math.isnan(float(acc[2]))
    with pytest.raises(ValueError, match="lie in"):
        edited_accuracy(model, u8, labels, MEAN, STD, num_classes=1)
