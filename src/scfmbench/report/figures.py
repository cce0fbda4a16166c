"""Figures of a run: confusion matrices, forest plot, UMAPs and curves (matplotlib, Agg, atomic)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scfmbench._atomic import atomic_path  # noqa: E402
from scfmbench.stages import safe_name  # noqa: E402


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion(
    matrix: np.ndarray, labels: list[str], path: Path, *, title: str, normalize: bool = True
) -> None:
    """Plot a confusion matrix: row-normalized colours, counts in the cells.

    Parameters
    ----------
    matrix : ndarray, shape (n_classes, n_classes)
        Cell counts; ``matrix[i, j]``: cells of true class ``labels[i]`` predicted as
        ``labels[j]``.
    labels : list of str
        The class names, in the matrix's order.
    path : Path
        The PNG to write (atomically).
    title : str
        The figure's title.
    normalize : bool, default True
        Colour by the fraction of each true class (else by the counts).
    """
    matrix = np.asarray(matrix, dtype=float)
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    size = 2.5 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                colour = "white" if shown[i, j] > 0.5 else "black"
                count = str(int(matrix[i, j]))
                ax.text(j, i, count, ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "")
    _save(fig, path)


def plot_forest(
    labels: list[str],
    values: list[float],
    intervals: list[tuple[float, float] | None],
    significant: list[bool],
    path: Path,
    *,
    xlabel: str,
    title: str,
) -> None:
    """Draw a forest plot: one row per label (first on top) and a vertical line at 0.

    Each row is a point at ``values[i]`` with ``intervals[i]`` as a horizontal bar (none when
    None); significant rows are filled and marked ``*``, the others hollow.

    Parameters
    ----------
    labels : list of str
        One per row.
    values : list of float
        The point of each row.
    intervals : list of (float, float) or None
        Each row's interval.
    significant : list of bool
        Whether each row is significant.
    path : Path
        The PNG to write (atomically).
    xlabel, title : str
        The x axis's label and the figure's title.
    """
    n = len(labels)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * n))
    y = np.arange(n)[::-1]
    for row, value, ci, flag in zip(y, values, intervals, significant, strict=True):
        colour = "tab:blue" if flag else "grey"
        if ci is not None:
            ax.plot(ci, [row, row], color=colour, linewidth=1.6)
        ax.plot(
            [value],
            [row],
            marker="o",
            markersize=6,
            color=colour,
            markerfacecolor=colour if flag else "white",
        )
    ax.axvline(0, color="black", linestyle="--", linewidth=0.8)
    marked = zip(labels, significant, strict=True)
    ax.set_yticks(y, [f"{label} *" if flag else label for label, flag in marked])
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_embedding(coords: np.ndarray, groups: np.ndarray, path: Path, *, title: str) -> None:
    """Plot a 2-D scatter (e.g. UMAP) coloured by a categorical annotation.

    Parameters
    ----------
    coords : ndarray, shape (n_cells, 2)
        The points.
    groups : ndarray, shape (n_cells,)
        Each cell's group (shown as strings, one colour and legend entry each).
    path : Path
        The PNG to write (atomically).
    title : str
        The figure's title.
    """
    groups = np.asarray(groups, dtype=str)
    names = sorted(set(groups))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for k, name in enumerate(names):
        mask = groups == name
        ax.scatter(
            coords[mask, 0],
            coords[mask, 1],
            s=4,
            color=cmap(k % cmap.N),
            label=name,
            linewidths=0,
            rasterized=True,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(title, fontsize=10)
    ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    _save(fig, path)


UMAP_MANY_COMPONENTS = 4
"""Above this many connected components in UMAP's graph, the layout starts from the first two
principal components of the features instead of the spectral embedding (scanpy's default).

umap-learn lays a disconnected graph out one component at a time and places the components by
a spectral embedding of their centroids once there are more than ``2 * dim`` of them (``dim``
= 2). That step grows with the square of the components and fails to converge when they are
far apart: on a 50,000-cell PBMC3k resample, where each cell has ~19 thinned copies, the graph
of 20,000 scored cells fell into 971 components and the spectral start took 38 of the UMAP's
44 CPU s. PBMC3k and Kang 2018 give one component and keep the spectral start."""


def umap_start(graph, n_cells: int) -> str:
    """Choose UMAP's initial layout: ``"spectral"`` or ``"pca"``.

    Parameters
    ----------
    graph : scipy.sparse matrix, shape (n_cells, n_cells)
        scanpy's fuzzy kNN connectivities.
    n_cells : int

    Returns
    -------
    str
        ``"pca"`` when the graph UMAP optimises has more than :data:`UMAP_MANY_COMPONENTS`
        connected components, else ``"spectral"``. The graph is pruned as umap-learn's
        ``simplicial_set_embedding`` prunes it before the layout: edges weaker than
        ``max / n_epochs`` are dropped (``n_epochs`` 500 up to 10,000 cells, 200 above, as
        scanpy sets it).
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n_epochs = 500 if n_cells <= 10_000 else 200
    kept = sp.csr_matrix(graph, copy=True)
    if kept.nnz:
        kept.data[kept.data < kept.data.max() / n_epochs] = 0.0
        kept.eliminate_zeros()
    n_components = connected_components(kept, directed=False)[0]
    return "pca" if n_components > UMAP_MANY_COMPONENTS else "spectral"


def umap_coordinates(features: np.ndarray, *, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """Compute the UMAP of a feature matrix with scanpy's neighbors (exact) and umap.

    The layout starts from scanpy's spectral embedding, or from the features' first two
    principal components (umap-learn's ``init="pca"``) when the graph falls into many
    components (:func:`umap_start`).

    Parameters
    ----------
    features : ndarray, shape (n_cells, n_features)
        The representation (cast to float32).
    seed : int
        Seeds both the neighbour graph and the layout.
    n_neighbors : int, default 15
        Neighbours per cell.

    Returns
    -------
    ndarray, shape (n_cells, 2)
        The UMAP coordinates.
    """
    import anndata
    import scanpy as sc

    from scfmbench._compile_cache import keep_umap_code

    keep_umap_code()
    holder = anndata.AnnData(np.zeros((features.shape[0], 1), dtype=np.float32))
    holder.obsm["X_rep"] = np.asarray(features, dtype=np.float32)
    # exact kNN at every size: what scanpy does below 8,192 cells anyway; from there its
    # pynndescent path fails on scipy's sparse arrays (``csr_array`` has no ``getnnz``)
    sc.pp.neighbors(
        holder, use_rep="X_rep", n_neighbors=n_neighbors, random_state=seed, transformer="sklearn"
    )
    start = umap_start(holder.obsp["connectivities"], holder.n_obs)
    # scanpy hands a string it does not know ("pca") to umap-learn's ``init``
    sc.tl.umap(holder, random_state=seed, init_pos=cast(Any, start))
    return np.asarray(holder.obsm["X_umap"])


def plot_layer_curve(rows: list[dict], path: Path, *, title: str) -> None:
    """Plot the test macro F1 (and accuracy) of a probe against the layer index.

    Parameters
    ----------
    rows : list of dict
        One per layer: ``layer``, ``macro_f1`` and ``accuracy``.
    path : Path
        The PNG to write (atomically).
    title : str
        The figure's title.
    """
    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [r["macro_f1"] for r in rows], marker="o", label="macro F1")
    ax.plot(layers, [r["accuracy"] for r in rows], marker="s", linestyle="--", label="accuracy")
    ax.set_xlabel("layer (0 = token embeddings)")
    ax.set_ylabel("test score")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_learning_curve(
    epochs: list[dict], path: Path, *, title: str, best_epoch: int | None = None
) -> None:
    """Plot train/val loss (left) and val macro F1 / accuracy (right) per fine-tuning epoch.

    Parameters
    ----------
    epochs : list of dict
        One per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_macro_f1`` and
        ``val_accuracy``.
    path : Path
        The PNG to write (atomically).
    title : str
        The figure's title.
    best_epoch : int, optional
        Marked with a dotted line in both panels.
    """
    x = [e["epoch"] for e in epochs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train")
    left.plot(x, [e["val_loss"] for e in epochs], marker="s", linestyle="--", label="validation")
    left.set_ylabel("loss")
    right.plot(x, [e["val_macro_f1"] for e in epochs], marker="o", label="val macro F1")
    right.plot(x, [e["val_accuracy"] for e in epochs], marker="s", linestyle="--", label="val acc.")
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_label_efficiency(
    x: list[float],
    ticks: list[str],
    curves: dict[str, list[dict]],
    path: Path,
    *,
    title: str,
    dashed: Collection[str] = frozenset(),
) -> None:
    """Plot test macro F1 against labelled cells per class (log x axis), one line per method.

    Each line carries its 95% CI as a band.

    Parameters
    ----------
    x : list of float
        The sizes (labelled training cells per class), one per position.
    ticks : list of str
        The tick label of each position (e.g. ``"all"`` for the full training set).
    curves : dict of str to list of dict
        Per method, one ``{"mean", "ci95": [lo, hi]}`` per position of ``x``.
    path : Path
        The PNG to write (atomically).
    title : str
        The figure's title.
    dashed : collection of str, default frozenset()
        Methods drawn dashed (e.g. random-init controls).
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for k, (name, points) in enumerate(curves.items()):
        colour = cmap(k % cmap.N)
        mean = [p["mean"] for p in points]
        ax.plot(
            x,
            mean,
            marker="o",
            color=colour,
            label=name,
            linestyle="--" if name in dashed else "-",
        )
        lo = [p["ci95"][0] for p in points]
        hi = [p["ci95"][1] for p in points]
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(x, ticks)
    ax.minorticks_off()
    ax.set_xlabel("labelled training cells per class")
    ax.set_ylabel("test macro F1 (95% CI)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


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
    """Draw the UMAP of one embedding coloured by label (and by batch).

    Cells with a NaN in their row (no embedding) are left out.

    Parameters
    ----------
    name : str
        The embedding's name (the figure titles; file names through ``safe_name``).
    matrix : ndarray, shape (n_cells, n_dims)
        The embedding.
    labels : ndarray, shape (n_cells,)
        Each cell's label.
    figures : Path
        The run's ``figures`` folder.
    seed : int
        Seeds the UMAP (:func:`umap_coordinates`).
    batches : ndarray, shape (n_cells,), optional
        Each cell's batch; with ``batch_key``, a second figure coloured by it.
    batch_key : str, optional
        The batch column's name.

    Returns
    -------
    dict of str to str
        ``umap_png`` (and ``umap_batch_png``): the figures' paths relative to the run
        folder, ``figures/umap_<name>[_<batch_key>].png``.
    """
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
