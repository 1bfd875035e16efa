"""Activation maximisation, total variation and the PNG figure helpers."""

from __future__ import annotations

import io
import re

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from salve.data import IMAGENET_MEAN, IMAGENET_STD
from salve.feature_vis import (
    activation_maximisation,
    activation_maximisation_batch,
    total_variation,
)
from salve.models import build_model, penultimate
from salve.present.images import image_png, overlay_grid_png, overlay_rgb, overlay_strip_png
from salve.sae import build_sae

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_total_variation_constant_is_zero():
    assert total_variation(torch.full((3, 7, 5), 0.3)).item() == 0.0
    assert total_variation(torch.full((2, 3, 4, 4), -1.0)).item() == 0.0


def test_total_variation_hand_computed():
    # [[1, 2], [4, 8]]: vertical |4-1| + |8-2| = 9, horizontal |2-1| + |8-4| = 5 -> 14
    x = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]])
    assert total_variation(x).item() == 14.0
    # a second channel adds its own TV: [[0, -1], [0, 0]] -> vertical 1, horizontal 1
    x2 = torch.cat([x, torch.tensor([[[0.0, -1.0], [0.0, 0.0]]])])
    assert total_variation(x2).item() == 16.0
    # batch dimension sums as well
    assert total_variation(torch.stack([x2, x2])).item() == 32.0


def _z(model, sae, image_chw, feature):
    mean = torch.tensor(IMAGENET_MEAN, dtype=image_chw.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image_chw.dtype).view(3, 1, 1)
    with torch.no_grad():
        x = ((image_chw - mean) / std)[None]
        return float(sae.encode(penultimate(model, x))[0, feature])


@pytest.fixture(scope="module")
def model_and_sae():
    torch.manual_seed(0)
    model = build_model("resnet18", 5)
    sae = build_sae("linear", 512, 16)
    return model.eval(), sae.eval()


AM_KW = {"image_size": 32, "lr": 0.05, "l2": 1e-4, "tv": 1e-3, "jitter": 2, "restarts": 2}


def test_activation_maximisation_increases_code(model_and_sae):
    model, sae = model_and_sae
    start = activation_maximisation(model, sae, 3, steps=0, seed=7, **AM_KW)
    best = activation_maximisation(model, sae, 3, steps=15, seed=7, **AM_KW)
    assert start.shape == best.shape == (3, 32, 32)
    assert start.dtype == torch.float32
    assert (best >= 0).all() and (best <= 1).all()
    z0, z1 = _z(model, sae, start, 3), _z(model, sae, best, 3)
    assert z1 > z0 + 0.1 * abs(z0) + 1e-3, (z0, z1)
    # the start is mid-grey with faint noise
    assert (start - 0.5).abs().max() < 0.05


class _Pooled(nn.Module):
    """A backbone of pooled features, [N, 6]: each channel's mean, and each channel's mean over
    the left half minus that over the right half. Its best images are known."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        left, right = x[..., :half].mean(dim=(2, 3)), x[..., half:].mean(dim=(2, 3))
        return self.fc(torch.cat([x.mean(dim=(2, 3)), left - right], dim=1))


def test_activation_maximisation_finds_a_known_optimum():
    """Latent 0 reads the mean red, latent 1 the left half's brightness minus the right half's
    (normalised units): the best images are all red, and white on the left, black on the right.
    With the default settings the AM images come close to those optima, and over 10 times the
    mean code of uniform random images."""
    model = _Pooled().eval()
    sae = build_sae("relu", 6, 2).eval()
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 1.0, 1.0, 1.0]]))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    images = activation_maximisation_batch(model, sae, [0, 1], image_size=16, seed=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 16)
    split = torch.cat([torch.ones(3, 16, 8), torch.zeros(3, 16, 8)], dim=2)
    noise = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for j, best in enumerate([red, split]):
        optimum, code = _z(model, sae, best, j), _z(model, sae, images[j], j)
        random_code = sum(_z(model, sae, img, j) for img in noise) / len(noise)
        assert code > 0.8 * optimum, (j, code, optimum)
        assert code > 10 * random_code > 0, (j, code, random_code)
    assert images[0, 0].min() > 0.9  # red everywhere
    assert images[1, :, :, :8].mean() > 0.8 > 0.2 > images[1, :, :, 8:].mean()


def test_activation_maximisation_deterministic_and_seeded(model_and_sae):
    model, sae = model_and_sae
    a = activation_maximisation(model, sae, 5, steps=6, seed=1, **AM_KW)
    b = activation_maximisation(model, sae, 5, steps=6, seed=1, **AM_KW)
    c = activation_maximisation(model, sae, 5, steps=6, seed=2, **AM_KW)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_activation_maximisation_leaves_model_unchanged(model_and_sae):
    model, sae = model_and_sae
    model.train()
    sae.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_sae = {k: v.clone() for k, v in sae.state_dict().items()}
    rng_state = torch.get_rng_state()
    activation_maximisation(model, sae, 0, steps=3, seed=0, **AM_KW)
    assert model.training and sae.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in sae.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before_sae[k], v) for k, v in sae.state_dict().items())
    assert torch.equal(rng_state, torch.get_rng_state())  # private generators only
    model.eval()
    sae.eval()


def test_activation_maximisation_rejects_bad_feature(model_and_sae):
    model, sae = model_and_sae
    with pytest.raises(ValueError, match="out of range"):
        activation_maximisation(model, sae, 16, steps=1, **AM_KW)
    with pytest.raises(ValueError, match="out of range"):
        activation_maximisation_batch(model, sae, [0, -1], steps=1, **AM_KW)


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("steps", -1, "steps >= 0"),
        ("lr", 0.0, "lr > 0"),
        ("l2", -1e-3, "l2 >= 0"),
        ("tv", -1e-3, "tv >= 0"),
        ("jitter", -1, "jitter >= 0"),
        ("scale", 1.0, "0 <= scale < 1"),
        ("rotate", -1.0, "0 <= rotate <= 180"),
        ("settle", 1.5, "0 <= settle <= 1"),
        ("restarts", 0, "restarts >= 1"),
        ("restart_steps", -2, "restart_steps >= 0"),
        ("decay", -0.5, "decay >= 0"),
        ("batch_size", 0, "batch_size >= 1"),
        ("image_size", 1, "image_size >= 2"),
    ],
)
def test_activation_maximisation_rejects_bad_settings(model_and_sae, key, value, rule):
    model, sae = model_and_sae
    with pytest.raises(ValueError, match=re.escape(rule)):
        activation_maximisation_batch(model, sae, [0], **(AM_KW | {"steps": 1, key: value}))


@pytest.fixture(scope="module")
def model_and_sae_64():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).double()
    sae = build_sae("linear", 512, 16).double()
    return model.eval(), sae.eval()


def test_batched_activation_maximisation_equals_one_latent_at_a_time(model_and_sae_64):
    """Each image's start and transformations come from its own run's generator and it gets its
    own gradient: in float64 the batched images equal the one-at-a-time ones to rounding. Not bit
    for bit: CPU kernels round a batch of 8 differently from a batch of 2, and Adam's normalised
    step amplifies that where a coefficient's gradient is tiny."""
    model, sae = model_and_sae_64
    feats = [3, 5, 0, 7]
    kw = AM_KW | {"steps": 6, "seed": 4, "restart_steps": 2}
    batched = activation_maximisation_batch(model, sae, feats, **kw)
    singles = torch.stack([activation_maximisation(model, sae, f, **kw) for f in feats])
    assert batched.shape == (4, 3, 32, 32) and batched.dtype == torch.float64
    assert torch.allclose(batched, singles, atol=1e-10, rtol=0)
    # different latents give different images (the comparison is not vacuous)
    assert (batched[0] - batched[1]).abs().max() > 1e-3
    # a latent's image does not depend on which latents share its batch
    chunked = activation_maximisation_batch(model, sae, feats[::-1], batch_size=6, **kw)
    assert torch.allclose(chunked.flip(0), batched, atol=1e-10, rtol=0)
    for f, image in zip(feats, batched, strict=True):
        start = activation_maximisation(model, sae, f, **(kw | {"steps": 0}))
        assert _z(model, sae, image, f) > _z(model, sae, start, f)


def test_restarts_keep_the_best_single_run(model_and_sae_64):
    """Run r of ``restarts`` is the single run of seed + r; picked at the end, each latent gets
    the run whose 8-bit image has the largest code."""
    model, sae = model_and_sae_64
    kw = AM_KW | {"steps": 4, "restart_steps": 4}
    feats = [2, 9]
    best = activation_maximisation_batch(model, sae, feats, **(kw | {"restarts": 3, "seed": 1}))
    runs = [
        activation_maximisation_batch(model, sae, feats, **(kw | {"restarts": 1, "seed": 1 + r}))
        for r in range(3)
    ]
    for j, f in enumerate(feats):
        shown = [(run[j] * 255).round() / 255 for run in runs]
        pick = max(range(3), key=lambda r: _z(model, sae, shown[r], f))
        assert torch.allclose(best[j], runs[pick][j], atol=1e-10, rtol=0)
    assert not torch.allclose(runs[0], runs[1])  # the runs differ


def test_batched_activation_maximisation_is_deterministic(model_and_sae):
    model, sae = model_and_sae
    kw = AM_KW | {"steps": 4, "seed": 9}
    first = activation_maximisation_batch(model, sae, [1, 2, 6], **kw)
    pngs = [image_png(img) for img in first]
    for _ in range(4):
        again = activation_maximisation_batch(model, sae, [1, 2, 6], **kw)
        assert torch.equal(again, first)
        assert [image_png(img) for img in again] == pngs
    assert activation_maximisation_batch(model, sae, [], **kw).shape == (0, 3, 32, 32)


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_image_png_exact_size_and_pixels_and_deterministic():
    torch.manual_seed(0)
    image = torch.rand(3, 20, 12)
    png = image_png(image)
    arr = _decode(png)
    assert arr.shape[:2] == (20, 12)
    # pixels are the image, rounded to 8 bits
    assert np.abs(arr[..., :3] - image.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    assert image_png(image) == png
    assert b"Software" not in png
    big = _decode(image_png(image, scale=3))
    assert big.shape[:2] == (60, 36)
    u8 = (image * 255).round().to(torch.uint8)
    assert _decode(image_png(u8)).shape[:2] == (20, 12)


def test_overlay_grid_png_size_and_deterministic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 16, 16), dtype=np.uint8)
    maps = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(0))
    titles = [f"#{i}" for i in range(5)]
    png = overlay_grid_png(torch.from_numpy(images), maps, titles, ncols=3, cell_inches=1, dpi=50)
    arr = _decode(png)
    assert arr.shape[:2] == (2 * 50, 3 * 50)  # 2 rows x 3 columns of 1 inch at 50 dpi
    assert overlay_grid_png(images, maps.numpy(), titles, ncols=3, cell_inches=1, dpi=50) == png
    assert b"Software" not in png
    # the overlay actually changes the pixels: a different heatmap gives a different figure
    other = overlay_grid_png(images, 1 - maps, titles, ncols=3, cell_inches=1, dpi=50)
    assert other != png
    no_titles = _decode(overlay_grid_png(images[:2], maps[:2]))
    assert no_titles.shape[:2] == (200, 400)  # defaults: 2 in cells at 100 dpi, 2 columns


def test_overlay_rgb_keeps_the_image_visible():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(3, 6, 5), dtype=np.uint8)
    rgb = image.transpose(1, 2, 0) / 255.0
    sal = np.zeros((6, 5))
    sal[2, 3], sal[4, 1] = 1.0, 0.5
    out = overlay_rgb(image, sal, cmap="inferno", alpha=0.45)
    assert out.shape == (6, 5, 3)
    off = sal == 0
    assert np.array_equal(out[off], rgb[off])  # no saliency: the image exactly
    colour = matplotlib.colormaps["inferno"](1.0)[:3]
    assert np.allclose(out[2, 3], 0.55 * rgb[2, 3] + 0.45 * np.array(colour))
    half = matplotlib.colormaps["inferno"](0.5)[:3]
    assert np.allclose(out[4, 1], (1 - 0.225) * rgb[4, 1] + 0.225 * np.array(half))
    with pytest.raises(ValueError, match="alpha"):
        overlay_rgb(image, sal, alpha=1.5)


def test_overlay_strip_png_exact_pixels_size_and_smooth_map():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 3, 4, 4), dtype=np.uint8)
    maps = np.zeros((3, 4, 4))
    maps[1, 1, 2] = 1.0
    png = overlay_strip_png(images, maps, scale=4, gap=2)
    assert overlay_strip_png(images, maps, scale=4, gap=2) == png and b"Software" not in png
    arr = _decode(png)[..., :3]
    assert arr.shape == (16, 3 * 16 + 2 * 2, 3)
    # tiles without saliency are the images enlarged by pixel repetition
    tile0 = images[0].transpose(1, 2, 0).repeat(4, axis=0).repeat(4, axis=1) / 255.0
    assert np.abs(arr[:, :16] - tile0).max() <= 0.5 / 255 + 1e-6
    assert (arr[:, 16:18] == 1.0).all()  # white gap
    # the single hot cell spreads smoothly (bilinear): more than its own 4x4 block is tinted
    tile1 = arr[:, 18:34]
    plain1 = images[1].transpose(1, 2, 0).repeat(4, axis=0).repeat(4, axis=1) / 255.0
    tinted = np.abs(tile1 - plain1).max(axis=2) > 1.5 / 255
    assert tinted.sum() > 16
    with pytest.raises(ValueError, match="maps"):
        overlay_strip_png(images, maps[:, :2], scale=1)


def test_overlay_grid_png_rejects_mismatched_shapes():
    images = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="maps"):
        overlay_grid_png(images, np.zeros((2, 4, 4)), None)
    with pytest.raises(ValueError, match="titles"):
        overlay_grid_png(images, np.zeros((2, 8, 8)), ["a"])
