"""Plain-loop Geneformer tokenization: the oracle the vectorized ``rank_value_tokens`` is
tested against, and the "before" of ``benchmarks/geneformer_throughput.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from scfmbench.data.matrix import to_csr
from scfmbench.models.geneformer.ranking import TARGET_SUM, GeneMapping


def tokenize_cell_loop(
    gene_indices: np.ndarray,
    counts: np.ndarray,
    mapping: GeneMapping,
    *,
    max_genes: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = TARGET_SUM,
) -> np.ndarray:
    """Tokens of one cell from its raw counts, as a plain loop (the reference for tests).

    Args:
        gene_indices, counts: the cell's nonzero input genes and their raw counts.
    """
    n_counts = float(np.sum(counts, dtype=np.float64))
    summed: dict[int, float] = {}
    for gene, count in zip(gene_indices.tolist(), counts.tolist(), strict=True):
        column = int(mapping.columns[gene])
        if column >= 0 and count != 0:
            summed[column] = summed.get(column, 0.0) + float(count)
    if not summed:
        return np.zeros(0, dtype=np.int64)
    columns = np.array(sorted(summed), dtype=np.int64)
    raw = np.array([summed[c] for c in columns], dtype=np.float64)
    values = raw / n_counts * target_sum / mapping.medians[columns]
    ranked = mapping.tokens[columns[np.argsort(-values, kind="stable")]][:max_genes]
    if cls_id is None:
        return ranked
    return np.concatenate([[cls_id], ranked, [eos_id]]).astype(np.int64)


def tokenize_loop(counts: sp.csr_matrix, mapping: GeneMapping, **options: Any) -> list[np.ndarray]:
    """``tokenize_cell_loop`` over every cell of a CSR count matrix (empty arrays included)."""
    counts = to_csr(counts)
    return [
        tokenize_cell_loop(counts.indices[lo:hi], counts.data[lo:hi], mapping, **options)
        for lo, hi in zip(counts.indptr[:-1], counts.indptr[1:], strict=True)
    ]
