"""salve.train: bit-reproducible fine-tuning, exact resume, divergence detection, augmentation."""

from __future__ import annotations

import copy

import pytest
import torch

from salve.data import normalise
from salve.models import build_model
from salve.train import (
    DivergenceError,
    TrainSettings,
    augment_batch,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    predict,
    train_classifier,
)

K = 4
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Two CPU threads, as CPU runs use; restored after (the setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "train_x": torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g),
        "train_y": torch.randint(0, K, (12,), generator=g),
        "val_x": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
        "val_y": torch.randint(0, K, (4,), generator=g),
    }


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", K)


def _settings(**kw) -> TrainSettings:
    base = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "augment": True, "seed": 3}
    return TrainSettings(**(base | kw))


def _train(model, data, settings, **kw):
    return train_classifier(
        model,
        data["train_x"],
        data["train_y"],
        data["val_x"],
        data["val_y"],
        settings,
        mean=MEAN,
        std=STD,
        device=CPU,
        progress=False,
        **kw,
    )


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _history_without_time(history) -> list[dict]:
    return [{k: v for k, v in h.as_dict().items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def reference(data):
    """One uninterrupted 2-epoch run, with a snapshot of model+optimizer after epoch 1."""
    snapshots = {}

    def snap(epoch, model, optimizer, history):
        snapshots[epoch] = {
            "model": copy.deepcopy(model.state_dict()),
            "optim": optimizer_tensors(optimizer),
            "history": list(history),
        }

    model = _model()
    history = _train(model, data, _settings(), on_epoch_end=snap)
    return model, history, snapshots


def test_same_seed_gives_bit_identical_weights(data, reference) -> None:
    model, history, _ = reference
    again = _model()
    history2 = _train(again, data, _settings())
    _assert_same_state(model.state_dict(), again.state_dict())
    assert _history_without_time(history) == _history_without_time(history2)
    assert [h.epoch for h in history] == [1, 2]
    # and training did something: the weights moved from their initialisation
    assert not torch.equal(model.fc.weight, _model().fc.weight)


def _tiny(seed: int = 0) -> torch.nn.Module:
    """A small conv net with BatchNorm, for the negative controls (fast on CPU)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, K),
    )


def test_seed_and_optimizer_state_matter(data) -> None:
    """Negative controls, so the equalities above cannot hold by accident."""
    a, b, c = _tiny(), _tiny(), _tiny()
    _train(a, data, _settings(seed=3))
    _train(b, data, _settings(seed=4))  # other shuffle and augmentation
    assert not torch.equal(a[0].weight, b[0].weight)
    # resuming from epoch 1 without the optimizer state does not reproduce the run
    snaps = {}
    _train(c, data, _settings(epochs=1), on_epoch_end=lambda e, m, o, h: snaps.update(m=m))
    fresh = _tiny(seed=5)
    fresh.load_state_dict(snaps["m"].state_dict())
    _train(fresh, data, _settings(), start_epoch=1)
    assert not torch.equal(a[0].weight, fresh[0].weight)


def test_resume_from_epoch_1_equals_uninterrupted_run(data, reference) -> None:
    model, history, snapshots = reference
    snap = snapshots[1]
    assert set(snap["optim"]) and all(k.startswith("optim.") for k in snap["optim"])

    resumed = _model(seed=99)  # a fresh process would build a different random model first
    resumed.load_state_dict(snap["model"])
    optimizer = make_optimizer(resumed, _settings())
    load_optimizer_tensors(optimizer, snap["optim"])
    history2 = _train(
        resumed,
        data,
        _settings(),
        start_epoch=1,
        optimizer=optimizer,
        history=snap["history"],
    )
    _assert_same_state(model.state_dict(), resumed.state_dict())
    assert _history_without_time(history2) == _history_without_time(history)


def test_optimizer_tensors_round_trip_sgd() -> None:
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, _settings(optimizer="sgd"))
    assert isinstance(opt, torch.optim.SGD)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    tensors = optimizer_tensors(opt)
    assert set(tensors) == {"optim.0.momentum_buffer", "optim.1.momentum_buffer"}
    fresh = make_optimizer(model, _settings(optimizer="sgd"))
    load_optimizer_tensors(fresh, tensors | {"model.fc.weight": torch.zeros(1)})
    for idx, state in opt.state_dict()["state"].items():
        assert torch.equal(
            fresh.state_dict()["state"][idx]["momentum_buffer"], state["momentum_buffer"]
        )
    assert isinstance(make_optimizer(model, _settings()), torch.optim.AdamW)


def test_nan_loss_raises_divergence_and_does_not_step(data, monkeypatch) -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())

    def nan_forward(x):
        return torch.full((x.shape[0], K), float("nan"), requires_grad=True)

    monkeypatch.setattr(model, "forward", nan_forward)
    with pytest.raises(DivergenceError, match=r"epoch 1, batch 0.*finetune\.lr"):
        _train(model, data, _settings())
    _assert_same_state(before, model.state_dict())


def test_augment_batch_is_a_crop_and_flip_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = augment_batch(images, torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment_batch(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, augment_batch(images, torch.Generator().manual_seed(6)))

    # Oracle: each output is a window of the 4-px replicate-padded image, maybe mirrored.
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="replicate")
    for i in range(len(images)):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i].float(), w) for w in windows), i


def test_augment_batch_uses_all_offsets_and_flips() -> None:
    images = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(400, 3, 1, 1)
    out = augment_batch(images, torch.Generator().manual_seed(0))
    distinct = {tuple(o[0].flatten().tolist()) for o in out}
    assert len(distinct) > 100  # 81 offsets x 2 flips; a stuck generator gives 1
    assert sum(torch.equal(o, images[0]) for o in out) < 20


def test_predict_is_argmax_of_logits_and_restores_mode(data) -> None:
    model = _tiny(seed=2).train()  # BatchNorm: train-mode outputs differ from eval
    x = data["train_x"]
    preds = predict(model, x, MEAN, STD, batch_size=5)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = model(normalise(x, MEAN, STD)).argmax(dim=1)
    assert preds.dtype == torch.long and torch.equal(preds, expected)
    assert torch.equal(predict(model, x, MEAN, STD, batch_size=64), expected)
    assert predict(model, x[:0], MEAN, STD).shape == (0,)
