"""Cell-type labels: the label column, placeholder labels and spellings of one class.

Labels that differ only by case or whitespace (``"B "``, ``"b"``) are found here;
:func:`scfmbench.data.validate.filter_cells` keeps them apart or merges them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scfmbench.errors import SchemaError
from scfmbench.registry import did_you_mean

MISSING_LABELS = {"", "nan", "none", "na", "n/a", "null", "unknown", "unassigned"}
"""Placeholder labels, compared after stripping whitespace and ignoring case: a cell whose
label is NaN/None or one of these has no cell type; it is dropped from ``obs`` labels (with a
warning), and a transfer label map that maps a label to one of these drops its cells."""


def is_missing_label(value) -> bool:
    """Tell whether one label is a placeholder (NaN, None or ``MISSING_LABELS``)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    return str(value).strip().lower() in MISSING_LABELS


def label_key_of(label: object) -> str:
    """Return the form two labels must share to count as one class spelled differently.

    Whitespace is trimmed and collapsed, case folded (``"B "``, ``"b"`` → ``"b"``).
    """
    return " ".join(str(label).split()).casefold()


def similar_label_groups(sizes: pd.Series) -> list[dict[str, int]]:
    """Group the labels that differ only by case or whitespace.

    Parameters
    ----------
    sizes
        Cells per label.

    Returns
    -------
    list of dict
        One ``{label: cells}`` per group of two or more spellings (largest first).
    """
    groups: dict[str, dict[str, int]] = {}
    for label, size in sizes.sort_values(ascending=False, kind="stable").items():
        groups.setdefault(label_key_of(label), {})[str(label)] = int(size)
    return [group for _, group in sorted(groups.items()) if len(group) > 1]


def most_common_spelling(group: dict[str, int]) -> str:
    """Return the spelling with the most cells (ties: the first in sort order)."""
    return min(group, key=lambda label: (-group[label], label))


def suggest_label_columns(obs: pd.DataFrame) -> list[str]:
    """Return the obs columns that look like cell-type labels (text, 2..n/2 values)."""
    out = []
    for column in obs.columns:
        series = obs[column]
        if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
            n_unique = series.nunique(dropna=True)
            if 2 <= n_unique <= max(2, len(series) // 2):
                out.append(str(column))
    return out


def resolve_label_key(obs: pd.DataFrame, label_key: str | None) -> str:
    """Return the label column: ``label_key``, or ``cell_type`` when none is given.

    Raises
    ------
    SchemaError
        No column given and no ``cell_type``, or ``label_key`` is not an obs column; the
        message lists the columns that look like labels.
    """
    if label_key is None:
        if "cell_type" in obs.columns:
            return "cell_type"
        raise SchemaError(
            f"no label column given and adata.obs has no 'cell_type'; columns that look like "
            f"labels: {suggest_label_columns(obs)[:8]}. Pass --label-key."
        )
    if label_key not in obs.columns:
        raise SchemaError(
            f"adata.obs has no column {label_key!r}; columns that look like labels: "
            f"{suggest_label_columns(obs)[:8]}. Pass --label-key with one of those."
            + did_you_mean(label_key, [str(c) for c in obs.columns])
        )
    return label_key
