"""Reading a dataset: ``.h5ad`` files, AnnData zarr stores and the built-in datasets.

The file checks recognise other formats (loom, 10x ``.h5``, plain HDF5) by content and name
the reader to convert them with.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import anndata
import h5py
from anndata import AnnData

from scfmbench.errors import DataError

BUILTIN_DATASETS = {"pbmc68k_reduced": "bulk_labels"}
"""Built-in dataset names and their default label column."""

DUPLICATE_NAMES_WARNING = r"(Observation|Variable) names are not unique"
"""anndata's warnings on reading duplicated ``obs_names``/``var_names``, which validation
refuses (cells) or makes unique with a warning of its own (genes)."""


def load_dataset(source: str | Path | AnnData) -> AnnData:
    """Read an ``.h5ad`` file, an AnnData zarr store or a built-in dataset (``pbmc68k_reduced``).

    Parameters
    ----------
    source
        A path, a built-in name (:data:`BUILTIN_DATASETS`), or an AnnData (returned as is).

    Returns
    -------
    AnnData
        The dataset, in memory.

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
        with warnings.catch_warnings():  # validate() reports duplicated names in its own words
            warnings.filterwarnings("ignore", DUPLICATE_NAMES_WARNING, UserWarning)
            return anndata.read_zarr(path) if fmt == "zarr" else anndata.read_h5ad(path)
    except Exception as exc:  # h5py/zarr/anndata raise many types for damaged files
        raise unreadable_h5ad(name, exc) from None


def check_h5ad_file(name: str | Path) -> Path:
    """Return the path ``name`` of an ``.h5ad`` file that can be read chunk by chunk.

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
    """Tell which AnnData on-disk format ``path`` holds, by content, not by its name.

    Returns
    -------
    str
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
    if not magic:
        raise DataError(
            f"{name!r} is empty (0 bytes): a write or copy that did not finish? Write it again "
            "with anndata's `adata.write_h5ad(path)`."
        )
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
        found = sorted(map(str, groups))[:8]
        raise DataError(
            f"{name!r} is an HDF5 file without AnnData's obs and var groups (found "
            f"{found}); write the data with anndata's `adata.write_h5ad(path)`."
        )
    return "h5ad"


def check_config_data(data: str, config: Path) -> None:
    """Refuse a ``data:`` entry of the config file ``config`` that names no file.

    Relative paths are read from the current folder, as on the command line (so a run's saved
    ``config.yaml`` means the same data wherever it is copied).

    Raises
    ------
    DataError
        ``data`` is neither a built-in name nor an existing path; the message names the config
        and, when the file lies beside the config instead, the path to write.
    """
    path = Path(data)
    if data in BUILTIN_DATASETS or path.exists():
        return
    beside = Path(config).parent / path
    fix = (
        f"relative paths are read from the current folder: write data: {str(beside)!r}"
        if not path.is_absolute() and beside.exists()
        else "check the path"
        + ("" if path.is_absolute() else " (relative paths are read from the current folder)")
    )
    raise DataError(f"data file {data!r} (data: in {str(config)!r}) does not exist; {fix}.")


def _foreign_hdf5_format(groups: dict) -> tuple[str, str] | None:
    """Return (description, scanpy reader) when HDF5 ``groups`` are a loom or 10x layout."""
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
    """Return the DataError for an ``.h5ad`` file that h5py/anndata cannot read."""
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return DataError(
        f"cannot read {str(name)!r} as .h5ad ({type(exc).__name__}: {reason}); the file is "
        "truncated or corrupt — re-export it with `adata.write_h5ad`."
    )
