"""Convert a raw-count AnnData (symbols as var_names, Ensembl IDs in var["gene_ids"]) into the
layouts other tools publish: CELLxGENE schema, a Seurat conversion and a 10x-style file."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp


def _lognorm(counts: ad.AnnData) -> ad.AnnData:
    out = counts.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def cellxgene(counts: ad.AnnData) -> ad.AnnData:
    """CELLxGENE schema: Ensembl var_names, var["feature_name"] symbols (categorical),
    log-normalized X, raw counts in raw.X (raw.var without the symbol column), categorical
    obs with an unused category."""
    genes = pd.Index(counts.var["gene_ids"].astype(str), name=None)
    symbols = counts.var.get("gene_symbol", pd.Series(counts.var_names, index=counts.var_names))
    var = pd.DataFrame(
        {
            "feature_name": pd.Categorical(symbols.astype(str).to_numpy()),
            "feature_biotype": pd.Categorical(["gene"] * counts.n_vars),
            "feature_is_filtered": False,
        },
        index=genes,
    )
    obs = counts.obs[["cell_type"]].copy()
    obs["cell_type"] = pd.Categorical(
        obs["cell_type"].astype(str),
        categories=[*sorted(set(obs["cell_type"].astype(str))), "unused type"],
    )
    raw = ad.AnnData(X=sp.csr_matrix(counts.X), obs=obs.copy(), var=pd.DataFrame(index=genes))
    out = ad.AnnData(X=_lognorm(counts).X, obs=obs, var=var)
    out.raw = raw
    return out


def seurat(counts: ad.AnnData, *, scaled: bool, layer: bool = False) -> ad.AnnData:
    """A Seurat conversion: symbols as var_names, counts in raw.X (``layer``: in
    layers["counts"] instead); X log-normalized, or (``scaled``) the scaled data of 500
    variable genes only (then counts are always in raw.X)."""
    lognorm = _lognorm(counts)
    var = pd.DataFrame(index=counts.var_names.astype(str))
    obs = counts.obs[["cell_type"]].copy()
    if scaled:
        top = np.argsort(-np.asarray(lognorm.X.power(2).mean(0)).ravel())[:500]
        dense = lognorm.X[:, np.sort(top)].toarray()
        dense = (dense - dense.mean(0)) / (dense.std(0) + 1e-8)
        out = ad.AnnData(X=dense.astype(np.float32), obs=obs, var=var.iloc[np.sort(top)].copy())
        out.raw = ad.AnnData(X=sp.csr_matrix(counts.X), obs=obs.copy(), var=var.copy())
        return out
    out = ad.AnnData(X=lognorm.X, obs=obs, var=var.copy())
    if layer:
        out.layers["counts"] = sp.csr_matrix(counts.X)
    else:
        out.raw = ad.AnnData(X=sp.csr_matrix(counts.X), obs=obs.copy(), var=var.copy())
    return out


def tenx(counts: ad.AnnData) -> ad.AnnData:
    """A 10x-style file as scanpy reads it: symbols as var_names, var["gene_ids"],
    var["feature_types"], raw counts in X."""
    var = pd.DataFrame(
        {"gene_ids": counts.var["gene_ids"].astype(str).to_numpy(), "feature_types": "Gene"},
        index=counts.var_names.astype(str),
    )
    return ad.AnnData(X=sp.csr_matrix(counts.X), obs=counts.obs[["cell_type"]].copy(), var=var)
