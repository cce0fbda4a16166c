"""Parity with the reference pipelines on inputs as the field ships them.

Tiny checkpoints in the real on-disk formats, the real vocabularies from ../shared and real
PBMC3k cells prepared the way the reference tools expect them (symbols as ``var_names``,
Ensembl IDs in ``var["ensembl_id"]``). Vectorized code is never its own oracle: the
Geneformer tokens are recomputed here cell by cell from the dictionaries.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from scfmbench.embed import MODELS, collate, embed
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
