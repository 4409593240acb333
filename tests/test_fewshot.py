"""Few-shot linear evaluation: the closed-form ridge solver, the k-shot sampler, l2 selection on training
data only, and end-to-end accuracy on synthetic features (separable -> high, random labels -> chance)."""

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from stages.eval.fewshot import choose_l2, few_shot_eval, fit_ridge, predict, sample_k_shot


def blobs(rng: np.random.Generator, num_classes: int, per_class: int, dim: int, spread: float = 6.0,
          noise: float = 1.0, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Isotropic Gaussian blobs around random class centres; returns (features float32, labels, centres)."""
    if centres is None:
        centres = rng.normal(scale=spread / np.sqrt(dim), size=(num_classes, dim)) * np.sqrt(dim)
    labels = np.repeat(np.arange(num_classes), per_class)
    feats = centres[labels] + rng.normal(scale=noise, size=(labels.size, dim))
    return feats.astype(np.float32), labels, centres


@pytest.mark.parametrize("n,dim", [(60, 8), (12, 40)], ids=["primal_n_gt_d", "dual_d_gt_n"])
@pytest.mark.parametrize("l2", [0.1, 10.0])
def test_ridge_matches_sklearn(n, dim, l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)) + rng.normal(size=dim)  # off-centre features: the bias matters
    labels = rng.integers(0, 4, size=n)
    w, b = fit_ridge(x, labels, 4, l2)
    targets = 2.0 * np.eye(4)[labels] - 1.0
    ref = Ridge(alpha=l2, fit_intercept=True, solver="svd").fit(x, targets)
    np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(predict(w, b, x), np.argmax(ref.predict(x), axis=1))
    assert w.dtype == np.float64 and w.shape == (dim, 4) and b.shape == (4,)


def test_ridge_targets_are_plus_minus_one_and_absent_classes_score_low():
    # With tiny l2 and more dims than samples the fit interpolates its targets exactly.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 20))
    labels = np.array([0, 0, 1, 1, 2, 2])
    w, b = fit_ridge(x, labels, 4, 1e-9)
    out = x @ w + b
    np.testing.assert_allclose(out, 2.0 * np.eye(4)[labels] - 1.0, atol=1e-6)
    assert np.all(out[:, 3] < -0.99)  # class 3 never seen: target -1 everywhere


def test_ridge_rejects_nonpositive_l2_and_bad_labels():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="l2"):
        fit_ridge(x, np.array([0, 1, 0, 1]), 2, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        fit_ridge(x, np.array([0, 1, 2, 1]), 2, 1.0)
    with pytest.raises(ValueError, match="integer"):
        fit_ridge(x, np.array([0.0, 1.0, 0.0, 1.0]), 2, 1.0)


def test_sample_k_shot_exact_distinct_and_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(7), [3, 9, 4, 12, 5, 6, 30]))
    idx = sample_k_shot(labels, 3, np.random.default_rng(42))
    assert len(np.unique(idx)) == idx.size == 21
    np.testing.assert_array_equal(np.bincount(labels[idx]), np.full(7, 3))
    np.testing.assert_array_equal(idx, sample_k_shot(labels, 3, np.random.default_rng(42)))
    others = [sample_k_shot(labels, 3, np.random.default_rng(s)) for s in range(5)]
    assert any(not np.array_equal(idx, o) for o in others)
    # k equal to a class's size takes all of it.
    idx = sample_k_shot(labels, 3, np.random.default_rng(1))
    np.testing.assert_array_equal(np.sort(idx[labels[idx] == 0]), np.flatnonzero(labels == 0))


def test_sample_k_shot_errors():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 2"):
        sample_k_shot(labels, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="class 3 has 0"):
        sample_k_shot(labels, 1, np.random.default_rng(0), num_classes=4)
    with pytest.raises(ValueError, match="k must be"):
        sample_k_shot(labels, 0, np.random.default_rng(0))


def test_separable_blobs_give_high_accuracy():
    rng = np.random.default_rng(0)
    train_x, train_y, centres = blobs(rng, 5, 40, 32)
    test_x, test_y, _ = blobs(rng, 5, 40, 32, centres=centres)
    out = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 5, 10), draws=3, seed=0)
    assert out["skipped"] == {}
    assert set(out["shots"]) == {1, 5, 10}
    for k, r in out["shots"].items():
        assert len(r["accuracies"]) == len(r["l2"]) == 3
        assert r["mean"] > (0.8 if k == 1 else 0.95), (k, r)
        assert set(r["l2"]) <= set(out["l2_grid"])
    assert out["shots"][10]["mean"] >= out["shots"][1]["mean"]


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(300, 24)).astype(np.float32)
    train_y = np.repeat(np.arange(5), 60)
    test_x = rng.normal(size=(1000, 24)).astype(np.float32)
    test_y = rng.integers(0, 5, size=1000)
    out = few_shot_eval(train_x, train_y, test_x, test_y, shots=(5, 25), draws=4, seed=0)
    for r in out["shots"].values():
        assert abs(r["mean"] - 0.2) < 0.06, r


def test_deterministic_for_a_seed_and_draws_depend_only_on_seed_k_draw():
    rng = np.random.default_rng(3)
    train_x, train_y, centres = blobs(rng, 4, 30, 16, spread=1.5, noise=1.0)
    test_x, test_y, _ = blobs(rng, 4, 50, 16, spread=1.5, noise=1.0, centres=centres)
    a = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=11)
    b = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=11)
    assert a == b
    c = few_shot_eval(train_x, train_y, test_x, test_y, shots=(5,), draws=2, seed=11)
    assert c["shots"][5]["accuracies"] == a["shots"][5]["accuracies"][:2]
    d = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=12)
    assert d["shots"] != a["shots"]


def test_skips_k_the_data_does_not_allow_and_says_why():
    rng = np.random.default_rng(0)
    train_x, train_y, centres = blobs(rng, 3, 12, 8)
    train_x, train_y = train_x[:-8], train_y[:-8]  # class 2 keeps 4 examples
    test_x, test_y, _ = blobs(rng, 3, 5, 8, centres=centres)
    out = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 2, 5, 25), draws=2)
    assert set(out["shots"]) == {1}  # 2-shot needs 2*2+1 = 5 per class to choose l2
    assert "choosing l2 needs 5" in out["skipped"][2] and "class 2 has 4" in out["skipped"][2]
    assert "needs 5 training examples per class; class 2 has 4" in out["skipped"][5]
    assert "needs 25" in out["skipped"][25]
    # A one-value grid is the strict protocol: only k per class are needed.
    strict = few_shot_eval(train_x, train_y, test_x, test_y, shots=(1, 2, 5), draws=2, l2_grid=(1.0,))
    assert set(strict["shots"]) == {1, 2} and set(strict["skipped"]) == {5}
    assert strict["shots"][2]["l2"] == [1.0, 1.0]


def test_l2_choice_never_sees_test_labels():
    rng = np.random.default_rng(5)
    train_x, train_y, centres = blobs(rng, 4, 40, 64, spread=1.0, noise=1.0)
    test_x, test_y, _ = blobs(rng, 4, 30, 64, spread=1.0, noise=1.0, centres=centres)
    grid = (1e-2, 1.0, 1e2, 1e4)
    a = few_shot_eval(train_x, train_y, test_x, test_y, shots=(5, 10), draws=3, l2_grid=grid)
    b = few_shot_eval(train_x, train_y, test_x, rng.permutation(test_y), shots=(5, 10), draws=3, l2_grid=grid)
    assert [r["l2"] for r in a["shots"].values()] == [r["l2"] for r in b["shots"].values()]
    assert [r["accuracies"] for r in a["shots"].values()] != [r["accuracies"] for r in b["shots"].values()]


def test_choose_l2_prefers_the_useful_regulariser():
    rng = np.random.default_rng(0)
    # Class is the sign of x0 - x1, but x0 alone is swamped by noise shared with x1. A huge l2 shrinks
    # ridge to W ∝ Xᵀ Y (class-mean differences), which sees only x0's noisy shift; a small l2 learns
    # x0 - x1 and is nearly perfect.
    y = np.repeat(np.arange(2), 40)
    shared = rng.normal(scale=5.0, size=80)
    x = np.stack([(2 * y - 1) * 0.5 + shared + rng.normal(scale=0.05, size=80), shared], axis=1)
    assert choose_l2(x, y, 2, [1e12, 1e-1], 0.25, np.random.default_rng(0)) == 1e-1
    assert choose_l2(x, y, 2, [1e-1, 1e12], 0.25, np.random.default_rng(0)) == 1e-1
    x, y, _ = blobs(rng, 4, 20, 16)
    # Ties (both perfect on separable data) go to the larger, more conservative value.
    assert choose_l2(x, y, 4, [1e-2, 1.0], 0.25, np.random.default_rng(0)) == 1.0
    with pytest.raises(ValueError, match="holdout_fraction"):
        choose_l2(x, y, 4, [1.0], 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2"):
        choose_l2(x[:21], y[:21], 4, [1.0], 0.5, np.random.default_rng(0))  # class 1 has one example


@pytest.mark.parametrize("normalize", ["standardize", "l2", "none"])
def test_normalisation_invariances(normalize):
    rng = np.random.default_rng(2)
    train_x, train_y, centres = blobs(rng, 3, 30, 12, spread=1.5)
    test_x, test_y, _ = blobs(rng, 3, 40, 12, spread=1.5, centres=centres)
    kw = {"shots": (5,), "draws": 2, "normalize": normalize, "l2_grid": (1.0,)}
    base = few_shot_eval(train_x, train_y, test_x, test_y, **kw)["shots"][5]["accuracies"]
    # Standardisation undoes per-dimension scale; unit-norm undoes per-sample scale; raw does neither.
    dim_scale = np.exp(rng.normal(scale=2.0, size=12)).astype(np.float32)
    sample_scale = lambda n: np.exp(rng.normal(scale=2.0, size=(n, 1))).astype(np.float32)  # noqa: E731
    by_dim = few_shot_eval(train_x * dim_scale, train_y, test_x * dim_scale, test_y, **kw)["shots"][5]["accuracies"]
    by_sample = few_shot_eval(train_x * sample_scale(len(train_x)), train_y, test_x * sample_scale(len(test_x)),
                              test_y, **kw)["shots"][5]["accuracies"]
    if normalize == "standardize":
        np.testing.assert_allclose(by_dim, base, atol=1e-12)
    if normalize == "l2":
        np.testing.assert_allclose(by_sample, base, atol=1e-12)
    if normalize == "none":
        assert by_dim != base or by_sample != base


def test_rejects_bad_arguments():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="normalize"):
        few_shot_eval(x, y, x, y, normalize="whiten")
    with pytest.raises(ValueError, match="dims"):
        few_shot_eval(x, y, np.zeros((4, 3)), y)
    with pytest.raises(ValueError, match="rows"):
        few_shot_eval(x, y[:3], x, y)


def test_l2_is_chosen_on_a_same_size_proxy_disjoint_from_the_k_shot_set(monkeypatch):
    import stages.eval.fewshot as fewshot

    rng = np.random.default_rng(0)
    train_x, train_y, centres = blobs(rng, 3, 20, 6)
    train_x = np.concatenate([train_x, np.arange(60, dtype=np.float32)[:, None]], axis=1)  # last column: row id
    test_x, test_y, _ = blobs(rng, 3, 5, 6, centres=centres)
    test_x = np.concatenate([test_x, np.zeros((15, 1), np.float32)], axis=1)
    calls = []
    real = fewshot._select_l2

    def spy(fit_x, fit_y, hold_x, hold_y, *args):
        calls.append((fit_x[:, -1].astype(int), hold_x[:, -1].astype(int)))
        return real(fit_x, fit_y, hold_x, hold_y, *args)

    monkeypatch.setattr(fewshot, "_select_l2", spy)
    out = few_shot_eval(train_x, train_y, test_x, test_y, shots=(4,), draws=2, seed=3, holdout_per_class=5)
    assert len(calls) == 2
    for d, (proxy, hold) in enumerate(calls):
        shots = sample_k_shot(train_y, 4, np.random.default_rng([3, 4, d]), 3)
        assert not set(proxy) & set(shots) and not set(hold) & set(shots) and not set(proxy) & set(hold)
        np.testing.assert_array_equal(np.bincount(train_y[proxy]), [4, 4, 4])  # same shape as the real problem
        np.testing.assert_array_equal(np.bincount(train_y[hold]), [5, 5, 5])
    json.dumps(out)  # the result is JSON-serialisable as is
