"""Baseline representations, fitted on the training cells of each split only (no leakage).

Every representation reads the expression matrix in row chunks through a
:class:`scfmbench.data.cells.CellRows` source — an in-memory matrix or an ``.h5ad`` file on
disk (:class:`scfmbench.data.backed.BackedCells`) — so the same code serves both, and the
full matrix is never needed: the HVG choice and the PCA are fitted from per-gene sums and a
gene × gene covariance accumulated chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from scfmbench.data.cells import CellRows, lognorm_chunks, row_indices
from scfmbench.registry import Registry

CLIP_SCALED = 10.0

# --------------------------------------------------------------------------------------
# Highly variable genes from per-gene sums
# --------------------------------------------------------------------------------------


@dataclass
class GeneMoments:
    """Per-gene sums over a set of cells, in float64: enough for HVGs and z-scoring."""

    n: int
    sum_expm1: np.ndarray
    sumsq_expm1: np.ndarray
    sum_log: np.ndarray
    sumsq_log: np.ndarray

    @classmethod
    def of(cls, cells: CellRows, rows: np.ndarray, *, kind: str) -> GeneMoments:
        """Accumulate the sums over ``rows`` chunk by chunk."""
        sums = np.zeros((4, cells.n_vars), dtype=np.float64)
        for _, lognorm in lognorm_chunks(cells, rows, kind):
            _add_column_sums(sums, lognorm)
        return cls(len(rows), *sums)

    def mean_std_log(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sample SD (ddof 1; 1 where 0) of the log values of ``genes``."""
        n = self.n
        mean = self.sum_log[genes] / n
        var = (self.sumsq_log[genes] - n * mean**2) / max(n - 1, 1)
        std = np.sqrt(np.clip(var, 0, None))
        std[std == 0] = 1.0
        return mean, std


def _add_column_sums(sums: np.ndarray, lognorm: sp.csr_matrix) -> None:
    data = lognorm.data.astype(np.float64)
    columns = lognorm.indices
    n_vars = sums.shape[1]
    expm1 = np.expm1(data)
    for row, values in enumerate((expm1, expm1 * expm1, data, data * data)):
        sums[row] += np.bincount(columns, weights=values, minlength=n_vars)


def select_hvg(moments: GeneMoments, *, n_top: int) -> np.ndarray:
    """Select the ``n_top`` most dispersed genes (Seurat flavour, 20 mean bins).

    Dispersion = var/mean of expm1 values, log-transformed and z-scored within bins of
    log mean expression, as in ``scanpy.pp.highly_variable_genes(flavor="seurat")``.
    Ties are broken by gene order.
    """
    n_genes, n = len(moments.sum_expm1), moments.n
    if n_top >= n_genes:
        return np.arange(n_genes)
    mean = moments.sum_expm1 / n
    var = (moments.sumsq_expm1 / n - mean**2) * n / max(n - 1, 1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        log_disp = np.log(dispersion)
    log_mean = np.log1p(mean)
    bins = pd.cut(log_mean, bins=20)
    frame = pd.DataFrame({"d": log_disp, "bin": bins})
    stats = cast(pd.DataFrame, frame.groupby("bin", observed=True)["d"].agg(["mean", "std"]))
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


# --------------------------------------------------------------------------------------
# Representations
# --------------------------------------------------------------------------------------


@dataclass
class SplitFeatures:
    """Dense features for the three sets of one split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    info: dict


def _split_rows(cells: CellRows, split) -> list[np.ndarray]:
    return [row_indices(cells, names) for names in (split.train, split.val, split.test)]


def _collect(
    cells: CellRows, sets: list[np.ndarray], kind: str, transform, width: int
) -> list[np.ndarray]:
    """``transform(lognorm chunk)`` for the rows of each set (one pass over their union)."""
    union, inverse = np.unique(np.concatenate(sets), return_inverse=True)
    out = np.empty((len(union), width), dtype=np.float32)
    for positions, lognorm in lognorm_chunks(cells, union, kind):
        out[positions] = transform(lognorm)
    bounds = np.cumsum([0, *map(len, sets)])
    return [out[inverse[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def hvg_features(cells: CellRows, split, *, kind: str, n_hvg: int = 2000, **_) -> SplitFeatures:
    """Log-normalized expression of the top ``n_hvg`` HVGs chosen on the training cells."""
    sets = _split_rows(cells, split)
    genes = select_hvg(GeneMoments.of(cells, sets[0], kind=kind), n_top=n_hvg)
    parts = _collect(cells, sets, kind, lambda x: x[:, genes].toarray(), len(genes))
    return SplitFeatures(*parts, info={"n_genes": int(len(genes))})


def pca_features(
    cells: CellRows,
    split,
    *,
    kind: str,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
    **_,
) -> SplitFeatures:
    """HVGs → z-score (train mean/sd, clipped at 10) → PCA(n_pcs), all fitted on train.

    The PCA is the eigendecomposition of the training cells' covariance, accumulated chunk
    by chunk in float64 (sklearn's ``covariance_eigh`` solver; its sign convention), so only
    ``n_hvg × n_hvg`` and the ``n_pcs`` columns are ever held.
    """
    del seed  # the eigendecomposition is deterministic
    sets = _split_rows(cells, split)
    moments = GeneMoments.of(cells, sets[0], kind=kind)
    genes = select_hvg(moments, n_top=n_hvg)
    mean, std = moments.mean_std_log(genes)

    def scaled(lognorm: sp.csr_matrix) -> np.ndarray:
        dense = lognorm[:, genes].toarray().astype(np.float64)
        return np.clip((dense - mean) / std, -CLIP_SCALED, CLIP_SCALED)

    center, components = _fit_pca(cells, sets[0], kind, scaled, len(genes), n_pcs)
    parts = _collect(
        cells, sets, kind, lambda x: (scaled(x) - center) @ components.T, len(components)
    )
    return SplitFeatures(*parts, info={"n_genes": int(len(genes)), "n_pcs": int(len(components))})


def _fit_pca(
    cells: CellRows, rows: np.ndarray, kind: str, scaled, width: int, n_pcs: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components) of the PCA of ``scaled(rows)``, components as rows, sign-fixed."""
    n = len(rows)
    total = np.zeros(width)
    gram = np.zeros((width, width))
    for _, lognorm in lognorm_chunks(cells, rows, kind):
        block = scaled(lognorm)
        total += block.sum(axis=0)
        gram += block.T @ block
    center = total / n
    covariance = (gram - n * np.outer(center, center)) / max(n - 1, 1)
    n_components = min(n_pcs, n - 1, width)
    # only the top n_components eigenpairs (LAPACK syevr): ~3x faster than a full eigh. One
    # BLAS thread: the tridiagonal reduction is memory-bound, and on a shared 2-core machine
    # two threads took 15x the CPU time of one (8.3 vs 0.56 CPU s for 2000 genes)
    with threadpool_limits(limits=1, user_api="blas"):
        _, vectors = scipy.linalg.eigh(
            covariance, subset_by_index=[width - n_components, width - 1], driver="evr"
        )
    components = vectors[:, ::-1].T.copy()
    # the largest-magnitude loading of every component is positive (sklearn's svd_flip)
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(len(components)), biggest])[:, None]
    return center, components


def pca_all_cells(
    cells: CellRows,
    *,
    kind: str,
    n_hvg: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
    names: pd.Index | None = None,
) -> np.ndarray:
    """Fit HVG → z-score → PCA on all cells (or the cells ``names``) and project them.

    This is the unsupervised baseline view for figures and scores.

    Returns
    -------
    numpy.ndarray
        float32 of shape (n_cells, n_pcs), rows in the order of ``names`` (default: every
        cell of ``cells``).
    """
    from scfmbench.data.splits import Split

    everyone = pd.Index(cells.obs_names if names is None else names)
    split = Split(seed=seed, train=everyone, val=everyone[:1], test=everyone[:1])
    return pca_features(cells, split, kind=kind, n_hvg=n_hvg, n_pcs=n_pcs, seed=seed).train


def no_features(cells: CellRows, split, **_) -> SplitFeatures:
    """Return a constant feature: what the majority-class floor sees."""
    return SplitFeatures(
        *(np.zeros((len(c), 1), np.float32) for c in (split.train, split.val, split.test)),
        info={},
    )


REPRESENTATIONS: Registry = Registry("representation")
REPRESENTATIONS.register("hvg")(hvg_features)
REPRESENTATIONS.register("pca")(pca_features)
REPRESENTATIONS.register("none")(no_features)
# "scvi" is registered by scfmbench.evaluation.scvi (imported by the package's face)


def embedding_features(matrix: np.ndarray, obs_names: pd.Index, split) -> SplitFeatures:
    """Slice a per-cell embedding matrix (e.g. ``obsm['X_geneformer']``) by split."""
    return SplitFeatures(
        *(matrix[obs_names.get_indexer(c)] for c in (split.train, split.val, split.test)),
        info={"dim": int(matrix.shape[1])},
    )
