"""Figures: confusion matrices and UMAPs (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scfmbench._atomic import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion(
    matrix: np.ndarray, labels: list[str], path: Path, *, title: str, normalize: bool = True
) -> None:
    """Confusion matrix (rows = true class); row-normalized colours, counts in the cells."""
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
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "")
    _save(fig, path)


def plot_embedding(coords: np.ndarray, groups: np.ndarray, path: Path, *, title: str) -> None:
    """2-D scatter (e.g. UMAP) coloured by a categorical annotation."""
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


def umap_coordinates(features: np.ndarray, *, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """UMAP of a feature matrix through scanpy's neighbors (exact) + umap (seeded)."""
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
    sc.tl.umap(holder, random_state=seed)
    return np.asarray(holder.obsm["X_umap"])


def plot_layer_curve(rows: list[dict], path: Path, *, title: str) -> None:
    """Macro F1 (and accuracy) of a probe against layer index."""
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
    """Train/val loss (left) and val macro F1 / accuracy (right) per fine-tuning epoch."""
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
