"""Classification metrics per method and split, and gains over a reference method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


@dataclass(frozen=True)
class ReportedMetric:
    """One headline metric and how the report shows it.

    Parameters
    ----------
    key : str
        The metric's key in ``metrics.json`` summaries (e.g. ``"macro_f1"``).
    label : str
        Its column header (``"macro F1"``).
    short : str
        Its name inside compound headers (``"F1"`` in ``"Δabs F1"``).
    primary : bool
        Shown with its 95% interval and its gain over the reference method, and compared
        between frozen and fine-tuned models; otherwise only its mean ± sd.
    """

    key: str
    label: str
    short: str
    primary: bool


REPORTED_METRICS = (
    ReportedMetric("accuracy", "accuracy", "acc", primary=True),
    ReportedMetric("macro_f1", "macro F1", "F1", primary=True),
    ReportedMetric("weighted_f1", "weighted F1", "weighted F1", primary=False),
    ReportedMetric("balanced_accuracy", "balanced accuracy", "balanced acc", primary=False),
)
"""The headline metrics, in the report's column order: the one list of them."""
HEADLINE_METRICS = tuple(metric.key for metric in REPORTED_METRICS)
"""Their keys in ``metrics.json`` summaries, in the same order."""


@dataclass(frozen=True)
class ClassificationMetrics:
    """Scores of one method on one test set.

    ``confusion[i, j]`` counts cells of true class ``classes[i]`` predicted as ``classes[j]``.
    """

    accuracy: float
    macro_f1: float
    weighted_f1: float
    balanced_accuracy: float
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray
    classes: tuple[str, ...]
    n_test: int

    def to_dict(self) -> dict:
        """Return the scores as metrics.json records them (the confusion matrix as lists)."""
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "n_test": self.n_test,
            "per_class": self.per_class,
            "confusion": {"labels": list(self.classes), "matrix": self.confusion.tolist()},
        }


def averaged_f1(y_true, y_pred, *, labels: list | np.ndarray, average: str = "macro") -> float:
    """Return scikit-learn's ``f1_score`` over ``labels``; a class never predicted scores 0.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels, of shape (n_cells,).
    labels
        The classes averaged over.
    average
        ``"macro"`` (default) or ``"weighted"``.
    """
    return float(
        f1_score(
            y_true,
            y_pred,
            labels=labels,
            average=average,
            zero_division=0,  # pyright: ignore[reportArgumentType]
        )
    )


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    classes: list[str] | tuple[str, ...],
    present_only: bool = False,
) -> ClassificationMetrics:
    """Accuracy, macro/weighted F1, balanced accuracy, per-class scores, confusion matrix.

    Parameters
    ----------
    y_true
        True labels (strings) of shape (n_test,).
    y_pred
        Predicted labels (strings) of shape (n_test,); labels outside ``classes`` (e.g.
        ``<unassigned>``) count as wrong.
    classes
        Every training class, fixing the order of rows/columns. Macro F1 averages all of them
        (``f1_score(labels=classes, zero_division=0)``): a class never predicted scores 0,
        also when it has no test cells. Balanced accuracy is the mean recall over the classes
        present in ``y_true``.
    present_only
        Macro F1 averages only the classes present in ``y_true`` (designs ``holdout`` and
        ``transfer``: a held-out group or a target dataset need not hold every training
        class); default False.

    Returns
    -------
    ClassificationMetrics
        Scores in [0, 1]; ``confusion`` of shape (len(classes), len(classes)).
    """
    y_true = np.asarray(y_true, dtype=str)
    y_pred = np.asarray(y_pred, dtype=str)
    labels = list(classes)
    scores = precision_recall_fscore_support(
        y_true,
        y_pred,
        labels=labels,
        zero_division=0,  # pyright: ignore[reportArgumentType]
    )
    precision, recall, f1, support = cast(tuple[np.ndarray, ...], scores)
    per_class = {
        c: {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    present = recall[support > 0]
    averaged = [c for c, s in zip(labels, support, strict=True) if s > 0]
    return ClassificationMetrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=averaged_f1(y_true, y_pred, labels=averaged if present_only else labels),
        weighted_f1=averaged_f1(y_true, y_pred, labels=labels, average="weighted"),
        balanced_accuracy=float(present.mean()) if len(present) else 0.0,
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
        classes=tuple(classes),
        n_test=int(len(y_true)),
    )


def delta(value: float, reference: float) -> dict[str, float | None]:
    """Gain over a reference: ``abs = value - reference``, ``rel = abs / reference``."""
    gain = value - reference
    return {"abs": gain, "rel": gain / reference if reference else None}


def summarize(values: list[float]) -> dict:
    """Mean, sample sd (0 for one value) and the per-split values."""
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }
