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


def test_logreg_grid_scales_once_and_matches_one_pipeline_per_c():
    """The grid shares one fitted scaler; each C's fit equals its own pipeline's, refitted
    from scratch, and the chosen C is the first best on validation."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from scfmbench.evaluation.probes import LOGREG_C_GRID, make_logreg

    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 20))
    y = rng.integers(0, 3, 400)
    X = (centres[y] + 2.5 * rng.normal(size=(400, 20))) * rng.uniform(0.5, 20, 20)
    X = X.astype(np.float32)
    train, val = slice(0, 300), slice(300, 400)
    fits = StandardScaler.fit
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return fits(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StandardScaler, "fit", counted)
        fitted = fit_probe("logreg", X[train], y[train], X[val], y[val], seed=0)
    assert len(calls) == 1  # once for the 8 values of C

    scores = []
    for c in LOGREG_C_GRID:
        oracle = make_logreg(seed=0, C=c).fit(X[train], y[train])
        scores.append(f1_score(y[val], oracle.predict(X[val]), average="macro"))
    chosen = LOGREG_C_GRID[int(np.argmax(scores))]
    assert fitted.params == {"C": chosen}
    assert fitted.val_macro_f1 == pytest.approx(max(scores), abs=1e-12)
    oracle = make_logreg(seed=0, C=chosen).fit(X[train], y[train])
    np.testing.assert_array_equal(fitted.estimator[-1].coef_, oracle[-1].coef_)
    np.testing.assert_array_equal(fitted.predict(X[val]), oracle.predict(X[val]))
    assert len(set(scores)) > 1  # the choice is not a tie, so the test can fail


def test_grid_shares_no_scaling_when_the_steps_before_the_classifier_differ():
    """A grid whose pipelines scale differently fits each one as it is: the features shrunk
    to 1e-6 leave the regularized fit predicting one class, so the second point wins."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from scfmbench.evaluation.probes import PROBES, ProbeSpec

    def factory(*, seed, scale):
        step = FunctionTransformer(
            lambda X, factor: X * factor, kw_args={"factor": np.full(3, scale)}
        )
        return make_pipeline(step, LogisticRegression(random_state=seed))

    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    PROBES.register("scaled")(ProbeSpec(factory, grid=({"scale": 1e-6}, {"scale": 1.0})))
    try:
        fitted = fit_probe("scaled", X[:60], y[:60], X[60:], y[60:], seed=0)
    finally:
        PROBES._entries.pop("scaled", None)
    assert fitted.params == {"scale": 1.0}
    assert fitted.estimator[0].kw_args["factor"][0] == 1.0
    assert fitted.val_macro_f1 > 0.8
