"""Load/validate stage: find the raw counts, check values and labels, drop with warnings."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

from scfmbench.errors import CountsRequiredError, DataError

logger = logging.getLogger(__name__)

INTEGER_TOLERANCE = 1e-3
MAX_SAMPLED_VALUES = 5_000_000

MATRIX_KINDS = ("counts", "normalized", "lognorm", "scaled")


def _nonzero_values(matrix) -> np.ndarray:
    """The stored values of a sparse matrix, or the nonzero values of a dense one."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    values = np.asarray(matrix).ravel()
    return values[values != 0]


def check_finite(matrix, *, where: str) -> None:
    """Raise DataError when ``matrix`` holds NaN or infinite values."""
    values = _nonzero_values(matrix)
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        n_inf = int(bad.sum()) - n_nan
        raise DataError(
            f"{where} contains {n_nan} NaN and {n_inf} infinite values; "
            "replace them (e.g. with 0 for missing counts) or drop the affected cells/genes."
        )


def classify_matrix(matrix) -> str:
    """Classify an expression matrix as raw ``counts``, ``normalized``, ``lognorm`` or ``scaled``.

    Counts are non-negative integers (within 1e-3); scaled data has negative values;
    non-integer data with a maximum above 50 is taken as normalized but not logged.
    """
    values = _nonzero_values(matrix)
    if values.size > MAX_SAMPLED_VALUES:
        values = values[:: values.size // MAX_SAMPLED_VALUES + 1]
    if values.size == 0:
        return "counts"
    if values.min() < 0:
        return "scaled"
    if np.all(np.abs(values - np.round(values)) < INTEGER_TOLERANCE):
        return "counts"
    return "normalized" if values.max() > 50 else "lognorm"


def require_counts(matrix, *, model: str, allow_normalized: bool = False, where: str = "X") -> str:
    """Check that a count-based model gets raw counts; return the detected matrix kind.

    Raises:
        CountsRequiredError: for normalized, log-transformed or scaled values, unless
            ``allow_normalized`` (then a warning is issued and scaled data still fails).
    """
    kind = classify_matrix(matrix)
    if kind == "counts":
        return kind
    described = {
        "normalized": "normalized (non-integer) values",
        "lognorm": "log-normalized values (non-integer, max ≤ 50)",
        "scaled": "scaled values (negative numbers)",
    }[kind]
    if kind != "scaled" and allow_normalized:
        warnings.warn(
            f"{model} expects raw counts but {where} holds {described}; proceeding because "
            "allow_normalized is set — results are not comparable to the published model.",
            stacklevel=2,
        )
        return kind
    raise CountsRequiredError(
        f"{model} needs raw integer counts but {where} holds {described}; pass the raw counts "
        "(X, layers['counts'] or .raw)"
        + (" or set --allow-normalized to proceed anyway." if kind != "scaled" else ".")
    )
