"""prepare_dataset sources (digits, imagefolder, CIFAR-100 layout), splits, normalise,
check_prepared; how image files decode; what a folder scan reports; chunked decoding; fetch."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

import salve.data.decode
from salve.config import from_dict
from salve.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENETTE_ARCHIVES,
    IMAGENETTE_CLASSES,
    DatasetError,
    PreparedData,
    check_prepared,
    load_image,
    normalise,
    plan_image_files,
    prepare_dataset,
    stratified_split,
    subsample_per_class,
)
from salve.io import TensorFileWriter, save_tensors

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> PreparedData:
    return prepare_dataset("digits", image_size=8, raw_dir=Path("unused"), progress=False)


def test_digits_split_sizes_and_stratification(digits: PreparedData) -> None:
    from sklearn.datasets import load_digits

    y_all = torch.as_tensor(load_digits().target)
    per_class = torch.bincount(y_all, minlength=10)
    assert len(digits.train_labels) + len(digits.val_labels) == 1797
    val_counts = torch.bincount(digits.val_labels, minlength=10)
    train_counts = torch.bincount(digits.train_labels, minlength=10)
    assert torch.equal(val_counts + train_counts, per_class)
    # Per class, round(0.2 * n) go to val.
    assert val_counts.tolist() == [int(np.floor(0.2 * n + 0.5)) for n in per_class.tolist()]
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.info["counts"] == {"train": int(train_counts.sum()), "val": 359}
    assert digits.info["train_per_class"]["3"] == int(train_counts[3])


def test_digits_pixels_are_the_original_images(digits: PreparedData) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16
    x = digits.train_images
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)
    assert int(x.min()) == 0 and int(x.max()) == 255
    # Channels are replicated grey.
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # Every prepared image is one of the originals scaled by 255/16, rounded.
    scaled = {tuple(np.round(img * 255.0 / 16.0).astype(np.uint8).ravel().tolist()) for img in raw}
    assert all(tuple(img[0].flatten().tolist()) in scaled for img in x[:50])


def test_digits_determinism_and_seed(digits: PreparedData) -> None:
    same = prepare_dataset("digits", image_size=8, raw_dir=Path("unused"), progress=False)
    assert torch.equal(same.train_images, digits.train_images)
    assert torch.equal(same.val_images, digits.val_images)
    assert torch.equal(same.val_labels, digits.val_labels)
    other = prepare_dataset("digits", image_size=8, raw_dir=Path("u"), seed=1, progress=False)
    assert len(other.val_labels) == len(digits.val_labels)
    assert not torch.equal(other.val_images, digits.val_images)


def test_digits_resize_and_max_per_class() -> None:
    d = prepare_dataset(
        "digits", image_size=20, raw_dir=Path("u"), max_per_class=7, seed=2, progress=False
    )
    assert d.train_images.shape == (70, 3, 20, 20) and d.val_images.shape[1:] == (3, 20, 20)
    assert torch.bincount(d.train_labels).tolist() == [7] * 10
    assert len(d.val_labels) == 359  # val is not subsampled
    assert d.train_images.dtype == torch.uint8 and int(d.train_images.max()) > 200
    again = prepare_dataset(
        "digits", image_size=20, raw_dir=Path("u"), max_per_class=7, seed=2, progress=False
    )
    assert torch.equal(again.train_images, d.train_images)


def test_stratified_split_and_subsample_properties() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    tr, va = stratified_split(labels, 0.3, seed=5)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(14))
    assert np.bincount(labels[va], minlength=3).tolist() == [3, 1, 0]  # singleton stays in train
    assert np.array_equal(tr, np.sort(tr)) and np.array_equal(va, np.sort(va))
    tr0, va0 = stratified_split(labels, 0.0, seed=5)
    assert len(va0) == 0 and len(tr0) == 14
    keep = subsample_per_class(labels, 2, seed=0)
    assert np.bincount(labels[keep]).tolist() == [2, 2, 1]
    assert np.array_equal(keep, subsample_per_class(labels, 2, seed=0))
    assert len(subsample_per_class(labels, 0, seed=0)) == 14


def test_prepare_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data source"):
        prepare_dataset("mnist", image_size=8, raw_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset("digits", image_size=8, raw_dir=tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        prepare_dataset("digits", image_size=0, raw_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown imagenette variant"):
        prepare_dataset("imagenette", image_size=8, raw_dir=tmp_path, variant="80px")


def test_imagenette_table_matches_torchvision() -> None:
    from salve.tv import import_torchvision

    tv_cls = import_torchvision().datasets.Imagenette
    assert tv_cls._ARCHIVES == IMAGENETTE_ARCHIVES
    assert {w: names[0] for w, names in tv_cls._WNID_TO_CLASS.items()} == IMAGENETTE_CLASSES


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------

COLOURS = {"cat": (250, 0, 0), "dog": (0, 250, 0), "fox": (0, 0, 250)}


def _write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (9, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder(root: Path, n: int = 5) -> Path:
    for cls, colour in COLOURS.items():
        for i in range(n):
            _write(root / cls / f"{i}.png", colour)
    return root


def _assert_colours(x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> None:
    for img, label in zip(x, y, strict=True):
        want = torch.tensor(COLOURS[classes[int(label)]], dtype=torch.uint8).view(3, 1, 1)
        assert torch.equal(img, want.expand_as(img))


def test_imagefolder_split(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    (root / "dog" / "notes.txt").write_text("ignored: not an image")
    d = prepare_dataset(
        "imagefolder",
        image_size=6,
        raw_dir=tmp_path,
        path=str(root),
        val_fraction=0.4,
        progress=False,
    )
    assert d.classes == ["cat", "dog", "fox"]
    assert d.train_images.shape == (9, 3, 6, 6) and d.val_images.shape == (6, 3, 6, 6)
    assert torch.bincount(d.val_labels).tolist() == [2, 2, 2]
    _assert_colours(d.train_images, d.train_labels, d.classes)
    _assert_colours(d.val_images, d.val_labels, d.classes)
    assert d.info["split"].startswith("stratified")


def test_imagefolder_given_train_val(tmp_path: Path) -> None:
    _folder(tmp_path / "ds" / "train", n=4)
    _folder(tmp_path / "ds" / "val", n=1)
    d = prepare_dataset(
        "imagefolder",
        image_size=5,
        raw_dir=tmp_path,
        path=str(tmp_path / "ds"),
        max_per_class=3,
        progress=False,
    )
    assert torch.bincount(d.train_labels).tolist() == [3, 3, 3]
    assert d.val_labels.tolist() == [0, 1, 2]
    _assert_colours(d.train_images, d.train_labels, d.classes)


def test_imagefolder_resize_shorter_side_then_center_crop(tmp_path: Path) -> None:
    # 30x10 image: red left/right thirds, green centre. Shorter side 10 -> 5, width 30 -> 15,
    # centre crop 5x5 keeps exactly the green third.
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))
    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        img.save(tmp_path / "ds" / cls / "x.png")
        img.save(tmp_path / "ds" / cls / "y.png")
    d = prepare_dataset(
        "imagefolder", image_size=5, raw_dir=tmp_path, path=str(tmp_path / "ds"), progress=False
    )
    x = d.train_images[0]
    assert x.shape == (3, 5, 5)
    assert int(x[1, :, 1:4].min()) == 255 and int(x[0, :, 1:4].max()) == 0


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        ("missing", "does not exist"),
        ("empty_path", "needs data.path"),
        ("one_class", "need at least 2"),
        ("empty_class", "holds no images"),
        ("unreadable", "bad.png: cannot read this image"),
        ("only_train", "only one of train/ and val/"),
        ("val_extra_class", "lacks"),
    ],
)
def test_imagefolder_errors(tmp_path: Path, setup: str, pattern: str) -> None:
    root = tmp_path / "ds"
    if setup == "one_class":
        _write(root / "cat" / "0.png", (1, 2, 3))
    elif setup == "empty_class":
        _folder(root, n=2)
        (root / "emu").mkdir()
    elif setup == "unreadable":
        _folder(root, n=2)
        (root / "dog" / "bad.png").write_bytes(b"not a png at all")
    elif setup == "only_train":
        _folder(root / "train", n=2)
    elif setup == "val_extra_class":
        _folder(root / "train", n=2)
        _folder(root / "val", n=1)
        _write(root / "val" / "emu" / "0.png", (1, 2, 3))
    path = "" if setup == "empty_path" else str(root)
    with pytest.raises(ValueError, match=pattern):
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=path, progress=False)


# --------------------------------------------------------------------------------------------
# cifar100 (torchvision's on-disk layout, faked small; its MD5 checks are bypassed)
# --------------------------------------------------------------------------------------------


def test_cifar100_from_existing_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from salve.tv import import_torchvision

    cifar_mod = import_torchvision().datasets.cifar
    monkeypatch.setattr(cifar_mod, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    base = tmp_path / "build" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"c{i:02d}" for i in range(100)]

    written: dict[str, np.ndarray] = {}

    def dump(name: str, n_per_class: int) -> None:
        # CIFAR's own format is a pickle: the test writes one (it never reads pickles back).
        labels = [c for c in range(100) for _ in range(n_per_class)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        written[name] = data
        with open(base / name, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": labels}, fh)

    dump("train", 3)
    dump("test", 1)
    with open(base / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": names}, fh)
    # Missing from raw_dir: fetched as an archive (file:// URL here), checked, extracted.
    tgz = tmp_path / "cifar.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(base, arcname="cifar-100-python")
    md5 = hashlib.md5(tgz.read_bytes()).hexdigest()
    raw = tmp_path / "raw"
    d = prepare_dataset(
        "cifar100",
        image_size=16,
        raw_dir=raw,
        max_per_class=2,
        archive=(tgz.as_uri(), md5),
        progress=False,
    )
    assert (raw / "cifar-100-python" / "meta").is_file()
    assert sorted(p.name for p in raw.iterdir()) == ["cifar-100-python", "cifar.tar.gz"]
    assert d.classes == names
    assert d.train_images.shape == (200, 3, 16, 16) and d.val_images.shape == (100, 3, 16, 16)
    assert torch.bincount(d.train_labels).tolist() == [2] * 100
    assert d.val_labels.tolist() == list(range(100))
    # Native size keeps pixels exactly (HWC -> CHW order is right).
    (raw / "cifar.tar.gz").unlink()  # now found on disk: no download needed
    d32 = prepare_dataset("cifar100", image_size=32, raw_dir=raw, progress=False)
    expected = written["test"].reshape(-1, 3, 32, 32)
    assert torch.equal(d32.val_images, torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------
# normalise and check_prepared
# --------------------------------------------------------------------------------------------


def test_normalise_hand_computed() -> None:
    x = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    x[0, :, 0, 0] = torch.tensor([255, 51, 0], dtype=torch.uint8)
    out = normalise(x, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == x.shape
    want = torch.tensor(
        [
            (1.0 - 0.485) / 0.229,  # 255 -> 1.0
            (0.2 - 0.456) / 0.224,  # 51 -> 0.2
            (0.0 - 0.406) / 0.225,
        ]
    )
    assert torch.allclose(out[0, :, 0, 0], want, atol=1e-6)
    assert torch.allclose(out[0, 0, 0, 1], torch.tensor(-0.485 / 0.229), atol=1e-6)
    assert torch.allclose(normalise(x[0], (0.5,), (0.5,))[:, 0, 0], torch.tensor([1.0, -0.6, -1]))
    with pytest.raises(ValueError, match="uint8"):
        normalise(x.float(), IMAGENET_MEAN, IMAGENET_STD)


def _tiny() -> PreparedData:
    return PreparedData(
        train_images=torch.zeros(4, 3, 5, 5, dtype=torch.uint8),
        train_labels=torch.tensor([0, 1, 2, 1]),
        val_images=torch.zeros(2, 3, 5, 5, dtype=torch.uint8),
        val_labels=torch.tensor([2, 0]),
        classes=["a", "b", "c"],
        info={"source": "test"},
    )


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"train_labels": torch.tensor([0, 1, 3, 1])}, r"values in \[0, 3\]"),
        ({"val_labels": torch.tensor([-1, 0])}, "val_labels: values"),
        ({"train_labels": torch.tensor([0, 1, 1, 1])}, r"without train samples: \['c'\]"),
        ({"train_images": torch.zeros(4, 3, 5, 5)}, "expected torch.uint8"),
        ({"train_labels": torch.tensor([0, 1, 2, 1], dtype=torch.int32)}, "torch.int64"),
        ({"train_labels": torch.tensor([0, 1, 2])}, "4 images but 3 labels"),
        ({"val_images": torch.zeros(2, 1, 5, 5, dtype=torch.uint8)}, r"expected \[N,3,S,S\]"),
        ({"val_images": torch.zeros(2, 3, 6, 6, dtype=torch.uint8)}, "sizes differ"),
        ({"classes": ["a", "a", "c"]}, "duplicate class names"),
        ({"classes": ["a"]}, "at least 2 classes"),
        ({"info": {"path": Path("x")}}, "JSON"),
    ],
)
def test_check_prepared_errors(change: dict, pattern: str) -> None:
    check_prepared(_tiny())  # the baseline is valid
    bad = dataclasses.replace(_tiny(), **change)
    with pytest.raises(ValueError, match=pattern):
        check_prepared(bad)


# --------------------------------------------------------------------------------------------
# How one image file decodes
# --------------------------------------------------------------------------------------------


def _grey16_file(tmp_path: Path, mode: str, values: np.ndarray) -> Path:
    """A 16-bit grey file that PIL opens in `mode` (I;16: PNG, I;16B and I: TIFF)."""
    if mode == "I;16":
        img, name = Image.fromarray(values.astype(np.uint16)), "g.png"
    elif mode == "I;16B":
        img = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
        name = "g.tif"
    else:
        img, name = Image.fromarray(values.astype(np.int32)), "g.tif"
    img.save(tmp_path / name)
    with Image.open(tmp_path / name) as back:
        assert back.mode == mode  # the file really exercises that mode
    return tmp_path / name


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path: Path, mode: str) -> None:
    # round(v / 257) steps up at v = 257 k + 129: 128 -> 0, 129 -> 1, 65406 -> 254, 65407 -> 255.
    values = np.array(
        [
            [0, 128, 129, 385],
            [386, 32767, 32768, 65406],
            [65407, 65535, 257 * 100, 257 * 100 + 129],
            [1000, 2000, 3000, 4000],
        ]
    )
    if mode == "I":  # 32-bit: values outside 0..65535 are clipped first
        values[3, :2] = (-5, 70000)
    arr = load_image(_grey16_file(tmp_path, mode, values), 4)
    clipped = np.clip(values, 0, 65535)
    want = np.floor(clipped * 255 / 65535 + 0.5).astype(np.uint8)  # v * 255 / 65535, rounded
    assert want[:3].tolist() == [[0, 0, 1, 1], [2, 127, 128, 254], [255, 255, 100, 101]]
    for c in range(3):
        assert np.array_equal(arr[..., c], want), (mode, arr[..., c])


# Where the stored image's row 0 and column 0 appear when shown (EXIF 2.3, tag 0x0112), written
# as numpy transforms of the stored [H, W, C] array.
EXIF_SHOWN = {
    1: lambda a: a,  # row 0 top, column 0 left
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right
    3: lambda a: a[::-1, ::-1],  # row 0 bottom, column 0 right
    4: lambda a: a[::-1, :],  # row 0 bottom, column 0 left
    5: lambda a: a.transpose(1, 0, 2),  # row 0 left, column 0 top
    6: lambda a: a[::-1].transpose(1, 0, 2),  # row 0 right, column 0 top
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, column 0 bottom
    8: lambda a: a[:, ::-1].transpose(1, 0, 2),  # row 0 left, column 0 bottom
}


@pytest.mark.parametrize("orientation", sorted(EXIF_SHOWN))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "x.png", exif=exif)
    shown = EXIF_SHOWN[orientation](stored)
    h, w = shown.shape[:2]  # the shorter side is already 4: no resize, only the centre crop
    top, left = (h - 4) // 2, (w - 4) // 2
    assert np.array_equal(load_image(tmp_path / "x.png", 4), shown[top : top + 4, left : left + 4])


def test_exif_orientation_of_a_jpeg(tmp_path: Path) -> None:
    # Stored 16 wide x 8 tall: left half red, right half blue. Orientation 6 shows it 8 wide x
    # 16 tall with the stored left edge on top: red above, blue below.
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8, 0] = 255
    stored[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "x.jpg", exif=exif, quality=95)
    arr = load_image(tmp_path / "x.jpg", 8).astype(int)  # the centre 8 x 8: rows 4..11 shown
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    assert np.abs(arr[1, 6] - red).max() < 40  # unrotated, this pixel would be blue
    assert np.abs(arr[6, 1] - blue).max() < 40  # unrotated, this pixel would be red


@pytest.mark.parametrize(
    ("make", "want"),
    [
        (lambda: Image.new("RGBA", (3, 3), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped
        (lambda: Image.new("LA", (3, 3), (70, 0)), (70, 70, 70)),
        (lambda: Image.new("CMYK", (3, 3), (0, 255, 0, 0)), (255, 0, 255)),  # 255 - C, M, Y
        (lambda: Image.new("L", (3, 3), 99), (99, 99, 99)),
        (lambda: Image.new("1", (3, 3), 1), (255, 255, 255)),
    ],
    ids=["RGBA", "LA", "CMYK", "L", "1"],
)
def test_other_modes_convert_as_documented(tmp_path: Path, make, want) -> None:
    img = make()
    path = tmp_path / ("x.tif" if img.mode == "CMYK" else "x.png")
    img.save(path)
    assert load_image(path, 3).reshape(-1, 3).tolist() == [list(want)] * 9


def test_palette_with_transparency_takes_its_palette_colour(tmp_path: Path) -> None:
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 9, 8, 7])
    img.save(tmp_path / "p.png", transparency=1)
    assert load_image(tmp_path / "p.png", 3).reshape(-1, 3).tolist() == [[9, 8, 7]] * 9


def _decode_as_before(path: Path, size: int) -> np.ndarray:
    """The decoder before 16-bit and EXIF handling, for files that have neither."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def test_plain_eight_bit_images_decode_to_the_same_bytes_as_before(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for i, (w, h, ext) in enumerate([(200, 120, "jpg"), (37, 51, "png"), (64, 40, "webp")]):
        path = tmp_path / f"{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        assert np.array_equal(load_image(path, 24), _decode_as_before(path, 24)), path


# --------------------------------------------------------------------------------------------
# What a folder scan skips or relabels: kept as before, now reported
# --------------------------------------------------------------------------------------------


def test_scan_reports_hidden_nested_non_image_and_stray_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path / "ds")
    _write(root / ".cache" / "0.png", (1, 1, 1))  # a hidden "class"
    _write(root / "cat" / ".thumbs" / "t.png", (2, 2, 2))  # a hidden sub-folder
    (root / "cat" / ".DS_Store").write_bytes(b"x")
    _write(root / "cat" / "._0.png", (3, 3, 3))  # hidden file with an image extension
    _write(root / "dog" / "sub" / "deep" / "a.png", COLOURS["dog"])  # nested: labelled dog
    _write(root / "dog" / "sub" / "b.png", COLOURS["dog"])
    (root / "fox" / "notes.txt").write_text("not an image")
    _write(root / "stray.png", (4, 4, 4))  # in no class folder
    (root / "README.md").write_text("plain files beside the class folders pass quietly")
    with caplog.at_level(logging.WARNING, logger="salve"):
        d = prepare_dataset(
            "imagefolder", image_size=4, raw_dir=tmp_path, path=str(root), progress=False
        )
    line = (
        "imagefolder: skipped 2 hidden folders (.cache, cat/.thumbs), 2 hidden files; "
        "2 images in nested sub-folders were labelled with their top class folder; "
        "ignored 1 non-image file in class folders (an image needs one of the extensions "
        + " ".join(sorted(IMAGE_EXTENSIONS))
        + "); ignored 1 image outside any class folder (stray.png)"
    )
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("salve", logging.WARNING, line)
    ]
    assert d.info["data_notes"] == line
    assert {k: d.info[k] for k in salve.data.SCAN_KEYS} == {
        "skipped_hidden": 4,
        "nested_images": 2,
        "non_image_files": 1,
        "images_outside_classes": 1,
    }
    assert d.info["hidden_folders"] == [".cache", "cat/.thumbs"]
    assert d.classes == ["cat", "dog", "fox"]
    assert d.info["counts"]["train"] + d.info["counts"]["val"] == 17  # 5 + 7 + 5
    assert d.info["train_per_class"]["dog"] + d.info["val_per_class"]["dog"] == 7
    _assert_colours(d.train_images, d.train_labels, d.classes)  # no hidden image was decoded
    _assert_colours(d.val_images, d.val_labels, d.classes)


def test_scan_reports_folders_beside_train_and_val(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _folder(tmp_path / "ds" / "train", n=2)
    _folder(tmp_path / "ds" / "val", n=1)
    _folder(tmp_path / "ds" / "test", n=1)
    _write(tmp_path / "ds" / "train" / ".git" / "x.png", (1, 1, 1))
    with caplog.at_level(logging.WARNING, logger="salve"):
        d = prepare_dataset(
            "imagefolder", image_size=4, raw_dir=tmp_path, path=str(tmp_path / "ds"), progress=False
        )
    assert d.info["data_notes"] == (
        "imagefolder: skipped 1 hidden folder (train/.git); ignored 1 folder beside train/ "
        "and val/ (test)"
    )
    assert caplog.records[0].getMessage() == d.info["data_notes"]


def test_a_clean_folder_reports_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="salve"):
        d = prepare_dataset(
            "imagefolder", image_size=4, raw_dir=tmp_path, path=str(_folder(tmp_path / "ds"))
        )
    assert caplog.records == [] and d.info["data_notes"] == ""
    assert all(d.info[k] == 0 for k in salve.data.SCAN_KEYS)


# --------------------------------------------------------------------------------------------
# Too few val images per class: refused before anything is decoded
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path, size: int) -> np.ndarray:
        raise AssertionError("decoded an image before the split was checked")

    monkeypatch.setattr(salve.data.decode, "load_image", refuse)


def test_too_few_val_images_stratified(tmp_path: Path, no_decoding: None) -> None:
    root = tmp_path / "ds"
    for cls, n in (("cat", 10), ("dog", 10), ("fox", 2), ("emu", 1)):
        for i in range(n):
            _write(root / cls / f"{i}.png", (1, 2, 3))
    with pytest.raises(DatasetError) as info:
        prepare_dataset(
            "imagefolder", image_size=4, raw_dir=tmp_path, path=str(root), min_val_per_class=2
        )
    msg = str(info.value)
    # round(0.2 * 2) = 0, raised to 1; a single image stays in train: 0.
    assert "2 class(es) have fewer than data.min_val_per_class=2 val images" in msg
    assert "emu (0), fox (1)" in msg
    for fix in ("add images", "data.val_fraction (now 0.2)", "val/", "lower data.min_val"):
        assert fix in msg, fix
    # The default (1) still refuses a class with no val image at all: its accuracy is NaN.
    with pytest.raises(DatasetError, match=r"data.min_val_per_class=1 val images.*: emu \(0\)"):
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))


def test_too_few_val_images_given_split(tmp_path: Path, no_decoding: None) -> None:
    _folder(tmp_path / "ds" / "train", n=3)
    for cls in ("cat", "dog"):
        _write(tmp_path / "ds" / "val" / cls / "0.png", COLOURS[cls])
    with pytest.raises(DatasetError) as info:
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(tmp_path / "ds"))
    msg = str(info.value)
    assert ": fox (0)." in msg and "val/ folders" in msg and "data.min_val_per_class" in msg
    assert "val_fraction" not in msg  # it does not apply to a given split


def test_too_few_val_images_array_source() -> None:
    with pytest.raises(DatasetError, match=r"10 class\(es\).*0 \(36\), 1 \(36\)"):
        prepare_dataset("digits", image_size=8, raw_dir=Path("u"), min_val_per_class=100)


# --------------------------------------------------------------------------------------------
# Permission problems name the path, the cause and data.path
# --------------------------------------------------------------------------------------------


def _deny(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """os.scandir of `target` fails as for a folder without read permission (we run as root,
    which chmod cannot lock out)."""
    real = os.scandir

    def scandir(path=".", *a):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize(("where", "kind"), [("", "folder"), ("dog", "class folder")])
def test_unreadable_folders_are_permission_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, kind: str
) -> None:
    root = _folder(tmp_path / "ds", n=2)
    target = root / where if where else root
    _deny(monkeypatch, target)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))
    msg = str(info.value)
    assert f"permission denied reading the {kind} {target} (Permission denied)" in msg
    assert "data.path" in msg and "holds no images" not in msg


def test_untraversable_data_folder_is_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _folder(tmp_path / "ds", n=2)
    real = Path.stat

    def stat(self: Path, **k) -> os.stat_result:
        if self == root:  # as when a parent folder lacks execute permission
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, **k)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(DatasetError, match=f"permission denied reading the data folder {root}"):
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))


def test_unreadable_image_is_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _folder(tmp_path / "ds", n=2)
    locked = root / "dog" / "1.png"
    real = PIL.Image.open

    def open_image(fp, *a, **k):
        if Path(fp) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", open_image)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))
    msg = str(info.value)
    assert f"{locked}: permission denied reading this image" in msg and "data.path" in msg
    assert "cannot read this image" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_locked_class_folder_and_image(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", n=2)
    (root / "dog").chmod(0)
    try:
        with pytest.raises(DatasetError, match="permission denied reading the class folder"):
            prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))
    finally:
        (root / "dog").chmod(0o755)
    (root / "dog" / "1.png").chmod(0)
    with pytest.raises(DatasetError, match="permission denied reading this image"):
        prepare_dataset("imagefolder", image_size=4, raw_dir=tmp_path, path=str(root))


# --------------------------------------------------------------------------------------------
# Chunked decoding and streaming into a tensor file
# --------------------------------------------------------------------------------------------


def test_plan_chunks_stream_to_the_same_bytes_as_prepared_data(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(3)
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(7):
            w, h = (int(v) for v in rng.integers(6, 20, 2))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    opts = {"image_size": 5, "raw_dir": tmp_path, "path": str(root), "max_per_class": 5, "seed": 4}
    data = prepare_dataset("imagefolder", progress=False, **opts)
    plan = plan_image_files("imagefolder", progress=False, **opts)
    assert plan.info == data.info and plan.classes == data.classes
    for split in ("train", "val"):
        chunks = list(plan.chunks(split, chunk_size=4, progress=False))
        assert [len(x) for x, _ in chunks][:-1] == [4] * (len(chunks) - 1)
        assert torch.equal(torch.cat([x for x, _ in chunks]), getattr(data, f"{split}_images"))
        assert torch.equal(torch.cat([y for _, y in chunks]), getattr(data, f"{split}_labels"))
        streamed, saved = tmp_path / f"s_{split}.st", tmp_path / f"r_{split}.st"
        with TensorFileWriter(streamed, plan.tensor_specs(split)) as w:
            for x, y in plan.chunks(split, chunk_size=3, progress=False):
                w.write("images", x)
                w.write("labels", y)
        save_tensors(
            saved,
            {
                "images": getattr(data, f"{split}_images"),
                "labels": getattr(data, f"{split}_labels"),
            },
        )
        assert streamed.read_bytes() == saved.read_bytes()


def test_plan_refuses_array_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="use prepare_dataset"):
        plan_image_files("digits", image_size=8, raw_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# The fetch stage: data.path relative to the repository root; the scan line in its metrics
# --------------------------------------------------------------------------------------------


def test_fetch_reads_data_path_from_the_repo_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import fetch

    repo = tmp_path / "repo"
    _folder(repo / "data" / "pets", n=25)  # 5 val images per class: data.min_val_per_class
    (repo / "data" / "pets" / "cat" / "notes.txt").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = {"source": "imagefolder", "path": "data/pets", "image_size": 16}
    summary = fetch.run(from_dict({"data": data}), repo, progress=False)
    metrics = json.loads((repo / "metrics" / "fetch.json").read_text())
    assert metrics == summary
    assert metrics["data_notes"].startswith("imagefolder: ignored 1 non-image file")
    assert metrics["non_image_files"] == 1 and metrics["val_samples"] == 15
    assert metrics["val_copies_of_train"] == 15  # one colour per class: all copies
    meta = json.loads((repo / "results" / "fetch" / "meta.json").read_text())
    assert meta["info"]["root"] == "data/pets"  # as configured, the same on every clone
    # Four per class leave 4 val images: below data.min_val_per_class (5), refused.
    with pytest.raises(DatasetError, match=r"min_val_per_class=5 val images.*cat \(4\)"):
        fetch.run(from_dict({"data": data | {"val_fraction": 0.16}}), repo, progress=False)


def test_fetch_metrics_for_digits_keep_their_keys(tmp_path: Path) -> None:
    from tasks import fetch

    cfg = from_dict({"data": {"image_size": 16, "max_per_class": 2}})
    fetch.run(cfg, tmp_path, progress=False)
    metrics = json.loads((tmp_path / "metrics" / "fetch.json").read_text())
    assert sorted(metrics) == [
        "image_size",
        "num_classes",
        "source",
        "train_samples",
        "val_copies_of_train",
        "val_samples",
    ]
    assert metrics["val_copies_of_train"] == 0  # the digits hold no repeated image


# --------------------------------------------------------------------------------------------
# fetch streams folder sources: the same files as decoding in memory, never a whole split
# --------------------------------------------------------------------------------------------


def _random_folder(root: Path, n: int = 9, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    for cls in ("ant", "bee", "cow"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            w, h = (int(v) for v in rng.integers(6, 24, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


def _fetch_before_streaming(cfg, repo: Path, out: Path) -> None:
    """What fetch wrote before it streamed: prepare_dataset in memory, then save_tensors."""
    d = cfg.data
    prepared = prepare_dataset(
        d.source,
        image_size=d.image_size,
        raw_dir=repo / d.path,
        path=str(repo / d.path),
        val_fraction=d.val_fraction,
        max_per_class=d.max_per_class,
        min_val_per_class=d.min_val_per_class,
        seed=cfg.common.seed,
        progress=False,
    )
    prepared.info["root"] = d.path
    check_prepared(prepared)
    for split in ("train", "val"):
        x, y = getattr(prepared, f"{split}_images"), getattr(prepared, f"{split}_labels")
        save_tensors(out / f"{split}.safetensors", {"images": x, "labels": y})
    meta = {"classes": prepared.classes, "info": prepared.info}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("given_split", [False, True])
def test_streamed_fetch_writes_the_bytes_of_the_in_memory_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given_split: bool
) -> None:
    from tasks import fetch

    repo = tmp_path / "repo"
    if given_split:
        _random_folder(repo / "data" / "ds" / "train", n=11, seed=1)
        _random_folder(repo / "data" / "ds" / "val", n=3, seed=2)
    else:
        _random_folder(repo / "data" / "ds", n=13)
    data = {"source": "imagefolder", "path": "data/ds", "image_size": 16, "max_per_class": 9}
    cfg = from_dict({"data": data | {"min_val_per_class": 2}, "common": {"seed": 3}})
    old = tmp_path / "old"
    old.mkdir()
    _fetch_before_streaming(cfg, repo, old)

    def whole_split(*a, **k):
        raise AssertionError("fetch decoded a whole split into memory")

    monkeypatch.setattr(salve.data.folders, "decode_images", whole_split)
    summary = fetch.run(cfg, repo, progress=False)
    new = repo / "results" / "fetch"
    for name in ("train.safetensors", "val.safetensors"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    assert json.loads((new / "meta.json").read_text()) == json.loads(
        (old / "meta.json").read_text()
    )
    assert summary["val_samples"] == 9 and summary["train_samples"] == 27  # both layouts
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())


def test_streamed_fetch_checks_before_decoding_and_keeps_old_files_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import fetch

    repo = tmp_path / "repo"
    _folder(repo / "data" / "pets" / "train", n=4)
    _folder(repo / "data" / "pets" / "val", n=2)
    data = {"source": "imagefolder", "path": "data/pets", "image_size": 16, "min_val_per_class": 1}
    cfg = from_dict({"data": data})
    fetch.run(cfg, repo, progress=False)
    out = repo / "results" / "fetch"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # check_prepared's rules hold on the plan, before any image is decoded: a repeated class name
    real_plan = fetch.plan_image_files

    def duplicate_class(*a, **k):
        plan = real_plan(*a, **k)
        plan.classes[1] = plan.classes[0]
        return plan

    monkeypatch.setattr(fetch, "plan_image_files", duplicate_class)
    monkeypatch.setattr(salve.data.decode, "load_image", lambda *a: pytest.fail("decoded"))
    with pytest.raises(DatasetError, match=r"prepared data is inconsistent: duplicate class"):
        fetch.run(cfg, repo, progress=False)
    monkeypatch.undo()
    # An unreadable val image fails after train is streamed: neither file is replaced.
    (repo / "data" / "pets" / "val" / "fox" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"val/fox/1.png: cannot read this image"):
        fetch.run(cfg, repo, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no temp file


# --------------------------------------------------------------------------------------------
# Val images that copy train images: counted from digests while streaming, one warning
# --------------------------------------------------------------------------------------------


def _copy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "exact copies" in r.getMessage()]


def test_fetch_counts_val_images_that_copy_train_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from tasks import fetch

    repo = tmp_path / "repo"
    ds = repo / "data" / "ds"
    _random_folder(ds / "train", n=4, seed=1)
    _random_folder(ds / "val", n=2, seed=2)  # distinct images: no copy yet
    data = {"source": "imagefolder", "path": "data/ds", "image_size": 16, "min_val_per_class": 1}
    cfg = from_dict({"data": data})
    with caplog.at_level(logging.WARNING, logger="salve"):
        summary = fetch.run(cfg, repo, progress=False)
    assert _copy_warnings(caplog) == [] and summary["val_copies_of_train"] == 0
    caplog.clear()

    for cls in ("ant", "bee", "cow"):  # val/<cls>/1.png becomes a copy of train/<cls>/3.png
        shutil.copyfile(ds / "train" / cls / "3.png", ds / "val" / cls / "1.png")
    with caplog.at_level(logging.WARNING, logger="salve"):
        summary = fetch.run(cfg, repo, progress=False)
    assert _copy_warnings(caplog) == [
        "data: 3 of 6 val images are exact copies of train images once decoded "
        "(val/ant/1.png = train/ant/3.png, val/bee/1.png = train/bee/3.png, "
        "val/cow/1.png = train/cow/3.png); val accuracy then measures memorisation, not "
        "generalisation: delete the copies from the val/ folder in data/ds (or replace them "
        "with images the model has not trained on)"
    ]
    assert summary["val_copies_of_train"] == 3
    metrics = json.loads((repo / "metrics" / "fetch.json").read_text())
    assert metrics["val_copies_of_train"] == 3
    caplog.clear()

    # A val made only of training images: every one counted, the list cut after three.
    shutil.rmtree(ds / "val")
    shutil.copytree(ds / "train", ds / "val")
    with caplog.at_level(logging.WARNING, logger="salve"):
        summary = fetch.run(cfg, repo, progress=False)
    (line,) = _copy_warnings(caplog)
    assert line.startswith("data: 12 of 12 val images are exact copies") and ", ...)" in line
    assert summary["val_copies_of_train"] == 12


def test_val_copies_across_chunks_and_in_memory_data(caplog: pytest.LogCaptureFixture) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8, generator=g)
    val = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=g)
    val[1], val[4] = train[6], train[2]  # train row 6 arrives in the second chunk
    copies = salve.data.ValCopies()
    for start in range(0, 7, 4):
        copies.add("train", train[start : start + 4])
    copies.add("val", val[:3])
    copies.add("val", val[3:])
    assert copies.pairs() == [(1, 6), (4, 2)]
    assert all(len(d) == 16 for d in copies.train) and len(copies.val) == 5  # digests only

    data = dataclasses.replace(_tiny(), val_images=val[:2], train_images=train[:4])
    data.val_images[0] = data.train_images[3]
    with caplog.at_level(logging.WARNING, logger="salve"):
        assert salve.data.report_val_copies(data, chunk_size=3) == 1
    assert _copy_warnings(caplog) == [
        "data: 1 of 2 val images are exact copies of train images once decoded "
        "(val #0 = train #3); val accuracy then measures memorisation, not generalisation: "
        "they come with the test data set itself, so read its val accuracy as partly memorised"
    ]
