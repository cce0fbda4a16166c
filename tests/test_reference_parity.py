"""Parity with the reference pipelines on inputs as the field ships them.

Tiny checkpoints in the real on-disk formats, the real vocabularies from ../shared and real
PBMC3k cells prepared the way the reference tools expect them (symbols as ``var_names``,
Ensembl IDs in ``var["ensembl_id"]``). Vectorized code is never its own oracle: the
Geneformer tokens are recomputed here cell by cell from the dictionaries.
"""

from __future__ import annotations

import logging
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scfmbench.data.genes import content_kind, resolve_gene_identifiers
from scfmbench.embed import collate, embed
from scfmbench.errors import SchemaError
from scfmbench.models import MODELS
from tests._geneformer_factory import hf_hidden_states, write_checkpoint
from tests._scfoundation_factory import GENES as SCF_GENES
from tests._scfoundation_factory import write_checkpoint as write_scfoundation
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import make_tiny_adata

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


@pytest.mark.parametrize(("version", "pooling"), [("V1", "mean"), ("V2", "cls")])
def test_geneformer_default_layer_and_pooling(gf_dirs, pbmc_reference_layout, version, pooling):
    """Second-to-last layer; V1 mean over gene tokens (emb_mode "cell"), V2 <cls>."""
    directory, network = gf_dirs[version]
    model = MODELS.get("geneformer")(directory)
    assert (model.n_layers, model.default_layer, model.default_pooling) == (2, 1, pooling)
    result = embed(pbmc_reference_layout.copy(), model, progress=False)
    assert (result.layer, result.pooling) == (1, pooling)
    tokens, states = hf_hidden_states(network, model, pbmc_reference_layout, layer=1)
    if version == "V1":  # no special tokens: every token is a gene
        expected = np.stack([states[i, :n].mean(0).numpy() for i, n in enumerate(tokens.lengths)])
    else:
        expected = states[:, 0].numpy()
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-5)


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


# ---- checkpoint folders as published ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clone(tmp_path_factory, shared_dir):
    """A clone of the Geneformer Hugging Face repository: model folders at the root, V2
    dictionaries in geneformer/*_gc104M.pkl, V1 ones in geneformer/gene_dictionaries_30m/."""
    root = tmp_path_factory.mktemp("Geneformer")
    v2 = root / "geneformer"
    v2.mkdir()
    for path in sorted((shared_dir / "vocab/geneformer/v2_gc95M").glob("*.pkl")):
        shutil.copy(path, v2 / path.name.replace("_gc95M", "_gc104M"))
    v1 = v2 / "gene_dictionaries_30m"
    v1.mkdir()
    for path in sorted((shared_dir / "vocab/geneformer/v1_gc30M").glob("*.pkl")):
        shutil.copy(path, v1 / path.name)
    _, v1_net = write_checkpoint(
        root / "Geneformer-V1-10M", shared_dir, version="V1", dictionaries=False
    )
    _, v2_net = write_checkpoint(
        root / "Geneformer-V2-104M", shared_dir, version="V2", dictionaries=False, head="cls"
    )
    return root, {"V1": v1_net, "V2": v2_net}


@pytest.mark.parametrize(
    ("folder", "version", "dictionary"),
    [
        ("Geneformer-V1-10M", "V1", "gene_dictionaries_30m/token_dictionary_gc30M.pkl"),
        ("Geneformer-V2-104M", "V2", "token_dictionary_gc104M.pkl"),
    ],
)
def test_hf_clone_finds_the_matching_dictionaries(
    hf_clone, pbmc_reference_layout, folder, version, dictionary
):
    root, _ = hf_clone
    model = MODELS.get("geneformer")(root / folder)
    assert model.version == version
    assert model.tokenizer.dicts.files["token_dictionary"] == root / "geneformer" / dictionary
    assert model.tokenize(pbmc_reference_layout[:3]).n_cells == 3


def test_sequence_classification_and_ddp_checkpoints_embed_alike(
    hf_clone, tmp_path, pbmc_reference_layout
):
    root, networks = hf_clone
    reference = embed(
        pbmc_reference_layout.copy(),
        MODELS.get("geneformer")(root / "Geneformer-V2-104M"),
        progress=False,
    )
    ddp = root / "Geneformer-V2-ddp"  # beside the others: finds the same dictionaries
    ddp.mkdir()
    shutil.copy(root / "Geneformer-V2-104M" / "config.json", ddp / "config.json")
    state = {f"module.{k}": v for k, v in networks["V2"].state_dict().items()}
    torch.save(state, ddp / "pytorch_model.bin")
    again = embed(pbmc_reference_layout.copy(), MODELS.get("geneformer")(ddp), progress=False)
    np.testing.assert_array_equal(reference.matrix, again.matrix)


def _official_heads(embsize: int, *, n_cls: int = 1, batch_labels: int = 0) -> dict:
    """Head tensors exactly as scgpt.model.TransformerModel names them: ClsDecoder with
    nlayers_cls=3 (Linear, ReLU, LayerNorm ×2 → indices 0, 2, 3, 5), out_layer (n_cls, d)."""
    g = torch.Generator().manual_seed(5)
    d = embsize
    heads = {}
    for i in (0, 3):
        heads[f"cls_decoder._decoder.{i}.weight"] = torch.randn(d, d, generator=g)
        heads[f"cls_decoder._decoder.{i}.bias"] = torch.randn(d, generator=g)
    for i in (2, 5):
        heads[f"cls_decoder._decoder.{i}.weight"] = torch.ones(d)
        heads[f"cls_decoder._decoder.{i}.bias"] = torch.zeros(d)
    heads["cls_decoder.out_layer.weight"] = torch.randn(n_cls, d, generator=g)
    heads["cls_decoder.out_layer.bias"] = torch.randn(n_cls, generator=g)
    if batch_labels:
        heads["batch_encoder.embedding.weight"] = torch.randn(batch_labels, d, generator=g)
        heads["batch_encoder.enc_norm.weight"] = torch.ones(d)
        heads["batch_encoder.enc_norm.bias"] = torch.zeros(d)
        for name in ("weight", "bias", "running_mean", "running_var"):
            heads[f"dsbn.bns.0.{name}"] = torch.ones(d)
        heads["dsbn.bns.0.num_batches_tracked"] = torch.tensor(3)
    return heads


def test_scgpt_official_one_output_cls_decoder_loads_strictly(make_scgpt_dir, caplog):
    plain = MODELS.get("scgpt")(make_scgpt_dir(name="plain"))
    heads = _official_heads(16)
    assert len(heads) == 10
    folder = make_scgpt_dir(name="official", edit=lambda state: {**state, **heads})
    with caplog.at_level(logging.INFO, logger="scfmbench"):
        model = MODELS.get("scgpt")(folder)
    assert model.network.cls_decoder.out_layer.weight.shape == (1, 16)
    torch.testing.assert_close(
        model.network.state_dict()["cls_decoder._decoder.3.weight"],
        heads["cls_decoder._decoder.3.weight"],
    )
    assert "heads not used for the embedding: decoder, cls_decoder (1 outputs), mvc_decoder" in (
        caplog.text
    )
    adata = make_tiny_adata()
    np.testing.assert_array_equal(
        embed(adata.copy(), model, progress=False).matrix,
        embed(adata.copy(), plain, progress=False).matrix,
    )


def test_scgpt_batch_label_dsbn_and_ddp_checkpoint(make_scgpt_dir, scgpt_tiny_state, caplog):
    d = 16

    def batch_model(state):
        state = {**state, **_official_heads(d, n_cls=4, batch_labels=2)}
        g = torch.Generator().manual_seed(1)
        # use_batch_labels=True: the expression and MVC decoders read [hidden, batch embedding]
        state["decoder.fc.0.weight"] = torch.randn(d, 2 * d, generator=g)
        state["mvc_decoder.W.weight"] = torch.randn(2 * d, d, generator=g)
        return {f"module.{k}": v for k, v in state.items()}

    with caplog.at_level(logging.INFO, logger="scfmbench"):
        model = MODELS.get("scgpt")(make_scgpt_dir(edit=batch_model))
    assert model.network.config.decoder_batch_labels and model.network.config.n_cls == 4
    assert "batch-label encoder" in caplog.text and "domain-specific batch norm" in caplog.text
    assert embed(make_tiny_adata(), model, progress=False).matrix.shape == (11, d)


# ---- Geneformer tokens against an independent per-cell computation --------------------------


def _reference_geneformer_tokens(adata: ad.AnnData, vocab_dir, suffix: str, special: bool):
    """The reference TranscriptomeTokenizer's steps, written out cell by cell from the pickles:
    upper-cased Ensembl IDs (version removed) → ensembl mapping → keep targets with a token;
    raw counts of genes with the same target summed; value = count / total × 10,000 / median;
    rank descending; keep the top genes (V2: <cls> + 4,094 + <eos>; V1: 2,048)."""

    def load(name):
        with open(vocab_dir / f"{name}{suffix}.pkl", "rb") as fh:
            return pickle.load(fh)

    token, median = load("token_dictionary"), load("gene_median_dictionary")
    mapping = load("ensembl_mapping_dict")
    targets = []
    for gene_id in adata.var["ensembl_id"].astype(str):
        target = mapping.get(gene_id.upper().split(".")[0])
        targets.append(target if target in token else None)
    counts = sp.csr_matrix(adata.X)
    cells = []
    for i in range(adata.n_obs):
        row = counts.getrow(i)
        total = float(row.sum())
        summed: dict[str, float] = {}
        for j, count in zip(row.indices, row.data, strict=True):
            if targets[j] is not None and count > 0:
                summed[targets[j]] = summed.get(targets[j], 0.0) + float(count)
        value = {g: c / total * 10_000 / float(median[g]) for g, c in summed.items()}
        ranked = sorted(summed, key=lambda g: -value[g])
        if special:
            cells.append([token["<cls>"], *[int(token[g]) for g in ranked[:4094]], token["<eos>"]])
        else:
            cells.append([int(token[g]) for g in ranked[:2048]])
    return cells


@pytest.fixture(scope="module")
def pbmc_300(shared_dir) -> ad.AnnData:
    adata = ad.read_h5ad(shared_dir / PBMC3K)
    rows = np.sort(np.random.default_rng(11).choice(adata.n_obs, 300, replace=False))
    adata = adata[rows].copy()
    adata.var = adata.var.rename(columns={"gene_ids": "ensembl_id"})[["ensembl_id"]]
    return adata


@pytest.mark.parametrize(
    ("version", "vocab", "suffix"), [("V2", "v2_gc95M", "_gc95M"), ("V1", "v1_gc30M", "_gc30M")]
)
def test_geneformer_default_tokens_equal_the_reference_steps(
    gf_dirs, pbmc_300, shared_dir, version, vocab, suffix
):
    model = MODELS.get("geneformer")(gf_dirs[version][0])  # default flags
    tokens = model.tokenize(pbmc_300)
    expected = _reference_geneformer_tokens(
        pbmc_300, shared_dir / "vocab/geneformer" / vocab, suffix, special=version == "V2"
    )
    assert tokens.n_cells == 300 and tokens.gene_match.gene_column == "ensembl_id"
    for i, cell in enumerate(expected):
        assert tokens.cell(i)[0].tolist() == cell, f"cell {i} ({pbmc_300.obs_names[i]})"
    # the symbols would lose genes and change the tokens of most cells (the old default)
    by_symbol = MODELS.get("geneformer")(gf_dirs[version][0], gene_column="var_names")
    symbol_tokens = by_symbol.tokenize(pbmc_300)
    differ = sum(symbol_tokens.cell(i)[0].tolist() != cell for i, cell in enumerate(expected))
    assert differ > 250
