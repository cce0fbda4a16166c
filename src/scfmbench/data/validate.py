"""Validate stage: check cells and labels, and record what was found.

Picks the expression matrix, drops empty, unlabelled and filtered cells and rare classes
with warnings, and records every drop in :class:`DataDiagnostics`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import cast

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.feature_selection import all_highly_variable
from scfmbench.data.genes import detect_identifier_type, identifier_sources
from scfmbench.data.io import DUPLICATE_NAMES_WARNING
from scfmbench.data.labels import (
    is_missing_label,
    most_common_spelling,
    resolve_label_key,
    similar_label_groups,
)
from scfmbench.data.matrix import KIND_NAMES, find_expression, to_csr
from scfmbench.errors import DataError, SchemaError

logger = logging.getLogger(__name__)


def check_unique_cells(obs_names: pd.Index, *, where: str) -> None:
    """Raise DataError when ``obs_names`` repeats a cell name.

    Repeated names appear after ``anndata.concat`` without ``obs_names_make_unique()``; cells
    are looked up by name in splits, features and embeddings, so every name must be unique.

    Parameters
    ----------
    obs_names
        The cell names, one per row.
    where
        What holds them, for the message (a file name or "the data").

    Raises
    ------
    DataError
        Naming the number of repeated names and the fix.
    """
    if not obs_names.is_unique:
        n = int(obs_names.duplicated().sum())
        raise DataError(
            f"{where} has {n} duplicated cell name{'s' if n != 1 else ''} (obs_names); make "
            "them unique (adata.obs_names_make_unique()) and write it again."
        )


FILTER_PASS = "filter_pass"


def filter_pass_mask(obs: pd.DataFrame) -> np.ndarray | None:
    """Return ``obs["filter_pass"]`` as a boolean mask (None when the column is absent).

    The reference Geneformer tokenizer keeps cells whose ``filter_pass`` is 1; the values
    must be booleans or the numbers 0/1.

    Raises
    ------
    SchemaError
        Other values, e.g. the strings ``"TRUE"``/``"FALSE"`` written from R.
    """
    if FILTER_PASS not in obs.columns:
        return None
    column = obs[FILTER_PASS]
    values = column.to_numpy()
    if pd.api.types.is_bool_dtype(column):
        return values.astype(bool)
    if pd.api.types.is_numeric_dtype(column) and np.isin(values, (0, 1)).all():
        return values == 1
    found = sorted({str(v) for v in pd.unique(values)})[:5]
    raise SchemaError(
        f"adata.obs['filter_pass'] must hold booleans or 0/1 but holds {found} "
        f"(dtype {column.dtype}); convert it, e.g. adata.obs['filter_pass'] = "
        "adata.obs['filter_pass'].astype(str).str.upper().eq('TRUE'), or drop the column."
    )


def drop_filter_pass(obs: pd.DataFrame, diag: DataDiagnostics) -> np.ndarray:
    """Return the cells to keep by ``obs["filter_pass"]`` (all when absent).

    The drop is recorded in ``diag`` with a warning. It applies to every method, so all are
    scored on the same cells.
    """
    passing = filter_pass_mask(obs)
    if passing is None:
        return np.ones(len(obs), dtype=bool)
    if not passing.all():
        diag.dropped_cells_filter_pass = int((~passing).sum())
        _warn(
            diag,
            f"dropped {int((~passing).sum())} cells with obs['filter_pass'] false, for every "
            "method (the reference Geneformer tokenizer drops them)",
        )
    return passing


@dataclass
class DataDiagnostics:
    """Everything the validate stage found; copied into metrics.json and the report."""

    n_cells_input: int
    n_genes_input: int
    n_cells: int = 0
    n_genes: int = 0
    label_key: str = ""
    count_source: str | None = None
    matrix_source: str = "X"
    matrix_kind: str = "counts"
    identifier_type: str = "symbol"
    classes: dict[str, int] = field(default_factory=dict)
    dropped_cells_no_counts: int = 0
    dropped_cells_missing_label: int = 0
    dropped_cells_filter_pass: int = 0
    gene_sources: dict[str, str | None] = field(default_factory=dict)  # vocabulary kind → column
    dropped_classes: dict[str, int] = field(default_factory=dict)
    renamed_duplicate_genes: int = 0
    similar_labels: list[dict[str, int]] = field(default_factory=list)
    merged_labels: dict[str, str] = field(default_factory=dict)
    all_highly_variable: bool = False  # every gene flagged var["highly_variable"]
    warnings: list[str] = field(default_factory=list)

    @property
    def matrix_description(self) -> str:
        """What the chosen matrix holds, in words (``KIND_NAMES``)."""
        return KIND_NAMES.get(self.matrix_kind, self.matrix_kind)

    def to_dict(self) -> dict:
        """Return every field plus ``matrix_description``, as metrics.json records them."""
        return {**asdict(self), "matrix_description": self.matrix_description}


@dataclass
class ValidatedData:
    """Validated data: ``adata.X`` is a CSR float32 matrix of ``diagnostics.matrix_kind``."""

    adata: AnnData
    labels: pd.Series
    diagnostics: DataDiagnostics
    original_var_names: pd.Index | None = None  # before duplicates were made unique

    @property
    def obs(self) -> pd.DataFrame:
        """The kept cells' ``obs``."""
        return cast(pd.DataFrame, self.adata.obs)

    @property
    def model_input(self) -> AnnData:
        """``adata`` with the file's own gene names.

        Foundation models match their vocabulary on the original identifiers; the unique
        names (``GENE-1``) are only the baselines' bookkeeping.
        """
        if self.original_var_names is None:
            return self.adata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-unique var_names, on purpose
            return AnnData(
                X=self.adata.X,
                obs=self.obs,
                var=cast(pd.DataFrame, self.adata.var).set_axis(self.original_var_names),
            )


def validate(
    adata: AnnData,
    *,
    label_key: str | None = None,
    min_cells_per_class: int = 10,
    merge_similar_labels: bool = False,
    name: str = "the data",
) -> ValidatedData:
    """Check data and labels; drop empty cells, unlabelled cells and rare classes with warnings.

    Parameters
    ----------
    adata
        The input data, cells × genes (not modified).
    label_key
        obs column with cell types (default ``cell_type`` when present).
    min_cells_per_class
        Classes with fewer cells are dropped, with a warning (default 10).
    merge_similar_labels
        Merge labels that differ only by case or whitespace into their most common spelling
        (default False: keep them apart, with a warning listing them).
    name
        What the data is called in error messages (e.g. the file name).

    Returns
    -------
    ValidatedData
        Its ``adata.X`` holds the chosen matrix (raw counts when available) as CSR float32
        over the kept cells; ``adata.uns["scfmbench"]["diagnostics"]`` records what was found.

    Raises
    ------
    DataError
        No cells or genes, duplicated cell names, NaN/inf values, no usable matrix, or no
        cell left after the drops.
    SchemaError
        The label column is missing, or fewer than 2 classes are left.
    """
    diag = DataDiagnostics(n_cells_input=adata.n_obs, n_genes_input=adata.n_vars)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"the data has {adata.n_obs} cells and {adata.n_vars} genes; it needs at least one "
            "of each — check that the right file was given."
        )
    check_unique_cells(adata.obs_names, where=name)
    obs = cast(pd.DataFrame, adata.obs)
    label_key = resolve_label_key(obs, label_key)
    diag.label_key = label_key
    source, matrix, var, kind = find_expression(adata)
    with warnings.catch_warnings():  # duplicated gene names: record_matrix says it below
        warnings.filterwarnings("ignore", DUPLICATE_NAMES_WARNING, UserWarning)
        data = AnnData(X=to_csr(matrix, np.float32), obs=obs.copy(), var=var.copy())
    original = data.var_names.copy()
    diag.gene_sources = identifier_sources(cast(pd.DataFrame, data.var))
    data.var_names = record_matrix(  # pyright: ignore[reportAttributeAccessIssue]
        diag, source=source, kind=kind, var_names=data.var_names
    )
    passing = drop_filter_pass(cast(pd.DataFrame, data.obs), diag)
    if not passing.all():
        data = data[passing].copy()

    empty = np.asarray(cast(sp.csr_matrix, data.X).sum(axis=1)).ravel() <= 0
    keep, labels = filter_cells(
        cast(pd.DataFrame, data.obs),
        label_key=label_key,
        empty=empty,
        min_cells_per_class=min_cells_per_class,
        diag=diag,
        merge_similar_labels=merge_similar_labels,
    )
    if not keep.all():
        data = data[keep].copy()
    data.obs[label_key] = labels.to_numpy()
    diag.n_genes = data.n_vars
    diag.all_highly_variable = all_highly_variable(var)
    data.uns["scfmbench"] = {"diagnostics": diag.to_dict()}
    logger.info(
        "validated %d cells × %d genes, %d classes; %s from adata.%s; %s identifiers",
        diag.n_cells,
        diag.n_genes,
        len(diag.classes),
        kind,
        source,
        diag.identifier_type,
    )
    renamed = None if original.equals(data.var_names) else original
    return ValidatedData(adata=data, labels=labels, diagnostics=diag, original_var_names=renamed)


def record_matrix(
    diag: DataDiagnostics, *, source: str, kind: str, var_names: pd.Index
) -> pd.Index:
    """Record the chosen matrix and gene identifiers in ``diag``.

    Warns when the matrix holds no raw counts.

    Returns
    -------
    pandas.Index
        ``var_names`` made unique (suffix -1, -2, …, with a warning).
    """
    diag.matrix_source, diag.matrix_kind = source, kind
    diag.count_source = source if kind == "counts" else None
    if kind == "corrected":
        _warn(
            diag,
            f"adata.{source} holds {KIND_NAMES[kind]}; the baselines depth-normalize them like "
            "counts and count-based models use them with a warning — pass the uncorrected "
            "integer counts (e.g. layers['counts']) to compare with published results",
        )
    elif kind != "counts":
        _warn(
            diag,
            f"no raw integer counts found; using {kind} values from adata.{source}",
        )
    if not var_names.is_unique:
        n_dup = int(var_names.duplicated().sum())
        var_names = pd.Index(anndata.utils.make_index_unique(pd.Index(var_names)))
        diag.renamed_duplicate_genes = n_dup
        _warn(diag, f"{n_dup} duplicated gene names were made unique (suffix -1, -2, …)")
    diag.identifier_type = detect_identifier_type(var_names)
    return var_names


def filter_cells(
    obs: pd.DataFrame,
    *,
    label_key: str,
    empty: np.ndarray,
    min_cells_per_class: int,
    diag: DataDiagnostics,
    merge_similar_labels: bool = False,
) -> tuple[np.ndarray, pd.Series]:
    """Choose the cells to keep and their labels; record the drops in ``diag`` with warnings.

    A cell is kept when it is not ``empty``, is labelled and is in a class with at least
    ``min_cells_per_class`` cells.

    Placeholder labels (:func:`.labels.is_missing_label`) count as missing. Labels that differ only
    by case or whitespace are listed in ``diag.similar_labels`` with a warning, and merged
    into their most common spelling (ties: the first in sort order) when
    ``merge_similar_labels``, before rare classes are dropped.

    Returns
    -------
    keep : numpy.ndarray
        Boolean mask over the rows of ``obs``.
    labels : pandas.Series
        Categorical labels of the kept cells (sorted classes), indexed by cell name.

    Raises
    ------
    DataError
        No cell is left.
    SchemaError
        Fewer than 2 classes are left.
    """
    keep = ~np.asarray(empty, dtype=bool)
    if not keep.all():
        diag.dropped_cells_no_counts = int((~keep).sum())
        _warn(diag, f"dropped {int((~keep).sum())} cells with no counts")
    labels = obs[label_key]
    _check_not_a_measurement(pd.Series(labels.to_numpy()[keep]), label_key, min_cells_per_class)
    values = labels.astype(object).to_numpy()
    missing = np.fromiter(map(is_missing_label, values), dtype=bool, count=len(values)) & keep
    if keep.any() and missing[keep].all():
        raise SchemaError(
            f"every cell's {label_key!r} label is missing (NaN, empty or a placeholder such as "
            "'unknown'); pick another --label-key."
        )
    if missing.any():
        diag.dropped_cells_missing_label = int(missing.sum())
        spellings = pd.Series(
            ["NaN" if pd.isna(v) else repr(str(v)) for v in values[missing]]
        ).value_counts()
        listed = ", ".join(f"{k} {v}" for k, v in spellings.sort_index().items())
        _warn(
            diag,
            f"dropped {int(missing.sum())} cells with a missing {label_key!r} label ({listed})",
        )
        keep &= ~missing
    text = labels.astype(str).to_numpy()
    groups = similar_label_groups(pd.Series(text[keep]).value_counts())
    if groups:
        diag.similar_labels = groups
        listed = "; ".join(", ".join(f"{k!r} ({v})" for k, v in group.items()) for group in groups)
        if merge_similar_labels:
            diag.merged_labels = {
                spelling: most_common_spelling(group)
                for group in groups
                for spelling in group
                if spelling != most_common_spelling(group)
            }
            text = np.array([diag.merged_labels.get(t, t) for t in text], dtype=object)
            _warn(diag, f"merged labels that differ only by case or whitespace: {listed}")
        else:
            _warn(
                diag,
                f"labels that differ only by case or whitespace are separate classes: {listed}; "
                "merge them with --merge-similar-labels (merge_similar_labels: true)",
            )
    sizes = pd.Series(text[keep]).value_counts()
    rare = sizes.loc[sizes < min_cells_per_class]
    if len(rare) and len(rare) == len(sizes):
        raise SchemaError(
            f"every class of {label_key!r} has fewer than {min_cells_per_class} cells (the "
            f"largest, {sizes.index[0]}, has {int(sizes.iloc[0])}); lower min_cells_per_class "
            "(--min-cells-per-class) or pick another --label-key."
        )
    if len(rare):
        diag.dropped_classes = {str(k): int(v) for k, v in rare.items()}
        listed = _first(f"{k} ({v})" for k, v in rare.items())
        _warn(
            diag,
            f"dropped {len(rare)} class{'es' if len(rare) != 1 else ''} with fewer than "
            f"{min_cells_per_class} cells: {listed}",
        )
        keep &= ~np.isin(text, rare.index.to_numpy())
    if not keep.any():
        raise DataError(
            "no cells left after dropping empty cells, unlabelled cells and rare classes; "
            "lower min_cells_per_class or check the label column."
        )
    classes = pd.Series(text[keep]).value_counts()
    if len(classes) < 2:
        raise SchemaError(
            f"label column {label_key!r} has {len(classes)} class after filtering "
            f"({', '.join(f'{k}: {v} cells' for k, v in classes.items())}); classification "
            "needs at least 2 — pick another --label-key"
            + (" or lower min_cells_per_class." if len(rare) else ".")
        )
    if all(str(name).lstrip("-").isdigit() for name in classes.index):
        _warn(diag, _numbered_classes(label_key, [str(name) for name in classes.index]))
    kept_labels = pd.Series(
        pd.Categorical(text[keep], categories=sorted(classes.index)),
        index=obs.index[keep],
        name=label_key,
    )
    diag.classes = {str(k): int(v) for k, v in classes.items()}
    diag.n_cells = int(keep.sum())
    return keep, kept_labels


def _check_not_a_measurement(labels: pd.Series, label_key: str, min_cells: int) -> None:
    """Refuse a numeric column whose typical value is rarer than a class may be.

    A per-cell measurement (``nCount_RNA``, ``percent_mt``) picked as the label column would
    otherwise become thousands of one-cell classes, all dropped. Integer-coded clusters pass.
    """
    if not pd.api.types.is_numeric_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        return
    sizes = labels.value_counts()
    if len(sizes) > 100 and sizes.median() < min_cells:
        raise SchemaError(
            f"label column {label_key!r} holds numbers with {len(sizes)} distinct values, most "
            f"on fewer than {min_cells} cells: it looks like a measurement, not cell types; "
            "pick another --label-key."
        )


def _numbered_classes(label_key: str, names: list[str]) -> str:
    """Return the warning for classes named by numbers only (leiden/louvain write "0", "1")."""
    shown = sorted(names, key=int)
    listed = ", ".join(shown) if len(shown) <= 4 else f"{shown[0]}, {shown[1]}, …, {shown[-1]}"
    return (
        f"label column {label_key!r} names its {len(names)} classes by numbers ({listed}): if "
        "they are clusters computed from this data's expression, the scores measure agreement "
        "with that clustering, which favours the PCA baseline it was built from; prefer "
        "annotated cell types"
    )


def _first(items, limit: int = 20) -> str:
    """Join the first ``limit`` of ``items`` with commas, counting the rest."""
    items = list(items)
    more = f", … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _warn(diag: DataDiagnostics, message: str) -> None:
    diag.warnings.append(message)
    warnings.warn(message, stacklevel=3)
