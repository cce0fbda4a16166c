"""Probe factories and validation-set tuning.

Every probe is an sklearn classifier (``fit(X, y) -> self``, ``predict``) built by a
registered factory ``make_<name>(*, seed, **params)``; a grid is tuned on the validation set
by macro F1 (over all training classes) and the chosen model is the one fitted on train only.
The test cells never take part in a choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from threadpoolctl import threadpool_limits

from scfmbench.evaluation.metrics import averaged_f1
from scfmbench.registry import Registry

Classifier = Any
"""A scikit-learn-style classifier with ``fit(X, y)`` and ``predict(X)`` (a pipeline, an
``XGBClassifier``, a ``KNeighborsClassifier``): scikit-learn declares no common type for it."""


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSpec:
    """A probe factory and the hyper-parameter grid tuned on the validation set."""

    factory: Callable[..., Classifier]
    grid: tuple[dict[str, Any], ...] = ({},)
    uses_validation_for_early_stopping: bool = False


PROBES: Registry = Registry("probe")


def make_logreg(*, seed: int, C: float = 1.0) -> Classifier:
    """Standardized features + L2 logistic regression (lbfgs, multinomial)."""
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed)
    )


XGBOOST_MAX_BIN = 64
"""Histogram bins per feature of the xgboost probe (xgboost's own default is 256).

A probe fits a few thousand cells, and the split search over 256 bins of every embedding
dimension took most of its time: 64 bins fit 2.3-2.5x faster. On PBMC3k (5 folds, 50 and 256
HVG principal components) the mean test macro F1 moved by -0.002 and -0.0045 against 256 bins,
while single folds spread over 0.05 (``benchmarks/probe_cost.py``)."""


def make_xgboost(*, seed: int, n_estimators: int = 300, max_depth: int = 6) -> Classifier:
    """Gradient-boosted trees (hist, ``XGBOOST_MAX_BIN`` bins), early-stopped on validation."""
    from xgboost import XGBClassifier

    return XGBClassifier(
        n_estimators=n_estimators,
        max_depth=max_depth,
        learning_rate=0.1,
        subsample=1.0,
        tree_method="hist",
        max_bin=XGBOOST_MAX_BIN,
        n_jobs=1,  # OpenMP threads thrash badly when the cores are shared; 1 is as fast
        random_state=seed,
        early_stopping_rounds=20,  # on XGBoost's default log loss (mlogloss; logloss for 2
    )  # classes, e.g. a held-out-group fold that trains on two)


def make_knn(*, seed: int, n_neighbors: int = 15) -> Classifier:
    """k-nearest neighbours on cosine distance.

    Rows are scaled to unit length first: between unit vectors the Euclidean distance is
    ``sqrt(2 - 2 cos)``, so the neighbours are those of the cosine distance, and
    scikit-learn's compiled Euclidean search replaces the cosine distance matrix it would
    otherwise build in NumPy (7-12x faster at 40,000 training cells).
    """
    del seed  # deterministic
    return make_pipeline(
        Normalizer(norm="l2"),
        KNeighborsClassifier(n_neighbors=n_neighbors, metric="euclidean", algorithm="brute"),
    )


def make_majority(*, seed: int) -> Classifier:
    """Make a classifier that always predicts the most frequent training class.

    It is the floor every method must beat.
    """
    return DummyClassifier(strategy="most_frequent", random_state=seed)


LOGREG_C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 8))
"""Inverse L2 strengths tried for the logistic-regression probe: 1e-4, 1e-3, …, 1e3."""
STUDY_LOGREG_C_GRID = (0.01, 0.1, 1.0)
"""The study's grid (``--design study`` keeps it, so old numbers are reproduced)."""

PROBES.register("logreg")(ProbeSpec(make_logreg, grid=tuple({"C": c} for c in LOGREG_C_GRID)))
PROBES.register("xgboost")(ProbeSpec(make_xgboost, uses_validation_for_early_stopping=True))
PROBES.register("knn")(
    ProbeSpec(make_knn, grid=({"n_neighbors": 5}, {"n_neighbors": 15}, {"n_neighbors": 30}))
)
PROBES.register("majority")(ProbeSpec(make_majority))


@dataclass
class FittedProbe:
    """The chosen estimator, its parameters and its validation macro F1."""

    name: str
    estimator: Classifier
    params: dict[str, Any]
    val_macro_f1: float
    on_grid_edge: bool = False

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict the class code (int64) of every row of ``X`` (cells × features)."""
        return np.asarray(self.estimator.predict(X)).astype(np.int64)


def fit_probe(
    name: str,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int,
    grid: tuple[dict[str, Any], ...] | None = None,
) -> FittedProbe:
    """Fit probe ``name`` on train, choosing grid parameters by validation macro F1.

    ``grid`` replaces the probe's registered grid (e.g. other logistic-regression C values).

    ``y_*`` are integer class codes ``0..K-1``; every class must occur in ``y_train``.
    Validation macro F1 averages all K classes; the first of equal scores wins. When the
    chosen value is the first or last of a grid of ≥ 3 values, ``on_grid_edge`` is set (the
    run warns once per method: a wider grid might score better). When every grid point's
    pipeline has the same steps before the classifier (the scaling), they are fitted once.
    """
    spec: ProbeSpec = PROBES.get(name)
    if grid is not None:
        spec = ProbeSpec(spec.factory, tuple(grid), spec.uses_validation_for_early_stopping)
    labels = np.arange(int(max(y_train.max(initial=0), y_val.max(initial=0))) + 1)
    best: FittedProbe | None = None
    best_index = 0
    grid_params = [_sized(name, params, len(y_train)) for params in spec.grid]
    estimators = [spec.factory(seed=seed, **params) for params in grid_params]
    # one BLAS thread: lbfgs on a few thousand cells gains nothing from more, and threads
    # contending for shared cores made one logistic-regression fit 25x slower
    with threadpool_limits(limits=1, user_api="blas"):
        prefix = _shared_prefix(estimators)
        data = (X_train, y_train, X_val, y_val)
        if prefix is not None:
            prefix.fit(X_train)
            data = (prefix.transform(X_train), y_train, prefix.transform(X_val), y_val)
        for index, (params, estimator) in enumerate(zip(grid_params, estimators, strict=True)):
            final = estimator if prefix is None else estimator.steps[-1][1]
            score = _fit_and_score(final, spec, data, labels)
            if prefix is not None:
                estimator = Pipeline([*prefix.steps, estimator.steps[-1]])
            if best is None or score > best.val_macro_f1:
                best, best_index = FittedProbe(name, estimator, params, score), index
    assert best is not None  # the grid is never empty
    if len(spec.grid) >= 3 and best_index in (0, len(spec.grid) - 1):
        best.on_grid_edge = True
        logger.debug(
            "probe %s: the best validation value %s is on the edge of the grid %s",
            name,
            best.params,
            [dict(p) for p in (spec.grid[0], spec.grid[-1])],
        )
    logger.debug("probe %s: chose %s (val macro F1 %.3f)", name, best.params, best.val_macro_f1)
    return best


def _sized(name: str, params: dict[str, Any], n_train: int) -> dict[str, Any]:
    """``params`` with the kNN neighbour count capped at the training cells."""
    params = dict(params)
    if name == "knn":
        params["n_neighbors"] = min(params["n_neighbors"], n_train)
    return params


def _shared_prefix(estimators: list[Classifier]) -> Pipeline | None:
    """Return the steps before the classifier, unfitted, when every grid point has the same.

    A grid that changes only the classifier (the C of the logistic regression, the k of the
    kNN) then fits the scaling once instead of once per grid point. The fitted pipelines are
    the same: the scaling is fitted on the training cells either way. ``None`` when the
    estimators are not pipelines or their steps before the classifier differ.
    """
    if len(estimators) < 2 or not all(isinstance(e, Pipeline) for e in estimators):
        return None

    def settings(pipeline: Pipeline) -> list:
        return [(n, type(t), t.get_params()) for n, t in pipeline.steps[:-1]]

    first = settings(estimators[0])
    try:
        differ = any(settings(e) != first for e in estimators[1:])
    except ValueError:  # a setting that is an array has no single truth value: do not share
        return None
    if not first or differ:
        return None
    return Pipeline([(n, clone(t)) for n, t in estimators[0].steps[:-1]])


def _fit_and_score(estimator: Classifier, spec: ProbeSpec, data, labels: np.ndarray) -> float:
    """Fit ``estimator`` on train and return its validation macro F1 over ``labels``."""
    X_train, y_train, X_val, y_val = data
    if spec.uses_validation_for_early_stopping:
        estimator.fit(X_train, y_train, eval_set=[(X_val, y_val)], verbose=False)
    else:
        estimator.fit(X_train, y_train)
    predicted = np.asarray(estimator.predict(X_val)).astype(np.int64)
    return averaged_f1(y_val, predicted, labels=labels)
