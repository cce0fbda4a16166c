"""How a command was launched: torchrun's environment, and whether to stream a file.

Light on purpose (no torch): the command line and a baseline-only run read it without
loading the embedding engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anndata import AnnData

from scfmbench.data.io import BUILTIN_DATASETS, check_h5ad_file, data_format
from scfmbench.errors import ConfigError

__all__ = ["BACKED_THRESHOLD_BYTES", "env_rank", "env_world_size", "should_stream"]

BACKED_THRESHOLD_BYTES = 1 << 30
"""``.h5ad`` files larger than this (1 GiB) are streamed unless ``backed`` says otherwise."""


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun / accelerate.

    Returns
    -------
    int
        The number of processes (1 when unset).
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as set by torchrun / accelerate.

    Returns
    -------
    int
        This process's rank (0 when unset).
    """
    return int(os.environ.get("RANK", "0"))


def should_stream(data: Any, *, backed: bool | None) -> bool:
    """Whether ``embed_dataset`` and ``run`` stream ``data`` chunk by chunk.

    ``backed`` when given, else under torchrun or for ``.h5ad`` files larger than
    ``BACKED_THRESHOLD_BYTES``.

    Parameters
    ----------
    data : AnnData, str or Path
        An in-memory AnnData, a built-in dataset name or a file path.
    backed : bool or None
        Stream (True), load (False), or decide (None).

    Returns
    -------
    bool
        Whether to stream.

    Raises
    ------
    ConfigError
        Streaming asked (or torchrun) for an in-memory AnnData or a built-in dataset, or
        ``backed=False`` under torchrun.
    DataError
        The file is missing, a directory or not HDF5.
    """
    distributed_run = env_world_size() > 1
    if isinstance(data, AnnData) or str(data) in BUILTIN_DATASETS:
        if backed or distributed_run:
            raise ConfigError(
                "streaming (--backed) and torchrun read an .h5ad file chunk by chunk, got "
                f"{'an in-memory AnnData' if isinstance(data, AnnData) else repr(str(data))}; "
                "write it with adata.write_h5ad and pass the path, or drop --backed/torchrun."
            )
        return False
    path = Path(data)
    if data_format(path) == "zarr" and not backed and not distributed_run:
        return False  # zarr stores are read in memory
    path = check_h5ad_file(path)
    if backed is None:
        return distributed_run or path.stat().st_size > BACKED_THRESHOLD_BYTES
    if not backed and distributed_run:
        raise ConfigError(
            "distributed embedding (WORLD_SIZE > 1) streams the file chunk by chunk; "
            "drop --no-backed."
        )
    return backed
