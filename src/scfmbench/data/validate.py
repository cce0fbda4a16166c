"""Load/validate stage: find the raw counts, check values and labels, drop with warnings."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.feature_selection import all_highly_variable
from scfmbench.data.genes import detect_identifier_type, identifier_sources
from scfmbench.errors import CountsRequiredError, DataError, SchemaError
from scfmbench.registry import did_you_mean

logger = logging.getLogger(__name__)

INTEGER_TOLERANCE = 1e-3
MAX_SAMPLED_VALUES = 5_000_000

MATRIX_KINDS = ("counts", "corrected", "normalized", "lognorm", "scaled")
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


def _nonzero_values(matrix) -> np.ndarray:
    """The stored values of a sparse matrix, or the nonzero values of a dense one."""
    if sp.issparse(matrix):
        return np.asarray(matrix.data)
    values = np.asarray(matrix).ravel()
    return values[values != 0]


def to_csr(matrix, dtype=None) -> sp.csr_matrix:
    """``matrix`` as CSR (``dtype`` if given) with one index dtype: files written by other
    tools may pair int64 ``indptr`` with int32 ``indices``, which scipy's routines refuse."""
    csr = sp.csr_matrix(matrix, dtype=dtype)
    if csr.indptr.dtype != csr.indices.dtype:
        csr = sp.csr_matrix(
            (csr.data, csr.indices.astype(np.int64), csr.indptr.astype(np.int64)), shape=csr.shape
        )
    return csr


def check_unique_cells(obs_names: pd.Index, *, where: str) -> None:
    """Raise DataError when ``obs_names`` repeats a cell name (as after ``anndata.concat``
    without ``obs_names_make_unique()``): cells are looked up by name in splits, features and
    embeddings, so every name must be unique.

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
        raise DataError(
            f"{where} has {int(obs_names.duplicated().sum())} duplicated cell names "
            "(obs_names); make them unique (adata.obs_names_make_unique()) and write it again."
        )


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


def require_counts(matrix, *, model: str, allow_normalized: bool = False, where: str = "X") -> str:
    """Check that a count-based model gets raw counts; return the detected matrix kind.

    Count-like non-integer values (``"corrected"``: ambient-corrected or EM counts) are used
    as counts with a warning naming the correction tools; the published models were trained
    on integer UMI counts.

    Raises:
        CountsRequiredError: for depth-normalized, log-scale or scaled values, unless
            ``allow_normalized`` (then a warning is issued and scaled data still fails).
    """
    kind = classify_matrix(matrix)
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
    """The warning a count-based model gives for count-like non-integer values."""
    return (
        f"{model}: {where} holds {KIND_NAMES['corrected']}; using them as counts — the model "
        "was trained on integer UMI counts, so for published behaviour pass the uncorrected "
        "counts (e.g. layers['counts'])."
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

BUILTIN_DATASETS = {"pbmc68k_reduced": "bulk_labels"}
"""Built-in dataset names and their default label column."""


def load_dataset(source: str | Path | AnnData) -> AnnData:
    """Read an ``.h5ad`` file, an AnnData zarr store or a built-in dataset (``pbmc68k_reduced``).

    Raises
    ------
    DataError
        The path is missing, unreadable, or another format (loom, 10x ``.h5``, plain HDF5);
        the message names the reader to convert it with.
    """
    if isinstance(source, AnnData):
        return source
    name = str(source)
    if name in BUILTIN_DATASETS:
        import scanpy as sc

        return sc.datasets.pbmc68k_reduced()
    path = Path(name)
    fmt = data_format(path)
    try:
        return anndata.read_zarr(path) if fmt == "zarr" else anndata.read_h5ad(path)
    except Exception as exc:  # h5py/zarr/anndata raise many types for damaged files
        raise unreadable_h5ad(name, exc) from None


def check_h5ad_file(name: str | Path) -> Path:
    """The path ``name`` of an ``.h5ad`` file that can be read chunk by chunk.

    Raises
    ------
    DataError
        As :func:`data_format`, and for a zarr store (read in memory only).
    """
    path = Path(name)
    if data_format(path) == "zarr":
        raise DataError(
            f"{str(name)!r} is an AnnData zarr store; streaming (--backed, torchrun) reads "
            "HDF5 .h5ad files only: drop --backed, or convert it with "
            "`anndata.read_zarr(path).write_h5ad('data.h5ad')`."
        )
    return path


def data_format(path: Path) -> Literal["h5ad", "zarr"]:
    """Which AnnData on-disk format ``path`` holds, recognised by content, not by its name.

    Returns
    -------
    ``"h5ad"`` for an HDF5 file with AnnData's ``obs``/``var`` groups, ``"zarr"`` for a
    directory holding a zarr store (``.zgroup`` or ``zarr.json``).

    Raises
    ------
    DataError
        The path is missing; a directory that is not a zarr store; not HDF5; truncated; a
        loom file (``scanpy.read_loom``); a 10x Cell Ranger ``.h5`` matrix
        (``scanpy.read_10x_h5``); an HDF5 file without AnnData's groups.
    """
    name = str(path)
    if not path.exists():
        raise DataError(
            f"data file {name!r} does not exist; pass an .h5ad path or a built-in name "
            f"({', '.join(BUILTIN_DATASETS)})."
        )
    if path.is_dir():
        if (path / ".zgroup").exists() or (path / "zarr.json").exists():
            return "zarr"
        raise DataError(
            f"{name!r} is a directory but not an AnnData zarr store (no .zgroup or zarr.json); "
            "pass the .h5ad file itself."
        )
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise DataError(
            f"{name!r} is not an .h5ad file (no HDF5 signature); write it with "
            "anndata's `adata.write_h5ad(path)` or scanpy's `sc.write`."
        )
    try:
        with h5py.File(path, "r") as handle:
            groups = {key: handle[key] for key in handle}
            found = _foreign_hdf5_format(groups)
    except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        raise unreadable_h5ad(name, exc) from None
    if found is not None:
        kind, reader = found
        raise DataError(
            f"{name!r} is {kind}, not an .h5ad file; convert it with "
            f"`{reader}(path).write_h5ad('data.h5ad')` and pass the new file."
        )
    if "obs" not in groups or "var" not in groups:
        raise DataError(
            f"{name!r} is an HDF5 file without AnnData's obs and var groups (found "
            f"{sorted(groups)[:8]}); write the data with anndata's `adata.write_h5ad(path)`."
        )
    return "h5ad"


def _foreign_hdf5_format(groups: dict) -> tuple[str, str] | None:
    """(description, scanpy reader) when top-level HDF5 ``groups`` are loom or 10x layouts."""
    if {"matrix", "row_attrs", "col_attrs"} <= groups.keys():
        return "a loom file", "scanpy.read_loom"
    matrix = groups.get("matrix")
    if isinstance(matrix, h5py.Group) and {"barcodes", "indptr", "features"} <= matrix.keys():
        return "a 10x Cell Ranger feature-barcode matrix (v3 .h5)", "scanpy.read_10x_h5"
    for group in groups.values():  # Cell Ranger v2: one group per genome
        if isinstance(group, h5py.Group) and {"barcodes", "indptr", "genes"} <= group.keys():
            return "a 10x Cell Ranger gene-barcode matrix (v2 .h5)", "scanpy.read_10x_h5"
    return None


def unreadable_h5ad(name: str | Path, exc: Exception) -> DataError:
    """The DataError for an ``.h5ad`` file that h5py/anndata cannot read."""
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return DataError(
        f"cannot read {str(name)!r} as .h5ad ({type(exc).__name__}: {reason}); the file is "
        "truncated or corrupt — re-export it with `adata.write_h5ad`."
    )


FILTER_PASS = "filter_pass"


def filter_pass_mask(obs: pd.DataFrame) -> np.ndarray | None:
    """``obs["filter_pass"]`` as a boolean mask (None when the column is absent).

    The reference Geneformer tokenizer keeps cells whose ``filter_pass`` is 1; the values
    must be booleans or the numbers 0/1.

    Raises:
        SchemaError: other values, e.g. the strings ``"TRUE"``/``"FALSE"`` written from R.
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
    """Cells to keep by ``obs["filter_pass"]`` (all when absent); the drop is recorded in
    ``diag`` with a warning. It applies to every method, so all are scored on the same cells."""
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


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

MISSING_LABELS = {"", "nan", "none", "na", "n/a", "null", "unknown", "unassigned"}
"""Placeholder labels, compared after stripping whitespace and ignoring case: a cell whose
label is NaN/None or one of these has no cell type; it is dropped from ``obs`` labels (with a
warning), and a transfer label map that maps a label to one of these drops its cells."""


def is_missing_label(value) -> bool:
    """Whether one label is a placeholder (NaN, None or ``MISSING_LABELS``)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    return str(value).strip().lower() in MISSING_LABELS


def label_key_of(label: str) -> str:
    """The form two labels must share to count as the same class spelled differently:
    whitespace trimmed and collapsed, case folded (``"B "``, ``"b"`` → ``"b"``)."""
    return " ".join(str(label).split()).casefold()


def similar_label_groups(sizes: pd.Series) -> list[dict[str, int]]:
    """Groups of labels that differ only by case or whitespace, each ``{label: cells}``
    (largest first); ``sizes`` is cells per label."""
    groups: dict[str, dict[str, int]] = {}
    for label, size in sizes.sort_values(ascending=False, kind="stable").items():
        groups.setdefault(label_key_of(label), {})[str(label)] = int(size)
    return [group for _, group in sorted(groups.items()) if len(group) > 1]


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
        return self.adata.obs

    @property
    def model_input(self) -> AnnData:
        """``adata`` with the file's own gene names: foundation models match their
        vocabulary on the original identifiers; the unique names (``GENE-1``) are only the
        baselines' bookkeeping."""
        if self.original_var_names is None:
            return self.adata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-unique var_names, on purpose
            return AnnData(
                X=self.adata.X,
                obs=self.adata.obs,
                var=self.adata.var.set_axis(self.original_var_names),
            )

    @property
    def has_counts(self) -> bool:
        return self.diagnostics.matrix_kind == "counts"


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
    """``adata.raw.var`` plus the ``adata.var`` columns it lacks (see ``with_var_columns``)."""
    return with_var_columns(adata.raw.var, adata.var)


def with_var_columns(raw_var: pd.DataFrame, var: pd.DataFrame) -> pd.DataFrame:
    """``raw_var`` plus the columns of ``var`` it lacks, matched by gene name (genes only in
    ``raw`` get missing values): the gene-identifier columns of a Seurat or CELLxGENE file
    usually live in ``var`` while the counts live in ``raw.X``."""
    out = raw_var.copy()
    extra = [c for c in var.columns if c not in out.columns]
    if extra and var.index.is_unique:
        out = out.join(var[extra], how="left")
    return out


def find_expression(adata: AnnData) -> tuple[str, object, pd.DataFrame, str]:
    """Pick the matrix to use: raw counts first, then count-like (corrected) values, else the
    first non-negative matrix.

    Returns (source name, matrix, var frame, kind). Raises DataError for NaN/inf or when
    only scaled (negative) values exist.
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
    found = ", ".join(f"{n}: {k}" for n, _, _, k in kinds)
    raise DataError(
        f"no usable expression matrix: every candidate has negative values ({found}); "
        "provide raw counts in X, layers['counts'] or .raw."
    )


def expression_view(adata: AnnData) -> AnnData:
    """All cells with the preferred expression matrix (raw counts when present) as CSR X."""
    source, matrix, var, kind = find_expression(adata)
    view = AnnData(X=to_csr(matrix, np.float32), obs=adata.obs.copy(), var=var.copy())
    view.uns["scfmbench"] = {"matrix_source": source, "matrix_kind": kind}
    return view


def suggest_label_columns(obs: pd.DataFrame) -> list[str]:
    """obs columns that look like cell-type labels (categorical/string, 2..n/2 values)."""
    out = []
    for column in obs.columns:
        series = obs[column]
        if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
            n_unique = series.nunique(dropna=True)
            if 2 <= n_unique <= max(2, len(series) // 2):
                out.append(str(column))
    return out


def validate(
    adata: AnnData,
    *,
    label_key: str | None = None,
    min_cells_per_class: int = 10,
    merge_similar_labels: bool = False,
    name: str = "the data",
) -> ValidatedData:
    """Check data and labels; drop empty cells, unlabelled cells and rare classes with warnings.

    Args:
        adata: the input data (not modified).
        label_key: obs column with cell types; default ``cell_type`` when present.
        min_cells_per_class: classes with fewer cells are dropped (with a warning).
        merge_similar_labels: merge labels that differ only by case or whitespace into their
            most common spelling (default: keep them apart, with a warning listing them).
        name: what the data is called in error messages (e.g. the file name).

    Raises:
        DataError: no cells or genes, duplicated cell names, NaN/inf values, no usable
            matrix, or no cell left after the drops.
        SchemaError: the label column is missing, or fewer than 2 classes are left.

    Returns:
        ValidatedData whose ``adata.X`` holds the chosen matrix (raw counts when available)
        as CSR float32 and whose ``adata.uns["scfmbench"]["diagnostics"]`` records what was found.
    """
    diag = DataDiagnostics(n_cells_input=adata.n_obs, n_genes_input=adata.n_vars)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"the data has {adata.n_obs} cells and {adata.n_vars} genes; it needs at least one "
            "of each — check that the right file was given."
        )
    check_unique_cells(adata.obs_names, where=name)
    label_key = resolve_label_key(adata.obs, label_key)
    diag.label_key = label_key
    source, matrix, var, kind = find_expression(adata)
    data = AnnData(X=to_csr(matrix, np.float32), obs=adata.obs.copy(), var=var.copy())
    original = data.var_names.copy()
    diag.gene_sources = identifier_sources(data.var)
    data.var_names = record_matrix(diag, source=source, kind=kind, var_names=data.var_names)
    passing = drop_filter_pass(data.obs, diag)
    if not passing.all():
        data = data[passing].copy()

    empty = np.asarray(data.X.sum(axis=1)).ravel() <= 0
    keep, labels = filter_cells(
        data.obs,
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
    """Record the chosen matrix and gene identifiers in ``diag`` (warning when it holds no
    raw counts); returns ``var_names`` made unique (suffix -1, -2, …, with a warning)."""
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
            f"no raw integer counts found; using {kind} values from adata.{source} "
            "(count-based models refuse them unless --allow-normalized is given)",
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
    """Which cells to keep (not ``empty``, labelled, in a class with enough cells) and their
    labels (categorical, sorted classes); records the drops in ``diag`` with warnings.

    Placeholder labels (:func:`is_missing_label`) count as missing. Labels that differ only
    by case or whitespace are listed in ``diag.similar_labels`` with a warning, and merged
    into their most common spelling (ties: the first in sort order) when
    ``merge_similar_labels``, before rare classes are dropped.

    Raises:
        DataError: no cell is left.
        SchemaError: fewer than 2 classes are left.
    """
    keep = ~np.asarray(empty, dtype=bool)
    if not keep.all():
        diag.dropped_cells_no_counts = int((~keep).sum())
        _warn(diag, f"dropped {int((~keep).sum())} cells with no counts")
    labels = obs[label_key]
    values = labels.astype(object).to_numpy()
    missing = np.fromiter(map(is_missing_label, values), dtype=bool, count=len(values)) & keep
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
                spelling: _most_common(group)
                for group in groups
                for spelling in group
                if spelling != _most_common(group)
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
    rare = sizes[sizes < min_cells_per_class]
    if len(rare):
        diag.dropped_classes = {str(k): int(v) for k, v in rare.items()}
        listed = ", ".join(f"{k} ({v})" for k, v in rare.items())
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
            f"({dict(classes)}); classification needs at least 2 — pick another --label-key "
            "or lower min_cells_per_class."
        )
    kept_labels = pd.Series(
        pd.Categorical(text[keep], categories=sorted(classes.index)),
        index=obs.index[keep],
        name=label_key,
    )
    diag.classes = {str(k): int(v) for k, v in classes.items()}
    diag.n_cells = int(keep.sum())
    return keep, kept_labels


def _most_common(group: dict[str, int]) -> str:
    """The spelling with the most cells (ties: the first in sort order)."""
    return min(group, key=lambda label: (-group[label], label))


def resolve_label_key(obs: pd.DataFrame, label_key: str | None) -> str:
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


def _warn(diag: DataDiagnostics, message: str) -> None:
    diag.warnings.append(message)
    warnings.warn(message, stacklevel=3)
