"""Few-shot linear evaluation (paper §4.1, "Metrics"): closed-form regularised least squares.

Frozen representations of k examples per class are regressed onto {-1, 1}^K targets (+1 for the
true class, -1 elsewhere); the class with the largest regression output is the prediction.

Choices, and why:

1. Feature normalisation (``normalize``), fitted on the k-shot set only, then applied unchanged to
   held-out and test features:
   - ``"standardize"`` (default): per-dimension z-score with the fit set's mean and std (+1e-5, so a
     constant dimension maps to ~0 instead of dividing by zero). This is big_vision's whitening; it
     makes the result invariant to per-dimension feature scale, so one l2 grid suits every model.
   - ``"l2"``: each feature vector scaled to unit norm (no statistics; invariant to per-sample scale).
   - ``"none"``: raw features.
2. Bias: the intercept is fitted *unregularised*, by centering features and targets on the fit set's
   means and solving ridge on the centered data (b = ȳ - x̄ W). This is the exact minimiser of
   ||XW + 1b - Y||² + l2 ||W||², the same problem as ``sklearn.linear_model.Ridge(fit_intercept=True)``;
   big_vision's alternative (appending a large constant column) only approximately un-regularises it.
3. Solver: float64 throughout. With N samples and D dimensions the ridge solution is either
   (XᵀX + l2 I)⁻¹ XᵀY (a D×D system, "primal") or Xᵀ (XXᵀ + l2 I)⁻¹ Y (N×N, "dual"); we eigendecompose
   whichever Gram matrix is smaller, once, after which every l2 candidate costs only matrix products.
   1-shot on 10 classes (N=10 ≪ D) and 25-shot on ImageNet (N=25000 ≫ D) both occur.
4. Choosing l2 (``few_shot_eval``): never on the test set. For each draw the k-shot set S is sampled
   from the training pool; a *proxy* problem of the same shape — another k examples per class plus
   up to ``holdout_per_class`` held-out examples per class, all disjoint from S — is sampled from the
   rest of the pool; every l2 candidate is fitted on the proxy shots and scored on the held-out ones;
   the winner is refitted on S. Same-size proxies matter because the best l2 depends on N (a 1-shot
   problem cannot be split, and l2 tuned on 25 examples per class would be wrong for 1). This uses
   labelled training examples beyond the k shots, as any hyperparameter search on a validation split
   does; pass a one-value ``l2_grid`` for a strict k-shot protocol that uses nothing else.
5. A k is skipped (with the reason recorded) when some class has fewer than k training examples, or,
   when l2 is being chosen, fewer than 2k + 1 (k shots, k proxy shots, at least one held out).

Randomness: draw d of k uses ``np.random.default_rng([seed, k, d])``, so a result depends only on
(seed, k, d), not on which other k values or how many draws were requested.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["DEFAULT_L2_GRID", "Normalize", "sample_k_shot", "fit_ridge", "predict", "choose_l2", "few_shot_eval"]

logger = logging.getLogger(__name__)

Normalize = Literal["standardize", "l2", "none"]

# Powers of 4 from 1/4 to 2^14. With standardised features the Gram matrices scale with N (primal) or
# D (dual), so useful values span from "almost unregularised" to "a few times D".
DEFAULT_L2_GRID: tuple[float, ...] = tuple(2.0**p for p in range(-2, 15, 2))

_STD_EPS = 1e-5  # added to per-dimension std: constant dimensions map to ~0 instead of exploding


def _check_labels(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} is out of range for num_classes={num_classes}")
    return labels


def _check_features(features: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {features.shape}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} has {features.shape[0]} rows but there are {labels.shape[0]} labels")
    return features


def sample_k_shot(labels: np.ndarray, k: int, rng: np.random.Generator, num_classes: int | None = None) -> np.ndarray:
    """Sorted indices into ``labels`` with exactly ``k`` distinct examples of every class.

    The classes are ``range(num_classes)`` when given (so an absent class is an error), else those
    present in ``labels``. Raises ``ValueError`` if any class has fewer than ``k`` examples.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = _check_labels(labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes or 0)
    classes = np.arange(num_classes) if num_classes is not None else np.flatnonzero(counts)
    short = [int(c) for c in classes if counts[c] < k]
    if short:
        raise ValueError(f"k={k}: class {short[0]} has {counts[short[0]]} examples"
                         + (f" (and {len(short) - 1} more classes are short)" if len(short) > 1 else ""))
    # One stable sort instead of a scan per class: ImageNet has 1000 classes and 1.28M labels.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picked = [order[starts[c] + rng.choice(counts[c], size=k, replace=False)] for c in classes]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    y = -np.ones((labels.shape[0], num_classes), dtype=np.float64)  # (N, K)
    y[np.arange(labels.shape[0]), labels] = 1.0
    return y


class _RidgeProblem:
    """Centered ridge regression on one fit set, factorised once so many l2 values are cheap."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        labels = _check_labels(labels, num_classes)
        x = _check_features(features, labels, "features").astype(np.float64)  # (N, D)
        if x.shape[0] == 0:
            raise ValueError("cannot fit ridge regression on zero examples")
        y = _targets(labels, num_classes)  # (N, K)
        self.x_mean, self.y_mean = x.mean(axis=0), y.mean(axis=0)  # (D,), (K,)
        xc, yc = x - self.x_mean, y - self.y_mean
        self.dual = x.shape[0] < x.shape[1]
        gram = xc @ xc.T if self.dual else xc.T @ xc  # (N, N) dual or (D, D) primal
        eigvals, self.q = np.linalg.eigh(gram)
        self.eigvals = np.clip(eigvals, 0.0, None)  # Gram matrices are PSD; clip round-off negatives
        # Everything that does not depend on l2, rotated into the eigenbasis.
        self.rhs = self.q.T @ (yc if self.dual else xc.T @ yc)  # (N, K) or (D, K)
        self.xc = xc if self.dual else None

    def solve(self, l2: float) -> tuple[np.ndarray, np.ndarray]:
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0 (the Gram matrix can be singular), got {l2}")
        inner = self.q @ (self.rhs / (self.eigvals + l2)[:, None])  # (N, K) or (D, K)
        w = self.xc.T @ inner if self.dual else inner  # (D, K)
        return w, self.y_mean - self.x_mean @ w


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Regularised least squares from (N, D) features to {-1, 1}^K targets: (W (D, K), b (K,)), float64.

    Minimises ||X W + 1 bᵀ - Y||² + l2 ||W||²; the bias is unregularised (see the module docstring).
    """
    return _RidgeProblem(features, labels, num_classes).solve(l2)


def predict(w: np.ndarray, b: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Class ids (N,): the argmax of the regression outputs X W + b."""
    return np.argmax(np.asarray(features, dtype=np.float64) @ w + b, axis=1)


def _normalizer(fit_features: np.ndarray, mode: Normalize) -> Callable[[np.ndarray], np.ndarray]:
    """A float64 feature transform fitted on ``fit_features`` only (applied unchanged to other sets)."""
    if mode == "standardize":
        fit = np.asarray(fit_features, dtype=np.float64)
        mean, scale = fit.mean(axis=0), fit.std(axis=0) + _STD_EPS
        return lambda x: (np.asarray(x, dtype=np.float64) - mean) / scale
    if mode == "l2":
        def unit(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return unit
    if mode == "none":
        return lambda x: np.asarray(x, dtype=np.float64)
    raise ValueError(f"normalize must be 'standardize', 'l2' or 'none', got {mode!r}")


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if labels.size else float("nan")


def _select_l2(fit_x: np.ndarray, fit_y: np.ndarray, hold_x: np.ndarray, hold_y: np.ndarray, num_classes: int,
               candidates: Sequence[float], normalize: Normalize) -> tuple[float, list[float]]:
    """Fit every candidate on (fit_x, fit_y), score on the held-out set; best accuracy wins.

    Ties (common with small held-out sets) go to the larger l2: the more conservative model.
    """
    norm = _normalizer(fit_x, normalize)
    problem = _RidgeProblem(norm(fit_x), fit_y, num_classes)
    hold = norm(hold_x)
    scores = [_accuracy(predict(*problem.solve(l2), hold), hold_y) for l2 in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
    return float(candidates[best]), scores


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) index arrays; every class keeps >= 1 example on each side."""
    fit, hold = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < 2:
            raise ValueError(f"class {c} has {idx.size} example(s); a held-out split needs at least 2")
        n_hold = min(max(1, round(idx.size * fraction)), idx.size - 1)
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(hold))


def choose_l2(train_feats: np.ndarray, train_labels: np.ndarray, num_classes: int, candidates: Sequence[float],
              holdout_fraction: float, rng: np.random.Generator, normalize: Normalize = "standardize") -> float:
    """The l2 among ``candidates`` with the best accuracy on a held-out slice of the *training* data.

    The split is stratified: ``holdout_fraction`` of each class (at least one example, never all) is
    held out, the rest is normalised and fitted on, exactly as the final model will be.
    """
    if not candidates:
        raise ValueError("candidates must not be empty")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    labels = _check_labels(train_labels, num_classes)
    feats = _check_features(train_feats, labels, "train_feats")
    fit, hold = _stratified_split(labels, holdout_fraction, rng)
    l2, scores = _select_l2(feats[fit], labels[fit], feats[hold], labels[hold], num_classes, candidates, normalize)
    logger.debug("choose_l2: held-out accuracy per l2 %s -> %g", dict(zip(candidates, scores)), l2)
    return l2


def _skip_reason(counts: np.ndarray, k: int, selecting: bool) -> str | None:
    need = 2 * k + 1 if selecting else k
    c = int(np.argmin(counts))
    if counts[c] >= need:
        return None
    if counts[c] < k:
        return f"needs {k} training examples per class; class {c} has {counts[c]}"
    return (f"choosing l2 needs {need} training examples per class (k shots, k proxy shots, >= 1 held out); "
            f"class {c} has {counts[c]} (a one-value l2_grid evaluates without choosing)")


def few_shot_eval(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray, test_labels: np.ndarray,
                  shots: Sequence[int] = (1, 5, 10, 25), draws: int = 5, seed: int = 0,
                  l2_grid: Sequence[float] = DEFAULT_L2_GRID, *, num_classes: int | None = None,
                  normalize: Normalize = "standardize", holdout_per_class: int = 10) -> dict[str, Any]:
    """k-shot linear-probe accuracy on the test set, mean and std over ``draws`` random k-shot sets.

    Returns a JSON-serialisable dict::

        {"num_classes": K, "normalize": ..., "draws": ..., "seed": ..., "l2_grid": [...],
         "shots": {k: {"mean": acc, "std": acc_std, "accuracies": [per draw], "l2": [chosen per draw]}},
         "skipped": {k: "why"}}

    ``std`` is the population std over draws (0 for one draw). Features may be float32 (only the
    sampled subsets are converted to float64, so an ImageNet-sized pool is never copied).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not l2_grid:
        raise ValueError("l2_grid must not be empty")
    if holdout_per_class < 1:
        raise ValueError(f"holdout_per_class must be >= 1, got {holdout_per_class}")
    _normalizer(np.zeros((1, 1)), normalize)  # validate the mode before any work
    train_y, test_y = _check_labels(train_labels), _check_labels(test_labels)
    train_x = _check_features(train_feats, train_y, "train_feats")
    test_x = _check_features(test_feats, test_y, "test_feats")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    if num_classes is None:
        num_classes = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
    if num_classes < 1:
        raise ValueError("few-shot evaluation needs at least one class")
    for labels in (train_y, test_y):
        _check_labels(labels, num_classes)
    counts = np.bincount(train_y, minlength=num_classes)
    selecting = len(l2_grid) > 1

    per_shot: dict[int, dict[str, Any]] = {}
    skipped: dict[int, str] = {}
    for k in sorted(set(int(s) for s in shots)):
        reason = "k must be >= 1" if k < 1 else _skip_reason(counts, k, selecting)
        if reason:
            skipped[k] = reason
            logger.info("few-shot: skipping %d-shot: %s", k, reason)
            continue
        accs, l2s = [], []
        for d in range(draws):
            rng = np.random.default_rng([seed, k, d])
            shot_idx = sample_k_shot(train_y, k, rng, num_classes)
            if selecting:
                l2 = _proxy_l2(train_x, train_y, shot_idx, k, holdout_per_class, counts, num_classes, l2_grid,
                               normalize, rng)
            else:
                l2 = float(l2_grid[0])
            norm = _normalizer(train_x[shot_idx], normalize)
            w, b = fit_ridge(norm(train_x[shot_idx]), train_y[shot_idx], num_classes, l2)
            # The test set is normalised with this draw's k-shot statistics, like any unseen data.
            accs.append(_accuracy(predict(w, b, norm(test_x)), test_y))
            l2s.append(l2)
        per_shot[k] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accuracies": accs, "l2": l2s}
        logger.info("few-shot: %d-shot accuracy %.4f ± %.4f over %d draws (l2 %s)", k, per_shot[k]["mean"],
                    per_shot[k]["std"], draws, l2s)
    return {"num_classes": num_classes, "normalize": normalize, "draws": draws, "seed": seed,
            "l2_grid": [float(v) for v in l2_grid], "shots": per_shot, "skipped": skipped}


def _proxy_l2(train_x: np.ndarray, train_y: np.ndarray, shot_idx: np.ndarray, k: int, holdout_per_class: int,
              counts: np.ndarray, num_classes: int, l2_grid: Sequence[float], normalize: Normalize,
              rng: np.random.Generator) -> float:
    """Choose l2 on a same-size k-shot proxy problem drawn from the pool minus the real k-shot set."""
    available = np.ones(train_y.shape[0], dtype=bool)
    available[shot_idx] = False
    rest = np.flatnonzero(available)
    proxy = rest[sample_k_shot(train_y[rest], k, rng, num_classes)]
    available[proxy] = False
    rest = np.flatnonzero(available)
    n_hold = min(holdout_per_class, int(counts.min()) - 2 * k)  # >= 1, guaranteed by _skip_reason
    hold = rest[sample_k_shot(train_y[rest], n_hold, rng, num_classes)]
    l2, scores = _select_l2(train_x[proxy], train_y[proxy], train_x[hold], train_y[hold], num_classes, l2_grid,
                            normalize)
    logger.debug("few-shot %d-shot: held-out accuracy per l2 %s -> %g", k, dict(zip(l2_grid, scores)), l2)
    return l2
