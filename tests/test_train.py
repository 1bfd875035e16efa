"""salve.train: bit-reproducible fine-tuning, exact resume, the schedule, early stopping with
the best epoch kept, the batch-of-one rule, augmentation and the quality gate."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from salve.config import FinetuneConfig
from salve.data import normalise
from salve.models import build_model
from salve.train import (
    FINAL_DIV,
    WARMUP_DIV,
    DivergenceError,
    TrainState,
    augment_batch,
    batches,
    epoch_budget,
    learning_rate,
    load_optimizer_tensors,
    make_optimizer,
    optimizer_tensors,
    predict,
    quality_gate,
    resolve_augment,
    resolve_min_steps,
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


def _settings(**kw) -> FinetuneConfig:
    base = {"epochs": 2, "min_steps": 0, "batch_size": 8, "lr": 1e-3, "patience": 0}
    return dataclasses.replace(FinetuneConfig(), **(base | kw))


def _train(model, data, settings, *, seed: int = 3, augment: str = "crop_flip", **kw):
    return train_classifier(
        model,
        data["train_x"],
        data["train_y"],
        data["val_x"],
        data["val_y"],
        settings,
        seed=seed,
        augment=augment,
        num_classes=K,
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
    """Comparable records: no wall time, NaN (a class without val images) as a string."""
    import json

    rows = [{k: v for k, v in h.as_dict().items() if k != "seconds"} for h in history]
    return json.loads(json.dumps(rows).replace("NaN", '"nan"'))


@pytest.fixture(scope="module")
def reference(data):
    """One uninterrupted 2-epoch run, with a snapshot of model+optimizer after epoch 1."""
    snapshots = {}

    def snap(model, optimizer, state):
        snapshots[len(state.history)] = {
            "model": copy.deepcopy(model.state_dict()),
            "optim": optimizer_tensors(optimizer),
            "state": copy.deepcopy(state),
        }

    model = _model()
    state = _train(model, data, _settings(), on_epoch_end=snap)
    return model, state.history, snapshots


def test_same_seed_gives_bit_identical_weights(data, reference) -> None:
    model, history, _ = reference
    again = _model()
    history2 = _train(again, data, _settings()).history
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
    _train(a, data, _settings(), seed=3)
    _train(b, data, _settings(), seed=4)  # other shuffle and augmentation
    assert not torch.equal(a[0].weight, b[0].weight)
    # resuming from epoch 1 without the optimizer state does not reproduce the run
    snaps = {}
    _train(c, data, _settings(epochs=1), on_epoch_end=lambda m, o, s: snaps.update(m=m, s=s))
    fresh = _tiny(seed=5)
    fresh.load_state_dict(snaps["m"].state_dict())
    _train(fresh, data, _settings(), state=copy.deepcopy(snaps["s"]))
    assert not torch.equal(a[0].weight, fresh[0].weight)


def test_resume_from_epoch_1_equals_uninterrupted_run(data, reference) -> None:
    model, history, snapshots = reference
    snap = snapshots[1]
    assert set(snap["optim"]) and all(k.startswith("optim.") for k in snap["optim"])

    resumed = _model(seed=99)  # a fresh process would build a different random model first
    resumed.load_state_dict(snap["model"])
    optimizer = make_optimizer(resumed, _settings())
    load_optimizer_tensors(optimizer, snap["optim"])
    state2 = _train(
        resumed, data, _settings(), optimizer=optimizer, state=copy.deepcopy(snap["state"])
    )
    history2 = state2.history
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
    out = augment_batch(images, "crop_flip", torch.Generator().manual_seed(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment_batch(images, "crop_flip", torch.Generator().manual_seed(5)))
    assert not torch.equal(
        out, augment_batch(images, "crop_flip", torch.Generator().manual_seed(6))
    )
    assert augment_batch(images, "none", torch.Generator()) is images

    # Oracle: each output is a window of the 4-px replicate-padded image, maybe mirrored.
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4), mode="replicate")
    for i in range(len(images)):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i].float(), w) for w in windows), i


def test_augment_batch_uses_all_offsets_and_flips() -> None:
    images = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(400, 3, 1, 1)
    out = augment_batch(images, "crop_flip", torch.Generator().manual_seed(0))
    distinct = {tuple(o[0].flatten().tolist()) for o in out}
    assert len(distinct) > 100  # 81 offsets x 2 flips; a stuck generator gives 1
    assert sum(torch.equal(o, images[0]) for o in out) < 20
    crops = augment_batch(images, "crop", torch.Generator().manual_seed(0))
    assert 60 < len({tuple(o[0].flatten().tolist()) for o in crops}) <= 81  # never mirrored
    mirrored = images[0, 0].flip(-1)
    assert not any(torch.equal(o[0], mirrored) for o in crops)


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


# -- schedule, batches, early stopping, gate ------------------------------------------------


def test_learning_rate_schedules_match_their_closed_forms() -> None:
    cfg = _settings(lr=0.01, warmup=0.2, schedule="onecycle")
    total = 50  # 10 warm-up steps
    lrs = [learning_rate(s, total, cfg) for s in range(total)]
    start = 0.01 / WARMUP_DIV
    assert lrs[0] == pytest.approx(start + (0.01 - start) / 10)
    assert lrs[9] == pytest.approx(0.01)  # the peak ends the warm-up
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only decays
    floor = 0.01 / FINAL_DIV
    mid = floor + (0.01 - floor) * 0.5 * (1 + math.cos(math.pi * 20 / 40))
    assert lrs[30] == pytest.approx(mid)
    assert learning_rate(total, total, cfg) == pytest.approx(floor)
    cos = _settings(lr=0.01, warmup=0.0, schedule="cosine")
    assert learning_rate(0, 100, cos) == pytest.approx(0.01)
    assert learning_rate(100, 100, cos) == pytest.approx(0.0, abs=1e-15)
    const = _settings(lr=0.01, warmup=0.1, schedule="constant")
    assert learning_rate(0, 100, const) == pytest.approx(0.001)
    assert learning_rate(50, 100, const) == 0.01


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [(10, 3, [3, 3, 4]), (9, 3, [3, 3, 3]), (5, 8, [5]), (17, 16, [17]), (2, 2, [2])],
)
def test_a_final_batch_of_one_joins_the_previous_batch(n, size, expected) -> None:
    parts = batches(n, size, torch.arange(n))
    assert [len(p) for p in parts] == expected
    assert torch.equal(torch.cat(parts), torch.arange(n))  # every sample once, in order
    with pytest.raises(ValueError, match="at least 2 training images"):
        batches(1, 4, torch.arange(1))


@pytest.mark.parametrize(
    ("n", "epochs", "min_steps", "expected"),
    [
        (1437, 4, 360, 4),  # digits: 90 steps an epoch, 4 x 90 = 360 already
        (768, 4, 360, 8),  # a 960-image folder: 48 steps an epoch, ceil(360 / 48) = 8
        (768, 10, 360, 10),  # the epoch budget when it is the larger
        (17, 4, 360, 360),  # 17 images at batch 16: one batch (the last 1 joins it)
        (768, 4, 0, 4),  # 0: the epoch budget alone
        (768, 0, 360, 0),  # epochs 0 never trains
    ],
)
def test_epoch_budget_reaches_min_steps(n, epochs, min_steps, expected) -> None:
    cfg = dataclasses.replace(FinetuneConfig(), epochs=epochs, min_steps=min_steps, batch_size=16)
    assert epoch_budget(n, cfg) == expected


def test_min_steps_raises_the_epochs_trained(data) -> None:
    # 12 samples at batch 8: 2 steps an epoch (8, then 4); 5 steps need 3 epochs
    state = _train(_tiny(), data, _settings(epochs=1, min_steps=5))
    assert [r.epoch for r in state.history] == [1, 2, 3]
    assert state.history[-1].lr == pytest.approx(learning_rate(5, 6, _settings(min_steps=5)))


def test_batch_size_one_and_a_batch_larger_than_the_data_train(data) -> None:
    for size in (2, 11, 100):  # 12 samples: 6 x 2, then 11 + 1 merged, then all 12 at once
        state = _train(_tiny(), data, _settings(epochs=1, batch_size=size))
        assert len(state.history) == 1 and math.isfinite(state.history[0].train_loss)


def test_early_stopping_keeps_the_best_epoch(data, monkeypatch) -> None:
    import salve.train as train_mod

    scripted = iter([0.25, 0.75, 0.5, 0.5, 1.0])  # val accuracy per epoch: best is epoch 2

    def fake_predict(model, images, *a, **k):
        acc = next(scripted)
        hits = round(acc * len(data["val_y"]))
        pred = data["val_y"].clone()
        pred[hits:] = (pred[hits:] + 1) % K
        return pred

    monkeypatch.setattr(train_mod, "predict", fake_predict)
    weights = {}
    state = _train(
        _tiny(),
        data,
        _settings(epochs=5, patience=2),
        on_epoch_end=lambda m, o, s: weights.update({len(s.history): copy.deepcopy(m)}),
    )
    assert [h.val_accuracy for h in state.history] == [0.25, 0.75, 0.5, 0.5]  # stopped at 4
    assert state.best_epoch == 2 and state.best_accuracy == 0.75
    _assert_same_state(state.best_state, weights[2].state_dict())
    assert state.stopped_early(2) and not TrainState().stopped_early(2)


def test_early_stopping_waits_for_three_quarters_of_the_budget(data, monkeypatch) -> None:
    import salve.train as train_mod

    # best at epoch 2, no better at 3 and 4: patience 2 would stop after 4, but of 8 epochs
    # the first 6 never stop; epoch 5 improves, 6 and 7 do not: stopped after 7
    scripted = iter([0.25, 0.75, 0.5, 0.5, 1.0, 0.5, 0.5, 0.5])

    def fake_predict(model, images, *a, **k):
        hits = round(next(scripted) * len(data["val_y"]))
        pred = data["val_y"].clone()
        pred[hits:] = (pred[hits:] + 1) % K
        return pred

    monkeypatch.setattr(train_mod, "predict", fake_predict)
    state = _train(_tiny(), data, _settings(epochs=8, patience=2))
    assert [h.val_accuracy for h in state.history] == [0.25, 0.75, 0.5, 0.5, 1.0, 0.5, 0.5]
    assert state.best_epoch == 5
    assert not state.stopped_early(2, not_before=8) and state.stopped_early(2, not_before=7)


def test_per_class_val_accuracy_is_recorded(data) -> None:
    state = _train(_tiny(), data, _settings(epochs=1))
    record = state.history[0]
    preds = predict(_tiny(), data["val_x"], MEAN, STD)  # shape check only
    assert len(record.val_class_accuracy) == K and preds.shape == data["val_y"].shape
    counts = torch.bincount(data["val_y"], minlength=K)
    for k in range(K):
        assert math.isnan(record.val_class_accuracy[k]) == (counts[k] == 0)


def test_resolve_min_steps() -> None:
    assert resolve_min_steps("auto") == 960
    assert resolve_min_steps(5) == 5
    with pytest.raises(ValueError, match="resolve_min_steps"):
        epoch_budget(100, FinetuneConfig())  # "auto" must be resolved from the data first


def test_resolve_augment() -> None:
    assert resolve_augment("auto", "digits") == "crop"
    assert resolve_augment("auto", "imagefolder") == "crop_flip"
    assert resolve_augment("none", "imagefolder") == "none"


def test_quality_gate_names_weak_classes_and_the_fixes() -> None:
    ok = quality_gate(0.97, {"a": 0.95, "b": 1.0}, min_val_accuracy=0.8, min_class_accuracy=0.5)
    assert ok is None
    msg = quality_gate(
        0.64,
        {"circle": 0.9, "square": 0.0, "star": 0.4},
        min_val_accuracy=0.8,
        min_class_accuracy=0.5,
    )
    assert "64.0% val accuracy" in msg and "square 0%, star 40%" in msg and "circle" not in msg
    assert "finetune.min_steps=" in msg and "finetune.min_val_accuracy=0" in msg
    # a class without val images (NaN) is weak, not silently passing
    nan = quality_gate(0.9, {"a": float("nan")}, min_val_accuracy=0.8, min_class_accuracy=0.5)
    assert nan is not None and "a nan%" in nan
    # the documented override
    assert quality_gate(0.1, {"a": 0.0}, min_val_accuracy=0, min_class_accuracy=0) is None
