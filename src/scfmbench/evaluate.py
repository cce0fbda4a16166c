"""Label structure of an embedding: silhouette, kNN label consistency, and UMAP figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

BATCH_COLUMNS = ("donor_id", "donor", "batch", "sample_id", "sample")


def knn_label_consistency(matrix: np.ndarray, labels: np.ndarray, *, k: int = 15) -> float:
    """Mean fraction of each cell's ``k`` nearest neighbours (cosine) that share its label."""
    labels = np.asarray(labels, dtype=str)
    k = min(k, len(labels) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute")
    index = neighbours.fit(matrix).kneighbors(matrix, return_distance=False)[:, 1:]
    return float((labels[index] == labels[:, None]).mean())


def embedding_quality(matrix: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict:
    """Silhouette (cosine, ≤ 5,000 sampled cells) and kNN label consistency of an embedding."""
    keep = ~np.isnan(matrix).any(axis=1)
    matrix, labels = matrix[keep], np.asarray(labels, dtype=str)[keep]
    sample = min(len(labels), 5000)
    silhouette = silhouette_score(
        matrix, labels, metric="cosine", sample_size=sample, random_state=seed
    )
    return {
        "silhouette": float(silhouette),
        "knn_consistency": knn_label_consistency(matrix, labels),
        "n_cells": int(len(labels)),
    }


def detect_batch_key(obs: pd.DataFrame, batch_key: str | None) -> str | None:
    """The donor/batch column to colour by: the given one, or a conventional name."""
    if batch_key is not None:
        return batch_key if batch_key in obs.columns else None
    for column in BATCH_COLUMNS:
        if column in obs.columns and 1 < obs[column].nunique() < len(obs):
            return column
    return None


def write_embedding_figures(
    name: str,
    matrix: np.ndarray,
    labels: np.ndarray,
    figures: Path,
    *,
    seed: int,
    batches: np.ndarray | None = None,
    batch_key: str | None = None,
) -> dict[str, str]:
    """UMAP of one embedding coloured by label (and by batch); returns relative paths."""
    from scfmbench._stages import safe_name
    from scfmbench.figures import plot_embedding, umap_coordinates

    keep = ~np.isnan(matrix).any(axis=1)
    coords = umap_coordinates(matrix[keep], seed=seed)
    out = {}
    path = Path(figures) / f"umap_{safe_name(name)}.png"
    plot_embedding(coords, np.asarray(labels)[keep], path, title=f"{name} — cell type")
    out["umap_png"] = f"figures/{path.name}"
    if batches is not None and batch_key is not None:
        path = Path(figures) / f"umap_{safe_name(name)}_{safe_name(batch_key)}.png"
        plot_embedding(coords, np.asarray(batches)[keep], path, title=f"{name} — {batch_key}")
        out["umap_batch_png"] = f"figures/{path.name}"
    return out
