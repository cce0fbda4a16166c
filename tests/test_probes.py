"""The probes' estimators against slow, independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from scfmbench.evaluation.probes import fit_probe, make_knn


def cosine_knn_oracle(X_train, y_train, X_query, k):
    """Majority vote of the k training rows of smallest cosine distance, one query at a time
    (ties in the vote go to the smallest class code, as in scikit-learn)."""
    predicted = []
    for query in X_query:
        distances = [
            1.0 - float(np.dot(query, row)) / (np.linalg.norm(query) * np.linalg.norm(row))
            for row in X_train
        ]
        nearest = np.argsort(distances, kind="stable")[:k]
        predicted.append(int(np.argmax(np.bincount(y_train[nearest], minlength=4))))
    return np.array(predicted)


@pytest.mark.parametrize("k", [1, 5, 15])
def test_knn_probe_votes_among_the_cosine_nearest_cells(k):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 12))
    y_train = rng.integers(0, 4, 300)
    # rows of very different lengths: cosine ignores length, Euclidean on raw rows would not
    X_train = (centres[y_train] + rng.normal(size=(300, 12))) * rng.uniform(0.1, 50, (300, 1))
    y_query = rng.integers(0, 4, 80)
    X_query = (centres[y_query] + rng.normal(size=(80, 12))) * rng.uniform(0.1, 50, (80, 1))
    probe = make_knn(seed=0, n_neighbors=k).fit(X_train.astype(np.float32), y_train)
    predicted = probe.predict(X_query.astype(np.float32))
    np.testing.assert_array_equal(predicted, cosine_knn_oracle(X_train, y_train, X_query, k))
    raw = np.argmin(((X_query[:, None] - X_train[None]) ** 2).sum(-1), axis=1)
    if k == 1:  # the lengths matter to a Euclidean search on raw rows: the test can fail
        assert (y_train[raw] != predicted).sum() > 0


def test_knn_probe_caps_k_at_the_training_cells():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 5)).astype(np.float32)
    y = np.repeat(np.arange(2), 10)
    X[y == 1, 0] += 6
    fitted = fit_probe("knn", X[[0, 1, 10, 11]], y[[0, 1, 10, 11]], X[2:10], y[2:10], seed=0)
    assert fitted.params == {"n_neighbors": 4}  # 5, 15 and 30 all become the 4 training cells
    assert fitted.estimator[-1].n_neighbors == 4
