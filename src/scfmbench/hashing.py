"""Content hashes used for cache keys, split reuse and the run manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp


def hash_bytes(*chunks: bytes) -> str:
    """Return the SHA-256 hex digest of ``chunks``, concatenated."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def hash_array(array: np.ndarray | sp.spmatrix) -> str:
    """SHA-256 of an array's dtype, shape and bytes (CSR: data, indices, indptr)."""
    h = hashlib.sha256()
    if sp.issparse(array):
        csr = sp.csr_matrix(array)
        h.update(f"csr{csr.shape}{csr.dtype}".encode())
        for part in (csr.data, csr.indices, csr.indptr):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        arr = np.ascontiguousarray(array)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Return the SHA-256 hex digest of a JSON-serializable object with sorted keys."""
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_file(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """Return the SHA-256 hex digest of a file, read ``chunk_size`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def hash_strings(values) -> str:
    """Return the SHA-256 hex digest of ``values`` as text, joined by the unit separator."""
    return hash_bytes("\x1f".join(map(str, values)).encode())
