"""Batching for the engine.

Length-sorted batches under cell, token and attention budgets, padding a batch of tokenized
cells, slicing cells out of a TokenizedCells, and backing off when a batch runs out of memory.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from scfmbench.errors import ConfigError
from scfmbench.models.base import FoundationModel, PaddedBatch, TokenizedCells

logger = logging.getLogger(__name__)

# batch_size="auto" starts with AUTO_BATCH_SIZE cells and at most AUTO_MAX_TOKENS padded
# tokens per batch (or max_tokens when given), and halves on out-of-memory
AUTO_BATCH_SIZE = 256
AUTO_MAX_TOKENS = 65_536


def longest_first(lengths: np.ndarray) -> np.ndarray:
    """Cell positions by decreasing length, ties in input order: the order cells are batched in.

    Parameters
    ----------
    lengths : numpy.ndarray
        Tokens per cell, shape (n_cells,).

    Returns
    -------
    numpy.ndarray
        int64 positions, shape (n_cells,).
    """
    return np.argsort(-np.asarray(lengths), kind="stable")


def batch_at(
    order: np.ndarray,
    lengths: np.ndarray,
    start: int,
    *,
    batch_size: int,
    max_tokens: int | None,
    max_attention: int | None = None,
) -> np.ndarray:
    """Return the batch that starts at ``order[start]``, within the budgets.

    Parameters
    ----------
    order : numpy.ndarray
        Cell indices, longest cell first.
    lengths : numpy.ndarray
        Tokens per cell, shape (n_cells,).
    start : int
        Position in ``order`` of the batch's first (longest) cell.
    batch_size : int
        Most cells per batch.
    max_tokens : int or None
        Most padded tokens (cells × longest) per batch.
    max_attention : int or None, default None
        Most attention scores per head (cells × longest²) per batch.

    Returns
    -------
    numpy.ndarray
        The batch's cell indices (at least one).
    """
    longest = max(int(lengths[order[start]]), 1)
    size = batch_size
    if max_tokens is not None:
        size = max(1, min(size, max_tokens // longest))
    if max_attention is not None:
        size = max(1, min(size, max_attention // longest**2))
    return order[start : start + size]


def length_sorted_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    max_tokens: int | None = None,
    max_attention: int | None = None,
) -> list[np.ndarray]:
    """Group cell indices into batches of similar length, longest first.

    A batch holds at most ``batch_size`` cells and, if given, at most ``max_tokens``
    padded tokens (``len(batch) * longest``) and ``max_attention`` attention scores per
    head (``len(batch) * longest²``, what attention memory grows with). Sorting is stable,
    so equal lengths keep input order and the batching is deterministic.

    Parameters
    ----------
    lengths : numpy.ndarray
        Tokens per cell, shape (n_cells,).
    batch_size : int
        Most cells per batch (≥ 1).
    max_tokens : int or None, default None
        Most padded tokens per batch.
    max_attention : int or None, default None
        Most attention scores per head per batch.

    Returns
    -------
    list of numpy.ndarray
        Cell indices of each batch; together every cell once.

    Raises
    ------
    ConfigError
        ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}.")
    order = longest_first(lengths)
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        batch = batch_at(
            order,
            lengths,
            start,
            batch_size=batch_size,
            max_tokens=max_tokens,
            max_attention=max_attention,
        )
        batches.append(batch)
        start += len(batch)
    return batches


def collate(
    tokens: TokenizedCells,
    indices: np.ndarray,
    *,
    pad_token_id: int,
    pad_value: float = 0.0,
) -> PaddedBatch:
    """Pad the cells ``indices`` to their longest sequence.

    Parameters
    ----------
    tokens : TokenizedCells
        The tokenized cells.
    indices : numpy.ndarray
        Cells of the batch, in row order.
    pad_token_id : int
        Token id of padding positions.
    pad_value : float, default 0.0
        Value at padding positions (models with per-token values).

    Returns
    -------
    PaddedBatch
        ``input_ids`` int64 and ``attention_mask`` bool of shape (len(indices), longest),
        and ``values`` float32 of that shape when the tokens carry values (else None).
    """
    lengths = tokens.lengths[indices]
    width = max(int(lengths.max()), 1)
    ids = np.full((len(indices), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=bool)
    token_values, values = tokens.values, None
    if token_values is not None:
        values = np.full((len(indices), width), pad_value, dtype=np.float32)
    for row, cell in enumerate(indices):
        lo, hi = tokens.offsets[cell], tokens.offsets[cell + 1]
        n = hi - lo
        ids[row, :n] = tokens.input_ids[lo:hi]
        mask[row, :n] = True
        if values is not None and token_values is not None:
            values[row, :n] = token_values[lo:hi]
    return PaddedBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        values=None if values is None else torch.from_numpy(values),
    )


def take_tokens(tokens: TokenizedCells, rows: np.ndarray) -> TokenizedCells:
    """Take the cells ``rows`` of a TokenizedCells, in that order, offsets rebased to 0.

    Parameters
    ----------
    tokens : TokenizedCells
        The tokenized cells.
    rows : numpy.ndarray
        Integer positions of the cells to take.

    Returns
    -------
    TokenizedCells
        The cells ``rows``, sharing the settings.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lengths = tokens.lengths[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # position of every taken token in the flat arrays: its cell's start + its rank in the cell
    flat = np.repeat(tokens.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return TokenizedCells(
        input_ids=tokens.input_ids[flat],
        offsets=offsets,
        obs_names=tokens.obs_names[rows],
        settings=tokens.settings,
        values=None if tokens.values is None else tokens.values[flat],
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device ran out of memory.

    Parameters
    ----------
    exc : BaseException
        A caught exception.

    Returns
    -------
    bool
        True for CUDA's OutOfMemoryError and for RuntimeErrors saying "out of memory".
    """
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def halve_batch(
    model: FoundationModel, tokens: TokenizedCells, indices: np.ndarray, device: torch.device
) -> int:
    """After an out-of-memory batch: free the cache and return the next (halved) batch size.

    Parameters
    ----------
    model : FoundationModel
        The model that ran out of memory (for the messages).
    tokens : TokenizedCells
        The tokenized cells.
    indices : numpy.ndarray
        The batch that ran out of memory.
    device : torch.device
        Where it ran.

    Returns
    -------
    int
        Half the batch's cells.

    Raises
    ------
    ConfigError
        The batch was a single cell: it does not fit on ``device`` at all.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if len(indices) == 1:
        n_tokens = int(tokens.lengths[indices[0]])
        raise ConfigError(
            f"{model.model_id}: one cell ({tokens.obs_names[indices[0]]!r}, {n_tokens} tokens) "
            f"alone runs out of memory on {device}; use a device with more memory, "
            "--precision bfloat16, or a shorter max_seq_len (--option max_seq_len=…)."
        )
    size = len(indices) // 2
    logger.warning(
        "%s: out of memory with %d cells per batch on %s; retrying with %d",
        model.model_id,
        len(indices),
        device,
        size,
    )
    return size
