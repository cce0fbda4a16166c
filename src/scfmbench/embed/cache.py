"""The embedding cache.

Embeddings on disk under a content key (model checkpoint, data, tokenizer settings, layer,
pooling, seed), each entry checksummed and verified on read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scfmbench._atomic import write_json, write_npy
from scfmbench.hashing import hash_array, hash_bytes, hash_file, hash_json, hash_strings
from scfmbench.models.base import FoundationModel

logger = logging.getLogger(__name__)

_WRITTEN_HERE: dict[Path, int] = {}
"""Cache entries written by this process: entry path → number of layers in the pass that
wrote it (so a reuse can say whether it comes from this run or from an earlier one)."""


class EmbeddingCache:
    """Embeddings on disk under a content key; entries carry a checksum and are verified.

    Parameters
    ----------
    root : Path
        The cache folder: ``<key>.npy`` (the matrix) and ``<key>.json`` (checksum, cell
        hash and info) per entry.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def written_here(self, key: str) -> int | None:
        """Layers of the pass in this process that wrote ``key``.

        Parameters
        ----------
        key : str
            A cache key.

        Returns
        -------
        int or None
            The number of layers that pass pooled; None when an earlier process wrote it.
        """
        return _WRITTEN_HERE.get(self._paths(key)[0].resolve())

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def get(self, key: str, obs_names: pd.Index) -> np.ndarray | None:
        """Return the matrix saved under ``key`` for exactly the cells ``obs_names``.

        Parameters
        ----------
        key : str
            A cache key.
        obs_names : pandas.Index
            The cells the entry must hold, in row order.

        Returns
        -------
        numpy.ndarray or None
            The saved (n_cells, dim) float32 matrix (or stacked layers); None when absent
            or unusable (checksum or cells differ: a warning is logged).
        """
        array_path, meta_path = self._paths(key)
        if not (array_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != hash_file(array_path):
                raise ValueError("checksum mismatch")
            if meta.get("obs_hash") != hash_strings(obs_names):
                raise ValueError("cells differ")
            return np.load(array_path, allow_pickle=False)
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            logger.warning("embedding cache entry %s is unusable (%s); recomputing", key[:12], exc)
            return None

    def drop_parts(self, key: str) -> None:
        """Remove the chunk files of ``key`` once the whole entry is saved.

        Parameters
        ----------
        key : str
            The key whose ``<key>.part*`` files are deleted.
        """
        for path in self.root.glob(f"{key}.part*"):
            path.unlink(missing_ok=True)

    def put(
        self,
        key: str,
        matrix: np.ndarray,
        obs_names: pd.Index,
        info: dict[str, Any],
        *,
        n_layers: int = 1,
    ) -> None:
        """Save ``matrix`` under ``key`` (atomically, with its checksum).

        Parameters
        ----------
        key : str
            The cache key.
        matrix : numpy.ndarray
            The embeddings, rows in ``obs_names`` order.
        obs_names : pandas.Index
            The cells of the rows.
        info : dict
            Extra JSON values stored beside the checksum.
        n_layers : int, default 1
            Layers of the pass that computed it (reported on reuse).
        """
        array_path, meta_path = self._paths(key)
        write_npy(array_path, matrix)
        meta = {"sha256": hash_file(array_path), "obs_hash": hash_strings(obs_names), **info}
        write_json(meta_path, meta)
        _WRITTEN_HERE[array_path.resolve()] = n_layers


def cache_key(
    model: FoundationModel, adata: AnnData, tokens_settings: dict[str, Any], **options: Any
) -> str:
    """Hash model (checkpoint), data, tokenizer settings and options into a cache key.

    Parameters
    ----------
    model : FoundationModel
        The model (its ``settings()``, which include the checkpoint hash).
    adata : AnnData
        The cells embedded (matrix, cell and gene names are hashed).
    tokens_settings : dict
        The tokenizer's settings.
    **options
        Whatever else decides the embedding (layer, pooling, seed, ...).

    Returns
    -------
    str
        A hex digest.
    """
    data_hash = hash_bytes(
        hash_array(adata.X).encode(),  # pyright: ignore[reportArgumentType]
        hash_strings(adata.obs_names).encode(),
        hash_strings(adata.var_names).encode(),
    )
    return hash_json(
        {"model": model.settings(), "data": data_hash, "tokenizer": tokens_settings, **options}
    )
