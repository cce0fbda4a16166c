"""Zero-shot quality of an embedding (scib-metrics: clustering, silhouettes, LISI, graph
connectivity)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

BATCH_COLUMNS = ("donor_id", "donor", "batch", "sample_id", "sample")


N_NEIGHBORS = 90
"""Neighbours per cell for iLISI/cLISI (perplexity 30), as in scib-metrics' ``Benchmarker``."""
N_NEIGHBORS_GRAPH = 15
"""Neighbours per cell for the Leiden clustering (NMI/ARI) and the graph connectivity."""
SCORE_KEYS = (
    "nmi",
    "ari",
    "silhouette_label",
    "clisi",
    "graph_connectivity",
    "silhouette_batch",
    "ilisi",
)
"""The zero-shot scores of one embedding in ``metrics.json["embeddings"][view]``."""


def nearest_neighbors(matrix: np.ndarray, n_neighbors: int):
    """Exact euclidean ``n_neighbors`` nearest neighbours of every row (itself included).

    Parameters
    ----------
    matrix : ndarray, shape (n_cells, n_dims)
    n_neighbors : int
        Neighbours per cell including the cell itself (at most ``n_cells``).

    Returns
    -------
    scib_metrics.nearest_neighbors.NeighborsResults
        ``indices`` and ``distances`` of shape (n_cells, n_neighbors).
    """
    from scib_metrics.nearest_neighbors import NeighborsResults

    search = NearestNeighbors(n_neighbors=n_neighbors, metric="euclidean", algorithm="brute")
    distances, indices = search.fit(matrix).kneighbors(matrix)
    return NeighborsResults(indices=indices, distances=distances.astype(np.float32))


def embedding_quality(
    matrix: np.ndarray,
    labels: np.ndarray,
    *,
    batches: np.ndarray | None = None,
    seed: int = 0,
    timings: dict[str, float] | None = None,
) -> dict:
    """Zero-shot scores of an embedding against the labels (and batches), by scib-metrics.

    Rows with a NaN (cells a model could not embed) are left out. Every score lies in
    [0, 1] and higher is better (scib-metrics' scaling):

    - ``nmi``, ``ari``: Leiden clusters of the 15-neighbour graph vs the labels, at the
      resolution (0.2, 0.4, …, 2.0) with the highest NMI (``nmi_ari_cluster_labels_leiden``).
    - ``silhouette_label``: (ASW + 1) / 2 of the labels, euclidean.
    - ``clisi``: cell-type LISI of the 90-neighbour graph, scaled so 1 = pure neighbourhoods.
    - ``graph_connectivity``: per label, the share of its cells in the largest connected
      component of the 15-neighbour graph restricted to that label; the mean over labels.
    - ``silhouette_batch``, ``ilisi`` (``None`` without ``batches``, or when no label has
      cells of two batches): 1 − |batch ASW| within each label, and the batch LISI scaled
      so 1 = batches perfectly mixed.

    Parameters
    ----------
    matrix : ndarray, shape (n_cells, n_dims)
    labels : array-like, shape (n_cells,)
    batches : array-like, shape (n_cells,), optional
        Donor/batch of each cell.
    seed : int, default 0
        Seed of the Leiden clustering.
    timings : dict, optional
        Filled with the wall seconds of each part: ``neighbors_s`` (exact kNN), ``graph_s``
        (the fuzzy connectivities of the 15-neighbour graph), ``leiden_s``, ``silhouette_s``,
        ``lisi_s`` and ``graph_connectivity_s``.

    Returns
    -------
    dict
        The keys of :data:`SCORE_KEYS` (floats or ``None``) plus ``n_cells`` and
        ``n_neighbors`` (the neighbours used for the LISI scores).
    """
    import scib_metrics

    from scfmbench._compile_cache import keep_umap_code, keep_xla_code

    keep_xla_code()  # scib-metrics' silhouettes and LISI are jax functions
    keep_umap_code()  # the kNN graph's connectivities are UMAP's fuzzy simplicial set
    keep = ~np.isnan(matrix).any(axis=1)
    matrix = np.ascontiguousarray(matrix[keep], dtype=np.float32)
    labels = np.asarray(labels, dtype=str)[keep]
    n_cells = len(labels)
    out: dict = dict.fromkeys(SCORE_KEYS)
    out.update(n_cells=int(n_cells), n_neighbors=None)
    if n_cells < 3 or len(np.unique(labels)) < 2:
        return out
    clock = _Clock(timings)
    with clock("neighbors_s"):
        neighbours = nearest_neighbors(matrix, min(N_NEIGHBORS, n_cells))
        graph = neighbours.subset_neighbors(min(N_NEIGHBORS_GRAPH, neighbours.n_neighbors))
    with clock("graph_s"):
        graph.knn_graph_connectivities  # noqa: B018  (cached property: timed on its own)
    with clock("leiden_s"):
        clusters = scib_metrics.nmi_ari_cluster_labels_leiden(graph, labels, seed=seed)
    with clock("silhouette_s"):
        silhouette = scib_metrics.silhouette_label(matrix, labels)
    with clock("lisi_s"):
        clisi = scib_metrics.clisi_knn(neighbours, labels)
    with clock("graph_connectivity_s"):
        connectivity = scib_metrics.graph_connectivity(graph, labels)
    out.update(
        nmi=float(clusters["nmi"]),
        ari=float(clusters["ari"]),
        silhouette_label=float(silhouette),
        clisi=float(clisi),
        graph_connectivity=float(connectivity),
        n_neighbors=int(neighbours.n_neighbors),
    )
    if batches is not None:
        batches = np.asarray(batches, dtype=str)[keep]
        if _has_mixed_label(labels, batches):
            with clock("silhouette_s"):
                out["silhouette_batch"] = float(
                    scib_metrics.silhouette_batch(matrix, labels, batches)
                )
            with clock("lisi_s"):
                out["ilisi"] = float(scib_metrics.ilisi_knn(neighbours, batches))
    return out


class _Clock:
    """``with clock(key):`` adds the block's wall seconds to ``timings[key]`` (no-op without
    a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                total = self.timings.get(key, 0.0) + time.perf_counter() - start
                self.timings[key] = round(total, 3)


def _has_mixed_label(labels: np.ndarray, batches: np.ndarray) -> bool:
    """Whether some label has cells of at least two batches (and not one cell per batch)."""
    frame = pd.DataFrame({"label": labels, "batch": batches})
    per_label = frame.groupby("label")["batch"].agg(["nunique", "size"])
    return bool(((per_label["nunique"] > 1) & (per_label["nunique"] < per_label["size"])).any())


def detect_batch_key(obs: pd.DataFrame, batch_key: str | None) -> str | None:
    """The donor/batch column to colour by: the given one, or a conventional name.

    Raises
    ------
    SchemaError
        ``batch_key`` is given but is not a column of ``obs`` (with a did-you-mean).
    """
    if batch_key is not None:
        if batch_key not in obs.columns:
            from scfmbench.errors import SchemaError
            from scfmbench.registry import did_you_mean

            columns = [str(c) for c in obs.columns]
            raise SchemaError(
                f"adata.obs has no column {batch_key!r} for batch_key (columns: {columns[:10]}); "
                "set batch_key to one of those, or drop it to detect one."
                + did_you_mean(batch_key, columns)
            )
        return batch_key
    for column in BATCH_COLUMNS:
        if column in obs.columns and 1 < obs[column].nunique() < len(obs):
            return column
    return None
