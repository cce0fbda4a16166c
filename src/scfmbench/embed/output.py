"""Rank 0's output of a streamed embedding.

An ``.npy`` matrix or a copy of the input ``.h5ad`` with ``obsm[key]``, filled chunk by
chunk so the embedding is never whole in memory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np

from scfmbench.data.backed import H5adCells
from scfmbench.errors import ConfigError

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".npy", ".h5ad")
"""The embedding files ``embed`` writes: the matrix, or a copy of the data with ``obsm``."""


def check_output_file(out: str | Path) -> Path:
    """Return ``out`` as a path if it ends in one of :data:`OUTPUT_SUFFIXES`.

    Raises
    ------
    ConfigError
        Any other suffix (e.g. ``.csv``, which would get an HDF5 file).
    """
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"output {str(out)!r} must end in .npy or .h5ad; e.g. --out emb.npy.")
    return out


class _NpyRows:
    """An (n_obs, dim) float32 ``.npy`` file filled chunk by chunk via small memmaps.

    Parameters
    ----------
    path : Path
        The file to create.
    n_obs, dim : int
        Its shape.
    """

    def __init__(self, path: Path, *, n_obs: int, dim: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_obs, dim))
        self.path, self.dim, self.offset = path, dim, header.offset
        del header

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, dim) at row ``start`` through a memmap of just those rows."""
        view = np.memmap(
            self.path,
            mode="r+",
            dtype=np.float32,
            offset=self.offset + start * self.dim * 4,
            shape=rows.shape,
        )
        view[:] = rows
        view.flush()
        del view

    def close(self, info: dict[str, Any] | None) -> None:
        """Nothing to add: ``.npy`` holds only the matrix."""


class _H5adRows:
    """A copy of the input ``.h5ad`` with ``obsm[key]`` written chunk by chunk (h5py).

    Parameters
    ----------
    path : Path
        The file to create.
    source : Path
        The input ``.h5ad``, copied first.
    n_obs, dim : int
        Shape of ``obsm[key]``.
    key : str
        The ``obsm`` key (replaced if present).
    """

    def __init__(self, path: Path, *, source: Path, n_obs: int, dim: int, key: str) -> None:
        shutil.copyfile(source, path)
        self.file = h5py.File(path, "r+")
        obsm = self.file.require_group("obsm")
        if "encoding-type" not in obsm.attrs:
            obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        if key in obsm:
            del obsm[key]
        self.key, self.dim = key, dim
        self.rows = obsm.create_dataset(
            key, shape=(n_obs, dim), dtype=np.float32, chunks=(min(max(n_obs, 1), 4096), dim)
        )
        self.rows.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (n, dim) into ``obsm[key]`` at row ``start``."""
        self.rows[start : start + len(rows)] = rows

    def close(self, info: dict[str, Any] | None) -> None:
        """Write ``uns['<key>_info']`` (unless ``info`` is None, after a failure) and close."""
        if info is None:
            self.file.close()
            return
        uns = self.file.require_group("uns")
        if "encoding-type" not in uns.attrs:
            uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        if f"{self.key}_info" in uns:
            del uns[f"{self.key}_info"]
        anndata.io.write_elem(uns, f"{self.key}_info", info)
        self.file.close()


def remove_leftovers(out: Path) -> None:
    """Delete temporary outputs (``.<name>.*.tmp``) that a killed run left beside ``out``.

    Parameters
    ----------
    out : Path
        The output file.
    """
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        logger.info("removing %s, left by an interrupted run", stale.name)
        stale.unlink(missing_ok=True)


class Output:
    """Rank 0's output file, opened at the first chunk with embeddings (its width sets dim).

    Chunks where no cell has tokens become NaN rows.

    Parameters
    ----------
    tmp : Path
        The temporary file written (renamed to ``out`` when finished).
    cells : H5adCells
        The input file's reader (its ``n_obs`` and ``path``).
    out : Path
        The final output (its suffix picks ``.npy`` or ``.h5ad``).
    key : str
        The ``obsm`` key of an ``.h5ad`` output.
    """

    def __init__(self, tmp: Path, cells: H5adCells, *, out: Path, key: str) -> None:
        self.tmp, self.cells, self.out, self.key = tmp, cells, out, key
        self.writer: _NpyRows | _H5adRows | None = None
        self.pending: list[tuple[int, int]] = []  # token-less chunks before the writer exists

    def write(self, start: int, stop: int, rows: np.ndarray | None) -> None:
        """Write the rows of cells ``start:stop`` (None: every cell without tokens).

        Parameters
        ----------
        start, stop : int
            Cell range of the chunk.
        rows : numpy.ndarray or None
            float32 rows of shape (stop - start, dim), NaN for cells without tokens.
        """
        if self.writer is None:
            if rows is None:
                self.pending.append((start, stop))
                return
            n_obs, dim = self.cells.n_obs, rows.shape[1]
            if self.out.suffix == ".npy":
                self.writer = _NpyRows(self.tmp, n_obs=n_obs, dim=dim)
            else:
                self.writer = _H5adRows(
                    self.tmp, source=self.cells.path, n_obs=n_obs, dim=dim, key=self.key
                )
            for lo, hi in self.pending:
                self.writer.write(lo, np.full((hi - lo, dim), np.nan, dtype=np.float32))
        if rows is None:
            rows = np.full((stop - start, self.writer.dim), np.nan, dtype=np.float32)
        self.writer.write(start, rows)

    def close(self, info: dict[str, Any] | None) -> None:
        """Close the writer, if one was opened.

        Parameters
        ----------
        info : dict or None
            ``uns`` info for an ``.h5ad`` output; None after a failure.
        """
        if self.writer is not None:
            self.writer.close(info)
