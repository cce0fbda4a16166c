"""Geneformer's gene → token mapping and the vectorized rank-value encoding.

See :mod:`scfmbench.models.geneformer.tokenizer` for the algorithm and its tie rule.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfmbench.data.genes import ENSEMBL_RE, detect_identifier_type, strip_version
from scfmbench.data.matrix import to_csr
from scfmbench.errors import CheckpointError
from scfmbench.models.geneformer.dictionaries import DICTS_FLAG, GeneformerDictionaries

TARGET_SUM = 10_000
CHUNK_CELLS = 256  # small blocks keep the working set in cache


@dataclass(frozen=True)
class GeneMapping:
    """How input genes reach Geneformer tokens (columns of the collapsed count matrix).

    ``columns[i]`` is the collapsed column of input gene ``i`` or -1; column ``j`` has token
    ``tokens[j]`` and median ``medians[j]``. Columns are the genes with a token of their own
    in input order, then the summed groups in order of their first member.
    """

    identifier_type: str
    n_genes: int
    n_symbols: int  # input genes given as symbols (mapped through the gene-name dictionary)
    n_symbols_mapped: int  # of those, found in the gene-name dictionary
    n_direct: int  # Ensembl IDs directly in the token dictionary
    n_mapped: int  # genes that reach a token through the ensembl mapping dictionary
    n_collapsed_tokens: int  # tokens that receive the summed counts of several genes
    columns: np.ndarray = field(repr=False)
    tokens: np.ndarray = field(repr=False)
    medians: np.ndarray = field(repr=False)

    @property
    def n_tokens(self) -> int:
        """Number of collapsed columns (distinct tokens the input reaches)."""
        return len(self.tokens)

    @property
    def n_single(self) -> int:
        """Columns fed by one input gene; the summed groups are the columns after them."""
        return self.n_tokens - self.n_collapsed_tokens

    def summary(self) -> str:
        """Return a one-line account of the mapping for the log."""
        text = (
            f"geneformer: {self.n_mapped}/{self.n_genes} genes map onto {self.n_tokens} tokens "
            f"({self.n_direct} directly in the vocabulary, {self.n_collapsed_tokens} tokens sum "
            "several genes)"
        )
        if self.n_symbols:
            text += (
                f"; {self.n_symbols_mapped}/{self.n_symbols} symbols found in the gene-name "
                "dictionary"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        """Return the counts of the mapping as a JSON-ready dict."""
        return {
            "identifier_type": self.identifier_type,
            "n_genes": self.n_genes,
            "n_symbols": self.n_symbols,
            "n_symbols_mapped": self.n_symbols_mapped,
            "n_direct": self.n_direct,
            "n_mapped": self.n_mapped,
            "n_tokens": self.n_tokens,
            "n_collapsed_tokens": self.n_collapsed_tokens,
        }


def map_genes(keys: pd.Index, dicts: GeneformerDictionaries) -> GeneMapping:
    """Map gene identifiers (Ensembl IDs or symbols, per gene) onto Geneformer tokens.

    Ensembl IDs are upper-cased (version suffix removed) and mapped through the ensembl
    mapping dictionary, keeping targets in the token dictionary; symbols first go through
    the gene-name dictionary.
    """
    names = [str(k) for k in keys]
    is_ensembl = [bool(ENSEMBL_RE.match(k.upper())) for k in names]
    n_symbols = len(names) - sum(is_ensembl)
    if n_symbols and dicts.gene_name_id is None:
        examples = [k for k, e in zip(names, is_ensembl, strict=True) if not e][:3]
        raise CheckpointError(
            f"{n_symbols} genes are symbols (e.g. {examples}) but "
            f"no gene_name_id_dict*.pkl was loaded; add it to {DICTS_FLAG} or pass "
            "--gene-column with a var column of Ensembl IDs."
        )
    name_id = dicts.gene_name_id or {}
    ensembl: list[str | None] = []
    for key, ens in zip(names, is_ensembl, strict=True):
        gene_id = strip_version(key.upper()) if ens else name_id.get(key)
        ensembl.append(None if gene_id is None else gene_id.upper())
    vocab, targets = dicts.token_dict, dicts.mapping_targets
    mapped = [None if e is None else targets.get(e) for e in ensembl]
    counts = Counter(m for m in mapped if m is not None)
    order = [m for m in dict.fromkeys(mapped) if m is not None and counts[m] == 1]
    order += [m for m in counts if counts[m] > 1]
    column_of = {gene: j for j, gene in enumerate(order)}
    columns = np.fromiter(
        (column_of[m] if m is not None else -1 for m in mapped), dtype=np.int32, count=len(names)
    )
    return GeneMapping(
        identifier_type=detect_identifier_type(names),
        n_genes=len(names),
        n_symbols=n_symbols,
        n_symbols_mapped=sum(1 for e, s in zip(ensembl, is_ensembl, strict=True) if not s and e),
        n_direct=sum(1 for e in ensembl if e is not None and e in vocab),
        n_mapped=int((columns >= 0).sum()),
        n_collapsed_tokens=sum(1 for c in counts.values() if c > 1),
        columns=columns,
        tokens=np.array([vocab[g] for g in order], dtype=np.int64),
        medians=np.array([dicts.gene_median[g] for g in order], dtype=np.float64),
    )


def _segment_positions(counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Targets for items grouped by row (``counts[r]`` of row ``r``) placed from ``starts[r]``."""
    first = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) + np.repeat(starts - first, counts)


@dataclass
class _Entries:
    """Nonzero collapsed entries of a block: one value per (row, column), rows ascending."""

    rows: np.ndarray  # (n,) int64 row of each entry
    columns: np.ndarray  # (n,) int64 collapsed column, ascending within a row
    values: np.ndarray  # (n,) float64 count / n_counts * target_sum / median

    def lookup(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Values at (row, column) pairs that are known to be entries."""
        width = int(self.columns.max(initial=0)) + 1
        key = self.rows * width + self.columns
        return self.values[np.searchsorted(key, rows * width + columns)]


def _block_entries(
    block: sp.csr_matrix, mapping: GeneMapping, *, target_sum: float
) -> tuple[_Entries, np.ndarray, _Entries]:
    """Entries of genes with a token of their own (CSR-ordered, with indptr) and summed groups.

    Returns
    -------
    tuple of (_Entries, np.ndarray, _Entries)
        ``(singles, singles_indptr, groups)``; ``singles.rows`` is left empty (derivable from
        the indptr) to save a pass over the data.
    """
    if not block.has_sorted_indices:
        block = block.sorted_indices()
    if not block.data.all():  # explicit zeros are not expressed genes
        block = block.copy()
        block.eliminate_zeros()
    n_counts = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()  # over all input genes
    columns = mapping.columns[block.indices]
    single = columns.view(np.uint32) < mapping.n_single  # -1 (unmapped) wraps to a huge value
    before = np.zeros(len(single) + 1, dtype=np.int32)
    np.cumsum(single, out=before[1:])
    indptr = before[block.indptr].astype(np.int64)
    s_columns = columns[single]
    s_values = block.data[single].astype(np.float64)
    s_values /= np.repeat(n_counts, np.diff(indptr))
    s_values *= target_sum
    s_values /= mapping.medians[s_columns]
    # genes sharing a token: sum their raw counts per (row, column) before normalizing
    grouped = np.flatnonzero(columns >= mapping.n_single)
    g_rows = np.searchsorted(block.indptr, grouped, side="right") - 1
    keys, where = np.unique(g_rows * mapping.n_tokens + columns[grouped], return_inverse=True)
    sums = np.bincount(where, weights=block.data[grouped].astype(np.float64), minlength=len(keys))
    g_rows, g_columns = np.divmod(keys, mapping.n_tokens)
    g_values = sums / n_counts[g_rows] * target_sum / mapping.medians[g_columns]
    singles = _Entries(np.zeros(0, np.int64), s_columns, s_values)
    return singles, indptr, _Entries(g_rows, g_columns, g_values)


def _rank_block(
    block: sp.csr_matrix, mapping: GeneMapping, *, max_genes: int, target_sum: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ranked gene tokens (flat) and their number per cell for one block of cells.

    One uint64 sort of (row, descending float32 value, collapsed column) keys ranks every
    cell; runs whose float32 values are equal (near-ties) are re-sorted on the exact float64
    values, so the result equals a stable per-cell ``argsort(-value)`` in collapsed order.
    """
    n_rows = len(block.indptr) - 1
    singles, indptr, groups = _block_entries(block, mapping, target_sum=target_sum)
    n_single = np.diff(indptr)
    lengths = n_single + np.bincount(groups.rows, minlength=n_rows)
    col_bits = max(int(mapping.n_tokens - 1).bit_length(), 1)
    row_shift = 31 + col_bits
    if max(int(n_rows - 1).bit_length(), 1) + row_shift > 64:
        raise ValueError(f"{n_rows} rows × {mapping.n_tokens} tokens do not fit a 64-bit key")
    key = np.empty(len(singles.values) + len(groups.values), dtype=np.uint64)
    n = len(singles.values)
    row_high = np.arange(n_rows, dtype=np.uint64) << np.uint64(row_shift)
    for part, entries, high in (
        (key[:n], singles, np.repeat(row_high, n_single)),
        (key[n:], groups, row_high[groups.rows]),
    ):
        # positive floats order like their bit patterns; subtract from the max for "descending"
        bits = np.int32(0x7FFFFFFF) - entries.values.astype(np.float32).view(np.int32)
        part[:] = bits.astype(np.uint64) << np.uint64(col_bits)
        part |= entries.columns.astype(np.uint64)
        part |= high
    key.sort()
    column_mask = np.uint64((1 << col_bits) - 1)
    head = key >> np.uint64(col_bits)
    tie = head[1:] == head[:-1]
    if tie.any():
        member = np.zeros(len(key), dtype=bool)
        member[1:] |= tie
        member[:-1] |= tie
        idx = np.flatnonzero(member)
        run = np.cumsum(np.concatenate([[True], ~tie])[idx])  # a run starts after a non-tie
        rows = (key[idx] >> np.uint64(row_shift)).astype(np.int64)
        columns = (key[idx] & column_mask).astype(np.int64)
        exact = np.empty(len(idx))
        in_group = columns >= mapping.n_single
        exact[in_group] = groups.lookup(rows[in_group], columns[in_group])
        exact[~in_group] = _singles_of_rows(singles, indptr, np.unique(rows[~in_group])).lookup(
            rows[~in_group], columns[~in_group]
        )
        key[idx] = key[idx][np.lexsort((columns, -exact, run))]
    tokens = mapping.tokens[(key & column_mask).astype(np.int64)]
    if lengths.max(initial=0) > max_genes:
        starts = np.cumsum(lengths) - lengths
        tokens = tokens[np.arange(len(tokens)) - np.repeat(starts, lengths) < max_genes]
    return tokens, np.minimum(lengths, max_genes)


def _singles_of_rows(singles: _Entries, indptr: np.ndarray, rows: np.ndarray) -> _Entries:
    """Return the single-gene entries of a few rows, with their rows filled in."""
    counts = indptr[rows + 1] - indptr[rows]
    at = _segment_positions(counts, indptr[rows])
    return _Entries(np.repeat(rows, counts), singles.columns[at], singles.values[at])


def rank_value_tokens(
    counts: sp.csr_matrix,
    mapping: GeneMapping,
    *,
    max_genes: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = TARGET_SUM,
    chunk_cells: int = CHUNK_CELLS,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized rank-value encoding of every cell of a raw count matrix.

    Cells are processed in blocks of at most ``chunk_cells`` (bounded memory), on ``n_jobs``
    threads.

    Parameters
    ----------
    counts
        (n_cells, n_genes) raw counts, genes in ``mapping`` order.
    mapping
        The gene → token mapping from ``map_genes``.
    max_genes
        Genes kept per cell (model input size, minus 2 with special tokens).
    cls_id, eos_id
        Tokens put before and after the genes (V2), or None (V1).

    Returns
    -------
    tuple of (np.ndarray, np.ndarray)
        ``(input_ids, lengths)``: flat int64 tokens of the cells that have any, and the number
        of tokens per input cell (0 for a cell without any in-vocabulary gene).
    """
    if not isinstance(counts, sp.csr_matrix):
        counts = to_csr(counts)
    n_cells = len(counts.indptr) - 1
    size = max(1, min(chunk_cells, -(-n_cells // max(n_jobs, 1))))

    def rank(lo: int) -> tuple[np.ndarray, np.ndarray]:
        block = _row_block(counts, lo, min(lo + size, n_cells))
        return _rank_block(block, mapping, max_genes=max_genes, target_sum=target_sum)

    starts = range(0, n_cells, size)
    if n_jobs > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:  # numpy releases the GIL
            blocks = list(pool.map(rank, starts))
    else:
        blocks = [rank(lo) for lo in starts]
    genes = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    n_genes = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)
    if cls_id is None or eos_id is None:
        if cls_id != eos_id:
            raise ValueError("cls_id and eos_id are given together (V2) or not at all (V1)")
        return genes.astype(np.int64), n_genes.astype(np.int64)
    lengths = np.where(n_genes > 0, n_genes + 2, 0).astype(np.int64)
    first = np.cumsum(lengths) - lengths
    ids = np.empty(int(lengths.sum()), dtype=np.int64)
    ids[_segment_positions(n_genes, first + 1)] = genes
    nonempty = lengths > 0
    ids[first[nonempty]] = cls_id
    ids[first[nonempty] + lengths[nonempty] - 1] = eos_id
    return ids, lengths


def _row_block(counts: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix:
    """Rows ``lo:hi`` of a CSR matrix without copying its data."""
    n_rows, n_columns = counts.shape  # pyright: ignore[reportGeneralTypeIssues]  (scipy stubs: shape may be None)
    if (lo, hi) == (0, n_rows):
        return counts
    a, b = counts.indptr[lo], counts.indptr[hi]
    block = sp.csr_matrix(
        (counts.data[a:b], counts.indices[a:b], counts.indptr[lo : hi + 1] - a),
        shape=(hi - lo, n_columns),
    )
    block.has_sorted_indices = counts.has_sorted_indices
    return block
