"""Out-of-core ``run``: streaming from disk gives the in-memory results without loading X."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA

from scfmbench.benchmark.pipeline import run
from scfmbench.data.backed import validate_backed
from scfmbench.data.cells import InMemoryCells
from scfmbench.data.splits import stratified_split
from scfmbench.data.validate import validate
from scfmbench.evaluation.representations import (
    CLIP_SCALED,
    GeneMoments,
    hvg_features,
    pca_features,
    select_hvg,
)
from tests._geneformer_factory import write_checkpoint
from tests._scgpt_fixtures import *  # noqa: F403
from tests.conftest import make_tiny_adata, run_cli_in_process


@pytest.fixture(scope="module")
def messy_pbmc(pbmc3k_sess, tmp_path_factory):
    """900 PBMC3k cells with 3 empty cells, 4 unlabelled cells and a rare class, on disk."""
    rng = np.random.default_rng(0)
    adata = pbmc3k_sess[np.sort(rng.choice(pbmc3k_sess.n_obs, 900, replace=False))].copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.X[[5, 400, 899]] = 0
    adata.X.eliminate_zeros()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[[10, 11, 500, 700]] = "nan"
    adata.obs["cell_type"] = labels
    path = tmp_path_factory.mktemp("backed") / "messy.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_backed_validation_matches_in_memory(messy_pbmc):
    path, adata = messy_pbmc
    with pytest.warns(UserWarning):
        expected = validate(adata.copy(), label_key="cell_type")
    with pytest.warns(UserWarning):
        backed = validate_backed(path, label_key="cell_type", chunk_size=128, progress=False)
    try:
        assert backed.diagnostics.to_dict() == expected.diagnostics.to_dict()
        assert backed.diagnostics.dropped_cells_no_counts == 3
        assert backed.diagnostics.dropped_cells_missing_label == 4
        pd.testing.assert_series_equal(backed.labels, expected.labels)
        rows = np.random.default_rng(1).permutation(len(backed.labels))[:300]
        got = np.zeros((len(rows), backed.cells.n_vars), dtype=np.float32)
        for positions, chunk in backed.cells.row_chunks(rows):
            got[positions] = chunk.toarray()
        np.testing.assert_array_equal(got, expected.adata.X[rows].toarray())
    finally:
        backed.close()


def test_pca_features_equal_sklearn_pca(pbmc3k):
    validated = validate(pbmc3k, label_key="cell_type")
    split = stratified_split(validated.labels, seed=42, fractions=(0.8, 0.1, 0.1))
    cells = InMemoryCells(validated.adata.X, validated.adata.obs_names, chunk_size=500)
    got = pca_features(cells, split, kind="counts", n_hvg=500, n_pcs=20)
    hvg = hvg_features(cells, split, kind="counts", n_hvg=500)
    train = hvg.train.astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
    std[std == 0] = 1
    scale = lambda x: np.clip((x - mean) / std, -CLIP_SCALED, CLIP_SCALED)  # noqa: E731
    pca = PCA(n_components=20, svd_solver="full").fit(scale(train))
    assert got.info == {"n_genes": 500, "n_pcs": 20}
    for ours, theirs in ((got.train, hvg.train), (got.test, hvg.test)):
        np.testing.assert_allclose(ours, pca.transform(scale(theirs.astype(np.float64))), atol=1e-4)


def test_hvg_from_moments_matches_scanpy(pbmc3k):
    import scanpy as sc

    lognorm = pbmc3k.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, flavor="seurat", n_top_genes=1000)
    cells = InMemoryCells(sp.csr_matrix(lognorm.X), lognorm.obs_names, chunk_size=700)
    moments = GeneMoments.of(cells, np.arange(lognorm.n_obs), kind="lognorm")
    genes = select_hvg(moments, n_top=1000)
    expected = np.flatnonzero(lognorm.var["highly_variable"].to_numpy())
    assert len(set(genes) ^ set(expected)) <= 4  # ties at the cut-off only


def test_backed_run_equals_in_memory_run(messy_pbmc, shared_dir, tmp_path, monkeypatch, caplog):
    path, _ = messy_pbmc
    # V1 (mean pooling): a tiny random network's <cls> outputs are nearly equal across cells, so
    # kNN on them would hinge on last-bit differences between batchings; inputs capped at 128
    # tokens keep the six embeddings of 900 cells quick
    gf, _ = write_checkpoint(tmp_path / "gf", shared_dir, version="V1", max_position_embeddings=128)
    settings = {
        "label_key": "cell_type",
        "n_splits": 2,
        "models": [f"geneformer={gf}"],
        "probes": ["logreg", "knn"],
        "baselines": ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"],  # scVI: own test
        "figures": False,
        "out": tmp_path / "runs",
        "progress": False,
        "gene_column": "var_names",  # symbols: the tokenizer warns about unmapped ones
    }
    with pytest.warns(UserWarning):
        memory = run(path, name="memory", backed=False, **settings)
    # the streamed run must never read the whole file
    monkeypatch.setattr(ad, "read_h5ad", lambda *a, **k: pytest.fail("read_h5ad called"))
    caplog.clear()
    with pytest.warns(UserWarning):
        backed = run(path, name="backed", backed=True, chunk_size=200, **settings)
    # per-chunk tokenizer warnings are shown for the first chunk only (6 streamed embeddings)
    assert caplog.text.count("not in the gene-name dictionary") == 6
    a, b = memory.metrics, backed.metrics
    assert a["diagnostics"]["n_cells"] == b["diagnostics"]["n_cells"] == 890
    assert set(a["methods"]) == set(b["methods"]) and "geneformer+knn" in a["methods"]
    for method, entry in a["methods"].items():
        for seed, scores in entry["splits"].items():
            other = b["methods"][method]["splits"][seed]
            if entry["kind"] == "baseline":  # features computed in float64 from the same sums
                assert other["confusion"] == scores["confusion"], (method, seed)
                assert other["macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-12)
                continue
            # embeddings of other batchings differ in the last float32 bits; a probe tuned over
            # C up to 1e3 on a tiny random network may move a cell or two
            moved = np.abs(
                np.array(other["confusion"]["matrix"]) - np.array(scores["confusion"]["matrix"])
            ).sum()
            assert moved <= 4, (method, seed, moved)
    assert b["layers"] == a["layers"] and len(a["layers"]["geneformer"]) == 3
    # the PCA view comes from the same float64 sums in both modes; the tiny random network's
    # embedding differs in the last bits between batchings, and Leiden clusters of a structureless
    # embedding (ARI ≈ 0.05) can change wholesale, so only its graph and distance scores compare
    checks = {
        "pca": (("nmi", "ari", "silhouette_label", "clisi", "graph_connectivity"), 1e-4),
        "geneformer": (("silhouette_label", "clisi", "graph_connectivity"), 0.01),
    }
    for view, (scores, tolerance) in checks.items():
        for score in scores:
            assert b["embeddings"][view][score] == pytest.approx(
                a["embeddings"][view][score], abs=tolerance
            ), (view, score)
    assert b["diagnostics"]["models"]["geneformer"]["chunk_size"] == 200
    streamed = sorted(p.name for p in (backed.run_dir / "embeddings").glob("*.npy"))
    assert streamed == [f"geneformer{c}_L{i}_mean.npy" for c in ("-random", "") for i in range(3)]
    on_disk = np.load(backed.run_dir / "embeddings" / "geneformer_L2_mean.npy")
    assert on_disk.shape == (900, 32) and np.isnan(on_disk[[5, 400, 899]]).all()
    # a rerun reuses the streamed embeddings and every probe
    with pytest.warns(UserWarning):
        again = run(path, name="backed", backed=True, chunk_size=200, **settings)
    assert again.metrics["diagnostics"]["models"]["geneformer"]["from_cache"] is True
    assert again.metrics["methods"] == b["methods"]


def test_backed_run_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(path)
    config = tmp_path / "finetune.yaml"  # a finetune section (--finetune also needs a model)
    config.write_text("finetune: {epochs: 1}\n")
    code, _, err = run_cli_in_process(
        ["run", "--data", str(path), "--backed", "--config", str(config), "--out",
         str(tmp_path / "r")],
        capsys,
    )  # fmt: skip
    assert code == 2 and "not available on a streamed (backed) run" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli_in_process(
        ["run", "--data", "pbmc68k_reduced", "--backed", "--out", str(tmp_path / "r")], capsys
    )
    assert code == 2 and "write it with adata.write_h5ad" in err


def test_files_with_int64_indptr_and_int32_indices(tmp_path, pbmc3k_sess, make_scgpt_dir):
    """Some writers store int64 indptr with int32 indices; both run modes must read them."""
    import h5py

    path = tmp_path / "mixed.h5ad"
    big = pbmc3k_sess.obs["cell_type"].isin(["Naive CD4 T", "CD14+ Mono", "B"]).to_numpy()
    pbmc3k_sess[np.flatnonzero(big)[:300]].copy().write_h5ad(path)  # no cell is dropped
    with h5py.File(path, "r+") as f:
        indptr = f["X/indptr"][:].astype(np.int64)
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=indptr)
        assert f["X/indices"].dtype == np.int32
    loaded = ad.read_h5ad(path)
    assert loaded.X.indptr.dtype != loaded.X.indices.dtype
    settings = {
        "design": "study",  # one random split keeps the test quick
        "n_splits": 1,
        "out": tmp_path / "runs",
        "progress": False,
        "figures": False,
        "layerwise": False,
        "random_controls": False,
        "probes": ["logreg"],
        "baselines": ["pca+logreg"],
        "models": [f"scgpt={make_scgpt_dir()}"],
        "model_options": {"scgpt": {"max_seq_len": 64}},
    }
    memory = run(path, name="memory", backed=False, **settings)
    backed = run(path, name="backed", backed=True, chunk_size=64, **settings)
    for method, entry in memory.metrics["methods"].items():
        assert entry["splits"] == backed.metrics["methods"][method]["splits"]
    assert set(memory.metrics["methods"]) == {"pca+logreg", "scgpt+logreg"}
    assert memory.metrics["diagnostics"]["n_cells"] == 300


def test_run_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli_in_process(["run", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "runs in one process" in err


def test_cli_validate_backed_equals_in_memory(messy_pbmc, capsys):
    import json

    path, _ = messy_pbmc
    reports = []
    for flag in ("--no-backed", "--backed"):
        code, out, err = run_cli_in_process(["validate", str(path), "--json", flag], capsys)
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[0] == reports[1]
    assert reports[1]["dropped_cells_no_counts"] == 3 and reports[1]["n_cells"] == 890
