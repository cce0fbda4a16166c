"""Per-cell scGPT binning: the one-cell form of ``bin_csr`` that the binning tests read."""

from __future__ import annotations

import numpy as np

from scfmbench.errors import DataError
from scfmbench.models.scgpt.tokenizer import SCGPT_N_BINS, bin_csr


def bin_values(values: np.ndarray, *, n_bins: int = SCGPT_N_BINS, seed: int = 0) -> np.ndarray:
    """Bin one cell's expression vector (zeros stay 0); see :func:`bin_csr` for the rule.

    Returns
    -------
    np.ndarray
        int64 array of the same shape as ``values``.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(f"bin_values expects one cell (1-D), got shape {values.shape}.")
    if (values < 0).any():
        raise DataError("bin_values got negative values; bin raw or normalized expression.")
    nonzero = np.flatnonzero(values)
    out = np.zeros(values.shape, dtype=np.int64)
    out[nonzero] = bin_csr(
        np.array([0, len(nonzero)]),
        values[nonzero],
        n_bins=n_bins,
        uniforms=np.random.default_rng(seed).random(len(nonzero)),
    )
    return out
