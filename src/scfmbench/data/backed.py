"""Out-of-core data: read and validate an ``.h5ad`` file chunk by chunk without loading it.

``H5adCells`` reads row chunks of the expression matrix straight from the file (h5py);
``validate_backed`` runs the checks of :func:`scfmbench.data.validate.validate` over the chunks
and returns a :class:`BackedData` whose ``cells`` serve the feature builders one chunk at a
time, so ``scfmbench run --backed`` never holds the expression matrix in memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench._progress import progress_bar
from scfmbench.data.feature_selection import all_highly_variable
from scfmbench.data.genes import identifier_sources
from scfmbench.data.io import check_h5ad_file, unreadable_h5ad
from scfmbench.data.labels import resolve_label_key
from scfmbench.data.matrix import (
    KIND_NAMES,
    check_finite,
    classify_matrix,
    find_expression,
    to_csr,
    with_var_columns,
)
from scfmbench.data.validate import (
    DataDiagnostics,
    check_unique_cells,
    drop_filter_pass,
    filter_cells,
    record_matrix,
)
from scfmbench.errors import DataError, ScfmbenchError

logger = logging.getLogger(__name__)

# where find_expression's candidates live inside an .h5ad file: (matrix, var)
H5_LOCATIONS = {
    "layers['counts']": ("layers/counts", "var"),
    "X": ("X", "var"),
    "raw.X": ("raw/X", "raw/var"),
}


def _read_frame(elem: Any) -> pd.DataFrame:
    """Read the ``obs`` or ``var`` data frame stored at HDF5 element ``elem``."""
    return cast(pd.DataFrame, anndata.io.read_elem(elem))


class H5adCells:
    """Row-chunk reader for the expression matrix of an ``.h5ad`` file (CSR or dense).

    Considers the candidates :func:`scfmbench.data.matrix.find_expression` considers, in its
    order (``layers['counts']``, ``X``, ``raw.X``; an absent ``X`` or one written as an empty
    dataset with ``encoding-type: null`` is skipped) and picks as it does (raw counts first),
    judged on the first chunk; ``obs`` and ``var`` are read whole, the matrix only chunk by
    chunk.

    Raises
    ------
    DataError
        Duplicated cell names, no cells, no candidate matrix, a matrix in an encoding that
        cannot be read by rows, or the legacy (anndata < 0.7) layout.
    """

    def __init__(self, path: Path, *, chunk_size: int) -> None:
        self.path = check_h5ad_file(path)
        try:
            self.file = h5py.File(self.path, "r")
            self.obs = _read_frame(self.file["obs"])
            self.vars = {
                var: _read_frame(self.file[var])
                for _, var in H5_LOCATIONS.values()
                if var in self.file
            }
        except Exception as exc:  # h5py/anndata raise many types for damaged files
            raise unreadable_h5ad(path, exc) from None
        self.n_obs = len(self.obs)
        try:
            self._check_layout()
            check_unique_cells(pd.Index(self.obs.index), where=self.path.name)
            self.source, self.kind = self._pick_matrix(min(chunk_size, self.n_obs))
        except ScfmbenchError:
            self.file.close()
            raise
        self.location, var_location = H5_LOCATIONS[self.source]
        self.var = self.vars[var_location]
        if var_location != "var":  # raw.X: identifier columns usually live in var
            self.var = with_var_columns(self.var, self.vars["var"])
        logger.info("%s: streaming adata.%s (%s)", self.path.name, self.source, self.kind)

    def candidates(self) -> list[str]:
        """Return the candidate matrices this file holds (``H5_LOCATIONS`` names), in order."""
        out = []
        for source, (location, var) in H5_LOCATIONS.items():
            elem = self.file.get(location)
            if elem is None or var not in self.vars:
                continue
            if isinstance(elem, h5py.Dataset) and (
                elem.shape is None or elem.attrs.get("encoding-type") == "null"
            ):
                continue  # X written as an empty dataset (anndata ≥ 0.12 with X=None)
            out.append(source)
        return out

    def _pick_matrix(self, stop: int) -> tuple[str, str]:
        """(source, kind) of the matrix ``find_expression`` picks on cells ``0:stop``."""
        if self.n_obs == 0:
            raise DataError(f"{self.path} has no cells; pass a file with at least one cell.")
        found = self.candidates()
        if not found:
            raise DataError(
                f"{self.path.name} has no expression matrix: X is absent or empty and there is "
                "no layers['counts'] or raw/X; write the counts to X (adata.X = counts) and "
                "save the file again."
            )
        first = AnnData(obs=self.obs.iloc[:stop], var=self.vars["var"])
        if "X" in found:
            first.X = self._read("X", 0, stop)
        if "layers['counts']" in found:
            first.layers["counts"] = self._read("layers/counts", 0, stop)
        if "raw.X" in found:
            first.raw = AnnData(X=self._read("raw/X", 0, stop), var=self.vars["raw/var"])
        source, _, _, kind = find_expression(first)
        return source, kind

    def _check_layout(self) -> None:
        """Raise DataError for the legacy anndata (< 0.7) layout.

        That layout has structured-array obs/var and a sparse X group marked only with
        ``h5sparse_format``.
        """
        obs, matrix = self.file["obs"], self.file.get("X")
        legacy = isinstance(obs, h5py.Dataset) or (
            isinstance(matrix, h5py.Group)
            and "h5sparse_format" in matrix.attrs
            and "encoding-type" not in matrix.attrs
        )
        if legacy:
            raise DataError(
                f"{self.path.name} uses the legacy anndata (< 0.7) layout (structured-array "
                "obs/var, X marked only with h5sparse_format), which cannot be streamed; read "
                "it with anndata.read_h5ad and write it again with adata.write_h5ad, or pass "
                "--no-backed."
            )

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the open file (a worker process opens its own).

        ``obs`` keeps its columns but no rows: a worker reads matrix rows only, and an
        atlas's ``obs`` is large.
        """
        state = {name: value for name, value in self.__dict__.items() if name != "file"}
        state["obs"] = self.obs.iloc[:0]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the reader and open the file again, read-only."""
        self.__dict__.update(state)
        self.file = h5py.File(self.path, "r")

    def _read(self, location: str, start: int, stop: int) -> sp.csr_matrix:
        elem = self.file[location]
        if isinstance(elem, h5py.Dataset):
            return to_csr(elem[start:stop], np.float32)
        encoding = elem.attrs.get("encoding-type", "")
        if encoding != "csr_matrix":
            raise DataError(
                f"{self.path} stores {location} as {encoding or 'an unknown encoding'}; streaming "
                "reads cells in chunks and needs CSR or dense rows: rewrite the file with "
                "`adata.X = adata.X.tocsr()` (likewise layers/raw), or pass --no-backed."
            )
        return to_csr(anndata.io.sparse_dataset(cast(h5py.Group, elem))[start:stop], np.float32)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` of the chosen matrix (CSR float32), unchecked."""
        return self._read(self.location, start, stop)

    def chunk(self, start: int, stop: int) -> AnnData:
        """Return cells ``start:stop`` as an in-memory AnnData (CSR float32 X), checked.

        Raises
        ------
        DataError
            NaN/inf values, or values of another kind than the first chunk's (e.g. negative,
            or normalized after raw counts).
        """
        matrix = self.rows(start, stop)
        where = f"adata.{self.source} of cells {start}-{stop - 1} in {self.path.name}"
        check_finite(matrix, where=where)
        kind = classify_matrix(matrix)
        if kind != self.kind and not _same_matrix(kind, self.kind, matrix):
            found = KIND_NAMES[kind]
            if kind == "scaled":
                found += f" (min {matrix.data.min():.3g})"
            raise DataError(
                f"{where} hold {found} but the first cells hold {KIND_NAMES[self.kind]}; every "
                "cell must come from the same matrix — fix or drop these cells and write the "
                "file again."
            )
        view = AnnData(X=matrix, obs=self.obs.iloc[start:stop], var=self.var)
        view.uns["scfmbench"] = {"matrix_source": self.source, "matrix_kind": self.kind}
        return view


SMALL_CHUNK = 100
"""A chunk with fewer non-empty cells is too small to tell count-like, depth-normalized and
log-scale values apart (one cell has no spread of totals; a few low-depth cells of corrected
counts may all stay below ``LOG_SCALE_MAX``)."""
NON_INTEGER_KINDS = {"corrected", "normalized", "lognorm"}


def _same_matrix(kind: str, first: str, matrix: sp.csr_matrix) -> bool:
    """Tell whether a chunk of ``kind`` can come from a matrix whose first chunk is ``first``.

    An all-integer chunk is fine in non-negative data (e.g. only zeros and ones), and a chunk
    of fewer than ``SMALL_CHUNK`` non-empty cells may look like any non-integer kind.
    """
    if kind == "counts":
        return first != "scaled"
    small = int((matrix.getnnz(axis=1) > 0).sum()) < SMALL_CHUNK
    return small and kind in NON_INTEGER_KINDS and first in NON_INTEGER_KINDS


# --------------------------------------------------------------------------------------
# Validated cells on disk
# --------------------------------------------------------------------------------------


@dataclass
class BackedCells:
    """The validated cells of an ``.h5ad`` file as ``CellRows``.

    Row ``i`` is file row ``file_rows[i]``; rows are read ``chunk_size`` file rows at a time.
    """

    reader: H5adCells
    file_rows: np.ndarray
    obs_names: pd.Index
    chunk_size: int
    progress: bool = False

    @property
    def n_vars(self) -> int:
        """Number of genes (columns)."""
        return len(self.reader.var)

    def row_chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield (positions in ``rows``, CSR float32 of those rows), reading the file in order.

        Rows are grouped by the file chunk they lie in, so every chunk is read once.
        """
        wanted = self.file_rows[np.asarray(rows, dtype=np.int64)]
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        chunk_of = ordered // self.chunk_size
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        groups = np.split(np.arange(len(ordered)), bounds)
        for group in progress_bar(
            groups, desc="read cells", unit="chunk", leave=False, progress=self.progress
        ):
            if len(group) == 0:
                continue
            start = int(chunk_of[group[0]]) * self.chunk_size
            stop = min(start + self.chunk_size, self.reader.n_obs)
            yield order[group], self.reader.rows(start, stop)[ordered[group] - start]


@dataclass
class BackedData:
    """A validated ``.h5ad`` file that stays on disk (the streaming ``ValidatedData``)."""

    path: Path
    cells: BackedCells
    labels: pd.Series
    obs: pd.DataFrame
    diagnostics: DataDiagnostics
    content_hash: str

    @property
    def file_rows(self) -> np.ndarray:
        """File row of every kept cell, in order."""
        return self.cells.file_rows

    def close(self) -> None:
        """Close the file."""
        self.cells.reader.close()


def validate_backed(
    path: str | Path,
    *,
    label_key: str | None = None,
    min_cells_per_class: int = 10,
    chunk_size: int = 2048,
    progress: bool = True,
    merge_similar_labels: bool = False,
) -> BackedData:
    """Validate an ``.h5ad`` file that stays on disk, as :func:`.validate.validate` does.

    One pass over the file in chunks of ``chunk_size`` cells checks every value (NaN/inf,
    the same kind of values as the first chunk), finds cells without counts and hashes the
    matrix; labels and genes come from ``obs``/``var``, which are read whole. Labels follow
    :func:`scfmbench.data.validate.filter_cells` (placeholders missing; ``merge_similar_labels``
    merges labels that differ only by case or whitespace).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    label_key, min_cells_per_class, merge_similar_labels
        As :func:`scfmbench.data.validate.validate`.
    chunk_size
        Cells read at a time (default 2048).
    progress
        Show a progress bar (default True).

    Returns
    -------
    BackedData
        Close it (``.close()``) when done.

    Raises
    ------
    DataError, SchemaError
        As :func:`scfmbench.data.validate.validate`, and for files the streaming reader
        cannot read by rows (see :class:`H5adCells`).
    """
    reader = H5adCells(Path(path), chunk_size=chunk_size)
    try:
        return _validate(
            reader, label_key, min_cells_per_class, chunk_size, progress, merge_similar_labels
        )
    except (ScfmbenchError, KeyboardInterrupt):
        reader.close()
        raise


def _validate(
    reader: H5adCells,
    label_key,
    min_cells_per_class: int,
    chunk_size: int,
    progress: bool,
    merge_similar_labels: bool,
) -> BackedData:
    obs = reader.obs
    diag = DataDiagnostics(n_cells_input=reader.n_obs, n_genes_input=len(reader.var))
    if len(reader.var) == 0:
        raise DataError(
            f"the data has {reader.n_obs} cells and 0 genes; it needs at least one of each — "
            "check that the right file was given."
        )
    label_key = resolve_label_key(obs, label_key)
    diag.label_key = label_key
    var_names = record_matrix(
        diag, source=reader.source, kind=reader.kind, var_names=pd.Index(reader.var.index)
    )
    diag.n_genes = len(var_names)
    diag.all_highly_variable = all_highly_variable(reader.var)
    diag.gene_sources = identifier_sources(reader.var)
    totals = np.zeros(reader.n_obs)
    digest = hashlib.sha256(f"{reader.source}{reader.n_obs}x{len(var_names)}".encode())
    starts = range(0, reader.n_obs, chunk_size)
    bar = progress_bar(starts, desc="validate", unit="chunk", progress=progress)
    for start in bar:
        stop = min(start + chunk_size, reader.n_obs)
        matrix = cast(sp.csr_matrix, reader.chunk(start, stop).X)
        totals[start:stop] = np.asarray(matrix.sum(axis=1)).ravel()
        for part in (matrix.data, matrix.indices, matrix.indptr):
            digest.update(np.ascontiguousarray(part).tobytes())
    passing = drop_filter_pass(obs, diag)
    kept, labels = filter_cells(
        obs.iloc[passing],
        label_key=label_key,
        empty=totals[passing] <= 0,
        min_cells_per_class=min_cells_per_class,
        diag=diag,
        merge_similar_labels=merge_similar_labels,
    )
    keep = np.zeros(reader.n_obs, dtype=bool)
    keep[np.flatnonzero(passing)[kept]] = True
    hashed = pd.util.hash_pandas_object(  # pyright: ignore[reportAttributeAccessIssue]
        labels.astype(str), index=True
    )
    digest.update(hashed.to_numpy().tobytes())
    logger.info(
        "validated %d cells × %d genes on disk, %d classes; %s from adata.%s; %s identifiers",
        diag.n_cells,
        diag.n_genes,
        len(diag.classes),
        reader.kind,
        reader.source,
        diag.identifier_type,
    )
    file_rows = np.flatnonzero(keep)
    cells = BackedCells(
        reader, file_rows, pd.Index(obs.index[keep]), chunk_size=chunk_size, progress=progress
    )
    return BackedData(
        path=reader.path,
        cells=cells,
        labels=labels,
        obs=obs.iloc[file_rows],
        diagnostics=diag,
        content_hash=digest.hexdigest(),
    )
