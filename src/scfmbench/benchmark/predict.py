"""Fitting each method's probe on its features and predicting the test cells.

The prediction cache lets a rerun skip every finished fit.

A :class:`Prediction` is what one method predicts on one split; the run, the held-out
comparison's random splits, the label-efficiency sweep and a transfer all make them here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scfmbench.benchmark.methods import Method
from scfmbench.config import RunConfig
from scfmbench.data.cells import CellRows
from scfmbench.data.splits import Split
from scfmbench.evaluation.metrics import ClassificationMetrics, classification_metrics
from scfmbench.evaluation.probes import PROBES, STUDY_LOGREG_C_GRID, FittedProbe, fit_probe
from scfmbench.evaluation.representations import REPRESENTATIONS, SplitFeatures, embedding_features
from scfmbench.hashing import hash_json

__all__ = [
    "UNASSIGNED",
    "Prediction",
    "ProbeInputs",
    "fit_and_predict_features",
    "probe_grid",
]

UNASSIGNED = "<unassigned>"
"""The predicted label of a test cell the method has no features for (scored as wrong)."""

Predictions = dict[tuple[str, int], "Prediction"]
"""``{(method name, split seed): Prediction}`` of a run."""


@dataclass(frozen=True)
class Prediction:
    """One method's predictions on the test cells of one split.

    Attributes
    ----------
    cells : list of str
        Test cell names (n_test).
    predicted : list of str
        Predicted label per test cell (:data:`UNASSIGNED` for a cell without features).
    probabilities : list or None
        n_test rows of class probabilities in the run's class order (None rows for
        unassigned cells); None when the probe has no ``predict_proba``.
    params : dict
        The probe setting chosen on the validation cells (or a fine-tuning's best epoch).
    val_macro_f1 : float or None
        Validation macro F1 of that setting.
    on_grid_edge : bool
        Whether the chosen setting is at an end of the probe's grid.
    n_unassigned : int
        Test cells the method could not predict.
    features : dict
        What the features were built from (``SplitFeatures.info``).
    """

    cells: list[str]
    predicted: list[str]
    probabilities: list[list[float] | None] | None
    params: dict[str, Any]
    val_macro_f1: float | None
    on_grid_edge: bool = False
    n_unassigned: int = 0
    features: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Prediction:
        """Read a saved payload (the prediction cache's, or a fine-tuning's)."""
        return cls(
            cells=list(payload["cells"]),
            predicted=list(payload["pred"]),
            probabilities=payload.get("proba"),
            params=payload["params"],
            val_macro_f1=payload["val_macro_f1"],
            on_grid_edge=payload.get("on_grid_edge", False),
            n_unassigned=payload["n_unassigned"],
            features=payload.get("features") or {},
        )

    def to_payload(self) -> dict[str, Any]:
        """Return the JSON payload of the prediction cache.

        :func:`scfmbench.evaluation.run_stats.predictions_table` reads it too.
        """
        return {
            "cells": self.cells,
            "pred": self.predicted,
            "proba": self.probabilities,
            "params": self.params,
            "val_macro_f1": self.val_macro_f1,
            "on_grid_edge": self.on_grid_edge,
            "n_unassigned": self.n_unassigned,
            "features": self.features,
        }

    def score(self, labels: pd.Series, classes: list[str]) -> ClassificationMetrics:
        """Scores of the predictions against ``labels`` (true label of every cell)."""
        truth = labels.loc[self.cells].astype(str).to_numpy()
        predicted = np.asarray(self.predicted, dtype=str)
        return classification_metrics(truth, predicted, classes=classes)


def payloads(predictions: Predictions) -> dict[tuple[str, int], dict[str, Any]]:
    """Return the payload of every prediction (what the predictions table is built from)."""
    return {key: prediction.to_payload() for key, prediction in predictions.items()}


def probe_grid(probe: str, config: RunConfig) -> tuple[dict[str, Any], ...] | None:
    """Return the grid a probe is tuned over in this run.

    Parameters
    ----------
    probe : str
        A registered probe name.
    config : RunConfig
        ``logreg_c`` and ``design`` are read.

    Returns
    -------
    tuple of dict or None
        Logistic regression tries ``config.logreg_c``, or the study's C values in design
        ``study``; None: the probe's registered grid.
    """
    if probe != "logreg":
        return None
    values = config.logreg_c
    if values is None and config.design == "study":
        values = list(STUDY_LOGREG_C_GRID)
    return None if values is None else tuple({"C": float(c)} for c in values)


def fit_and_predict_features(
    method: Method,
    feats: SplitFeatures,
    labels: pd.Series,
    split: Split,
    code_of: dict[str, int],
    classes: list[str],
    *,
    grid: tuple[dict[str, Any], ...] | None = None,
) -> Prediction:
    """Fit the method's probe on train (tuned on val) and predict the test cells.

    Parameters
    ----------
    method : Method
        Its ``probe`` is fitted.
    feats : SplitFeatures
        Train, val and test features of ``split`` (NaN rows: cells without features, left
        out of the fit and predicted :data:`UNASSIGNED`).
    labels : pandas.Series
        Categorical cell types of the run's cells.
    split : Split
        The cells; ``split.seed`` seeds the probe.
    code_of, classes : dict, list
        Class name → code, and the run's classes in code order.
    grid : tuple of dict, optional
        Settings tried on the validation cells (default: the probe's own grid).

    Returns
    -------
    Prediction
    """
    y_train = labels.loc[split.train].map(code_of).to_numpy(dtype=np.int64)
    y_val = labels.loc[split.val].map(code_of).to_numpy(dtype=np.int64)
    keep_train = ~np.isnan(feats.train).any(axis=1)
    keep_val = ~np.isnan(feats.val).any(axis=1)
    keep_test = np.asarray(~np.isnan(feats.test).any(axis=1))
    trained = np.unique(y_train[keep_train])  # a held-out-group fold may lack some classes
    fitted = fit_probe(
        method.probe,
        feats.train[keep_train],
        np.searchsorted(trained, y_train[keep_train]),
        feats.val[keep_val],
        np.searchsorted(trained, y_val[keep_val]),
        seed=split.seed,
        grid=grid,
    )
    predicted = np.full(len(split.test), UNASSIGNED, dtype=object)
    proba: list[list[float] | None] | None = None
    if keep_test.any():
        predicted[keep_test] = [classes[trained[i]] for i in fitted.predict(feats.test[keep_test])]
        proba = _probabilities(fitted, feats.test, keep_test, len(classes), trained)
    return Prediction(
        cells=list(split.test),
        predicted=[str(p) for p in predicted],
        probabilities=proba,
        params=fitted.params,
        val_macro_f1=fitted.val_macro_f1,
        on_grid_edge=fitted.on_grid_edge,
        n_unassigned=int((~keep_test).sum()),
        features=feats.info,
    )


def _probabilities(
    fitted: FittedProbe, X: np.ndarray, keep: np.ndarray, n_classes: int, trained: np.ndarray
) -> list[list[float] | None] | None:
    """Return the class probabilities of the test cells.

    None rows for unassigned cells, or None when the probe has no ``predict_proba``; columns
    follow the run's classes (``trained``: the run's class code of each class the probe was
    fitted on, 0 for the others).
    """
    estimator = fitted.estimator
    if not hasattr(estimator, "predict_proba"):
        return None
    values = np.zeros((int(keep.sum()), n_classes))
    # sklearn declares neither on ClassifierMixin
    classes = estimator.classes_  # pyright: ignore[reportAttributeAccessIssue]
    columns = trained[np.asarray(classes, dtype=np.int64)]
    values[:, columns] = estimator.predict_proba(X[keep])  # pyright: ignore[reportAttributeAccessIssue]
    rows: list[list[float] | None] = [None] * len(keep)
    for row, value in zip(np.flatnonzero(keep), values, strict=True):
        rows[row] = [round(float(v), 6) for v in value]
    return rows


def _features(
    method: Method,
    cells: CellRows,
    matrices: dict[str, np.ndarray],
    split: Split,
    config: RunConfig,
    kind: str,
) -> SplitFeatures:
    if method.model is not None:
        return embedding_features(matrices[method.model], cells.obs_names, split)
    builder = REPRESENTATIONS.get(method.representation)
    return builder(
        cells,
        split,
        kind=kind,
        n_hvg=config.n_hvg,
        n_pcs=config.n_pcs,
        seed=split.seed,
        scvi=config.scvi,
    )


def _representation_options(method: Method, config: RunConfig) -> dict[str, Any]:
    """Return settings only one representation reads (part of its predictions' cache key)."""
    if method.representation == "scvi":
        return {"scvi": config.scvi.model_dump()}
    return {}


@dataclass(frozen=True)
class ProbeInputs:
    """What every probe of a run is fitted on.

    The same for the run's own splits, the random splits of a held-out-group run and the
    label-efficiency sweep.

    Attributes
    ----------
    config : RunConfig
        Settings every probe and representation reads.
    cells : CellRows
        The run's cells, rows in the order of ``labels``.
    matrices : dict
        Model id → (n_cells, dim) embedding (NaN rows: cells the model could not embed).
    matrix_hashes : dict
        Model id → hash of its matrix (part of every cached prediction's key).
    labels : pd.Series
        Categorical cell types of the run's cells.
    data_hash : str
        Fingerprint of the data (:func:`scfmbench.benchmark.rundata.data_fingerprint`).
    kind : str
        Matrix kind of the data (``counts``, ``lognorm``, …) the baselines start from.
    """

    config: RunConfig
    cells: CellRows
    matrices: dict[str, np.ndarray]
    matrix_hashes: dict[str, str]
    labels: pd.Series
    data_hash: str
    kind: str

    def features(self, method: Method, split: Split) -> SplitFeatures:
        """``method``'s representation of the train, val and test cells of ``split``."""
        return _features(method, self.cells, self.matrices, split, self.config, self.kind)

    def cache_key(self, method: Method, split: Split, **extra: Any) -> str:
        """Return the key of ``method``'s saved predictions on ``split``.

        It covers the data, split cells, method, representation settings, embedding and
        probe grid (``extra``: what else they depend on, e.g. the label-efficiency sizes).
        """
        config = self.config
        return hash_json(
            {
                "data": self.data_hash,
                "split": [list(split.train), list(split.val), list(split.test)],
                "method": method.__dict__,
                "n_hvg": config.n_hvg,
                "n_pcs": config.n_pcs,
                "embedding": self.matrix_hashes.get(method.model) if method.model else None,
                "grid": probe_grid(method.probe, config) or PROBES.get(method.probe).grid,
                **_representation_options(method, config),
                **extra,
            }
        )
