"""Baseline representations, fitted on the training cells of each split only (no leakage)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.decomposition import PCA

from scfmbench.registry import Registry

CLIP_SCALED = 10.0


def lognormalize(matrix: sp.csr_matrix, *, kind: str, target_sum: float = 1e4) -> sp.csr_matrix:
    """normalize_total(1e4) + log1p for counts; log1p for normalized; unchanged for lognorm."""
    matrix = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    if kind == "counts":
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        matrix = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ matrix)
    if kind in ("counts", "normalized"):
        matrix.data = np.log1p(matrix.data)
    return matrix


def highly_variable_genes(lognorm: sp.csr_matrix, *, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` most dispersed genes (Seurat flavour, 20 mean bins).

    Dispersion = var/mean of expm1 values, log-transformed and z-scored within bins of
    log mean expression, as in ``scanpy.pp.highly_variable_genes(flavor="seurat")``.
    Ties are broken by gene order.
    """
    n_genes = lognorm.shape[1]
    if n_top >= n_genes:
        return np.arange(n_genes)
    expm1 = lognorm.copy()
    expm1.data = np.expm1(expm1.data)
    mean = np.asarray(expm1.mean(axis=0)).ravel()
    mean_sq = np.asarray(expm1.multiply(expm1).mean(axis=0)).ravel()
    n = lognorm.shape[0]
    var = (mean_sq - mean**2) * n / max(n - 1, 1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    log_disp = np.log(dispersion)
    log_mean = np.log1p(mean)
    bins = pd.cut(log_mean, bins=20)
    frame = pd.DataFrame({"d": log_disp, "bin": bins})
    stats = frame.groupby("bin", observed=True)["d"].agg(["mean", "std"])
    bin_mean = stats["mean"].reindex(frame["bin"]).to_numpy()
    bin_std = stats["std"].reindex(frame["bin"]).to_numpy()
    # a bin with one gene has no spread: scanpy sets its normalized dispersion to 1
    single = np.isnan(bin_std)
    bin_std = np.where(single, 1.0, bin_std)
    normalized = (log_disp - bin_mean) / bin_std
    normalized = np.where(single, 1.0, normalized)
    normalized = np.nan_to_num(normalized, nan=-np.inf)
    order = np.argsort(-normalized, kind="stable")
    return np.sort(order[:n_top])


@dataclass
class SplitFeatures:
    """Dense features for the three sets of one split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: dict


def _rows(adata: AnnData, cells: pd.Index) -> np.ndarray:
    return adata.obs_names.get_indexer(cells)


def hvg_features(adata: AnnData, split, *, kind: str, n_hvg: int = 2000, **_) -> SplitFeatures:
    """Log-normalized expression of the top ``n_hvg`` HVGs chosen on the training cells."""
    lognorm = lognormalize(adata.X, kind=kind)
    train_rows = _rows(adata, split.train)
    genes = highly_variable_genes(lognorm[train_rows], n_top=n_hvg)
    dense = lognorm[:, genes]
    return SplitFeatures(
        *(dense[_rows(adata, cells)].toarray() for cells in (split.train, split.val, split.test)),
        info={"n_genes": int(len(genes))},
    )


def pca_features(
    adata: AnnData, split, *, kind: str, n_hvg: int = 2000, n_pcs: int = 50, seed: int = 0, **_
) -> SplitFeatures:
    """HVGs → z-score (train mean/sd, clipped at 10) → PCA(n_pcs), all fitted on train."""
    hvg = hvg_features(adata, split, kind=kind, n_hvg=n_hvg)
    mean = hvg.train.mean(axis=0)
    std = hvg.train.std(axis=0, ddof=1)
    std[std == 0] = 1.0

    def scale(x: np.ndarray) -> np.ndarray:
        return np.clip((x - mean) / std, -CLIP_SCALED, CLIP_SCALED)

    n_components = min(n_pcs, hvg.train.shape[0] - 1, hvg.train.shape[1])
    pca = PCA(n_components=n_components, svd_solver="full", random_state=seed)
    train = pca.fit_transform(scale(hvg.train))
    return SplitFeatures(
        train.astype(np.float32),
        pca.transform(scale(hvg.val)).astype(np.float32),
        pca.transform(scale(hvg.test)).astype(np.float32),
        info={**hvg.info, "n_pcs": int(n_components)},
    )


def pca_all_cells(
    adata: AnnData, *, kind: str, n_hvg: int = 2000, n_pcs: int = 50, seed: int = 0
) -> np.ndarray:
    """HVG → z-score → PCA over all cells: the unsupervised baseline view for figures/scores."""
    from scfmbench.splits import Split

    everyone = pd.Index(adata.obs_names)
    split = Split(seed=seed, train=everyone, val=everyone[:1], test=everyone[:1])
    return pca_features(adata, split, kind=kind, n_hvg=n_hvg, n_pcs=n_pcs, seed=seed).train


def no_features(adata: AnnData, split, **_) -> SplitFeatures:
    """A constant feature: what the majority-class floor sees."""
    return SplitFeatures(
        *(np.zeros((len(c), 1), np.float32) for c in (split.train, split.val, split.test)),
        info={},
    )


REPRESENTATIONS: Registry = Registry("representation")
REPRESENTATIONS.register("hvg")(hvg_features)
REPRESENTATIONS.register("pca")(pca_features)
REPRESENTATIONS.register("none")(no_features)


def obsm_key_for(model_id: str) -> str:
    """Where a model's embeddings live: ``geneformer-random`` → ``obsm['X_geneformer_random']``."""
    return f"X_{model_id.replace('-', '_')}"


def embedding_features(matrix: np.ndarray, obs_names: pd.Index, split) -> SplitFeatures:
    """Slice a per-cell embedding matrix (e.g. ``obsm['X_geneformer']``) by split."""
    return SplitFeatures(
        *(matrix[obs_names.get_indexer(c)] for c in (split.train, split.val, split.test)),
        info={"dim": int(matrix.shape[1])},
    )
