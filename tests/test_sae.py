"""salve.sae: metric oracles, every SAE kind fits, exact Jacobians, state round trips, the
registry, and codes recomputed from the saved tensors and each kind's encode description."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import salve.sae as sae_mod
from salve.config import SaeConfig
from salve.io import load_tensors, save_tensors, write_json
from salve.sae import (
    SAE_KINDS,
    JumpReluSAE,
    SparseAutoencoder,
    build_sae,
    fit_sae,
    init_sae,
    loss_weights,
    quality_metrics,
    sae_from_tensors,
    sae_loss,
    sae_tensors,
)
from salve.train import DivergenceError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One thread: tiny matrices only contend; restored after (the setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic_sparse(n: int = 256, d: int = 16, atoms: int = 24, seed: int = 0) -> torch.Tensor:
    """Each sample: 3 of `atoms` unit directions with positive weights, plus a large offset."""
    g = _gen(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :3]
    coef = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, 3, generator=g) * 2 + 0.5)
    return coef @ dictionary + 3.0


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return synthetic_sparse()


def _settings(kind: str, **kw) -> SaeConfig:
    base = {"kind": kind, "width": 32, "l1": 1e-3, "k": 4, "lr": 1e-2, "epochs": 25}
    return SaeConfig(**(base | {"batch_size": 64} | kw))


def _random_sae(kind: str, d: int = 6, width: int = 8, seed: int = 0, k: int = 3):
    torch.manual_seed(seed)
    sae = build_sae(kind, d, width, k=k if kind in ("topk", "batchtopk") else 0)
    with torch.no_grad():
        sae.decoder.bias.normal_()
        sae.encoder.bias.normal_(std=0.3)
        if isinstance(sae, JumpReluSAE):
            sae.log_threshold.fill_(math.log(0.2))
    return sae


# --------------------------------------------------------------------------------------------
# quality metrics


def _identity_linear_sae(d: int, dtype=torch.float32) -> SparseAutoencoder:
    sae = build_sae("linear", d, d).to(dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(d))
        sae.decoder.weight.copy_(torch.eye(d))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    return sae


def test_perfect_reconstruction_metrics() -> None:
    g = _gen(1)
    a = torch.randn(50, 6, generator=g) * 4 + 2
    head = nn.Linear(6, 3)
    labels = torch.randint(0, 3, (50,), generator=g)
    sae = _identity_linear_sae(6)
    sae.train()
    m = quality_metrics(sae, a, head=head, labels_n=labels, batch_size=16)
    assert sae.training  # mode restored
    assert m["fvu"] == 0.0 and m["explained_variance"] == 1.0
    assert m["splice_accuracy"] == m["accuracy_original"]
    assert m["splice_agreement"] == 1.0
    expected_acc = float((head(a).argmax(1) == labels).double().mean())
    assert m["accuracy_original"] == pytest.approx(expected_acc, abs=1e-12)
    assert m["l0"] == 6.0 and m["dead_fraction"] == 0.0 and m["n_samples"] == 50


@pytest.mark.parametrize("batch_size", [1, 7, 50, 4096])
def test_mean_predictor_has_fvu_exactly_one(batch_size: int) -> None:
    g = _gen(2)
    a = torch.randn(50, 5, generator=g, dtype=F64) * 3 + 10
    sae = build_sae("relu", 5, 4).to(F64)
    with torch.no_grad():
        sae.decoder.weight.zero_()
        sae.decoder.bias.copy_(a.mean(dim=0))
    head = nn.Linear(5, 3).to(F64)
    labels = torch.randint(0, 3, (50,), generator=g)
    m = quality_metrics(sae, a, head=head, labels_n=labels, batch_size=batch_size)
    assert m["fvu"] == 1.0 and m["explained_variance"] == 0.0
    # splice: the head always sees the mean, so it always predicts one class
    constant = int(head(a.mean(dim=0, keepdim=True)).argmax())
    assert m["splice_accuracy"] == pytest.approx(float((labels == constant).double().mean()))
    agree = float((head(a).argmax(1) == constant).double().mean())
    assert m["splice_agreement"] == pytest.approx(agree)


def _relu_1d() -> SparseAutoencoder:
    """x_hat = relu(x): exact for x >= 0, zero otherwise."""
    sae = build_sae("relu", 1, 1).to(F64)
    with torch.no_grad():
        sae.encoder.weight.fill_(1.0)
        sae.decoder.weight.fill_(1.0)
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    return sae


def test_fvu_sums_over_batches_not_mean_of_ratios() -> None:
    # x = [0, -2, 6, 0]: mean 1; errors only at -2 (4); SST = 1 + 9 + 25 + 1 = 36
    a = torch.tensor([[0.0], [-2.0], [6.0], [0.0]], dtype=F64)
    sae = _relu_1d()
    for bs in (1, 2, 3, 4, 100):
        assert quality_metrics(sae, a, batch_size=bs)["fvu"] == 4 / 36
    # per-batch ratios with batch 2 would be (4/10 + 0/26) / 2 = 0.2
    assert quality_metrics(sae, a, batch_size=2)["fvu"] != pytest.approx(0.2)


def test_fvu_is_batch_size_invariant_on_random_data() -> None:
    # float64 throughout, so only the accumulation order differs between batch sizes
    a = torch.randn(300, 8, generator=_gen(3), dtype=F64) * 2 + 5
    sae = _random_sae("relu", d=8, width=16).to(F64)
    one = quality_metrics(sae, a, batch_size=300)
    for bs in (1, 17, 64):
        m = quality_metrics(sae, a, batch_size=bs)
        assert m["fvu"] == pytest.approx(one["fvu"], rel=1e-12)
        assert m["l0"] == one["l0"] and m["dead_fraction"] == one["dead_fraction"]
    # a direct float64 computation of the definition
    with torch.no_grad():
        recon = sae(a)[0]
    expected = (a - recon).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    assert one["fvu"] == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_l0_and_dead_fraction_hand_case(batch_size: int) -> None:
    sae = build_sae("relu", 2, 3)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    # codes: [1,0,0], [0,1,0], [2,3,0] -> 4 non-zeros over 3 samples; latent 2 never fires
    m = quality_metrics(sae, a, batch_size=batch_size)
    assert m["l0"] == pytest.approx(4 / 3, abs=1e-15)
    assert m["dead_fraction"] == pytest.approx(1 / 3, abs=1e-15)
    assert "splice_accuracy" not in m


# --------------------------------------------------------------------------------------------
# loss


def _tiny_sae(kind: str, w_enc, w_dec, k: int = 0) -> SparseAutoencoder:
    sae = build_sae(kind, 2, 2, k=k).to(F64)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor(w_enc, dtype=F64))
        sae.decoder.weight.copy_(torch.tensor(w_dec, dtype=F64))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    return sae


def test_sae_loss_hand_computed_relu_and_linear() -> None:
    a = torch.tensor([[1.0, 2.0], [-1.0, -3.0]], dtype=F64)
    w_enc, w_dec = [[1.0, 0.0], [0.0, -1.0]], [[2.0, 0.0], [0.0, 1.0]]
    # relu: pre [1,-2], [-1,3] -> codes [1,0], [0,3] -> recon [2,0], [0,3]; errors 5, 37
    loss, parts = sae_loss(_tiny_sae("relu", w_enc, w_dec), a, {"l1": 0.5})
    assert parts == {"mse": 21.0, "l1": 2.0} and loss.item() == 22.0
    # linear: codes = pre -> recon [2,-2], [-2,3]; errors 17, 37; l1 mean(3, 4)
    loss, parts = sae_loss(_tiny_sae("linear", w_enc, w_dec), a, {"l1": 0.5})
    assert parts == {"mse": 27.0, "l1": 3.5} and loss.item() == 28.75
    # l1 = 0 leaves the plain reconstruction error
    loss, parts = sae_loss(_tiny_sae("linear", w_enc, w_dec), a, {"l1": 0.0})
    assert loss.item() == 27.0 and "l1" not in parts


def test_sae_loss_hand_computed_topk_regularisers() -> None:
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=F64)
    eye = [[1.0, 0.0], [0.0, 1.0]]
    sae = _tiny_sae("topk", eye, eye, k=1)
    # codes [3,0], [0,2]; mse mean(1, 1) = 1; outside the top-1: 1 and 1
    loss, parts = sae_loss(sae, a, {"l1": 5.0})
    assert loss.item() == 1.0 and parts == {"mse": 1.0}  # no l1 on codes for topk
    loss, _ = sae_loss(sae, a, {"aux_l1": 0.25})
    assert loss.item() == 1.25
    ratio = (4 / math.sqrt(10) + 3 / math.sqrt(5)) / 2
    loss, _ = sae_loss(sae, a, {"l1_l2_ratio": 2.0})
    assert loss.item() == pytest.approx(1 + 2 * ratio, rel=1e-14)


# --------------------------------------------------------------------------------------------
# fitting


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_every_kind_fits_and_reduces_the_loss(acts, kind: str) -> None:
    s = _settings(kind)
    before = quality_metrics(init_sae(acts, s, seed=0), acts)
    sae, history = fit_sae(acts, s, seed=0, progress=False)
    after = quality_metrics(sae, acts)
    assert len(history) == s.epochs and [h["epoch"] for h in history[:2]] == [1, 2]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert after["fvu"] < 0.25 and after["fvu"] < before["fvu"] / 4
    assert not sae.training
    norms = sae.W_dec.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # normalise_decoder=True
    if kind in ("topk", "batchtopk"):
        assert after["l0"] <= s.k + 0.5
    if kind == "linear":
        assert after["l0"] == s.width  # signed codes, no sparsity by construction


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_topk_codes_have_at_most_k_nonzeros(acts, kind: str) -> None:
    sae = _random_sae(kind, d=16, width=32, k=5)
    sae.train()
    codes = sae.encode(acts - 3.0)
    per_sample = (codes != 0).sum(dim=1)
    if kind == "topk":
        assert per_sample.max() <= 5 and per_sample.max() == 5
    else:  # k per sample on average over the batch
        assert per_sample.sum() <= 5 * len(acts) and per_sample.max() > 5
    assert (codes >= 0).all()


def test_batchtopk_threshold_calibration_hand_check(acts) -> None:
    sae = _random_sae("batchtopk", d=16, width=32, k=3)
    x = acts - 3.0
    with torch.no_grad():
        pre = sae.pre_activation(x)

        def kept_min(p: torch.Tensor) -> torch.Tensor:
            top = p.flatten().topk(3 * p.shape[0]).values
            return top[top > 0].min()

        sae.calibrate_(x)  # one batch
        assert float(sae.batchtopk_threshold) == float(kept_min(pre))
        sae.calibrate_(x, batch_size=128)  # two batches: mean of their minima
        expected = (kept_min(pre[:128]) + kept_min(pre[128:])) / 2
        assert float(sae.batchtopk_threshold) == pytest.approx(float(expected), rel=1e-6)
        sae.eval()
        codes = sae.encode(x)
        thr = sae.batchtopk_threshold
        assert torch.equal(codes, pre * (pre > thr))


def test_batchtopk_threshold_saved_and_round_trips(acts, tmp_path: Path) -> None:
    s = _settings("batchtopk", epochs=10)
    sae, _ = fit_sae(acts, s, seed=0, progress=False)
    threshold = float(sae.batchtopk_threshold)
    assert threshold > 0
    tensors = sae_tensors(sae)
    assert float(tensors["batchtopk_threshold"]) == threshold
    save_tensors(tmp_path / "sae.safetensors", tensors)
    back = sae_from_tensors(load_tensors(tmp_path / "sae.safetensors"), "batchtopk", k=s.k)
    assert float(back.batchtopk_threshold) == threshold and not back.training
    assert torch.equal(back.encode(acts), sae.encode(acts))
    assert torch.equal(back(acts)[0], sae(acts)[0])
    # without the saved threshold (0) inference would keep every positive pre-activation
    blank = sae_from_tensors(tensors | {"batchtopk_threshold": torch.zeros(())}, "batchtopk", 4)
    assert (blank.encode(acts) != 0).sum() > (back.encode(acts) != 0).sum()


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_sae_tensors_round_trip_every_kind(kind: str) -> None:
    sae = _random_sae(kind).eval()
    tensors = sae_tensors(sae)
    assert ("log_threshold" in tensors) == (kind == "jumprelu")
    back = sae_from_tensors(tensors, kind, k=3)
    x = torch.randn(10, 6, generator=_gen(4))
    for got, want in zip(back(x), sae(x), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", SAE_KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_code_derivative_is_the_autograd_jacobian_diagonal(kind: str, training: bool) -> None:
    sae = _random_sae(kind).train(training)
    if kind == "batchtopk":
        sae.batchtopk_threshold.fill_(0.3)
    x = torch.randn(5, 6, generator=_gen(5))
    pre = sae.pre_activation(x).detach()
    jac = torch.autograd.functional.jacobian(sae.codes_from_pre, pre)  # [N, L, N, L]
    n, l_ = pre.shape
    flat = jac.reshape(n * l_, n * l_)
    diag = torch.diagonal(flat).reshape(n, l_)
    deriv = sae.code_derivative(x)
    assert torch.equal(deriv, diag)
    assert torch.equal(flat, torch.diag(torch.diagonal(flat)))  # nothing off the diagonal
    if kind == "linear":
        assert bool((deriv == 1).all())
    else:
        assert 0 < float(deriv.sum()) < deriv.numel()  # a real mix of on and off latents


@pytest.mark.parametrize("kind", ["linear", "relu", "jumprelu"])
def test_normalise_decoder_keeps_the_function(kind: str) -> None:
    sae = _random_sae(kind, d=6, width=8)
    with torch.no_grad():
        scale = torch.rand(8, generator=_gen(6)) * 3 + 0.3
        sae.decoder.weight.mul_(scale)  # columns of norm != 1
        sae.encoder.weight.div_(scale[:, None])
        sae.encoder.bias.div_(scale)
        if isinstance(sae, JumpReluSAE):
            sae.log_threshold.sub_(scale.log())
    x = torch.randn(40, 6, generator=_gen(7)) * 2
    recon0, codes0, _ = sae(x)
    old_norms = sae.W_dec.norm(dim=0).detach().clone()
    assert not torch.allclose(old_norms, torch.ones(8), atol=1e-2)
    sae.normalise_decoder_()
    recon1, codes1, _ = sae(x)
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(8), atol=1e-6)
    assert torch.allclose(recon1, recon0, atol=1e-5, rtol=1e-5)
    assert torch.allclose(codes1, codes0 * old_norms, atol=1e-5, rtol=1e-5)
    assert torch.equal(codes1 != 0, codes0 != 0)


def test_init_puts_decoder_bias_at_data_mean(acts) -> None:
    x = acts * 10 + 50.0  # a large offset, as pooled post-ReLU features have
    s = _settings("relu")
    sae = init_sae(x, s, seed=0)
    assert torch.equal(sae.b_dec, x.double().mean(dim=0).float())
    assert torch.allclose(sae.W_dec.norm(dim=0), torch.ones(s.width), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T) and bool((sae.b_enc == 0).all())
    again = init_sae(x, s, seed=0)
    assert torch.equal(again.W_dec, sae.W_dec)
    assert not torch.equal(init_sae(x, s, seed=1).W_dec, sae.W_dec)
    assert init_sae(x, _settings("topk"), seed=0).k == s.k and "k" not in sae.describe()


def test_fit_sae_is_deterministic_for_a_seed(acts) -> None:
    s = _settings("topk", epochs=5, aux_l1=0.1, l1_l2_ratio=0.01)
    a, hist_a = fit_sae(acts, s, seed=0, progress=False)
    b, hist_b = fit_sae(acts, s, seed=0, progress=False)
    ta, tb = sae_tensors(a), sae_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert hist_a == hist_b
    c, _ = fit_sae(acts, s, seed=1, progress=False)
    assert not torch.equal(c.W_dec, a.W_dec)


def test_fit_sae_without_decoder_normalisation(acts) -> None:
    sae, _ = fit_sae(
        acts, _settings("relu", epochs=5, normalise_decoder=False), seed=0, progress=False
    )
    assert not torch.allclose(sae.W_dec.norm(dim=0), torch.ones(32), atol=1e-3)


def test_non_finite_loss_raises_divergence(acts, monkeypatch) -> None:
    # An infinite activation: the loss is not finite. (A merely huge scale, acts * 1e30, no
    # longer overflows: the fit normalises the activations, tests/test_sae_scale.py.)
    infinite = acts.clone()
    infinite[5, 1] = math.inf
    with pytest.raises(DivergenceError, match=r"epoch 1.*sae\.lr"):
        fit_sae(infinite, _settings("relu"), seed=0, progress=False)
    nan = acts.clone()
    nan[3, 2] = math.nan
    with pytest.raises(DivergenceError):
        fit_sae(nan, _settings("relu"), seed=0, progress=False)

    calls = []

    def fake_loss(sae, batch, weights):
        calls.append(1)
        loss, parts = sae_loss(sae, batch, weights)
        return (loss * math.inf if len(calls) == 3 else loss), parts

    monkeypatch.setattr(sae_mod, "sae_loss", fake_loss)
    with pytest.raises(DivergenceError, match="epoch 1"):
        fit_sae(acts, _settings("relu"), seed=0, progress=False)
    assert len(calls) == 3


def test_unknown_kind_and_bad_k() -> None:
    with pytest.raises(ValueError, match="unknown SAE kind"):
        build_sae("gated", 4, 4)
    with pytest.raises(ValueError, match="k <= d_latent"):
        build_sae("topk", 4, 4, k=5)
    with pytest.raises(ValueError, match="k <= d_latent"):
        build_sae("batchtopk", 4, 4, k=0)


def test_loss_weights_are_the_config_weights_in_raw_loss_units() -> None:
    cfg = SaeConfig(l1=0.03, aux_l1=0.1, l1_l2_ratio=0.01)
    # the loss is divided by scale_sq: l1 terms count per sqrt(scale_sq), the ratio is unitless
    w = loss_weights(cfg, 4.0)
    assert w == pytest.approx({"l1": 0.06, "aux_l1": 0.2, "l1_l2_ratio": 0.04}, rel=1e-15)
    assert loss_weights(cfg, 1.0) == {"l1": 0.03, "aux_l1": 0.1, "l1_l2_ratio": 0.01}


# --------------------------------------------------------------------------------------------
# registry and the encode description


def test_registry_matches_the_config_choices() -> None:
    kind_field = next(f for f in fields(SaeConfig) if f.name == "kind")
    assert tuple(SAE_KINDS) == kind_field.metadata["choices"]


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_registry_builds_every_kind_and_round_trips(kind: str, tmp_path: Path) -> None:
    built = build_sae(kind, 6, 8, k=3)
    assert type(built) is SAE_KINDS[kind] and isinstance(built, SparseAutoencoder)
    assert (built.kind, built.d_in, built.d_latent) == (kind, 6, 8)
    assert getattr(built, "k", None) == (3 if kind in ("topk", "batchtopk") else None)
    sae = _random_sae(kind).eval()
    if kind == "batchtopk":
        sae.batchtopk_threshold.fill_(0.3)
    save_tensors(tmp_path / "sae.safetensors", sae_tensors(sae))
    write_json(tmp_path / "sae.json", sae.describe())
    description = json.loads((tmp_path / "sae.json").read_text())
    back = sae_from_tensors(load_tensors(tmp_path / "sae.safetensors"), description)
    assert type(back) is type(sae) and not back.training and back.describe() == description
    x = torch.randn(10, 6, generator=_gen(8))
    for got, want in zip(back(x), sae(x), strict=True):
        assert torch.equal(got, want)


def test_unknown_kind_names_the_allowed_ones() -> None:
    allowed = "allowed: linear, relu, topk, batchtopk, jumprelu"
    with pytest.raises(ValueError, match=f"unknown SAE kind 'gated'; {allowed}"):
        build_sae("gated", 4, 4)
    tensors = sae_tensors(build_sae("relu", 4, 4))
    with pytest.raises(ValueError, match=allowed):
        sae_from_tensors(tensors, {"kind": "gated"})
    with pytest.raises(TypeError, match=r"needs one: build_sae\(kind"):
        SparseAutoencoder(4, 4)


def test_a_description_that_disagrees_with_the_weights_is_refused() -> None:
    sae = _random_sae("jumprelu")
    tensors, rule = sae_tensors(sae), sae.describe()
    log_flag = rule["threshold"] | {"log_parameterised": False}
    with pytest.raises(ValueError, match="disagrees.*on threshold"):
        sae_from_tensors(tensors, rule | {"threshold": log_flag})
    with pytest.raises(ValueError, match="disagrees.*on shapes"):
        sae_from_tensors(sae_tensors(_random_sae("jumprelu", width=5)), rule)
    topk = _random_sae("topk")
    with pytest.raises(ValueError, match="disagrees.*on activation"):
        sae_from_tensors(sae_tensors(topk), topk.describe() | {"activation": "relu"})


def test_sidecars_without_a_description_load_by_kind() -> None:
    """A sidecar that names only the kind and k rebuilds the same SAE."""
    relu = _random_sae("relu").eval()
    back = sae_from_tensors(sae_tensors(relu), "relu", 8)
    x = torch.randn(10, 6, generator=_gen(9))
    assert torch.equal(back.encode(x), relu.encode(x))


def _codes_from_file(tensors: dict, rule: dict, a: torch.Tensor) -> torch.Tensor:
    """The encode rule as a reader of sae.json would write it: plain torch, no salve code."""
    names = rule["tensors"]
    w_enc, b_enc, b_dec = (tensors[names[key]] for key in ("W_enc", "b_enc", "b_dec"))
    pre = torch.nn.functional.linear(a - b_dec, w_enc, b_enc)
    if rule["activation"] == "identity":
        return pre
    if rule["activation"] == "relu":
        return pre * (pre > 0)
    if rule["activation"] == "topk":
        top = torch.zeros_like(pre, dtype=torch.bool)
        top.scatter_(-1, pre.topk(rule["k"], dim=-1).indices, True)
        return pre * (top & (pre > 0))
    assert rule["activation"] == "threshold"
    threshold = tensors[rule["threshold"]["tensor"]]
    assert list(threshold.shape) == rule["shapes"]["threshold"]  # scalar or one per latent
    if rule["threshold"]["log_parameterised"]:
        threshold = threshold.exp()
    return pre * (pre > threshold)


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_codes_recomputed_from_file_and_description_alone(acts, kind: str, tmp_path) -> None:
    sae, _ = fit_sae(acts, _settings(kind, epochs=5), seed=0, progress=False)
    save_file(sae_tensors(sae), str(tmp_path / "sae.safetensors"))
    (tmp_path / "sae.json").write_text(json.dumps(sae.describe()))
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    rule = json.loads((tmp_path / "sae.json").read_text())
    assert set(rule["tensors"].values()) == set(tensors)  # every tensor in the file is named
    a = acts * 1.5 + 2.0  # off the training distribution, so no accident of the fit helps
    with torch.no_grad():
        recon, codes, _ = sae(a)
    mine = _codes_from_file(tensors, rule, a)
    assert torch.equal(mine, codes)
    names = rule["tensors"]
    w_dec, b_dec = tensors[names["W_dec"]], tensors[names["b_dec"]]
    assert torch.equal(torch.nn.functional.linear(mine, w_dec, b_dec), recon)
    if kind != "linear":
        assert 0 < int((codes != 0).sum()) < codes.numel()  # a real mix of on and off
    # the centring on b_dec is part of the rule: an uncentred encoder gets other codes
    plain = _codes_from_file(tensors | {names["b_dec"]: torch.zeros_like(b_dec)}, rule, a)
    assert not torch.equal(plain, codes)


def test_load_sae_reads_new_and_earlier_sidecars(acts, tmp_path: Path) -> None:
    from tasks.artifacts import load_sae

    sae, _ = fit_sae(acts, _settings("batchtopk", epochs=3), seed=0, progress=False)
    out = tmp_path / "results" / "fit_sae"
    save_tensors(out / "sae.safetensors", sae_tensors(sae))
    earlier = {"format": "salve-sae", "kind": "batchtopk", "k": 4}
    for sidecar in (earlier | {"encode": sae.describe()}, earlier):
        write_json(out / "sae.json", sidecar)
        back, info = load_sae(tmp_path)
        assert info == sidecar and type(back) is type(sae)
        assert torch.equal(back.encode(acts), sae.encode(acts))


@pytest.mark.parametrize(
    ("n", "epochs", "max_steps", "expected"),
    [
        (1438, 300, 2000, 300),  # the digits default: 6 steps an epoch, under the cap
        (4000, 300, 2000, 125),  # 16 steps an epoch
        (16000, 300, 2000, 31),  # 63 steps an epoch
        (16000, 300, 0, 300),  # no cap
        (10**6, 300, 2000, 1),  # at least one epoch
    ],
)
def test_fit_epochs_caps_the_optimiser_steps(n, epochs, max_steps, expected) -> None:
    from salve.sae.fit import fit_epochs

    cfg = SaeConfig(epochs=epochs, max_steps=max_steps, batch_size=256)
    assert fit_epochs(n, cfg) == expected


def test_fit_runs_the_capped_epochs_and_the_cap_above_them_changes_nothing() -> None:
    import dataclasses

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(100, 8, generator=g)
    base = SaeConfig(kind="relu", width=16, epochs=6, batch_size=25, max_steps=0)
    _, history = fit_sae(acts, base, seed=0, progress=False)
    capped_above = dataclasses.replace(base, max_steps=24)  # 4 steps an epoch: 6 epochs
    sae_a, hist_a = fit_sae(acts, base, seed=0, progress=False)
    sae_b, hist_b = fit_sae(acts, capped_above, seed=0, progress=False)
    assert len(history) == 6 and hist_a == hist_b
    assert torch.equal(sae_a.W_dec, sae_b.W_dec)
    _, hist_c = fit_sae(acts, dataclasses.replace(base, max_steps=9), seed=0, progress=False)
    assert len(hist_c) == 2 and hist_c == history[:2]  # the same first two epochs, then stop
