"""scGPT network and loader: official key names, both attention layouts, encode, bad folders."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch

from scfmbench.embed import collate, embed, embed_tokens
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.models import MODELS
from scfmbench.models.scgpt.adapter import ScGPTModel, load_scgpt
from scfmbench.models.scgpt.network import (
    ScGPTConfig,
    TransformerModel,
    attention_layout,
    to_flash_layout,
    to_torch_layout,
)
from tests._padded import embed_padded_to_max
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import TINY_ARGS, make_tiny_adata

CORE_KEYS = {
    "encoder.embedding.weight",
    "encoder.enc_norm.weight",
    "encoder.enc_norm.bias",
    "value_encoder.linear1.weight",
    "value_encoder.linear1.bias",
    "value_encoder.linear2.weight",
    "value_encoder.linear2.bias",
    "value_encoder.norm.weight",
    "value_encoder.norm.bias",
    "transformer_encoder.layers.0.self_attn.Wqkv.weight",
    "transformer_encoder.layers.0.self_attn.Wqkv.bias",
    "transformer_encoder.layers.0.self_attn.out_proj.weight",
    "transformer_encoder.layers.0.linear1.weight",
    "transformer_encoder.layers.0.linear2.bias",
    "transformer_encoder.layers.1.norm1.weight",
    "transformer_encoder.layers.1.norm2.bias",
    "decoder.fc.0.weight",
    "decoder.fc.2.weight",
    "decoder.fc.4.bias",
    "mvc_decoder.gene2query.weight",
    "mvc_decoder.gene2query.bias",
    "mvc_decoder.W.weight",
    "flag_encoder.weight",
}


@pytest.fixture
def tiny_adata():
    return make_tiny_adata(n_cells=16)


def _embed(model: ScGPTModel, adata, **options) -> np.ndarray:
    return embed(adata, model, progress=False, **options).matrix


def test_official_key_names(scgpt_tiny_state):
    assert set(to_flash_layout(scgpt_tiny_state)) >= CORE_KEYS
    assert "mvc_decoder.W.bias" not in scgpt_tiny_state  # the reference W has no bias


@pytest.mark.parametrize("layout", ["flash", "torch"])
def test_checkpoint_loads_strict_in_both_layouts(make_scgpt_dir, scgpt_tiny_state, layout):
    folder = make_scgpt_dir(layout=layout)
    assert attention_layout(torch.load(folder / "best_model.pt")) == layout
    model = load_scgpt(folder)
    loaded = model.network.state_dict()
    assert loaded.keys() == scgpt_tiny_state.keys()
    for key, value in scgpt_tiny_state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert model.n_layers == 2 and model.default_layer == 2
    assert model.pad_token_id == 60694 and model.pad_value == -2.0
    assert not model.network.training


def test_both_layouts_give_identical_embeddings(make_scgpt_dir, tiny_adata):
    flash = load_scgpt(make_scgpt_dir(layout="flash", name="flash"))
    plain = load_scgpt(make_scgpt_dir(layout="torch", name="torch"))
    a, b = _embed(flash, tiny_adata.copy()), _embed(plain, tiny_adata.copy())
    np.testing.assert_array_equal(a, b)
    assert flash.checkpoint_sha256 != plain.checkpoint_sha256


def test_layout_conversion_round_trip(scgpt_tiny_state):
    flash = to_flash_layout(scgpt_tiny_state)
    assert not any("in_proj" in k for k in flash)
    assert to_torch_layout(flash).keys() == scgpt_tiny_state.keys()


def test_encoder_matches_torch_transformer_encoder(scgpt_tiny_state, scgpt_vocab):
    """Our SDPA post-norm layers = torch.nn.TransformerEncoder (the reference's non-flash path)."""
    network = TransformerModel(
        ScGPTConfig(
            ntoken=len(scgpt_vocab),
            **{"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2},
            flag_encoder=True,
        )
    )
    network.load_state_dict(scgpt_tiny_state)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.2, batch_first=True)
    reference = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    prefix = "transformer_encoder."
    reference.load_state_dict(
        {k[len(prefix) :]: v for k, v in scgpt_tiny_state.items() if k.startswith(prefix)}
    )
    network.eval(), reference.eval()
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    attend = torch.ones(3, 7, dtype=torch.bool)
    attend[1, 4:] = False
    attend[2, 2:] = False
    with torch.no_grad():
        ours = x
        for block in network.transformer_encoder.layers:
            ours = block(ours, attend)
        theirs = reference(x, src_key_padding_mask=~attend)
    torch.testing.assert_close(ours[attend], theirs[attend], rtol=1e-5, atol=1e-5)


def test_embeddings_cls_l2_normalized_and_deterministic(make_scgpt_dir, tiny_adata):
    model = load_scgpt(make_scgpt_dir())
    result = embed(tiny_adata, model, progress=False)
    assert result.matrix.shape == (15, 16) and result.pooling == "cls" and result.layer == 2
    np.testing.assert_allclose(np.linalg.norm(result.matrix, axis=1), 1.0, rtol=1e-5)
    full = tiny_adata.obsm["X_scgpt"]
    assert full.shape == (16, 16) and np.isnan(full[-1]).all()  # the all-zero cell
    assert list(result.dropped) == ["cell15"]
    np.testing.assert_array_equal(result.matrix, _embed(model, tiny_adata.copy()))


def test_padding_does_not_change_embeddings(make_scgpt_dir, tiny_adata):
    model = load_scgpt(make_scgpt_dir())
    tokens = model.tokenize(tiny_adata)
    one_by_one = embed_tokens(model, tokens, layer=2, pooling="cls", batch_size=1, progress=False)
    for embed_batches in (embed_tokens, embed_padded_to_max):
        batched = embed_batches(
            model,
            tokens,
            layer=2,
            pooling="mean",
            batch_size=8,
            progress=False,
        )
        singles = embed_tokens(model, tokens, layer=2, pooling="mean", batch_size=1, progress=False)
        np.testing.assert_allclose(batched, singles, rtol=1e-4, atol=1e-5)
    padded = embed_padded_to_max(model, tokens, layer=2, pooling="cls", batch_size=16)
    np.testing.assert_allclose(padded, one_by_one, rtol=1e-4, atol=1e-5)


def test_layers_and_poolings(make_scgpt_dir, tiny_adata):
    folder = make_scgpt_dir()
    model = load_scgpt(folder, l2_normalize=False)
    tokens = model.tokenize(tiny_adata)
    batch = collate(
        tokens, np.arange(4), pad_token_id=model.pad_token_id, pad_value=model.pad_value
    )
    net = model.network
    with torch.no_grad():
        inputs = net.encoder(batch.input_ids) + net.value_encoder(batch.values)
        torch.testing.assert_close(model.encode(batch, layer=0, pooling="cls"), inputs[:, 0])
        hidden = model.hidden_states(batch, layer=-1)
        torch.testing.assert_close(hidden, model.hidden_states(batch, layer=2))
        genes = batch.attention_mask.clone()
        genes[:, 0] = False
        mean = torch.stack([hidden[i][genes[i]].mean(0) for i in range(4)])
        torch.testing.assert_close(model.encode(batch, layer=2, pooling="mean"), mean)
        assert not torch.allclose(model.encode(batch, layer=1, pooling="cls"), hidden[:, 0])
    with pytest.raises(ConfigError, match="pooling 'max'"):
        embed(tiny_adata, model, pooling="max", progress=False)
    with pytest.raises(ConfigError, match="layer 5 is out of range"):
        embed(tiny_adata, model, layer=5, progress=False)


def test_random_init_control(make_scgpt_dir, tiny_adata):
    folder = make_scgpt_dir(weights=False)
    model = MODELS.get("scgpt")(folder, random_init=True)
    assert model.model_id == "scgpt-random" and model.obsm_key == "X_scgpt_random"
    again = load_scgpt(folder, random_init=True)
    other = load_scgpt(folder, random_init=True, seed=1)
    assert model.checkpoint_sha256 == again.checkpoint_sha256 != other.checkpoint_sha256
    a = _embed(model, tiny_adata)
    assert "X_scgpt_random" in tiny_adata.obsm
    np.testing.assert_array_equal(a, _embed(again, tiny_adata.copy()))
    assert not np.allclose(a, _embed(other, tiny_adata.copy()))


def test_random_init_control_follows_the_run_seed(make_scgpt_dir):
    """The run's seed reaches the scGPT control's initialisation, as for the other models."""
    from scfmbench.benchmark.pipeline import load_models
    from scfmbench.config import RunConfig

    folder = make_scgpt_dir(weights=False)

    def control(seed: int) -> torch.Tensor:
        (model,) = load_models(RunConfig(models=[f"scgpt-random={folder}"], seed=seed))
        return model.network.encoder.embedding.weight.detach().clone()

    assert torch.equal(control(1), control(1))
    assert not torch.equal(control(1), control(2))


def test_classification_head(make_scgpt_dir):
    model = load_scgpt(make_scgpt_dir(name="plain"), n_classes=5)
    head = model.network.cls_decoder
    assert head(torch.zeros(2, 16)).shape == (2, 5)
    assert len([m for m in head._decoder if isinstance(m, torch.nn.Linear)]) == 2  # n_layers_cls 3

    def with_head(state):
        extra = {f"cls_decoder.{k}": v for k, v in head.state_dict().items()}
        return {**state, **extra}

    loaded = load_scgpt(make_scgpt_dir(edit=with_head, name="head"))
    assert loaded.network.config.n_cls == 5
    torch.testing.assert_close(loaded.network.cls_decoder.out_layer.weight, head.out_layer.weight)


def test_ignored_keys_are_logged(make_scgpt_dir, caplog):
    def with_dsbn(state):
        return {
            **state,
            "dsbn.bns.0.weight": torch.ones(16),
            "dsbn.bns.0.running_mean": torch.zeros(16),
            "transformer_encoder.layers.0.self_attn.cross_attn.in_proj_weight": torch.zeros(48, 16),
        }

    with caplog.at_level(logging.WARNING):
        load_scgpt(make_scgpt_dir(edit=with_dsbn))
    text = caplog.text
    assert "ignoring 2 checkpoint tensors of the domain-specific batch norm" in text
    assert "dsbn.bns.0.weight" in text and "cross-attention" in text


def test_query_style_mvc_decoder_is_listed_and_skipped(make_scgpt_dir, caplog, tiny_adata):
    """The reference's MVCDecoder(arch_style="sum query"): gene2query, fc1, fc2 and no W."""

    def with_sum_query_mvc(state):
        state = {k: v for k, v in state.items() if not k.startswith("mvc_decoder.")}
        return {
            **state,
            "mvc_decoder.gene2query.weight": torch.zeros(16, 16),
            "mvc_decoder.gene2query.bias": torch.zeros(16),
            "mvc_decoder.fc1.weight": torch.zeros(64, 16),
            "mvc_decoder.fc1.bias": torch.zeros(64),
            "mvc_decoder.fc2.weight": torch.zeros(1, 64),
            "mvc_decoder.fc2.bias": torch.zeros(1),
        }

    with caplog.at_level(logging.WARNING):
        model = load_scgpt(make_scgpt_dir(edit=with_sum_query_mvc))
    assert "ignoring 6 checkpoint tensors of the masked-value decoder in the 'concat" in caplog.text
    assert not hasattr(model.network, "mvc_decoder")
    np.testing.assert_array_equal(
        _embed(model, tiny_adata),
        _embed(load_scgpt(make_scgpt_dir(name="plain")), tiny_adata.copy()),
    )


# --- bad folders --------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["args.json", "vocab.json", "best_model.pt"])
def test_missing_file(make_scgpt_dir, missing):
    folder = make_scgpt_dir()
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"has no {missing} "):
        load_scgpt(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="has no args.json \\(found \\[\\]\\)"):
        load_scgpt(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights(make_scgpt_dir, damage):
    folder = make_scgpt_dir()
    path = folder / "best_model.pt"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not a checkpoint" * 10, "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_scgpt(folder)
    assert "\n" not in str(info.value)


def test_not_a_state_dict(make_scgpt_dir):
    folder = make_scgpt_dir()
    torch.save({"epoch": 3}, folder / "best_model.pt")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        load_scgpt(folder)
    torch.save({"args": argparse.Namespace(lr=1)}, folder / "best_model.pt")
    objects = "Python objects besides tensors \\(e.g. argparse.Namespace\\).*re-save"
    with pytest.raises(CheckpointError, match=objects):
        load_scgpt(folder)


def test_mismatched_keys_are_listed(make_scgpt_dir):
    def rename(state):
        state = dict(state)
        state["transformer_encoder.layers.1.mlp.weight"] = state.pop(
            "transformer_encoder.layers.1.linear1.weight"
        )
        state["mystery_head.weight"] = torch.zeros(2)
        return state

    with pytest.raises(CheckpointError) as info:
        load_scgpt(make_scgpt_dir(edit=rename))
    message = str(info.value)
    assert "missing 1 keys: transformer_encoder.layers.1.linear1.weight" in message
    assert "unexpected 2 keys:" in message and "mystery_head.weight" in message
    assert "args.json" in message and "\n" not in message


def test_args_that_do_not_fit_the_weights(make_scgpt_dir):
    first_missing = "missing 12 keys: transformer_encoder.layers.2.self_attn.Wqkv.weight"
    with pytest.raises(CheckpointError, match=first_missing):
        load_scgpt(make_scgpt_dir(nlayers=3))
    with pytest.raises(CheckpointError, match="shapes differ .*linear1.weight \\(32, 16\\)"):
        load_scgpt(make_scgpt_dir(d_hid=64, name="wide"))


def test_vocab_size_mismatch(make_scgpt_dir):
    folder = make_scgpt_dir()
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["EXTRA_GENE"] = 60697
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="60698 tokens .* but best_model.pt has 60697 gene"):
        load_scgpt(folder)


def test_bad_args(make_scgpt_dir):
    folder = make_scgpt_dir()
    (folder / "args.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="args.json \\(model arguments\\) is not valid JSON"):
        load_scgpt(folder)
    (folder / "args.json").write_text(json.dumps({"embsize": 16}))
    with pytest.raises(CheckpointError, match="args.json lacks \\['nheads', 'd_hid', 'nlayers'\\]"):
        load_scgpt(folder)
    (folder / "args.json").write_text(json.dumps({**TINY_ARGS, "input_emb_style": "category"}))
    with pytest.raises(CheckpointError, match="input_emb_style='category'"):
        load_scgpt(folder)


def test_options_reach_tokenizer_and_cache(make_scgpt_dir, tiny_adata, tmp_path):
    model = load_scgpt(make_scgpt_dir(), max_seq_len=3, n_bins=11)
    assert model.settings()["max_length"] == 3 and model.settings()["n_bins"] == 11
    tokens = model.tokenize(tiny_adata)
    assert tokens.lengths.max() == 3 and tokens.values.max() <= 10
    first = embed(tiny_adata, model, cache_dir=tmp_path / "cache", progress=False)
    second = embed(tiny_adata.copy(), model, cache_dir=tmp_path / "cache", progress=False)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.matrix, second.matrix)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("max_seq_len", "max_seq_len must be ≥ 2 (<cls> + one gene), got 0."),
        ("n_bins", "n_bins must be ≥ 3 for scGPT binning, got 0; use 51."),
    ],
)
def test_an_option_of_zero_is_refused_not_replaced_by_the_default(
    option, message, make_scgpt_dir, tiny_adata
):
    from scfmbench.errors import DataError

    model = load_scgpt(make_scgpt_dir(), **{option: 0})
    with pytest.raises(DataError) as raised:
        model.tokenize(tiny_adata)
    assert str(raised.value) == message


def test_fine_tuning_hooks_and_save_round_trip(make_scgpt_dir, tiny_adata, tmp_path):
    model = load_scgpt(make_scgpt_dir())
    assert model.hidden_size == 16 and len(model.layer_modules()) == 2
    assert model.embedding_modules() == [model.network.encoder, model.network.value_encoder]
    names = dict(model.network.named_modules())
    targets = model.lora_target_modules()
    assert len(targets) == 6 and all(isinstance(names[t], torch.nn.Linear) for t in targets)
    head = model.make_classifier_head(4)
    assert head is model.network.cls_decoder and head(torch.zeros(3, 16)).shape == (3, 4)
    model.save_pretrained(tmp_path / "saved")
    saved = torch.load(tmp_path / "saved" / "best_model.pt", weights_only=True)
    assert attention_layout(saved) == "flash" and "cls_decoder.out_layer.weight" in saved
    again = load_scgpt(tmp_path / "saved")
    assert again.network.config.n_cls == 4
    torch.testing.assert_close(again.network.cls_decoder.out_layer.weight, head.out_layer.weight)
    np.testing.assert_array_equal(_embed(model, tiny_adata.copy()), _embed(again, tiny_adata))
