"""The cells of a run: in memory or streamed, their rows, fingerprint and random splits."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pandas as pd

from scfmbench.config import RunConfig
from scfmbench.data.backed import BackedData
from scfmbench.data.cells import CellRows, InMemoryCells
from scfmbench.data.splits import SplitSet, labels_hash, load_or_make_splits
from scfmbench.data.validate import ValidatedData
from scfmbench.hashing import hash_array, hash_json

__all__ = ["IN_MEMORY", "RunData", "data_fingerprint", "random_splits", "run_cells"]

IN_MEMORY = "<in-memory AnnData>"
"""``config.data`` of a run given an AnnData object instead of a file."""

RunData = ValidatedData | BackedData
"""The validated cells of a run: in memory, or an ``.h5ad`` file streamed from disk."""


def random_splits(directory: Path, labels: pd.Series, config: RunConfig) -> SplitSet:
    """Return the splits of ``config``'s random-split design, reused or made and saved.

    Parameters
    ----------
    directory : pathlib.Path
        The folder of ``splits.json`` (see :func:`scfmbench.data.splits.load_or_make_splits`).
    labels : pandas.Series
        Categorical cell types of the run's cells.
    config : RunConfig
        ``design``, ``n_splits``, ``n_repeats``, ``seed`` and ``fractions`` are read.

    Returns
    -------
    SplitSet

    Raises
    ------
    SplitError
        Classes too small to split.
    """
    split_set, _ = load_or_make_splits(
        directory,
        labels,
        n_splits=config.n_splits,
        seed=config.seed,
        fractions=config.fractions,
        design=config.design,
        n_repeats=config.n_repeats,
    )
    return split_set


def run_cells(data: RunData) -> CellRows:
    """Return the expression rows of the run's cells (read chunk by chunk when streamed)."""
    cells = data.cells if isinstance(data, BackedData) else InMemoryCells.from_adata(data.adata)
    return cast(CellRows, cells)  # CellRows declares n_vars an attribute, the readers a property


def data_fingerprint(data: RunData) -> str:
    """Hash the run's expression values and labels (the key of the cached stages)."""
    if isinstance(data, BackedData):
        return data.content_hash
    matrix = data.adata.X  # CSR after validation; anndata types X more widely
    return hash_json([hash_array(matrix), labels_hash(data.labels)])  # pyright: ignore[reportArgumentType]
