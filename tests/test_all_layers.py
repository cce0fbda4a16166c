"""One forward pass pools every layer: equal to independent per-layer computations, cached
per layer, and a run with layer-wise probing embeds each model's cells once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import scfmbench.embed.cache as cache
import scfmbench.embed.engine as engine
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.embed import collate, embed, embed_tokens
from scfmbench.models.geneformer.adapter import load_geneformer
from scfmbench.models.scfoundation.adapter import load_scfoundation
from scfmbench.models.scgpt.adapter import load_scgpt
from tests._geneformer_factory import write_checkpoint as write_geneformer
from tests._scfoundation_factory import GENES, counts_adata
from tests._scfoundation_factory import write_checkpoint as write_scfoundation
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import make_tiny_adata


def _all_layers(model, tokens, pooling: str) -> np.ndarray:
    layers = list(range(model.n_layers + 1))
    out = embed_tokens(
        model, tokens, layer=0, layers=layers, pooling=pooling, batch_size=3, progress=False
    )
    assert out.shape[:2] == (model.n_layers + 1, tokens.n_cells)
    return out


# ---- Geneformer: Hugging Face output_hidden_states as the oracle -------------------------


@pytest.fixture(scope="module")
def geneformer(tmp_path_factory, shared_dir):
    folder = tmp_path_factory.mktemp("gf")
    _, network = write_geneformer(folder, shared_dir, version="V2", num_hidden_layers=3)
    return load_geneformer(folder), network


@pytest.fixture(scope="module")
def geneformer_short(tmp_path_factory, shared_dir):
    """The same network with inputs capped at 128 tokens, for the runs of 240 cells."""
    folder = tmp_path_factory.mktemp("gf_short")
    write_geneformer(
        folder, shared_dir, version="V2", num_hidden_layers=3, max_position_embeddings=128
    )
    return load_geneformer(folder)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_geneformer_every_layer_equals_hf_hidden_states(geneformer, pbmc3k, pooling):
    model, network = geneformer
    adata = pbmc3k[:10].copy()
    tokens = model.tokenize(adata)
    got = _all_layers(model, tokens, pooling)
    batch = collate(tokens, np.arange(tokens.n_cells), pad_token_id=model.pad_token_id)
    with torch.no_grad():
        states = network.bert(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            output_hidden_states=True,
        ).hidden_states
    special = set(model._special_ids.tolist())
    for layer, hidden in enumerate(states):
        for row in range(tokens.n_cells):
            ids, _ = tokens.cell(row)
            cell = hidden[row, : len(ids)].numpy()
            if pooling == "cls":
                expected = cell[0]
            else:
                expected = cell[[i not in special for i in ids]].mean(axis=0)
            np.testing.assert_allclose(got[layer, row], expected, rtol=1e-4, atol=1e-5)
        per_layer = embed_tokens(
            model, tokens, layer=layer, pooling=pooling, batch_size=3, progress=False
        )
        np.testing.assert_allclose(got[layer], per_layer, rtol=1e-5, atol=1e-6)


# ---- scGPT: the network's layers applied by hand, one unpadded cell at a time -------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_scgpt_every_layer_equals_a_manual_forward(make_scgpt_dir, pooling):
    model = load_scgpt(make_scgpt_dir())
    tokens = model.tokenize(make_tiny_adata(n_cells=9))
    got = _all_layers(model, tokens, pooling)
    net = model.network
    for row in range(tokens.n_cells):
        ids, values = tokens.cell(row)
        ids, values = torch.from_numpy(ids)[None], torch.from_numpy(values)[None]
        with torch.no_grad():
            x = net.encoder(ids) + net.value_encoder(values)
            for layer in range(model.n_layers + 1):
                if layer:
                    x = net.transformer_encoder.layers[layer - 1](x)
                expected = x[0, 0] if pooling == "cls" else x[0, 1:].mean(0)
                if model.l2_normalize:
                    expected = torch.nn.functional.normalize(expected, dim=-1)
                np.testing.assert_allclose(got[layer, row], expected.numpy(), rtol=1e-4, atol=1e-5)


# ---- scFoundation: embeddings, layers and final norm by hand, one cell at a time --------


@pytest.mark.parametrize("pooling", ["all", "max"])
def test_scfoundation_every_layer_equals_a_manual_forward(tmp_path, pooling):
    write_scfoundation(tmp_path, GENES)
    model = load_scfoundation(tmp_path)
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, size=(9, len(GENES))).astype(np.float32)
    counts[:, 0] += 1
    counts[4, 2:] = 0  # a short cell, so batches are padded
    tokens = model.tokenize(counts_adata(counts, GENES))
    got = _all_layers(model, tokens, pooling)
    net = model.network
    blocks = net.encoder.transformer_encoder
    for row in range(tokens.n_cells):
        ids, values = tokens.cell(row)
        ids, values = torch.from_numpy(ids)[None], torch.from_numpy(values)[None]
        no_pad = torch.zeros_like(ids, dtype=torch.bool)
        with torch.no_grad():
            x = net.token_emb(values.float()) + net.pos_emb(ids)
            for layer in range(model.n_layers + 1):
                if layer:
                    x = blocks[layer - 1](x, src_key_padding_mask=no_pad)
                h = net.encoder.norm(x) if layer == len(blocks) else x
                h = h[0]
                if pooling == "max":
                    expected = h.max(0).values
                else:
                    genes = h[:-2]
                    expected = torch.cat([h[-1], h[-2], genes.max(0).values, genes.mean(0)])
                np.testing.assert_allclose(got[layer, row], expected.numpy(), rtol=1e-4, atol=1e-5)


# ---- cache: one pass stores every layer under the per-layer keys --------------------------


def test_all_layer_pass_fills_the_per_layer_cache(geneformer, pbmc3k, tmp_path, monkeypatch):
    model, _ = geneformer
    adata = pbmc3k[:12].copy()
    first = embed(adata, model, cache_dir=tmp_path, all_layers=True, progress=False)
    assert not first.from_cache and first.layer == model.default_layer

    def no_pass(*args, **kwargs):
        raise AssertionError("a cached layer ran the model")

    monkeypatch.setattr(engine, "embed_tokens", no_pass)
    for layer in [*range(model.n_layers + 1), -1]:
        again = embed(adata, model, layer=layer, cache_dir=tmp_path, progress=False)
        assert again.from_cache
        monkeypatch.undo()
        fresh = embed(adata, model, layer=layer, progress=False)
        monkeypatch.setattr(engine, "embed_tokens", no_pass)
        np.testing.assert_array_equal(again.matrix, fresh.matrix)


def test_all_layers_falls_back_to_one_layer_above_the_memory_cap(
    geneformer, pbmc3k, tmp_path, monkeypatch
):
    model, _ = geneformer
    adata = pbmc3k[:6].copy()
    monkeypatch.setattr(engine, "ALL_LAYERS_MAX_BYTES", 1)
    first = embed(adata, model, layer=1, cache_dir=tmp_path, all_layers=True, progress=False)
    settings = model.tokenize(adata).settings
    key = cache.cache_key(model, adata, settings, pooling=first.pooling, seed=DEFAULT_SEED, layer=1)
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == [f"{key}.npy"]  # layer 1 only


# ---- a default run: one pass per model (and one for its random control) -------------------


@pytest.mark.parametrize("backed", [False, True])
def test_run_with_layerwise_probing_embeds_each_cell_once(
    geneformer_short, pbmc3k, tmp_path, monkeypatch, backed
):
    from scfmbench.benchmark import pipeline
    from scfmbench.benchmark.pipeline import run

    model = geneformer_short
    adata = pbmc3k[:240].copy()
    data = adata
    if backed:
        data = tmp_path / "pbmc.h5ad"
        adata.write_h5ad(data)
    seen: dict[str, Counter] = {}
    encode = engine._encode

    def counted(model, tokens, indices, *args):
        seen.setdefault(model.model_id, Counter()).update(tokens.obs_names[indices])
        return encode(model, tokens, indices, *args)

    monkeypatch.setattr(engine, "_encode", counted)
    # the layer-wise probes run inside the probe stage (beside the workers' fits)
    fitting, probed_while_fitting = [False], []
    predict_all, layerwise_probing = pipeline.predict_all, pipeline.layerwise_probing

    def tracked_predict_all(*args, **kwargs):
        fitting[0] = True
        try:
            return predict_all(*args, **kwargs)
        finally:
            fitting[0] = False

    def tracked_layerwise_probing(*args, **kwargs):
        probed_while_fitting.append(fitting[0])
        return layerwise_probing(*args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_all", tracked_predict_all)
    monkeypatch.setattr(pipeline, "layerwise_probing", tracked_layerwise_probing)
    result = run(
        data,
        progress=False,
        models=[f"geneformer={model.model_dir}"],
        n_splits=1,
        design="study",
        baselines=["majority"],
        probes=["logreg"],
        figures=False,
        min_cells_per_class=5,
        out=tmp_path,
        name="r",
        backed=backed,
        chunk_size=100,
    )
    assert probed_while_fitting == [True]
    layers = result.metrics["layers"]
    assert set(layers) == {"geneformer", "geneformer-random"}
    assert [row["layer"] for row in layers["geneformer"]] == list(range(model.n_layers + 1))
    # every layer was probed, yet each cell went through each model once; the 237 cells
    # run (3 DCs fall below min_cells_per_class) are among them
    counts = adata.obs[result.metrics["run"]["label_key"]].value_counts()
    run_cells = adata.obs_names[
        adata.obs[result.metrics["run"]["label_key"]].isin(counts.index[counts >= 5])
    ]
    assert len(run_cells) == 237
    assert set(seen) == {"geneformer", "geneformer-random"}
    for per_cell in seen.values():
        assert set(per_cell.values()) == {1}
        assert set(run_cells) - set(per_cell) <= set(adata.obs_names[adata.X.sum(1).A1 == 0])


def test_cache_reuse_says_where_the_embedding_came_from(
    geneformer, pbmc3k, tmp_path, monkeypatch, caplog
):
    model, _ = geneformer
    adata = pbmc3k[:12].copy()
    embed(adata, model, cache_dir=tmp_path, all_layers=True, progress=False)
    caplog.clear()
    with caplog.at_level("INFO", logger="scfmbench.embed.engine"):
        embed(adata, model, layer=1, cache_dir=tmp_path, progress=False)
        monkeypatch.setattr(cache, "_WRITTEN_HERE", {})  # as a later process sees the cache
        embed(adata, model, layer=2, cache_dir=tmp_path, progress=False)
    lines = [r.getMessage()[: r.getMessage().rindex(" (")] for r in caplog.records]
    assert lines == [
        f"{model.model_id}: reusing layer 1 (cls pooling) from this run's all-layer pass",
        f"{model.model_id}: layer 2 (cls pooling) loaded from cache (computed by an earlier run)",
    ]


# ---- chunks of the length order: the batches of one pass ---------------------------------


def test_take_tokens_gathers_cells_in_the_order_asked():
    from scfmbench.embed.batching import take_tokens
    from scfmbench.models.base import TokenizedCells

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50, n) for n in (3, 0, 5, 1, 4)]
    values = [rng.random(len(x)).astype(np.float32) for x in ids]
    tokens = TokenizedCells.from_lists(
        ids, obs_names=pd.Index(list("abcde")), settings={"s": 1}, values=values
    )
    taken = take_tokens(tokens, np.array([4, 0, 2, 1]))
    assert list(taken.obs_names) == ["e", "a", "c", "b"]
    assert taken.lengths.tolist() == [4, 3, 5, 0]
    for i, row in enumerate([4, 0, 2, 1]):
        np.testing.assert_array_equal(taken.cell(i)[0], ids[row])
        np.testing.assert_array_equal(taken.cell(i)[1], values[row])
    assert taken.settings == {"s": 1}


def test_chunked_pass_makes_the_batches_of_one_pass(
    geneformer_short, pbmc3k, tmp_path, monkeypatch
):
    model = geneformer_short
    adata = pbmc3k[:40].copy()
    batches: list[list[str]] = []
    encode = engine._encode

    def recorded(model, tokens, indices, *args):
        batches.append(sorted(tokens.obs_names[indices]))
        return encode(model, tokens, indices, *args)

    monkeypatch.setattr(engine, "_encode", recorded)
    options = {"batch_size": 4, "progress": False, "all_layers": True}
    whole = embed(adata.copy(), model, cache_dir=tmp_path / "one", chunk_size=1000, **options)
    one_pass, batches[:] = list(batches), []
    chunked = embed(adata.copy(), model, cache_dir=tmp_path / "chunks", chunk_size=12, **options)
    assert batches == one_pass  # 12 cells a chunk, 4 a batch: the same batches, in order
    assert len(batches) == 10
    np.testing.assert_array_equal(chunked.matrix, whole.matrix)
    assert list(chunked.obs_names) == list(whole.obs_names)
