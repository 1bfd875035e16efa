"""prepare_dataset sources (digits, imagefolder, CIFAR-100 layout), splits, normalise,
check_prepared."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salve.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENETTE_ARCHIVES,
    IMAGENETTE_CLASSES,
    PreparedData,
    check_prepared,
    normalise,
    prepare_dataset,
    stratified_split,
    subsample_per_class,
)

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
