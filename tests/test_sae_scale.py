"""salve.sae fits are equivariant to a scalar scale of the activations (issue #30, item 9).

A randomly initialised backbone can give head inputs of norm 1e-8; the scale-free loss alone
did not make the fit scale-free (Adam's steps, the initialisation and JumpReLU's threshold are
in absolute units), and such a fit diverged. The fit now normalises and folds the scale back.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from salve.config import SaeConfig
from salve.sae import (
    SAE_KINDS,
    JumpReluSAE,
    build_sae,
    fit_sae,
    input_scale,
    quality_metrics,
    sae_from_tensors,
    sae_tensors,
)
from tests.test_sae import synthetic_sparse

F64 = torch.float64
SCALES = (1e-6, 1.0, 1e6)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return synthetic_sparse()


def _settings(kind: str) -> SaeConfig:
    return SaeConfig(kind=kind, width=32, l1=1e-3, k=4, lr=1e-2, epochs=8, batch_size=64)


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_fit_is_equivariant_to_the_activation_scale(acts, kind: str) -> None:
    """a * s gives codes * s, reconstructions * s and the same FVU, for s far from 1 (float32
    data: the scaled copies differ from a by rounding only, hence the tolerances)."""
    fits = {s: fit_sae(acts * s, _settings(kind), seed=0, progress=False) for s in SCALES}
    ref, ref_history = fits[1.0]
    codes = ref.encode_batched(acts).double()
    recon = ref(acts)[0].detach().double()
    fvu = quality_metrics(ref, acts)["fvu"]
    assert 0 < fvu < 0.5
    for s, (sae, history) in fits.items():
        x = acts * s
        assert sae.input_scale == pytest.approx(s * ref.input_scale, rel=1e-6)
        assert [h["loss"] for h in history] == pytest.approx(
            [h["loss"] for h in ref_history], rel=1e-4
        )
        got = sae.encode_batched(x).double() / s
        torch.testing.assert_close(got, codes, rtol=1e-4, atol=1e-5 * float(codes.abs().max()))
        assert torch.equal(got != 0, codes != 0)  # the same latents fire
        got_recon = sae(x)[0].detach().double() / s
        torch.testing.assert_close(
            got_recon, recon, rtol=1e-5, atol=1e-5 * float(recon.abs().max())
        )
        assert quality_metrics(sae, x)["fvu"] == pytest.approx(fvu, rel=1e-5)
        # unitless weights are the same; decoder columns keep unit norm (alpha's scale)
        torch.testing.assert_close(sae.W_dec, ref.W_dec, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.W_enc, ref.W_enc, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(32), rtol=0, atol=1e-5)


def test_tiny_norm_activations_fit_every_kind(acts) -> None:
    """The issue's case: head inputs of mean norm 1e-8 (a randomly initialised mobilenet)
    diverged at epoch 2 with a reconstruction error 1.6e13 x the data variance."""
    x = acts / acts.norm(dim=1).mean() * 1e-8
    for kind in SAE_KINDS:
        sae, history = fit_sae(x, _settings(kind), seed=0, progress=False)
        assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["mse"] < 0.5
        assert quality_metrics(sae, x)["fvu"] < 0.5
        codes = sae.encode_batched(x)
        assert bool(torch.isfinite(codes).all()) and bool((codes != 0).any())


def test_input_scale_gives_mean_squared_deviation_d_in(acts) -> None:
    x = (acts * 1e-7).double()
    c = input_scale(acts * 1e-7)
    assert float((x / c - (x / c).mean(0)).pow(2).sum(1).mean()) == pytest.approx(16, rel=1e-6)
    assert input_scale(torch.ones(5, 3)) == math.sqrt(1 / 3)  # constant data: a unit of 1 / d


# --------------------------------------------------------------------------------------------
# the fold-back


def _hand_codes(kind: str, pre: torch.Tensor, threshold) -> torch.Tensor:
    if kind == "linear":
        return pre
    if kind == "relu":
        return pre.clamp_min(0)
    if kind == "topk":  # k = 1
        top = pre == pre.amax(dim=1, keepdim=True)
        return pre * (top & (pre > 0))
    return pre * (pre > threshold)


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_fold_back_hand_case(kind: str) -> None:
    """encode(raw) after the fold == scale * the codes of raw / scale, computed by hand."""
    sae = build_sae(kind, 2, 3, k=1).to(F64).eval()
    w_enc = torch.tensor([[1.0, 0.0], [0.5, -1.0], [-1.0, 2.0]], dtype=F64)
    w_dec = torch.tensor([[0.6, 0.0, -1.0], [0.8, 1.0, 0.0]], dtype=F64)
    b_enc = torch.tensor([0.25, -0.5, 0.0], dtype=F64)
    b_dec = torch.tensor([1.0, -2.0], dtype=F64)
    threshold = 0.3  # batchtopk's scalar, jumprelu's per latent
    with torch.no_grad():
        sae.encoder.weight.copy_(w_enc)
        sae.decoder.weight.copy_(w_dec)
        sae.encoder.bias.copy_(b_enc)
        sae.decoder.bias.copy_(b_dec)
        if kind == "batchtopk":
            sae.batchtopk_threshold.fill_(threshold)
        if kind == "jumprelu":
            sae.log_threshold.fill_(math.log(threshold))
    # pre-activations well away from 0, from the threshold 0.3 and from ties (top-1)
    x = torch.tensor([[2.0, -1.0], [0.0, -2.2], [1.6, -3.0], [-3.0, 4.0], [1.1, -1.0]], dtype=F64)
    pre = (x - b_dec) @ w_enc.T + b_enc  # the fit's units
    codes = _hand_codes(kind, pre, threshold)
    assert 0 < int((codes != 0).sum()) < codes.numel() or kind == "linear"
    for scale in (1e-6, 3.7e5):
        folded = copy.deepcopy(sae)
        folded.fold_input_scale_(scale)
        raw = x * scale
        torch.testing.assert_close(folded.encode(raw), scale * codes, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            folded(raw)[0], scale * (codes @ w_dec.T + b_dec), rtol=1e-12, atol=0
        )
        # Grad-FAM reads f'(pre) W_enc: the same on raw activations as on normalised ones
        assert torch.equal(folded.code_derivative(raw), sae.code_derivative(x))
        assert torch.equal(folded.W_enc, sae.W_enc) and torch.equal(folded.W_dec, sae.W_dec)
        assert folded.input_scale == scale and folded.describe()["input_scale"] == scale
        if kind == "batchtopk":  # the batch rule while fitting commutes with the scale too
            torch.testing.assert_close(
                folded.train().encode(raw), scale * sae.train().encode(x), rtol=1e-12, atol=0
            )
            sae.eval()


def test_jumprelu_threshold_is_folded_in_log_space() -> None:
    sae = JumpReluSAE(3, 4)
    before = sae.log_threshold.detach().clone()
    sae.fold_input_scale_(1e-8)
    torch.testing.assert_close(sae.log_threshold.detach(), before + math.log(1e-8))


def test_fold_refuses_a_bad_scale() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and > 0"):
            build_sae("relu", 2, 2).fold_input_scale_(bad)


def test_the_scale_is_recorded_in_the_description_and_round_trips(acts, tmp_path) -> None:
    x = acts * 1e-6
    sae, _ = fit_sae(x, _settings("jumprelu"), seed=0, progress=False)
    rule = json.loads(json.dumps(sae.describe()))
    assert rule["input_scale"] == input_scale(x) and "units" in rule
    back = sae_from_tensors(sae_tensors(sae), rule)
    assert back.input_scale == sae.input_scale and back.describe() == rule
    assert torch.equal(back.encode(x), sae.encode(x))
    assert "input_scale" not in build_sae("relu", 2, 2).describe()  # unfitted: no such record
