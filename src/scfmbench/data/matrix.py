"""The expression matrix: CSR conversion, finite checks, count detection and log-normalizing.

What kind of values a matrix holds (raw counts, corrected, normalized, log-normalized or
scaled), where in an AnnData the counts live, and the one normalize + log1p every baseline
reads.
"""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.errors import CountsRequiredError, DataError

INTEGER_TOLERANCE = 1e-3
MAX_SAMPLED_VALUES = 5_000_000

LOG_SCALE_MAX = 50.0
"""Non-integer values whose maximum is at most this are taken as log-scale (log1p of CP10k
tops out near 10, log2 of CPM near 20; counts and count-like values of any real matrix
exceed it)."""
CONSTANT_TOTAL_SPREAD = 1e-3
"""Per-cell totals whose range is within this fraction of their median count as constant:
the matrix is already depth-normalized (e.g. ``sc.pp.normalize_total`` without log1p)."""
CORRECTION_TOOLS = "SoupX, CellBender, DecontX or STARsolo EM multi-mapper"
KIND_NAMES = {
    "counts": "raw integer counts",
    "corrected": "count-like non-integer values (per-cell totals vary, as in ambient-corrected "
    f"counts from {CORRECTION_TOOLS})",
    "normalized": "depth-normalized values (non-integer, the same total in every cell)",
    "lognorm": f"log-normalized values (log-scale: non-integer, max ≤ {LOG_SCALE_MAX:g})",
    "scaled": "scaled values (negative numbers)",
}
"""What each matrix kind means, as validate, metrics.json and the report word it."""


def kind_in_words(kind: str) -> str:
    """Say what a matrix of ``kind`` holds in a few words (``lognorm``: log-normalized values).

    :data:`KIND_NAMES` without the explanation in parentheses; an unknown kind is returned
    as is.
    """
    return KIND_NAMES.get(kind, kind).split(" (", 1)[0]


def _nonzero_values(matrix) -> np.ndarray:
    """Return the stored values of a sparse matrix, or the nonzero values of a dense one."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    values = np.asarray(matrix).ravel()
    return values[values != 0]


def to_csr(matrix, dtype=None) -> sp.csr_matrix:
    """Convert ``matrix`` to CSR with one index dtype.

    Files written by other tools may pair int64 ``indptr`` with int32 ``indices``, which
    scipy's routines refuse; such a matrix gets int64 for both.

    Parameters
    ----------
    matrix
        Cells × genes, sparse or dense.
    dtype
        Value dtype of the result (default: that of ``matrix``).

    Returns
    -------
    scipy.sparse.csr_matrix
        Of the shape of ``matrix``.
    """
    csr = sp.csr_matrix(matrix, dtype=dtype)
    if csr.indptr.dtype != csr.indices.dtype:
        csr = sp.csr_matrix(
            (csr.data, csr.indices.astype(np.int64), csr.indptr.astype(np.int64)), shape=csr.shape
        )
    return csr


def check_finite(matrix, *, where: str) -> None:
    """Raise DataError when ``matrix`` holds NaN or infinite values.

    Parameters
    ----------
    matrix
        Cells × genes, sparse or dense.
    where
        What the matrix is, for the message (e.g. ``"adata.X"``).

    Raises
    ------
    DataError
        Naming the number of NaN and infinite values.
    """
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
    """Classify an expression matrix by what its values are.

    Parameters
    ----------
    matrix
        Cells × genes, sparse or dense; a sample of at most ``MAX_SAMPLED_VALUES`` stored
        values is judged, per-cell totals over every value.

    Returns
    -------
    str
        ``"scaled"`` when any value is negative; ``"counts"`` when every value is an integer
        (within ``INTEGER_TOLERANCE``); else ``"lognorm"`` when the maximum is at most
        ``LOG_SCALE_MAX``; else ``"normalized"`` when every non-empty cell has the same total
        (within ``CONSTANT_TOTAL_SPREAD``); else ``"corrected"``: count-like non-integer
        values whose totals vary with sequencing depth (ambient-corrected or EM counts),
        which the baselines depth-normalize like counts. One non-empty cell has no spread to
        judge and counts as ``"corrected"``.
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
    if values.max() <= LOG_SCALE_MAX:
        return "lognorm"
    totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    totals = totals[totals > 0]
    if len(totals) > 1 and np.ptp(totals) <= CONSTANT_TOTAL_SPREAD * np.median(totals):
        return "normalized"
    return "corrected"


def require_counts(
    matrix, *, model: str, allow_normalized: bool = False, where: str = "adata.X"
) -> str:
    """Check that a count-based model gets raw counts; return the detected matrix kind.

    Count-like non-integer values (``"corrected"``: ambient-corrected or EM counts) are used
    as counts with a warning naming the correction tools; the published models were trained
    on integer UMI counts.

    Parameters
    ----------
    matrix
        Cells × genes, sparse or dense.
    model
        The model's name, for messages.
    allow_normalized
        Use depth-normalized or log-scale values with a warning instead of failing
        (default False).
    where
        What the matrix is, for messages (default ``"adata.X"``).

    Returns
    -------
    str
        The matrix kind (see :func:`classify_matrix`).

    Raises
    ------
    CountsRequiredError
        For depth-normalized, log-scale or scaled values, unless ``allow_normalized`` (then a
        warning is issued and scaled data still fails).
    """
    return check_counts_kind(
        classify_matrix(matrix), model=model, allow_normalized=allow_normalized, where=where
    )


def check_counts_kind(kind: str, *, model: str, allow_normalized: bool, where: str) -> str:
    """Apply :func:`require_counts` to a matrix already classified as ``kind``; return it.

    Raises
    ------
    CountsRequiredError
        For ``normalized``, ``lognorm`` or ``scaled``, unless ``allow_normalized`` (then a
        warning is issued and ``scaled`` still fails).
    """
    if kind == "counts":
        return kind
    if kind == "corrected":
        warnings.warn(corrected_counts_warning(model, where), stacklevel=2)
        return kind
    described = KIND_NAMES[kind]
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


def corrected_counts_warning(model: str, where: str) -> str:
    """Return the warning a count-based model gives for count-like non-integer values."""
    return (
        f"{model}: {where} holds {KIND_NAMES['corrected']}; using them as counts — the model "
        "was trained on integer UMI counts, so for published behaviour pass the uncorrected "
        "counts (e.g. layers['counts'])."
    )


def lognormalize(matrix: sp.csr_matrix, *, kind: str, target_sum: float = 1e4) -> sp.csr_matrix:
    """Log-normalize ``matrix`` as scanpy's ``normalize_total`` + ``log1p`` do.

    Counts and count-like (``corrected``) values are scaled to ``target_sum`` per cell, then
    log1p'd; depth-normalized values are only log1p'd; log-normalized values are returned
    unchanged (as a float32 copy). A cell without counts stays all zero.

    Parameters
    ----------
    matrix
        Cells × genes, sparse.
    kind
        The matrix kind (see :func:`classify_matrix`).
    target_sum
        Total of every cell after scaling (default 1e4).

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, of the shape of ``matrix``; the input is not modified.
    """
    matrix = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if kind in ("counts", "corrected"):
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        matrix = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ matrix)
    if kind in ("counts", "corrected", "normalized"):
        matrix.data = np.log1p(matrix.data)
    return matrix


def _candidate_matrices(adata: AnnData) -> list[tuple[str, object, pd.DataFrame]]:
    """(name, matrix, var) for every place counts may live, in order of preference."""
    out = []
    if "counts" in adata.layers:
        out.append(("layers['counts']", adata.layers["counts"], adata.var))
    out.append(("X", adata.X, adata.var))
    if adata.raw is not None:
        out.append(("raw.X", adata.raw.X, raw_var(adata)))
    return out


def raw_var(adata: AnnData) -> pd.DataFrame:
    """Return ``adata.raw.var`` plus the ``adata.var`` columns it lacks (``with_var_columns``)."""
    return with_var_columns(adata.raw.var, cast(pd.DataFrame, adata.var))


def with_var_columns(raw_var: pd.DataFrame, var: pd.DataFrame) -> pd.DataFrame:
    """Return ``raw_var`` plus the columns of ``var`` it lacks, matched by gene name.

    Genes only in ``raw`` get missing values. The gene-identifier columns of a Seurat or
    CELLxGENE file usually live in ``var`` while the counts live in ``raw.X``.
    """
    out = raw_var.copy()
    extra = [c for c in var.columns if c not in out.columns]
    if extra and var.index.is_unique:
        out = out.join(var[extra], how="left")
    return out


def find_expression(adata: AnnData) -> tuple[str, object, pd.DataFrame, str]:
    """Pick the matrix to use: raw counts first, then count-like values, else non-negative.

    The candidates are ``layers['counts']``, ``X`` and ``raw.X``, in that order.

    Returns
    -------
    tuple
        (source name, matrix, var frame, kind).

    Raises
    ------
    DataError
        A candidate holds NaN/inf, or only scaled (negative) values exist.
    """
    candidates = _candidate_matrices(adata)
    kinds = []
    for name, matrix, var in candidates:
        if matrix is None:
            continue
        check_finite(matrix, where=f"adata.{name}")
        kind = classify_matrix(matrix)
        kinds.append((name, matrix, var, kind))
        if kind == "counts":
            return name, matrix, var, kind
    for preferred in (("corrected",), ("normalized", "lognorm")):
        for name, matrix, var, kind in kinds:
            if kind in preferred:
                return name, matrix, var, kind
    found = "; ".join(describe_negatives(name, matrix) for name, matrix, _, _ in kinds)
    raise DataError(
        f"no usable expression matrix: every candidate has negative values ({found}); "
        "counts are never negative: fix those entries, or provide raw counts in X, "
        "layers['counts'] or .raw."
    )


FEW_NEGATIVE = 0.01
"""Largest share of negative stored values that reads as broken counts rather than scaling."""


def describe_negatives(name: str, matrix) -> str:
    """Say how many values of ``adata.<name>`` are negative, and what the others are.

    Scaled data (``sc.pp.scale``) are negative in about half the entries; a few negative
    entries (at most :data:`FEW_NEGATIVE` of them) among integers are broken counts.

    Parameters
    ----------
    name : str
        ``X``, ``layers['counts']`` or ``raw.X``.
    matrix
        Its cells × genes values, sparse or dense.

    Returns
    -------
    str
        E.g. ``"X: 1 negative of 2,000 stored values (min -1), the others integer counts"``
        or ``"X: 5,120 negative of 10,000 stored values (min -2.1): scaled"``.
    """
    values = _nonzero_values(matrix)
    negative = values < 0
    n_negative = int(negative.sum())
    text = (
        f"{name}: {n_negative:,} negative of {values.size:,} stored values (min {values.min():.3g})"
    )
    rest = values[~negative]
    few = n_negative <= FEW_NEGATIVE * values.size
    if few and rest.size and np.all(np.abs(rest - np.round(rest)) < INTEGER_TOLERANCE):
        return f"{text}, the others integer counts"
    return f"{text}: scaled"


def expression_view(adata: AnnData) -> AnnData:
    """Return all cells with the preferred matrix (raw counts when present) as CSR float32 X.

    ``uns["scfmbench"]`` records ``matrix_source`` and ``matrix_kind``.
    """
    source, matrix, var, kind = find_expression(adata)
    view = AnnData(
        X=to_csr(matrix, np.float32), obs=cast(pd.DataFrame, adata.obs).copy(), var=var.copy()
    )
    view.uns["scfmbench"] = {"matrix_source": source, "matrix_kind": kind}
    return view
