"""scFoundation adapter: checkpoint layout, preprocessing, T/S tokens, pooling, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scfmbench.embed import collate, embed, embed_tokens
from scfmbench.errors import (
    CheckpointError,
    ConfigError,
    CountsRequiredError,
    DataError,
    GeneMatchError,
)
from scfmbench.models import MODELS
from scfmbench.models.scfoundation.adapter import load_scfoundation
from scfmbench.models.scfoundation.tokenizer import (
    GENE_INDEX_FILE,
    ScFoundationOptions,
    read_gene_index,
    tokenize_scfoundation,
)
from tests._padded import embed_padded_to_max
from tests._scfoundation_factory import GENES, HIDDEN, counts_adata, write_checkpoint
from tests.conftest import require_shared


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scfoundation")
    write_checkpoint(folder, GENES)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_scfoundation(tiny_dir)


@pytest.fixture(scope="module")
def small_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(12, 6)).astype(np.float32)
    counts[:, 0] += 1
    counts[3, 1:] = 0  # a short cell
    return counts_adata(counts, GENES)


# ---- loading ---------------------------------------------------------------------------


def test_released_layout_loads_strictly_with_real_index_size(tmp_path, caplog):
    index_path = require_shared("vocab/scfoundation/OS_scRNA_gene_index.19264.tsv")
    genes = list(read_gene_index(index_path))
    assert len(genes) == 19264
    ckpt = write_checkpoint(tmp_path, genes)
    with caplog.at_level(logging.INFO):
        model = load_scfoundation(ckpt, gene_index=index_path)
    state = model.network.state_dict()
    assert state["pos_emb.weight"].shape == (19264 + 3, HIDDEN)  # seq_len 19266 + 1
    for name in (
        "token_emb.mlp.weight",
        "token_emb.mlp2.bias",
        "token_emb.emb.weight",
        "token_emb.emb_mask.weight",
        "token_emb.emb_pad.weight",
        "encoder.transformer_encoder.1.self_attn.in_proj_weight",
        "encoder.transformer_encoder.1.linear2.weight",
        "encoder.norm.bias",
    ):
        assert name in state
    saved = torch.load(ckpt, weights_only=True)["cell"]["state_dict"]
    for key, value in state.items():
        torch.testing.assert_close(value, saved[f"model.{key}"], rtol=0, atol=0)
    assert "ignoring 4 decoder-side tensors" in caplog.text
    assert model.model_id == "scfoundation" and model.n_layers == 2


def test_converted_single_model_layout_loads(tmp_path, tiny_dir, small_adata):
    entry = torch.load(tiny_dir / "models.ckpt", weights_only=True)["cell"]
    flat = dict(entry["config"]["model_config"]["mae_autobin"])
    state = {k.removeprefix("model."): v for k, v in entry["state_dict"].items()}
    torch.save({"config": flat, "model_state_dict": state}, tmp_path / "models.ckpt")
    converted = load_scfoundation(tmp_path / "models.ckpt", gene_index=tiny_dir / GENE_INDEX_FILE)
    released = load_scfoundation(tiny_dir, version="gene")
    a = embed(small_adata.copy(), converted, progress=False).matrix
    b = embed(small_adata.copy(), released, progress=False).matrix
    np.testing.assert_array_equal(a, b)


def test_registered_and_random_control(tiny_dir, tiny_model, small_adata):
    assert MODELS.get("scfoundation") is load_scfoundation
    random_a = load_scfoundation(tiny_dir, random_init=True, seed=1)
    random_b = load_scfoundation(tiny_dir, random_init=True, seed=1)
    assert random_a.model_id == "scfoundation-random"
    adata = small_adata.copy()
    emb = embed(adata, random_a, progress=False)
    assert "X_scfoundation_random" in adata.obsm
    np.testing.assert_array_equal(emb.matrix, embed(adata, random_b, progress=False).matrix)
    assert not np.allclose(emb.matrix, embed(adata, tiny_model, progress=False).matrix)
    assert random_a.checkpoint_sha256 != tiny_model.checkpoint_sha256


def test_random_control_without_checkpoint_uses_released_architecture(tmp_path):
    index = pd.DataFrame({"gene_name": GENES, "index": range(6)})
    index.to_csv(tmp_path / GENE_INDEX_FILE, sep="\t", index=False)
    with pytest.raises(CheckpointError, match="positions but the gene index has 6 genes"):
        load_scfoundation(tmp_path, random_init=True)  # released model: 19266 positions


# ---- preprocessing ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_gene_alignment_fills_missing_genes_with_zero():
    index = {"A": 0, "B": 1, "C": 2, "D": 3}
    # data genes: C, X (not in index), A, C again (summed); B and D are missing → zero
    values = [[0.5, 2.5, 1.0, 1.5], [0, 3.5, 0, 0], [2.5, 0, 0, 0]]
    adata = counts_adata(values, ["C", "X", "A", "C"])
    options = ScFoundationOptions(pre_normalized="T")  # log1p values, used as is: easy to read
    with pytest.warns(UserWarning, match="dropped 1 cells"):
        tokens = tokenize_scfoundation(adata, gene_index=index, options=options)
    assert list(tokens.obs_names) == ["c0", "c2"] and list(tokens.dropped) == ["c1"]
    ids, values = tokens.cell(0)
    assert ids.tolist() == [0, 2, 4, 5]  # A, C, then T, S; B and D are zero → not tokens
    assert values[:2].tolist() == [1.0, 2.0]  # A = 1, C = 0.5 + 1.5
    ids, values = tokens.cell(1)
    assert ids.tolist() == [2, 4, 5] and values[0] == 2.5
    match = tokens.gene_match
    assert (match.n_matched, match.n_total) == (3, 4)
    assert match.fraction_counts == pytest.approx(5.5 / 11.5)  # C, A, C of all of X


def test_count_tokens_hand_computed():
    index = {"A": 0, "B": 1, "C": 2, "D": 3}
    adata = counts_adata([[1, 3, 0, 6]], ["A", "B", "C", "D"])  # total 10 → S = 1
    expected = np.log1p(np.array([1, 3, 6]) / 10 * 1e4).astype(np.float32)
    for tgthighres, target in [("t4", 4.0), ("f2", np.log10(20)), ("a5", 6.0), ("t0.5", 0.5)]:
        options = ScFoundationOptions(tgthighres=tgthighres)
        ids, values = tokenize_scfoundation(adata, gene_index=index, options=options).cell(0)
        assert ids.tolist() == [0, 1, 3, 4, 5]
        np.testing.assert_allclose(values[:3], expected, rtol=1e-6)
        np.testing.assert_allclose(values[3:], [target, 1.0], rtol=1e-6)


def test_pre_normalized_modes():
    index = {"A": 0, "B": 1}
    lognorm = counts_adata([[0.5, 1.5]], ["A", "B"])
    lognorm.obs["total_counts"] = [1000.0]
    ids, values = tokenize_scfoundation(
        lognorm, gene_index=index, options=ScFoundationOptions(pre_normalized="T")
    ).cell(0)
    np.testing.assert_allclose(values, [0.5, 1.5, 4.0, np.log10(2.0)], rtol=1e-6)
    ids, values = tokenize_scfoundation(
        lognorm, gene_index=index, options=ScFoundationOptions(pre_normalized="A")
    ).cell(0)
    np.testing.assert_allclose(values, [0.5, 1.5, 4.0, 3.0], rtol=1e-6)
    with pytest.warns(UserWarning, match="using them as normalize_total"):
        tokens = tokenize_scfoundation(lognorm, gene_index=index, allow_normalized=True)
    assert tokens.settings["pre_normalized"] == "T"


def test_gene_name_column_is_used_like_the_reference():
    index = {"A": 0, "B": 1}
    adata = counts_adata([[1, 2]], ["ENSG00000000001", "ENSG00000000002"], gene_name=["A", "B"])
    tokens = tokenize_scfoundation(adata, gene_index=index)
    assert tokens.cell(0)[0].tolist() == [0, 1, 2, 3]


def test_pbmc3k_alignment_with_the_real_index(pbmc3k):
    index = read_gene_index(require_shared("vocab/scfoundation/OS_scRNA_gene_index.19264.tsv"))
    adata = pbmc3k[:100].copy()
    default = tokenize_scfoundation(adata, gene_index=index)
    assert default.gene_match.gene_column == "gene_symbol"  # a well-known symbol column
    tokens = tokenize_scfoundation(adata, gene_index=index, gene_column="var_names")
    match = tokens.gene_match
    assert match.n_total == 13714 and 0.5 < match.fraction < 1
    assert 0.5 < match.fraction_counts <= 1 and match.identifier_type == "symbol"
    ids, values = tokens.cell(0)
    assert ids[-2:].tolist() == [19264, 19265] and np.all(np.diff(ids[:-2]) > 0)
    in_index = [index.get(g, -1) >= 0 for g in adata.var_names]
    total = adata.X[0].toarray().ravel()[in_index].sum()
    assert values[-1] == pytest.approx(np.log10(total)) and values[-2] == 4.0
    assert len(ids) - 2 == int((adata.X[0].toarray().ravel()[in_index] > 0).sum())


# ---- pooling and the engine ------------------------------------------------------------


def reference_cell_embedding(model, adata: ad.AnnData, row: int) -> np.ndarray:
    """The reference script for one cell: dense 19264+2 vector, x > 0, no padding."""
    n_genes = len(model.gene_index)
    dense = np.zeros(n_genes)
    x = adata.X[row].toarray().ravel()
    for gene, value in zip(adata.var_names, x, strict=True):
        dense[model.gene_index[gene]] += value
    total = dense.sum()
    full = np.concatenate([np.log1p(dense / total * 1e4), [4.0, np.log10(total)]])
    full = torch.tensor(full.tolist()).unsqueeze(0)  # float32, as the script
    keep = full > 0
    positions = torch.arange(n_genes + 2).unsqueeze(0)[keep].unsqueeze(0)
    values = full[keep].unsqueeze(0)
    network = model.network
    with torch.no_grad():
        hidden = network.token_emb(values) + network.pos_emb(positions)
        hidden = network.encoder(hidden, torch.zeros_like(values, dtype=torch.bool))
    parts = [hidden[:, -1], hidden[:, -2], hidden[:, :-2].max(dim=1).values]
    parts.append(hidden[:, :-2].mean(dim=1))
    return torch.cat(parts, dim=1)[0].numpy()


def test_embedding_matches_reference_procedure_and_pooling_order(tiny_model, small_adata):
    adata = small_adata.copy()
    emb = embed(adata, tiny_model, batch_size=5, progress=False)
    assert emb.matrix.shape == (12, 4 * HIDDEN) and tiny_model.hidden_size == 4 * HIDDEN
    np.testing.assert_array_equal(adata.obsm["X_scfoundation"], emb.matrix)
    for row in (0, 3, 11):
        expected = reference_cell_embedding(tiny_model, adata, row)
        np.testing.assert_allclose(emb.matrix[row], expected, rtol=1e-4, atol=1e-5)
    # blocks: [S, T, max over genes, mean over genes]
    tokens = tiny_model.tokenize(adata)
    ids, _ = tokens.cell(0)
    assert ids[-2:].tolist() == [6, 7]  # T then S at the end of the sequence


def test_max_pooling_and_layers(tiny_model, small_adata):
    tokens = tiny_model.tokenize(small_adata)
    out = embed_tokens(tiny_model, tokens, layer=2, pooling="max", progress=False)
    assert out.shape == (12, HIDDEN)
    full = embed_tokens(tiny_model, tokens, layer=2, pooling="all", progress=False)
    # max over all tokens ≥ max over genes and ≥ the S and T states
    assert np.all(out >= full[:, 2 * HIDDEN : 3 * HIDDEN] - 1e-6)
    assert np.all(out >= full[:, :HIDDEN] - 1e-6)
    layer0 = embed_tokens(tiny_model, tokens, layer=0, pooling="all", progress=False)
    assert not np.allclose(layer0, full)
    np.testing.assert_allclose(
        embed_tokens(tiny_model, tokens, layer=-1, pooling="all", progress=False), full
    )


def test_deterministic_and_batch_independent(tiny_model, small_adata, tmp_path):
    tokens = tiny_model.tokenize(small_adata)
    a = embed_tokens(tiny_model, tokens, layer=2, pooling="all", batch_size=1, progress=False)
    b = embed_tokens(tiny_model, tokens, layer=2, pooling="all", batch_size=1, progress=False)
    np.testing.assert_array_equal(a, b)
    batched = embed_tokens(tiny_model, tokens, layer=2, pooling="all", batch_size=7, progress=False)
    padded = embed_padded_to_max(tiny_model, tokens, layer=2, pooling="all", batch_size=4)
    np.testing.assert_allclose(batched, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(padded, a, rtol=1e-4, atol=1e-5)
    first = embed(small_adata.copy(), tiny_model, cache_dir=tmp_path, progress=False)
    second = embed(small_adata.copy(), tiny_model, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.matrix, second.matrix)


# ---- fine-tuning hooks -----------------------------------------------------------------


def test_fine_tuning_hooks_and_save_round_trip(tiny_model, small_adata, tmp_path):
    assert len(tiny_model.layer_modules()) == 2
    assert tiny_model.embedding_modules()[1] is tiny_model.network.pos_emb
    names = {n.rsplit(".", 1)[-1] for n, _ in tiny_model.network.named_modules()}
    assert set(tiny_model.lora_target_modules()) <= names
    head = tiny_model.make_classifier_head(3)
    assert head(torch.zeros(1, tiny_model.hidden_size)).shape == (1, 3)
    tiny_model.save_pretrained(tmp_path / "saved")
    reloaded = load_scfoundation(tmp_path / "saved")
    assert set(reloaded.entry.decoder_state) == set(tiny_model.entry.decoder_state)
    a = embed(small_adata.copy(), tiny_model, progress=False).matrix
    np.testing.assert_array_equal(a, embed(small_adata.copy(), reloaded, progress=False).matrix)


def test_lora_targets_train(tiny_dir, small_adata):
    peft = pytest.importorskip("peft")
    model = load_scfoundation(tiny_dir)
    config = peft.LoraConfig(r=2, target_modules=model.lora_target_modules())
    model.network = peft.get_peft_model(model.network, config)
    model.network.train()
    tokens = model.tokenize(small_adata)
    batch = collate(
        tokens, np.arange(4), pad_token_id=model.pad_token_id, pad_value=model.pad_value
    )
    model.encode(batch, layer=2, pooling="all").sum().backward()
    trained = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in model.network.named_parameters()
        if "lora_" in n and p.grad is not None
    }
    assert {"self_attn", "out_proj", "linear1", "linear2"} <= trained


# ---- bad input -------------------------------------------------------------------------


def test_unknown_layout_names_the_keys(tmp_path, tiny_dir):
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"unknown layout: top-level keys \['epoch', 'weig"):
        load_scfoundation(tmp_path, gene_index=tiny_dir / GENE_INDEX_FILE)


def test_missing_version_lists_the_models(tiny_dir):
    with pytest.raises(CheckpointError, match=r"no 'rde' model .* holds \['cell', 'gene'\]"):
        load_scfoundation(tiny_dir, version="rde")


def test_missing_and_corrupt_files(tmp_path, tiny_dir):
    index = tiny_dir / GENE_INDEX_FILE
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_scfoundation(tmp_path / "nothing.ckpt", gene_index=index)
    assert "\n" not in str(info.value)
    (tmp_path / "models.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        load_scfoundation(tmp_path, gene_index=index)
    assert "\n" not in str(info.value)
    whole = (tiny_dir / "models.ckpt").read_bytes()
    (tmp_path / "models.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_scfoundation(tmp_path, gene_index=index)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no scFoundation gene index"):
        load_scfoundation(tmp_path / "elsewhere" / "models.ckpt")


def test_weights_that_do_not_fit(tmp_path, tiny_dir):
    obj = torch.load(tiny_dir / "models.ckpt", weights_only=True)
    del obj["cell"]["state_dict"]["model.token_emb.emb_pad.weight"]
    obj["cell"]["state_dict"]["model.extra.weight"] = torch.zeros(1)
    torch.save(obj, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"missing 1 keys .*emb_pad.* unexpected 1 keys"):
        load_scfoundation(tmp_path, gene_index=tiny_dir / GENE_INDEX_FILE)


def test_pickled_objects_are_refused(tmp_path, tiny_dir):
    obj = torch.load(tiny_dir / "models.ckpt", weights_only=True)
    obj["cell"]["config"]["path"] = Path("/somewhere")
    torch.save(obj, tmp_path / "models.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_scfoundation(tmp_path, gene_index=tiny_dir / GENE_INDEX_FILE)


def test_low_overlap_names_the_identifier_type(tiny_model):
    ensembl = [f"ENSG{i:011d}" for i in range(6)]
    adata = counts_adata(np.ones((2, 6)), ensembl)
    with pytest.raises(GeneMatchError, match="look like ensembl identifiers .* uses symbol"):
        tiny_model.tokenize(adata)


def test_scaled_and_normalized_input_refused(tiny_model):
    scaled = counts_adata([[-0.5, 1.2, 0, 0, 0, 0]], GENES)
    with pytest.raises(CountsRequiredError, match="scaled values"):
        tiny_model.tokenize(scaled)
    lognorm = counts_adata([[0.5, 1.2, 0, 0, 0, 0]], GENES)
    with pytest.raises(CountsRequiredError, match="pre_normalized='T'"):
        tiny_model.tokenize(lognorm)
    with pytest.raises(DataError, match="total_counts"):
        tokenize_scfoundation(
            lognorm,
            gene_index=tiny_model.gene_index,
            options=ScFoundationOptions(pre_normalized="A"),
        )


def test_bad_options(tiny_dir):
    with pytest.raises(ConfigError, match="tgthighres 'x4'"):
        load_scfoundation(tiny_dir, tgthighres="x4")
    with pytest.raises(ConfigError, match="tgthighres 'f0'"):
        load_scfoundation(tiny_dir, tgthighres="f0")
    with pytest.raises(ConfigError, match="pre_normalized 'yes'"):
        load_scfoundation(tiny_dir, pre_normalized="yes")
    with pytest.raises(ConfigError, match="version 'big'"):
        load_scfoundation(tiny_dir, version="big")


def test_embed_files_record_the_mode_and_the_warnings(tiny_dir, tmp_path, capsys, caplog):
    """`embed` writes the tokenizer's settings (scFoundation's pre_normalized mode) and the
    warnings about the data into uns['X_scfoundation_info'], the same in memory and streamed."""
    import scanpy as sc

    from tests.conftest import run_cli_in_process

    rng = np.random.default_rng(1)
    lognorm = counts_adata(rng.poisson(3.0, size=(20, len(GENES))) + 1, GENES)
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    data = tmp_path / "lognorm.h5ad"
    lognorm.write_h5ad(data)
    model = ["--model", f"scfoundation={tiny_dir}", "--device", "cpu", "-q"]
    resolved = (
        "scfoundation: adata.X holds lognorm values; using them as normalize_total + log1p "
        "input (pre_normalized='T')."
    )
    cases = [(["--option", "pre_normalized=T"], None), (["--allow-normalized"], resolved)]
    mode = "T"
    for flags, warned in cases:
        infos = []
        for backed in (["--no-backed"], ["--backed", "--chunk-size", "8"]):  # 3 chunks
            out = tmp_path / f"{len(flags)}{backed[0]}.h5ad"
            caplog.clear()
            code, _, err = run_cli_in_process(
                ["embed", str(data), *model, "--out", str(out), *backed, *flags], capsys
            )
            assert code == 0, err
            info = dict(ad.read_h5ad(out).uns["X_scfoundation_info"])
            assert info["tokenizer"]["pre_normalized"] == mode
            assert info["tokenizer"]["allow_normalized"] == (warned is not None)
            assert info["tokenizer"]["total_counts_key"] == "total_counts"
            if warned is None:
                assert "warnings" not in info
            else:
                assert list(info["warnings"]) == [warned]
                assert caplog.text.count(warned) == 1  # once, not once per chunk
            infos.append(info)
        memory, streamed = infos
        assert streamed.pop("chunk_size") == 8
        assert repr(streamed) == repr(memory)
