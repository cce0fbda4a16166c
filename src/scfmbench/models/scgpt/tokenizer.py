"""scGPT tokenizer: symbol vocabulary, per-cell value binning, ``<cls>`` + non-zero genes.

The reference pipeline (scGPT ``tasks/cell_emb.py`` + ``DataCollator``) per cell:

1. keep the genes whose symbol is in ``vocab.json``; take the cell's non-zero genes in var order;
2. bin the non-zero values into ``n_bins`` bins (edges are the quantiles of the cell's non-zero
   values at ``n_bins - 1`` evenly spaced points; ties with edges are broken at random between
   left- and right-sided digitize); zeros are never tokenized;
3. prepend ``<cls>`` with value ``pad_value``;
4. if longer than ``max_seq_len``, keep ``<cls>`` and a random subset of the genes.

Binning only depends on the order of a cell's values, so it is computed from ranks: normalizing
(or not) gives the same bins. The edge positions are the float64 virtual indices of
``np.quantile``, so for count data the bins equal the reference's ``np.quantile`` +
``np.digitize`` bins; they can differ by one bin only where the reference's interpolated float
edge rounds onto a neighbouring value (large or irregular values).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.genes import match_genes, resolve_gene_identifiers
from scfmbench.data.matrix import check_finite, classify_matrix, to_csr
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, DataError
from scfmbench.hashing import hash_json
from scfmbench.models.base import TokenizedCells

logger = logging.getLogger(__name__)

SCGPT_SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
SCGPT_N_BINS = 51
SCGPT_MAX_SEQ_LEN = 1200
SCGPT_PAD_VALUE = -2.0
TARGET_SUM = 1e4


def load_scgpt_vocab(path: Path | str) -> dict[str, int]:
    """Read a scGPT ``vocab.json`` ({token: id}) and append ``<pad>``, ``<cls>``, ``<eoc>``.

    Missing special tokens get the next free ids, in that order, as the reference does.

    Raises
    ------
    CheckpointError
        The file is missing, not JSON, or not a {str: int} mapping with
        unique ids.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"scGPT vocabulary {path} does not exist; put the checkpoint's vocab.json next to "
            "best_model.pt and args.json."
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"scGPT vocabulary {path} is not valid JSON ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); re-download the checkpoint's vocab.json."
        ) from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in raw.items()
    ):
        raise CheckpointError(
            f"scGPT vocabulary {path} is not a {{gene symbol: integer id}} mapping; "
            "use the vocab.json that ships with the checkpoint."
        )
    vocab = dict(raw)
    if len(set(vocab.values())) != len(vocab):
        raise CheckpointError(
            f"scGPT vocabulary {path} maps several tokens to the same id; "
            "use the vocab.json that ships with the checkpoint."
        )
    next_id = max(vocab.values(), default=-1) + 1
    for token in SCGPT_SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return vocab


def _edge_keys(
    sorted_ranks: np.ndarray,
    next_differs: np.ndarray,
    cell_starts: np.ndarray,
    n_per_cell: np.ndarray,
    n_bins: int,
) -> np.ndarray:
    """Quantile edges of every cell as keys comparable with ``2 * rank`` of a value.

    Edge ``j`` of a cell with ``n`` sorted values sits at the virtual index
    ``(n - 1) * linspace(0, 1, n_bins - 1)[j]``, computed in float64 exactly as
    ``np.quantile`` does. It equals the value at the lower index when the index is whole or
    both neighbours are equal (key ``2 * rank``), else it lies strictly between two ranks
    (key ``2 * rank + 1``). Returns an (n_cells, n_bins - 1) int64 array, non-decreasing
    along each row.
    """
    quantiles = np.linspace(0.0, 1.0, n_bins - 1)
    virtual = (n_per_cell[:, None] - 1).astype(np.float64) * quantiles[None, :]
    lower = np.floor(virtual)
    at = cell_starts[:, None] + np.minimum(lower.astype(np.int64), n_per_cell[:, None] - 1)
    between = (virtual != lower) & next_differs[at]
    return 2 * sorted_ranks[at] + between


BIN_BLOCK_CELLS = 4096
"""Cells binned at a time (a cell's bins do not depend on the others)."""


def bin_csr(
    indptr: np.ndarray, values: np.ndarray, *, n_bins: int, uniforms: np.ndarray
) -> np.ndarray:
    """Bin the non-zero ``values`` of each CSR row into 1..n_bins-1 (scGPT's rule).

    Parameters
    ----------
    indptr
        CSR row pointer of shape (n_cells + 1,).
    values
        The stored values of shape (nnz,), all > 0, in CSR order.
    n_bins
        Number of bins including the zero bin (51 for scGPT_human).
    uniforms
        The tie-breaking draws in [0, 1), one per value in CSR order.

    Returns
    -------
    np.ndarray
        int64 bins of shape (nnz,).
    """
    if n_bins < 3:
        raise DataError(f"n_bins must be ≥ 3 for scGPT binning, got {n_bins}; use 51.")
    values = np.asarray(values)
    indptr = np.asarray(indptr, dtype=np.int64)
    nnz = values.shape[0]
    n_per_cell = np.diff(indptr)
    cell = np.repeat(np.arange(len(n_per_cell), dtype=np.int64), n_per_cell)
    if nnz == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((values, cell))  # by cell, then value
    sorted_values = values[order]
    new_value = np.ones(nnz, dtype=bool)
    new_value[1:] = (sorted_values[1:] != sorted_values[:-1]) | (cell[1:] != cell[:-1])
    dense = np.cumsum(new_value) - 1  # global dense rank
    sorted_ranks = dense - dense[indptr[cell]]  # rank within the cell, from 0
    next_differs = np.zeros(nnz, dtype=bool)
    next_differs[:-1] = new_value[1:] & (cell[1:] == cell[:-1])
    nonempty = n_per_cell > 0
    edges = np.zeros((len(n_per_cell), n_bins - 1), dtype=np.int64)
    edges[nonempty] = _edge_keys(
        sorted_ranks, next_differs, indptr[:-1][nonempty], n_per_cell[nonempty], n_bins
    )
    ranks = np.empty(nnz, dtype=np.int64)
    ranks[order] = sorted_ranks
    # make keys globally sortable: offset each cell by more than any key
    stride = 2 * int(n_per_cell.max()) + 2
    offset_edges = (edges + stride * np.arange(len(n_per_cell))[:, None]).ravel()
    keys = 2 * ranks + stride * cell
    base = cell * (n_bins - 1)
    left = np.searchsorted(offset_edges, keys, side="right") - base  # edges ≤ value
    right = np.searchsorted(offset_edges, keys, side="left") - base  # edges < value
    return np.ceil(uniforms * (right - left) + left).astype(np.int64)


def cell_generator(seed: int, name: str) -> np.random.Generator:
    """Return the random generator of one cell, seeded by ``seed`` and the cell's name.

    A cell's draws do not depend on which other cells (or chunks, or processes) it is
    tokenized with.
    """
    key = int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, key])


def _normalize_log1p(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """normalize_total to 1e4 then log1p, on the stored values (float64)."""
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    data = np.log1p(matrix.data * np.repeat(scale, np.diff(matrix.indptr)))
    return sp.csr_matrix((data, matrix.indices, matrix.indptr), shape=matrix.shape)


def _check_expression(matrix, *, where: str) -> str:
    """Refuse scaled (negative) or non-finite values; return the matrix kind."""
    check_finite(matrix, where=where)
    kind = classify_matrix(matrix)
    if kind == "scaled":
        values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
        raise DataError(
            f"scgpt needs non-negative expression but {where} holds scaled values "
            f"(min {float(np.min(values)):.3g}); pass raw counts or normalized data "
            "(X, layers['counts'] or .raw), not the output of sc.pp.scale."
        )
    return kind


def tokenize_scgpt(
    adata: AnnData,
    *,
    vocab: dict[str, int],
    gene_column: str | None = None,
    n_bins: int = SCGPT_N_BINS,
    max_seq_len: int = SCGPT_MAX_SEQ_LEN,
    pad_value: float = SCGPT_PAD_VALUE,
    normalize: bool = True,
    seed: int = DEFAULT_SEED,
    min_overlap: float = 0.5,
) -> TokenizedCells:
    """Tokenize ``adata.X`` for scGPT: ``<cls>`` then the cell's non-zero genes in var order.

    Parameters
    ----------
    adata
        Cells × genes, raw counts or normalized (not scaled) in ``X``.
    vocab
        Token → id, with ``<cls>`` (see :func:`load_scgpt_vocab`).
    gene_column
        ``adata.var`` column holding gene symbols, or ``"var_names"``; default:
        resolved by content (``scfmbench.data.genes.resolve_gene_identifiers``).
    n_bins
        Number of value bins including the zero bin.
    max_seq_len
        Longest sequence, ``<cls>`` included; longer cells keep ``<cls>`` and a
        seeded random subset of their genes (still in var order).
    pad_value
        Value of the ``<cls>`` token.
    normalize
        Apply normalize_total (1e4) + log1p first, as the annotation recipe does;
        the bins are the same either way.
    seed
        Seeds the tie-breaking and the subset sampling, together with each cell's name
        (:func:`cell_generator`): a cell gets the same tokens in any batch of cells.
    min_overlap
        Minimum fraction of genes found in the vocabulary.

    Returns
    -------
    TokenizedCells
        TokenizedCells with ``input_ids`` (token ids), ``values`` (``pad_value`` for
        ``<cls>``, bins 1..n_bins-1 for genes) and the gene match; cells without any
        expressed vocabulary gene are listed in ``dropped``.
    """
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be ≥ 2 (<cls> + one gene), got {max_seq_len}.")
    if "<cls>" not in vocab:
        raise CheckpointError(
            "scGPT vocabulary has no '<cls>' token; load it with "
            "load_scgpt_vocab, which adds the special tokens."
        )
    kind = _check_expression(adata.X, where="adata.X")
    source = resolve_gene_identifiers(
        cast(pd.DataFrame, adata.var),  # in-memory AnnData
        vocabulary_kind="symbol",
        model="scgpt",
        gene_column=gene_column,
    )
    keys = source.keys
    matrix = to_csr(adata.X, np.float64)
    matrix.eliminate_zeros()
    gene_vocab = {k: v for k, v in vocab.items() if k not in SCGPT_SPECIAL_TOKENS}
    match = match_genes(
        keys,
        gene_vocab,
        model="scgpt",
        gene_totals=np.asarray(matrix.sum(axis=0)).ravel(),
        expected_type="symbol",
        min_overlap=min_overlap,
        source=source,
    )
    kept = np.flatnonzero(match.positions >= 0)
    matrix = matrix[:, kept].tocsr()
    matrix.sort_indices()  # var order within each cell
    if normalize:
        logger.debug("scgpt: normalize_total(1e4) + log1p on %s data before binning", kind)
        matrix = _normalize_log1p(matrix)
    lengths = np.diff(matrix.indptr)
    has_genes = lengths > 0
    uniforms = np.empty(matrix.nnz)
    takes: list[np.ndarray] = []
    n_sampled = 0
    for row in np.flatnonzero(has_genes):
        lo, hi = int(matrix.indptr[row]), int(matrix.indptr[row + 1])
        rng = cell_generator(seed, str(adata.obs_names[row]))
        uniforms[lo:hi] = rng.random(hi - lo)
        take = np.arange(lo, hi)
        if hi - lo + 1 > max_seq_len:
            take = np.sort(rng.choice(take, size=max_seq_len - 1, replace=False))
            n_sampled += 1
        takes.append(take)
    bins = np.empty(matrix.nnz, dtype=np.int64)
    n_cells = len(matrix.indptr) - 1
    for lo in range(0, n_cells, BIN_BLOCK_CELLS):  # bounds bin_csr's temporaries
        hi = min(lo + BIN_BLOCK_CELLS, n_cells)
        a, b = matrix.indptr[lo], matrix.indptr[hi]
        bins[a:b] = bin_csr(
            matrix.indptr[lo : hi + 1] - a, matrix.data[a:b], n_bins=n_bins, uniforms=uniforms[a:b]
        )
    gene_ids = match.positions[kept][matrix.indices]
    cls_id = vocab["<cls>"]
    ids: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for take in takes:
        ids.append(np.concatenate([[cls_id], gene_ids[take]]))
        values.append(np.concatenate([[pad_value], bins[take].astype(np.float32)]))
    dropped = adata.obs_names[~has_genes]
    if len(dropped):
        logger.warning(
            "scgpt: %d cells have no expressed vocabulary gene and are dropped (e.g. %s)",
            len(dropped),
            list(dropped[:3]),
        )
    if n_sampled:
        logger.info(
            "scgpt: %d cells longer than %d tokens were subsampled (seed %d)",
            n_sampled,
            max_seq_len,
            seed,
        )
    settings = {
        "tokenizer": "scgpt",
        "n_bins": n_bins,
        "max_seq_len": max_seq_len,
        "pad_value": pad_value,
        "gene_column": source.column,
        "seed": seed,
        "random_draws": "per cell",
        "vocab": hash_json(sorted(vocab.items())),
    }
    return TokenizedCells.from_lists(
        ids,
        obs_names=pd.Index(adata.obs_names[has_genes]),
        settings=settings,
        values=values,
        dropped=pd.Index(dropped),
        gene_match=match,
    )
