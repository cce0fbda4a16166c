"""Cells of an expression matrix, read a chunk of rows at a time.

``CellRows`` is the source every baseline representation reads: in memory
(:class:`InMemoryCells`) or streamed from an ``.h5ad`` file
(:class:`scfmbench.data.backed.BackedCells`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.matrix import lognormalize, to_csr

IN_MEMORY_CHUNK = 8192


class CellRows(Protocol):
    """Rows of an expression matrix, read a chunk at a time."""

    obs_names: pd.Index

    @property
    def n_vars(self) -> int:
        """Number of genes (columns)."""
        ...

    def row_chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield (positions in ``rows``, CSR float32 of those rows) chunk by chunk."""
        ...


@dataclass
class InMemoryCells:
    """A CSR matrix in memory, served in chunks of ``chunk_size`` rows."""

    matrix: sp.csr_matrix
    obs_names: pd.Index
    chunk_size: int = IN_MEMORY_CHUNK

    @classmethod
    def from_adata(cls, adata: AnnData) -> InMemoryCells:
        """Serve ``adata.X`` (as CSR float32) with ``adata.obs_names``."""
        return cls(to_csr(adata.X, np.float32), pd.Index(adata.obs_names))

    @property
    def n_vars(self) -> int:
        """Number of genes (columns)."""
        return self.matrix.shape[1]  # pyright: ignore[reportOptionalSubscript]

    def row_chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Yield (positions in ``rows``, CSR float32 of those rows), ``chunk_size`` at a time."""
        for start in range(0, len(rows), self.chunk_size):
            positions = np.arange(start, min(start + self.chunk_size, len(rows)))
            yield positions, self.matrix[rows[positions]]


def row_indices(cells: CellRows, names: pd.Index) -> np.ndarray:
    """Return the row numbers of the cells ``names``.

    Raises
    ------
    KeyError
        Some of ``names`` are not in ``cells``.
    """
    rows = cells.obs_names.get_indexer(names)
    if (rows < 0).any():
        raise KeyError(f"{int((rows < 0).sum())} cells are not in the data")
    return rows


def lognorm_chunks(
    cells: CellRows, rows: np.ndarray, kind: str
) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """Yield log-normalized chunks of ``rows`` (see :func:`lognormalize`)."""
    for positions, chunk in cells.row_chunks(rows):
        yield positions, lognormalize(chunk, kind=kind)
