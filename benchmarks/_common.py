"""Measurement helpers shared by the embedding throughput benchmarks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from scfmbench.embed import embed_tokens, length_sorted_batches

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PBMC3K = SHARED / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad"
RESULTS = REPO / "benchmarks" / "results"


def timed_embedding(model, tokens, *, pooling: str, **options) -> tuple[np.ndarray, float, float]:
    """Embeddings, wall seconds and process CPU seconds (less sensitive to a shared CPU)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = embed_tokens(
        model, tokens, layer=model.default_layer, pooling=pooling, progress=False, **options
    )
    return out, time.perf_counter() - wall, time.process_time() - cpu


def padded_tokens(lengths: np.ndarray, *, batch_size: int, width: int | None) -> int:
    """Tokens the network processes: each batch padded to its longest cell (or ``width``)."""
    if width is not None:
        return int(width * len(lengths))
    batches = length_sorted_batches(lengths, batch_size=batch_size)
    return int(sum(len(b) * lengths[b].max() for b in batches))
