"""Classification metrics per method and split, and gains over a reference method."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy")


@dataclass(frozen=True)
class ReportedMetric:
    """How the report shows one of :data:`HEADLINE_METRICS`.

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
"""The report's metrics, in column order: one per :data:`HEADLINE_METRICS`."""


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
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "n_test": self.n_test,
            "per_class": self.per_class,
            "confusion": {"labels": list(self.classes), "matrix": self.confusion.tolist()},
        }


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    classes: list[str] | tuple[str, ...],
    present_only: bool = False,
) -> ClassificationMetrics:
    """Accuracy, macro/weighted F1, balanced accuracy, per-class scores, confusion matrix.

    Args:
        y_true: true labels (strings) of shape (n_test,).
        y_pred: predicted labels (strings) of shape (n_test,); labels outside ``classes``
            (e.g. ``<unassigned>``) count as wrong.
        classes: every training class, fixing the order of rows/columns. Macro F1 averages
            all of them (``f1_score(labels=classes, zero_division=0)``): a class never
            predicted scores 0, also when it has no test cells. Balanced accuracy is the mean
            recall over the classes present in ``y_true``.
        present_only: macro F1 averages only the classes present in ``y_true`` (design
            ``holdout``: a held-out group need not hold every training class).
    """
    y_true = np.asarray(y_true, dtype=str)
    y_pred = np.asarray(y_pred, dtype=str)
    labels = list(classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
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
    macro = f1_score(
        y_true,
        y_pred,
        labels=averaged if present_only else labels,
        average="macro",
        zero_division=0,
    )
    return ClassificationMetrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(macro),
        weighted_f1=float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
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
