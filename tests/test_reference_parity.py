"""Parity with the reference pipelines on inputs as the field ships them.

Tiny checkpoints in the real on-disk formats, the real vocabularies from ../shared and real
PBMC3k cells prepared the way the reference tools expect them (symbols as ``var_names``,
Ensembl IDs in ``var["ensembl_id"]``). Vectorized code is never its own oracle: the
Geneformer tokens are recomputed here cell by cell from the dictionaries.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scfmbench.embed import MODELS, collate, embed
from scfmbench.errors import SchemaError
from scfmbench.genes import content_kind, resolve_gene_identifiers
from tests._geneformer_factory import write_checkpoint
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import make_tiny_adata
from tests.test_scfoundation import GENES as SCF_GENES
from tests.test_scfoundation import write_checkpoint as write_scfoundation

PBMC3K = "data/pbmc3k_seurat_labels_2638x13714_counts.h5ad"
N_CELLS = 40


@pytest.fixture(scope="module")
def pbmc_reference_layout(shared_dir) -> ad.AnnData:
    """PBMC3k cells as the reference Geneformer tokenizer expects them: symbol var_names,
    Ensembl IDs in var["ensembl_id"] (the 10x column renamed), raw counts in X."""
    adata = ad.read_h5ad(shared_dir / PBMC3K)
    rows = np.sort(np.random.default_rng(7).choice(adata.n_obs, N_CELLS, replace=False))
    adata = adata[rows].copy()
    adata.var = adata.var.rename(columns={"gene_ids": "ensembl_id"})[["ensembl_id"]]
    return adata


@pytest.fixture(scope="module")
def gf_dirs(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("gf")
    return {
        version: write_checkpoint(root / version, shared_dir, version=version, seed=3)
        for version in ("V1", "V2")
    }


# ---- defaults: each model's reference layer and pooling ---------------------------------------


def _hf_hidden(network, model, adata, layer: int):
    tokens = model.tokenize(adata)
    batch = collate(tokens, np.arange(tokens.n_cells), pad_token_id=0)
    with torch.no_grad():
        states = network.bert(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            output_hidden_states=True,
        ).hidden_states[layer]
    return tokens, states


def test_geneformer_v1_default_is_mean_of_second_to_last_layer(gf_dirs, pbmc_reference_layout):
    directory, network = gf_dirs["V1"]
    model = MODELS.get("geneformer")(directory)
    assert (model.n_layers, model.default_layer, model.default_pooling) == (2, 1, "mean")
    result = embed(pbmc_reference_layout.copy(), model, progress=False)
    assert (result.layer, result.pooling) == (1, "mean")
    tokens, states = _hf_hidden(network, model, pbmc_reference_layout, layer=1)
    expected = np.stack([states[i, :n].mean(0).numpy() for i, n in enumerate(tokens.lengths)])
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-5)


def test_geneformer_v2_default_is_cls_of_second_to_last_layer(gf_dirs, pbmc_reference_layout):
    directory, network = gf_dirs["V2"]
    model = MODELS.get("geneformer")(directory)
    assert (model.n_layers, model.default_layer, model.default_pooling) == (2, 1, "cls")
    result = embed(pbmc_reference_layout.copy(), model, progress=False)
    assert (result.layer, result.pooling) == (1, "cls")
    _, states = _hf_hidden(network, model, pbmc_reference_layout, layer=1)
    np.testing.assert_allclose(result.matrix, states[:, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_scgpt_default_is_l2_normalized_cls_of_last_layer(make_scgpt_dir):
    model = MODELS.get("scgpt")(make_scgpt_dir())
    assert (model.n_layers, model.default_layer, model.default_pooling) == (2, 2, "cls")
    adata = make_tiny_adata()
    result = embed(adata, model, progress=False)
    assert (result.layer, result.pooling) == (2, "cls")
    np.testing.assert_allclose(np.linalg.norm(result.matrix, axis=1), 1.0, rtol=1e-5)
    tokens = model.tokenize(adata)
    batch = collate(tokens, np.arange(tokens.n_cells), pad_token_id=model.pad_token_id)
    with torch.no_grad():
        states = model.network(batch.input_ids, batch.values, batch.attention_mask)[:, 0]
    expected = torch.nn.functional.normalize(states, dim=-1).numpy()
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-6)


def test_scfoundation_default_is_the_embedding_script(tmp_path):
    write_scfoundation(tmp_path / "scf", SCF_GENES)
    model = MODELS.get("scfoundation")(tmp_path / "scf")
    assert (model.n_layers, model.default_layer, model.default_pooling) == (2, 2, "all")
    counts = np.random.default_rng(0).poisson(2.0, size=(5, len(SCF_GENES))) + 1
    adata = ad.AnnData(X=counts.astype(np.float32), var={"_": SCF_GENES})
    adata.var_names = SCF_GENES
    result = embed(adata, model, progress=False)
    assert (result.layer, result.pooling, result.matrix.shape) == (2, "all", (5, 4 * 8))


# ---- gene identifiers: resolved once per model by the vocabulary's kind --------------------


def _var(index, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(index, dtype=object))


SYMBOLS = ["CD3D", "LYZ", "MS4A1", "NKG7", "GNLY"]
ENSEMBL = [
    "ENSG00000167286",
    "ENSG00000090382",
    "ENSG00000156738",
    "ENSG00000105374",
    "ENSG00000115523",
]


def test_resolution_order_and_version_suffixes():
    versioned = [f"{g}.{i + 3}" for i, g in enumerate(ENSEMBL)]
    var = _var(SYMBOLS, feature_biotype=["gene"] * 5, gene_ids=versioned, gene_symbol=SYMBOLS)
    ens = resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m")
    assert (ens.column, ens.kind, list(ens.keys)) == ("gene_ids", "ensembl", ENSEMBL)
    sym = resolve_gene_identifiers(var, vocabulary_kind="symbol", model="m")
    assert (sym.column, list(sym.keys)) == ("gene_symbol", SYMBOLS)
    # the well-known names come first, before columns in file order
    var = _var(SYMBOLS, other=ENSEMBL, ensembl_id=versioned)
    assert resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m").column == (
        "ensembl_id"
    )
    explicit = resolve_gene_identifiers(
        var, vocabulary_kind="ensembl", model="m", gene_column="var_names"
    )
    assert (explicit.column, explicit.kind, explicit.reason) == (
        "var_names",
        "symbol",
        "--gene-column",
    )


def test_detection_by_content_needs_ninety_percent():
    nine = ENSEMBL * 2  # 10 genes
    var = _var([f"g{i}" for i in range(10)], ids=nine[:9] + ["x"], half=nine[:8] + ["x", "y"])
    found = resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m")
    assert found.column == "ids" and found.looked_at == ("ids",)
    var = _var([f"g{i}" for i in range(10)], half=nine[:8] + ["x", "y"])
    fallback = resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m")
    assert fallback.column == "var_names" and fallback.looked_at == ("half", "var_names")
    assert content_kind(["gene"] * 10) is None  # a category, not gene names
    assert content_kind([str(i) for i in range(10)]) is None
    assert content_kind(SYMBOLS) == "symbol" and content_kind(ENSEMBL) == "ensembl"


def test_ensembl_vocabulary_falls_back_to_symbols_for_the_dictionaries():
    var = _var([f"ENSG{i:011d}" for i in range(5)], feature_name=SYMBOLS)
    assert resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m").column == (
        "var_names"
    )
    var = _var(["a1", "b2", "c3", "d4", "e5"], feature_name=SYMBOLS, n_cells=[1, 2, 3, 4, 5])
    var.index = [str(i) for i in range(5)]
    found = resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="geneformer")
    assert (found.column, found.kind) == ("feature_name", "symbol")
    assert "mapped through the geneformer dictionaries" in found.reason


def test_missing_explicit_column_names_the_columns():
    var = _var(SYMBOLS, gene_ids=ENSEMBL)
    with pytest.raises(SchemaError, match=r"no column 'ensembl'.*\['gene_ids'\].*var_names"):
        resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m", gene_column="ensembl")


def test_geneformer_default_reads_var_ensembl_id(gf_dirs, pbmc_reference_layout, caplog):
    model = MODELS.get("geneformer")(gf_dirs["V2"][0])
    with caplog.at_level(logging.INFO, logger="scfmbench"):
        default = model.tokenize(pbmc_reference_layout)
    explicit = MODELS.get("geneformer")(gf_dirs["V2"][0], gene_column="ensembl_id").tokenize(
        pbmc_reference_layout
    )
    np.testing.assert_array_equal(default.input_ids, explicit.input_ids)
    info = default.gene_match.to_dict()
    assert info["gene_column"] == "ensembl_id" and info["n_genes"] == 13_714
    assert info["n_matched"] == 11_965 and info["fraction_counts"] > 0.9
    assert default.settings["gene_column"] == "ensembl_id"
    assert "from var['ensembl_id']" in caplog.text
    by_symbol = MODELS.get("geneformer")(gf_dirs["V2"][0], gene_column="var_names")
    assert by_symbol.tokenize(pbmc_reference_layout).settings["gene_column"] == "var_names"


def test_scfoundation_ignores_a_gene_name_column_of_ensembl_ids(tmp_path):
    write_scfoundation(tmp_path / "scf", SCF_GENES)
    model = MODELS.get("scfoundation")(tmp_path / "scf")
    counts = np.arange(1, 1 + 3 * len(SCF_GENES), dtype=np.float32).reshape(3, -1)
    adata = ad.AnnData(X=counts, var=_var(SCF_GENES, gene_name=ENSEMBL + ["ENSG00000000001"]))
    tokens = model.tokenize(adata)
    assert tokens.gene_match.gene_column == "var_names"
    assert tokens.gene_match.n_matched == len(SCF_GENES)
