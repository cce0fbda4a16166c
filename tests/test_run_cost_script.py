"""benchmarks/run_cost.py: the 50k-cell resample and the stage breakdown it prints."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from run_cost import THINNING, breakdown, resample_file  # noqa: E402


def test_resample_draws_cells_with_replacement_and_thins_their_counts(shared_dir, tmp_path):
    out = resample_file(shared_dir, tmp_path / "r.h5ad", 400, seed=3)
    got = ad.read_h5ad(out)
    source = ad.read_h5ad(shared_dir / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad")
    rows = np.random.default_rng(3).integers(0, source.n_obs, size=400)  # the same draw
    assert got.shape == (400, source.n_vars)
    assert list(got.var_names) == list(source.var_names)
    np.testing.assert_array_equal(
        got.obs["cell_type"].astype(str), source.obs["cell_type"].astype(str).to_numpy()[rows]
    )
    counts = sp.csr_matrix(got.X).toarray()
    original = sp.csr_matrix(source.X)[rows].toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    assert (counts <= original).all()  # thinning never adds a count
    ratio = counts.sum() / original.sum()
    assert abs(ratio - THINNING) < 0.01
    assert len({row.tobytes() for row in counts}) == 400  # no two cells identical
    assert len(set(rows.tolist())) < 400  # although some source cells were drawn twice


def test_breakdown_orders_stages_by_cpu_time_and_lists_their_parts():
    timings = {
        "probe:hvg+logreg": {"seconds": 3.0, "cpu_seconds": 2.0},
        "embedding_scores:pca": {"seconds": 9.0, "cpu_seconds": 6.0, "leiden_s": 1.25},
        "embed:gf": {"seconds": 1.0, "cpu_seconds": 0.5, "n_cells": 8, "cells_per_s": 8.0},
        "total": {"seconds": 20.0, "cpu_seconds": 10.0},
    }
    lines = breakdown(timings)
    assert lines[2] == "| embedding_scores:pca | 9.0 | 6.0 | 60% | leiden 1.2 |"
    assert lines[3] == "| probe:hvg+logreg | 3.0 | 2.0 | 20% |  |"
    assert lines[4] == "| embed:gf | 1.0 | 0.5 | 5% |  |"  # a rate is not a part
    assert len(lines) == 5
