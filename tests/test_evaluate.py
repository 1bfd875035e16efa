"""Oracle tests for salve.evaluate: hand-computed metrics, exact folds, LEACE's defining property,
a known permutation for the Hungarian matching, a hand t interval, deterministic image shifts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salve.evaluate import (
    METRICS,
    SHIFTS,
    ShiftedRows,
    cross_class_accuracy_change,
    evaluate_seed,
    feature_stability,
    mean_ci95,
    prediction_metrics,
    probe_recovery,
    seed_free_probes,
    shift_images,
    summarise_methods,
)
from salve.methods import (
    METHODS,
    LeaceBasis,
    build_edit,
    fit_leace,
    random_other_latent,
    random_unit_direction,
    zero_row_edit,
)

F64 = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _hand_case() -> dict[str, torch.Tensor]:
    """Two classes; latent 0 is d = e0, latent 1 is e1; the SAE centre sits at a.d = -10.
    Head z0 = a0, z1 = a1. Class 0 at a0 = -2 (base accuracy 1/2), class 1 at a0 = -18."""
    return {
        "weight": torch.eye(2, dtype=F64),
        "bias": torch.zeros(2, dtype=F64),
        "w_dec": torch.eye(2, dtype=F64) * 2.0,
        "b_dec": torch.tensor([-10.0, 0.0], dtype=F64),
        "acts": torch.tensor([[-2.0, -1.0], [-2.0, -3.0], [-18.0, 5.0]], dtype=F64),
        "labels": torch.tensor([0, 0, 1]),
    }


def _blobs(n: int, m: int, k: int, seed: int, spread: float = 3.0):
    """k Gaussian classes with well separated means (class c centred at spread * e_c)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    means = torch.zeros(k, m, dtype=F64)
    means[torch.arange(k), torch.arange(k)] = spread
    acts = means[labels] + torch.randn(n, m, generator=g, dtype=F64)
    return acts, labels


def test_prediction_metrics_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    before = torch.tensor([0, 0, 1, 1, 0, 2, 2])
    after = torch.tensor([1, 0, 2, 1, 1, 2, 0])
    out = prediction_metrics(before, after, labels, target=0, num_classes=4)  # class 3: empty
    # Class 0: 2/3 -> 1/3; of its two correct samples one changed. Class 1: 1/2 -> 1 (+1/2),
    # class 2: 1 -> 1/2 (-1/2); class 3 has no samples and is ignored.
    assert out["efficacy"] == pytest.approx(1 / 3)
    assert out["flip_rate"] == pytest.approx(0.5)
    assert out["specificity_mean"] == pytest.approx(0.0)
    assert out["specificity_worst"] == pytest.approx(-0.5)


def test_zero_row_target_logit_zero_and_others_bit_identical() -> None:
    weight, bias, acts = _rand(4, 6, seed=1), _rand(4, seed=2), _rand(9, 6, seed=3)
    edit = zero_row_edit(weight, bias, target=2)
    logits = edit.logits(acts)
    assert torch.equal(logits[:, 2], torch.zeros(9, dtype=F64))
    original = acts @ weight.T + bias
    for j in (0, 1, 3):
        assert torch.equal(logits[:, j], original[:, j])
    # A head-only edit: the representation is the input itself, read by the edited head.
    assert edit.representation.is_identity and torch.equal(edit.represent(acts), acts)


def test_zero_row_perfect_specificity_when_no_class_lost_to_the_target() -> None:
    # Identity head; every sample's own logit (5) beats everything, including a zeroed target.
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    acts = torch.ones(6, 3, dtype=F64)
    acts[torch.arange(6), labels] = 5.0
    w, b = torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64)
    edit = zero_row_edit(w, b, target=0)
    out = prediction_metrics((acts @ w.T).argmax(1), edit.logits(acts).argmax(1), labels, 0, 3)
    assert out == {
        "efficacy": 1.0,
        "flip_rate": 1.0,
        "specificity_mean": 0.0,
        "specificity_worst": 0.0,
    }


def test_evaluate_seed_hand_case() -> None:
    c = _hand_case()
    res = evaluate_seed(
        c["weight"], c["bias"], c["acts"], c["labels"], c["acts"], c["labels"],
        c["w_dec"], c["b_dec"], [0, 1],
        projection_alpha=1.0, paper_alpha=1.0, min_base_accuracy=0.5, seed=0,
        methods=("salve_projection", "zero_row"), probe=False,
    )  # fmt: skip
    assert res["evaluated_classes"] == [0, 1] and res["left_out_classes"] == []
    assert res["base_accuracy"] == [0.5, 1.0]
    proj = res["per_class"]["salve_projection"]
    # Target 0: centred suppression sets z0 = -10: class 0 falls from 1/2 to 0; the one correct
    # sample flips; class 1 (z1 = 5) is untouched.
    assert proj["0"] == {
        "efficacy": 0.5,
        "flip_rate": 1.0,
        "specificity_mean": 0.0,
        "specificity_worst": 0.0,
    }
    # Target 1: z1 = 0 (the centre has no e1 part); class 1 (z0 = -18) keeps its sample; class
    # 0's samples now lose to z1 = 0 > -2: 1/2 -> 0.
    assert proj["1"] == {
        "efficacy": 0.0,
        "flip_rate": 0.0,
        "specificity_mean": -0.5,
        "specificity_worst": -0.5,
    }
    assert res["methods"]["salve_projection"] == {
        "efficacy": 0.25,
        "flip_rate": 0.5,
        "specificity_mean": -0.25,
        "specificity_worst": -0.25,
    }
    # Zeroing class 0's row makes z0 = 0 > z1 for both class-0 samples: its accuracy RISES.
    assert res["per_class"]["zero_row"]["0"]["efficacy"] == -0.5
    left = evaluate_seed(
        c["weight"], c["bias"], c["acts"], c["labels"], c["acts"], c["labels"],
        c["w_dec"], c["b_dec"], [0, 1],
        projection_alpha=1.0, paper_alpha=1.0, min_base_accuracy=0.75, seed=0,
        methods=("zero_row",), probe=False,
    )  # fmt: skip
    assert left["evaluated_classes"] == [1] and left["left_out_classes"] == [0]
    assert list(left["per_class"]["zero_row"]) == ["1"]


def test_cross_class_accuracy_change_hand() -> None:
    c = _hand_case()
    got = cross_class_accuracy_change(
        c["weight"], c["bias"], c["acts"], c["labels"], c["w_dec"], c["b_dec"], 0, [0, 1], 1.0
    )
    assert got == {"0": -0.5, "1": 0.0}


@pytest.mark.parametrize("method", METHODS)
def test_representation_map_matches_the_folded_head(method: str) -> None:
    k, m, n = 3, 6, 60
    acts, labels = _blobs(n, m, k, seed=4)
    weight, bias = _rand(k, m, seed=5), _rand(k, seed=6)
    w_dec, b_dec = _rand(m, 8, seed=7), _rand(m, seed=8)
    edit = build_edit(
        method, weight, bias, 1, 3, w_dec, b_dec, acts, labels,
        projection_alpha=0.8, paper_alpha=4.0, seed=11,
    )  # fmt: skip
    probe_acts = _rand(25, m, seed=9) * 2
    reps = edit.represent(probe_acts)
    torch.testing.assert_close(edit.reader_logits(reps), edit.logits(probe_acts), atol=1e-6, rtol=0)
    assert not torch.allclose(edit.logits(probe_acts), probe_acts @ weight.T + bias)
    if method in ("salve_projection", "random_direction", "random_latent"):
        # Centred on b_dec: the centre is a fixed point, and the component is scaled by 1 - 0.8.
        assert torch.allclose(edit.represent(b_dec.unsqueeze(0))[0], b_dec, atol=1e-12)
    if method == "salve_projection":
        d = w_dec[:, 3] / w_dec[:, 3].norm()
        torch.testing.assert_close((reps - b_dec) @ d, 0.2 * ((probe_acts - b_dec) @ d))
    if method == "salve_paper":  # a' = f * a; the bias never moves
        assert torch.equal(edit.bias_k, bias)
        assert torch.equal(
            edit.representation.matrix_mm, torch.diag(edit.representation.matrix_mm.diag())
        )


PROJECTIONS = ("salve_projection", "random_direction", "random_latent", "mean_difference")


@pytest.mark.parametrize("method", METHODS)
def test_structured_representation_equals_its_dense_matrix(method: str) -> None:
    """The O(NM) paths (diagonal, identity minus rank one) are the dense affine map."""
    k, m = 3, 7
    acts, labels = _blobs(40, m, k, seed=21)
    edit = build_edit(
        method, _rand(k, m, seed=22), _rand(k, seed=23), 2, 1, _rand(m, 5, seed=24),
        _rand(m, seed=25), acts, labels, projection_alpha=0.7, paper_alpha=3.0, seed=3,
    )  # fmt: skip
    rep = edit.representation
    structured = rep.diag_m is not None or rep.rank_one is not None
    assert structured == (method in ("salve_paper", *PROJECTIONS))
    dense = acts @ rep.matrix_mm.T + rep.shift_m
    torch.testing.assert_close(rep(acts), dense, atol=1e-12, rtol=0)


def test_leace_shared_basis_gives_the_same_bytes() -> None:
    acts, labels = _blobs(90, 6, 3, seed=26)
    basis = LeaceBasis.fit(acts)
    for target in range(3):
        concept = (labels == target).to(F64)
        alone, shared = fit_leace(acts, concept), fit_leace(acts, concept, basis)
        assert torch.equal(alone.matrix_mm, shared.matrix_mm)
        assert torch.equal(alone.shift_m, shared.shift_m)
    with pytest.raises(ValueError, match="same N rows"):
        fit_leace(acts, torch.ones(89), basis)


def test_random_baselines_are_seeded() -> None:
    d0, d0b, d1 = (random_unit_direction(12, s, 2) for s in (0, 0, 1))
    assert torch.equal(d0, d0b) and not torch.equal(d0, d1)
    assert float(d0.norm()) == pytest.approx(1.0)
    assert not torch.equal(d0, random_unit_direction(12, 0, 3))  # differs per class too
    w_dec = _rand(4, 6, seed=0)
    w_dec[:, 5] = 0.0  # a dead latent is never drawn
    drawn = {random_other_latent(w_dec, 2, s, 0) for s in range(40)}
    assert drawn == {0, 1, 3, 4}
    assert random_other_latent(w_dec, 2, 7, 0) == random_other_latent(w_dec, 2, 7, 0)


def test_leace_defining_properties_and_package_oracle() -> None:
    acts, labels = _blobs(240, 6, 3, seed=12)
    acts[:, 5] = 0.0  # a dead dimension: singular covariance
    concept = (labels == 0).to(F64)
    eraser = fit_leace(acts, concept)
    erased = eraser(acts)
    # Class-conditional means become equal: no linear probe beats a constant (least squares).
    torch.testing.assert_close(
        erased[labels == 0].mean(0), erased[labels != 0].mean(0), atol=1e-10, rtol=0
    )
    centred_z = concept - concept.mean()
    torch.testing.assert_close(
        (erased - erased.mean(0)).T @ centred_z, torch.zeros(6, dtype=F64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(eraser(erased), erased, atol=1e-10, rtol=0)  # idempotent
    assert torch.equal(erased[:, 5], torch.zeros(240, dtype=F64))
    # The unconditional mean is kept, and it differs from the input (something was erased).
    torch.testing.assert_close(erased.mean(0), acts.mean(0), atol=1e-10, rtol=0)
    assert not torch.allclose(erased, acts)
    # Independent oracle: EleutherAI's implementation, without shrinkage or trace constraint.
    from concept_erasure import LeaceFitter

    fitter = LeaceFitter(6, 1, dtype=F64, shrinkage=False, constrain_cov_trace=False, svd_tol=1e-12)
    fitter.update(acts, concept.unsqueeze(1))
    torch.testing.assert_close(erased, fitter.eraser(acts), atol=1e-8, rtol=0)


def test_leace_of_an_unrelated_concept_is_identity() -> None:
    acts = _rand(20, 4, seed=13)
    eraser = fit_leace(acts, torch.ones(20))
    assert eraser.is_identity and torch.equal(eraser(acts), acts)


def test_probe_recovery_high_when_separable_and_chance_after_leace() -> None:
    x_train, y_train = _blobs(300, 4, 2, seed=14)
    x_val, y_val = _blobs(300, 4, 2, seed=15)
    assert probe_recovery(x_train, y_train, x_val, y_val, 0) > 0.95
    eraser = fit_leace(x_train, (y_train == 0).to(F64))
    after = probe_recovery(eraser(x_train), y_train, eraser(x_val), y_val, 0)
    assert abs(after - 0.5) < 0.1


def test_evaluate_seed_every_method_and_identity_shift() -> None:
    k, m = 3, 5
    x_train, y_train = _blobs(150, m, k, seed=16)
    x_val, y_val = _blobs(90, m, k, seed=17)
    weight = torch.zeros(k, m, dtype=F64)
    weight[torch.arange(k), torch.arange(k)] = 1.0  # reads the class means: accurate
    bias = torch.zeros(k, dtype=F64)
    w_dec = torch.cat([torch.eye(m, dtype=F64), _rand(m, 3, seed=18)], dim=1)
    res = evaluate_seed(
        weight, bias, x_train, y_train, x_val, y_val, w_dec, x_train.mean(0), [0, 1, 2],
        projection_alpha=1.0, paper_alpha=8.0, min_base_accuracy=0.5, seed=3,
        shifted_val_acts={"noise": x_val},
    )  # fmt: skip
    assert res["evaluated_classes"] == [0, 1, 2]
    for name in METHODS:
        means = res["methods"][name]
        assert set(METRICS) <= set(means) and "generalisation_noise" in means
        # A "shift" that changes nothing generalises exactly as the edit did on val.
        for row in res["per_class"][name].values():
            assert row["generalisation"] == row["efficacy"] == row["generalisation_noise"]
    base_probe = probe_recovery(x_train, y_train, x_val, y_val, 1)
    assert res["per_class"]["zero_row"]["1"]["probe_recovery"] == base_probe > 0.9
    assert res["methods"]["leace"]["probe_recovery"] < 0.65
    # The dominant latents read the class dimensions: suppressing them hits their classes far
    # more than a random direction or latent does.
    eff = {name: res["methods"][name]["efficacy"] for name in METHODS}
    assert eff["salve_projection"] > max(eff["random_direction"], eff["random_latent"]) + 0.1
    assert eff["zero_row"] > 0.5
    assert res["latents"]["0"]["dominant"] == 0 and res["latents"]["0"]["random"] != 0


def test_feature_stability_recovers_a_permutation_with_sign_flips() -> None:
    ref = _rand(16, 6, seed=19)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0], dtype=F64)
    cur = ref[:, perm] * signs * 2.5 + 1e-3 * _rand(16, 6, seed=20)  # scale does not matter
    inverse = torch.argsort(perm)  # reference latent r sits at column inverse[r]
    out = feature_stability(ref, cur, [3, 0], [int(inverse[3]), int(inverse[4])])
    assert out["match"] == inverse.tolist()
    assert out["matched_fraction"] == 1.0
    assert out["dominant_match"] == [True, False]
    assert out["dominant_match_fraction"] == 0.5
    assert out["dominant_abs_cosine"][0] == pytest.approx(1.0, abs=1e-4)
    # Replace one seed latent by an unrelated direction: its reference latent no longer matches.
    cur2 = cur.clone()
    cur2[:, int(inverse[2])] = _rand(16, seed=21)
    out2 = feature_stability(ref, cur2, [3], [int(inverse[3])])
    assert out2["matched_fraction"] == pytest.approx(5 / 6)


def test_mean_ci95_hand_t_interval() -> None:
    t_975_3 = 3.182446305284263  # Student t, 97.5 % quantile, 3 degrees of freedom
    half = t_975_3 * math.sqrt(5 / 3) / 2  # s = sqrt(5/3) for 1..4, n = 4
    got = mean_ci95([1.0, 2.0, math.nan, 3.0, 4.0])
    assert got["mean"] == pytest.approx(2.5) and got["n"] == 4
    assert got["ci95"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-12)
    assert mean_ci95([0.7]) == {"mean": 0.7, "ci95": [0.7, 0.7], "n": 1}
    empty = mean_ci95([math.nan])
    assert math.isnan(empty["mean"]) and empty["n"] == 0


def test_summarise_methods() -> None:
    per_seed = [
        {"zero_row": {"efficacy": 1.0}, "leace": {"efficacy": 0.2, "probe_recovery": 0.5}},
        {"zero_row": {"efficacy": 1.0}, "leace": {"efficacy": 0.4}},
    ]
    out = summarise_methods(per_seed)
    assert out["zero_row"]["efficacy"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 2}
    t_975_1 = 12.706204736174698
    half = t_975_1 * (math.sqrt(0.02) / math.sqrt(2))
    assert out["leace"]["efficacy"]["ci95"] == pytest.approx([0.3 - half, 0.3 + half])
    assert out["leace"]["probe_recovery"] == {"mean": 0.5, "ci95": [0.5, 0.5], "n": 1}


@pytest.mark.parametrize("kind", ["noise", "blur", "jitter"])
def test_shift_images_deterministic_uint8(kind: str) -> None:
    g = torch.Generator().manual_seed(22)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    a, b, other = (shift_images(images, kind, s) for s in (5, 5, 6))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert torch.equal(a, other) == (kind == "blur")  # blur has no randomness


@pytest.mark.parametrize("size", [(13, 11), (64, 64)])
def test_shifted_rows_batch_by_batch_equal_the_whole_split(size, tmp_path) -> None:
    """evaluate shifts the val split one batch at a time from its file: the same bytes as
    shifting it whole, whatever the batching (the noise streams are per image)."""
    from salve.io import TensorRows, save_tensors

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (11, 3, *size), generator=g, dtype=torch.uint8)
    save_tensors(tmp_path / "val.safetensors", {"images": images})
    on_disk = TensorRows(tmp_path / "val.safetensors", "images")
    for kind in SHIFTS:
        whole = shift_images(images, kind, 7)
        for batch in (1, 4, 11):
            rows = ShiftedRows(on_disk, kind, 7)
            assert rows.shape == tuple(images.shape) and len(rows) == 11
            parts = torch.cat([rows[a : a + batch] for a in range(0, 11, batch)])
            assert torch.equal(parts, whole), (kind, batch)
    with pytest.raises(TypeError, match="row slices"):
        ShiftedRows(images, "noise", 0)[[0, 1]]


def test_shift_images_oracles() -> None:
    grey = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    noisy = shift_images(grey, "noise", 0).to(F64) - 128
    assert abs(float(noisy.std()) - 25.5) < 2.0 and abs(float(noisy.mean())) < 2.0
    assert torch.equal(shift_images(grey, "blur", 0), grey)  # a constant image stays constant
    impulse = torch.zeros(1, 3, 15, 15, dtype=torch.uint8)
    impulse[0, :, 7, 7] = 255
    taps = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / 2)
    centre = float((taps[3] / taps.sum()) ** 2 * 255)
    assert int(shift_images(impulse, "blur", 0)[0, 0, 7, 7]) == round(centre)
    # Colour jitter keeps a grey image grey (R = G = B) while changing its level.
    jittered = shift_images(grey, "jitter", 1)
    assert torch.equal(jittered[:, 0], jittered[:, 1]) and torch.equal(
        jittered[:, 1], jittered[:, 2]
    )
    with pytest.raises(ValueError, match="unknown shift"):
        shift_images(grey, "rotate", 0)
    with pytest.raises(ValueError, match="uint8"):
        shift_images(grey.float(), "noise", 0)


def test_bad_inputs_are_named() -> None:
    c = _hand_case()
    with pytest.raises(ValueError, match="dominant_k"):
        evaluate_seed(
            c["weight"], c["bias"], c["acts"], c["labels"], c["acts"], c["labels"],
            c["w_dec"], c["b_dec"], [0],
            projection_alpha=1.0, paper_alpha=1.0, min_base_accuracy=0.5, seed=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="unknown method"):
        build_edit(
            "nope", c["weight"], c["bias"], 0, 0, c["w_dec"], c["b_dec"], c["acts"], c["labels"],
            projection_alpha=1.0, paper_alpha=1.0, seed=0,
        )  # fmt: skip
    assert np.isfinite(mean_ci95([1.0, 1.0])["ci95"]).all()


def test_seed_free_probes_are_what_evaluate_seed_computes_itself() -> None:
    k, m = 3, 5
    x_train, y_train = _blobs(150, m, k, seed=16)
    x_val, y_val = _blobs(90, m, k, seed=17)
    weight = torch.zeros(k, m, dtype=F64)
    weight[torch.arange(k), torch.arange(k)] = 1.0
    bias = torch.zeros(k, dtype=F64)
    w_dec = torch.cat([torch.eye(m, dtype=F64), _rand(m, 3, seed=18)], dim=1)
    opts = {"projection_alpha": 1.0, "min_base_accuracy": 0.5}
    known = seed_free_probes(weight, bias, x_train, y_train, x_val, y_val, **opts)
    # one unedited, one mean-difference and one LEACE probe per evaluated class
    assert sorted(known) == sorted(
        f"{kind}/{c}" for kind in ("identity", "mean_difference", "leace") for c in range(k)
    )
    args = (weight, bias, x_train, y_train, x_val, y_val, w_dec, x_train.mean(0), [0, 1, 2])
    for seed in (3, 4):
        kwargs = opts | {"paper_alpha": 8.0, "seed": seed}
        assert evaluate_seed(*args, **kwargs, known_probes=known) == evaluate_seed(*args, **kwargs)
    # and the known values are the ones used: a marked value shows up where it belongs
    marked = known | {"leace/1": 0.123, "identity/2": 0.456}
    res = evaluate_seed(*args, **opts, paper_alpha=8.0, seed=3, known_probes=marked)
    assert res["per_class"]["leace"]["1"]["probe_recovery"] == 0.123
    assert res["per_class"]["zero_row"]["2"]["probe_recovery"] == 0.456  # head-only edit
    for name in ("salve_paper", "salve_projection"):  # they rescale or project the input
        assert res["per_class"][name]["2"]["probe_recovery"] != 0.456


def test_a_job_with_a_fitted_sae_uses_it_and_the_others_fit_their_seed(monkeypatch) -> None:
    # evaluate's first seed is the pipeline's own SAE (fitted with common.seed by fit_sae): its
    # job carries that SAE and fits nothing; the other seeds fit one each, with their seed.
    import salve.evaluate.stage as stage
    from salve.config import SaeConfig
    from salve.sae import fit_sae

    k, m = 3, 5
    x_train, y_train = _blobs(150, m, k, seed=16)
    x_val, y_val = _blobs(90, m, k, seed=17)
    x_train, x_val = x_train.float(), x_val.float()
    weight = torch.zeros(k, m)
    weight[torch.arange(k), torch.arange(k)] = 1.0
    cfg = SaeConfig(kind="relu", width=6, epochs=3, batch_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs fit: one thread
    try:
        given, _ = fit_sae(x_train, cfg, seed=11, progress=False)
    finally:
        torch.set_num_threads(threads)
    fitted_seeds = []

    def recording_fit(acts, sae_cfg, *, seed, progress):
        fitted_seeds.append(seed)
        return fit_sae(acts, sae_cfg, seed=seed, progress=progress)

    monkeypatch.setattr(stage, "fit_sae", recording_fit)
    job = {
        "known_probes": None, "train_sample": None, "reproducible": True, "sae": cfg,
        "train_acts": x_train, "train_labels": y_train, "val_acts": x_val, "val_labels": y_val,
        "weight": weight, "bias": torch.zeros(k), "shifted": {}, "shifted_rows": None,
        "projection_alpha": 1.0,
        "paper_alpha": 8.0, "min_base_accuracy": 0.5,
    }  # fmt: skip
    reused = stage.fit_and_evaluate(job | {"seed": 0, "fitted": given})
    assert fitted_seeds == [] and torch.equal(reused["w_dec"], given.W_dec.detach())
    refit = stage.fit_and_evaluate(job | {"seed": 11, "fitted": None})
    assert fitted_seeds == [11]
    assert torch.equal(refit["w_dec"], reused["w_dec"])  # same seed, same data: the same SAE
    assert refit["dominant"] == reused["dominant"]


# --- salve_steer: activation steering as an evaluated method --------------------------------


def _identity_relu_sae(m: int):
    """A ReLU SAE with W_enc = W_dec = I and zero biases: z = relu(a), so steering latent c
    at alpha = 1 (ablation) clips a_c at 0, a hand-checkable representation."""
    from salve.sae import build_sae

    sae = build_sae("relu", m, m).to(F64).eval()
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(m, dtype=F64))
        sae.decoder.weight.copy_(torch.eye(m, dtype=F64))
        sae.encoder.bias.zero_()
        sae.decoder.bias.zero_()
    return sae


def _clipped(x: torch.Tensor, c: int) -> torch.Tensor:
    out = x.clone()
    out[:, c] = out[:, c].clamp(max=0.0)
    return out


def test_salve_steer_row_against_a_hand_representation() -> None:
    from salve.evaluate import per_class_accuracy
    from salve.methods import SAE_METHODS

    k, m = 3, 5
    x_train, y_train = _blobs(150, m, k, seed=16)
    x_val, y_val = _blobs(90, m, k, seed=17)
    weight = torch.zeros(k, m, dtype=F64)
    weight[torch.arange(k), torch.arange(k)] = 1.0
    bias = torch.zeros(k, dtype=F64)
    sae = _identity_relu_sae(m)
    args = (weight, bias, x_train, y_train, x_val, y_val, sae.W_dec.detach(), sae.b_dec.detach())
    opts = {"projection_alpha": 1.0, "paper_alpha": 8.0, "min_base_accuracy": 0.5, "seed": 3}
    res = evaluate_seed(*args, [0, 1, 2], **opts, shifted_val_acts={"noise": x_val}, sae=sae)
    assert list(res["methods"]) == [*METHODS, *SAE_METHODS]
    steer = res["methods"]["salve_steer"]
    assert set(METRICS) <= set(steer) and res["settings"]["steer_alpha"] == 1.0
    for target in range(k):
        edit = build_edit(
            "salve_steer", weight, bias, target, target, sae.W_dec, sae.b_dec, x_train, y_train,
            projection_alpha=1.0, paper_alpha=8.0, seed=0, sae=sae,
        )  # fmt: skip
        torch.testing.assert_close(edit.represent(x_val), _clipped(x_val, target))
        torch.testing.assert_close(edit.logits(x_val), _clipped(x_val, target) @ weight.T)
        row = res["per_class"]["salve_steer"][str(target)]
        before = per_class_accuracy((x_val @ weight.T).argmax(1), y_val, k)
        after = per_class_accuracy((_clipped(x_val, target) @ weight.T).argmax(1), y_val, k)
        assert row["efficacy"] == pytest.approx(float(before[target] - after[target]))
        assert row["generalisation"] == row["efficacy"]  # the identity "shift"
        # probe recovery reads a', the representation the steered model uses
        probe = probe_recovery(_clipped(x_train, target), y_train, _clipped(x_val, target), y_val,
                               target)  # fmt: skip
        assert row["probe_recovery"] == probe
    assert steer["efficacy"] > 0.5  # the dominant latents carry their classes
    # without the SAE the default leaves steering out, and asking for it is an error
    assert "salve_steer" not in evaluate_seed(*args, [0, 1, 2], **opts, probe=False)["methods"]
    with pytest.raises(ValueError, match="need the SAE"):
        evaluate_seed(*args, [0, 1, 2], **opts, methods=("salve_steer",))


def test_tiny_project_evaluate_has_a_salve_steer_row_with_intervals(
    built_project_template,
) -> None:
    import csv

    from salve.io import read_json

    root = built_project_template
    m = read_json(root / "metrics" / "evaluate.json")
    steer = m["methods"]["salve_steer"]
    for key in ("efficacy", "specificity_mean", "specificity_worst", "generalisation",
                "probe_recovery"):  # fmt: skip
        v = steer[key]
        assert v["n"] == m["seeds"] == 2, key
        lo, hi = v["ci95"]
        assert math.isfinite(v["mean"]) and lo <= v["mean"] <= hi, key
    assert m["settings"]["steer_alpha"] == 1.0
    with open(root / "plots" / "evaluate" / "methods.csv", newline="") as fh:
        assert "salve_steer" in {r["method"] for r in csv.DictReader(fh)}


def test_tiny_project_edit_stage_in_steer_mode_ships_the_rule(built_project) -> None:
    """edit.mode=steer on the tiny project: the saved model, loaded with load_classifier,
    gives on the val images head(a') of the rule computed from cached activations, the SAE
    and the original head; the report inputs carry the projection edit beside it."""
    import copy
    import dataclasses

    import salve
    import tasks.edit as edit_stage
    from salve.activations import batched_forward
    from salve.config import load
    from salve.io import read_json
    from salve.steering import Steer, SteeredClassifier, steer_activations
    from tasks.artifacts import load_activations, load_model, load_sae, open_split

    root = built_project
    cfg = load(root / "params.yaml")
    cfg = dataclasses.replace(cfg, edit=dataclasses.replace(cfg.edit, mode="steer"))
    edit_stage.run(cfg, root, progress=False)
    metrics = read_json(root / "metrics" / "edit.json")
    rec = metrics["checkpoint_edit"]
    assert rec["mode"] == "steer" and metrics["companion"]["mode"] == "projection"
    assert set(metrics["companion"]["per_class"]) == set(metrics["per_class"])
    latents = read_json(root / "results" / "edit" / "latents.json")
    assert latents["companion_mode"] == "projection"
    assert all(
        len(x["companion_class_change"]) == len(x["class_change"]) for x in latents["latents"]
    )

    steered = salve.load_classifier(root / "results" / "edit" / "model.safetensors")
    assert isinstance(steered, SteeredClassifier)
    sidecar = read_json(root / "results" / "edit" / "model.json")
    norm = sidecar["normalisation"]
    images, _ = open_split(root, "val")
    logits = batched_forward(steered, steered, images, tuple(norm["mean"]), tuple(norm["std"]))
    acts, _ = load_activations(root, "val")
    sae, _ = load_sae(root)
    base, _ = load_model(root)
    head = base.get_submodule(sidecar["head"])
    step = Steer(rec["feature"], rec["alpha_abs"], rec["sign"])
    rule = steer_activations(acts.double(), copy.deepcopy(sae).double(), step)
    want = rule @ head.weight.detach().double().T + head.bias.detach().double()
    assert float((logits.double() - want).abs().max()) < 1e-4
    # alpha = 0: the original logits bit for bit
    steered.steer.steers = (Steer(rec["feature"], 0.0, rec["sign"]),)
    zero = batched_forward(steered, steered, images, tuple(norm["mean"]), tuple(norm["std"]))
    plain = batched_forward(base, base, images, tuple(norm["mean"]), tuple(norm["std"]))
    assert torch.equal(zero, plain)


def test_train_rows_all_up_to_the_sample_then_a_seeded_sorted_subset() -> None:
    from salve.evaluate.seed import train_rows

    assert train_rows(50, None) == slice(None) and train_rows(50, 50) == slice(None)
    rows = train_rows(1000, 300)
    assert rows.shape == (300,) and rows.unique().numel() == 300
    assert bool((rows[1:] > rows[:-1]).all()) and int(rows.min()) >= 0 and int(rows.max()) < 1000
    assert torch.equal(rows, train_rows(1000, 300))  # the same rows for every probe


def test_train_sample_changes_nothing_when_the_train_set_fits_and_bounds_the_rows_otherwise(
    monkeypatch,
) -> None:
    from salve.evaluate import seed as seed_module

    g = torch.Generator().manual_seed(1)
    k, m, n = 3, 6, 60
    x_train, y_train = torch.randn(n, m, generator=g), torch.arange(n) % k
    x_val, y_val = torch.randn(30, m, generator=g), torch.arange(30) % k
    weight, bias = torch.randn(k, m, generator=g), torch.zeros(k)
    common = dict(projection_alpha=1.0, min_base_accuracy=0.0)
    full = seed_module.seed_free_probes(weight, bias, x_train, y_train, x_val, y_val, **common)
    same = seed_module.seed_free_probes(
        weight, bias, x_train, y_train, x_val, y_val, train_sample=n, **common
    )
    assert same == full
    sizes = []
    real = seed_module.probe_recovery

    def recording(train_reps, *args, **kwargs):
        sizes.append(train_reps.shape[0])
        return real(train_reps, *args, **kwargs)

    monkeypatch.setattr(seed_module, "probe_recovery", recording)
    sampled = seed_module.seed_free_probes(
        weight, bias, x_train, y_train, x_val, y_val, train_sample=24, **common
    )
    assert sizes and set(sizes) == {24}
    # the baselines (mean difference, LEACE) are fitted on those rows too: the same numbers as
    # an evaluation given only them
    rows = seed_module.train_rows(n, 24)
    monkeypatch.setattr(seed_module, "probe_recovery", real)
    only = seed_module.seed_free_probes(
        weight, bias, x_train[rows], y_train[rows], x_val, y_val, **common
    )
    assert sampled == only


def test_evaluate_seed_on_a_train_sample_is_evaluate_seed_on_those_rows() -> None:
    """Every method's numbers with ``train_sample`` are those of an evaluation given only the
    sampled train rows (mean difference and LEACE fitted on them, probes too)."""
    from salve.evaluate.seed import evaluate_seed, train_rows

    g = torch.Generator().manual_seed(3)
    k, m, n = 3, 6, 90
    x_train, y_train = torch.randn(n, m, generator=g), torch.arange(n) % k
    x_val, y_val = torch.randn(30, m, generator=g), torch.arange(30) % k
    weight = torch.randn(k, m, generator=g)
    w_dec, b_dec = torch.randn(m, 4, generator=g), torch.zeros(m)
    common = dict(
        projection_alpha=1.0, paper_alpha=1.0, min_base_accuracy=0.0, seed=0,
        methods=("mean_difference", "leace", "salve_projection"),
    )  # fmt: skip
    rest = (x_val, y_val, w_dec, b_dec, torch.tensor([0, 1, 2]))
    rows = train_rows(n, 40)
    sampled = evaluate_seed(weight, torch.zeros(k), x_train, y_train, *rest, train_sample=40,
                            **common)  # fmt: skip
    only = evaluate_seed(weight, torch.zeros(k), x_train[rows], y_train[rows], *rest, **common)
    assert sampled == only
    whole = evaluate_seed(weight, torch.zeros(k), x_train, y_train, *rest, **common)
    assert whole["methods"]["mean_difference"] != sampled["methods"]["mean_difference"]


def test_generalisation_on_a_sample_of_val_is_the_efficacy_on_those_rows() -> None:
    """Unshifted "shifted" activations of a sample of val rows: the generalisation is then the
    efficacy an evaluation of those rows alone measures; all rows give the efficacy itself."""
    g = torch.Generator().manual_seed(2)
    k, m = 3, 5
    x_train, y_train = torch.randn(90, m, generator=g), torch.arange(90) % k
    x_val, y_val = torch.randn(40, m, generator=g), torch.arange(40) % k
    weight = torch.randn(k, m, generator=g)
    w_dec, b_dec = torch.randn(m, 4, generator=g), torch.zeros(m)
    common = dict(
        projection_alpha=1.0, paper_alpha=1.0, min_base_accuracy=0.0, seed=0,
        methods=("salve_projection", "zero_row"), probe=False,
    )  # fmt: skip
    args = (weight, torch.zeros(k), x_train, y_train)
    rows = torch.tensor([1, 4, 5, 9, 11, 20, 21, 30, 33, 39])
    sampled = evaluate_seed(
        *args, x_val, y_val, w_dec, b_dec, [0, 1, 2],
        shifted_val_acts={"noise": x_val[rows]}, shifted_rows=rows, **common,
    )  # fmt: skip
    alone = evaluate_seed(*args, x_val[rows], y_val[rows], w_dec, b_dec, [0, 1, 2], **common)
    whole = evaluate_seed(
        *args, x_val, y_val, w_dec, b_dec, [0, 1, 2],
        shifted_val_acts={"noise": x_val}, shifted_rows=torch.arange(40), **common,
    )  # fmt: skip
    for method in ("salve_projection", "zero_row"):
        for target in ("0", "1", "2"):
            got = sampled["per_class"][method][target]["generalisation_noise"]
            assert got == pytest.approx(alone["per_class"][method][target]["efficacy"])
            w = whole["per_class"][method][target]
            assert w["generalisation_noise"] == pytest.approx(w["efficacy"])
    with pytest.raises(ValueError, match="val rows shifted"):
        evaluate_seed(
            *args, x_val, y_val, w_dec, b_dec, [0, 1, 2],
            shifted_val_acts={"noise": x_val}, shifted_rows=rows, **common,
        )  # fmt: skip
