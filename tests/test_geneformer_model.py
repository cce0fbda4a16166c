"""Geneformer model adapter: checkpoint loading, embeddings, cache behaviour and bad checkpoints."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfmbench.embed import collate, embed, embed_tokens
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.models import MODELS
from scfmbench.models.geneformer.adapter import GeneformerModel, load_geneformer
from tests._geneformer_factory import (
    copy_dictionaries,
    hf_hidden_states,
    real_config,
    write_checkpoint,
)
from tests._padded import embed_padded_to_max

PBMC3K = "data/pbmc3k_seurat_labels_2638x13714_counts.h5ad"


@pytest.fixture(scope="module")
def pbmc(shared_dir) -> ad.AnnData:
    adata = ad.read_h5ad(shared_dir / PBMC3K)
    return adata[np.random.default_rng(1).choice(adata.n_obs, 12, replace=False)].copy()


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, shared_dir):
    return write_checkpoint(tmp_path_factory.mktemp("gf") / "v1", shared_dir, version="V1")


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory, shared_dir):
    return write_checkpoint(
        tmp_path_factory.mktemp("gf") / "v2", shared_dir, version="V2", weights="bin", head="cls"
    )


def reference_embeddings(network, model: GeneformerModel, adata, *, layer: int) -> np.ndarray:
    """Hugging Face forward with all hidden states, mean over gene tokens (the reference way)."""
    tokens, states = hf_hidden_states(network, model, adata, layer=layer)
    special = model.tokenizer.cls_id is not None
    rows = []
    for i, length in enumerate(tokens.lengths):
        lo, hi = (1, length - 1) if special else (0, length)
        rows.append(states[i, lo:hi].mean(0).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("which", ["v1_dir", "v2_dir"])
def test_save_load_round_trip_matches_reference_extraction(request, pbmc, which):
    directory, network = request.getfixturevalue(which)
    model = MODELS.get("geneformer")(directory, gene_column="gene_ids")
    assert isinstance(model, GeneformerModel) and model.model_id == "geneformer"
    assert (model.n_layers, model.default_layer) == (2, 1)
    adata = pbmc.copy()
    result = embed(adata, model, pooling="mean", batch_size=8, progress=False)
    expected = reference_embeddings(network, model, pbmc, layer=1)
    assert result.matrix.shape == (12, 32) and result.layer == 1
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(adata.obsm["X_geneformer"], result.matrix)
    assert result.checkpoint_sha256 == model.checkpoint_sha256
    assert len(model.checkpoint_sha256) == 64


def test_cls_pooling_v2_only(v1_dir, v2_dir, pbmc):
    v2 = load_geneformer(v2_dir[0], gene_column="gene_ids")
    tokens = v2.tokenize(pbmc)
    batch = collate(tokens, np.arange(4), pad_token_id=0)
    with torch.no_grad():
        cls = v2.encode(batch, layer=2, pooling="cls")
        full = v2.network(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
    torch.testing.assert_close(cls, full.last_hidden_state[:, 0])
    v1 = load_geneformer(v1_dir[0], gene_column="gene_ids")
    with pytest.raises(ConfigError, match="pooling 'cls' is not available"):
        embed(pbmc.copy(), v1, pooling="cls", progress=False)


def test_dynamic_batching_equals_pad_to_max(v2_dir, pbmc):
    model = load_geneformer(v2_dir[0], gene_column="gene_ids")
    tokens = model.tokenize(pbmc[:6])
    dynamic = embed_tokens(model, tokens, layer=1, pooling="mean", batch_size=4, progress=False)
    padded = embed_padded_to_max(model, tokens, layer=1, pooling="mean", batch_size=4)
    np.testing.assert_allclose(dynamic, padded, rtol=1e-4, atol=1e-5)


def test_embeddings_are_deterministic_and_random_control_is_seeded(v1_dir, pbmc):
    directory = v1_dir[0]
    first = embed(pbmc.copy(), load_geneformer(directory, gene_column="gene_ids"), progress=False)
    second = embed(pbmc.copy(), load_geneformer(directory, gene_column="gene_ids"), progress=False)
    np.testing.assert_array_equal(first.matrix, second.matrix)
    random_a = load_geneformer(directory, random_init=True, gene_column="gene_ids", seed=3)
    random_b = load_geneformer(directory, random_init=True, gene_column="gene_ids", seed=3)
    random_c = load_geneformer(directory, random_init=True, gene_column="gene_ids", seed=4)
    assert random_a.model_id == "geneformer-random"
    assert random_a.checkpoint_sha256 == random_b.checkpoint_sha256 != random_c.checkpoint_sha256
    emb_a = embed(pbmc.copy(), random_a, progress=False).matrix
    np.testing.assert_array_equal(emb_a, embed(pbmc.copy(), random_b, progress=False).matrix)
    assert not np.allclose(emb_a, embed(pbmc.copy(), random_c, progress=False).matrix)
    assert not np.allclose(emb_a, first.matrix)


def test_random_init_needs_no_weights(tmp_path, shared_dir, pbmc):
    directory = copy_dictionaries(shared_dir, "V1", tmp_path / "gf")
    config = real_config(shared_dir, "V1", num_hidden_layers=1, hidden_size=16)
    config["num_attention_heads"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    model = load_geneformer(directory, random_init=True, gene_column="gene_ids")
    assert embed(pbmc.copy(), model, progress=False).matrix.shape == (12, 16)
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors and"):
        load_geneformer(directory)


def test_cache_hit_and_invalidation(v2_dir, pbmc, tmp_path):
    model = load_geneformer(v2_dir[0], gene_column="gene_ids")
    cache = tmp_path / "cache"
    first = embed(pbmc.copy(), model, cache_dir=cache, progress=False)
    hit = embed(pbmc.copy(), model, cache_dir=cache, progress=False)
    assert (first.from_cache, hit.from_cache) == (False, True)
    np.testing.assert_array_equal(first.matrix, hit.matrix)
    assert not embed(pbmc.copy(), model, layer=2, cache_dir=cache, progress=False).from_cache
    assert not embed(pbmc.copy(), model, pooling="mean", cache_dir=cache, progress=False).from_cache
    changed = pbmc.copy()
    changed.X = changed.X.copy()
    changed.X.data[0] += 1
    assert not embed(changed, model, cache_dir=cache, progress=False).from_cache
    for path in cache.glob("*.npy"):  # corrupt every entry: each must be recomputed
        path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)
    again = embed(pbmc.copy(), model, cache_dir=cache, progress=False)
    assert not again.from_cache
    np.testing.assert_array_equal(again.matrix, first.matrix)
    assert embed(pbmc.copy(), model, cache_dir=cache, progress=False).from_cache


def test_dropped_cells_get_nan_rows(v1_dir, pbmc):
    model = load_geneformer(v1_dir[0], gene_column="gene_ids")
    adata = pbmc.copy()
    dense = adata.X.toarray()
    dense[3] = 0
    adata.X = sp.csr_matrix(dense)
    result = embed(adata, model, progress=False)
    assert list(result.dropped) == [adata.obs_names[3]]
    assert np.isnan(adata.obsm["X_geneformer"][3]).all()
    assert not np.isnan(np.delete(adata.obsm["X_geneformer"], 3, axis=0)).any()


# --- bad checkpoints ----------------------------------------------------------------------


def test_missing_weights_file(tmp_path, shared_dir):
    directory, _ = write_checkpoint(tmp_path / "gf", shared_dir)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*random-init"):
        load_geneformer(directory)


def test_missing_dictionaries(tmp_path, shared_dir):
    directory, _ = write_checkpoint(tmp_path / "gf", shared_dir, dictionaries=False)
    with pytest.raises(CheckpointError, match=r"no token_dictionary\*\.pkl .*--geneformer-dicts"):
        load_geneformer(directory)
    dicts = copy_dictionaries(shared_dir, "V1", tmp_path / "dicts")
    assert load_geneformer(directory, dicts=dicts).version == "V1"


def test_vocab_size_mismatch(tmp_path, shared_dir):
    directory, _ = write_checkpoint(tmp_path / "gf", shared_dir, version="V1", dictionaries=False)
    dicts = copy_dictionaries(shared_dir, "V2", tmp_path / "dicts")
    with pytest.raises(CheckpointError, match=r"vocab_size 25426 but .*\(20275 tokens\)"):
        load_geneformer(directory, dicts=dicts)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_truncated_weights_file(tmp_path, shared_dir, weights):
    directory, _ = write_checkpoint(tmp_path / "gf", shared_dir, weights=weights)
    path = next(directory.glob("*.safetensors" if weights == "safetensors" else "*.bin"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read weights .*{path.name}.*corrupt") as err:
        load_geneformer(directory)
    assert "\n" not in str(err.value)


def test_unexpected_and_missing_keys(tmp_path, shared_dir):
    directory, network = write_checkpoint(tmp_path / "gf", shared_dir, weights="bin")
    state = network.state_dict()
    state["bert.extra.weight"] = torch.zeros(2)
    del state["bert.encoder.layer.1.output.dense.bias"]
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"1 missing keys \['encoder.layer.1.output.dense.bias'\], "
        r"1 unexpected keys \['extra.weight'\]",
    ):
        load_geneformer(directory)


def test_weights_that_do_not_fit_the_config(tmp_path, shared_dir):
    directory, _ = write_checkpoint(tmp_path / "gf", shared_dir)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit config.json"):
        load_geneformer(directory)


def test_missing_config_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_geneformer(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json in"):
        load_geneformer(tmp_path)


def test_finetuning_hooks_and_save_pretrained_round_trip(v2_dir, pbmc, tmp_path):
    model = load_geneformer(v2_dir[0])
    assert model.hidden_size == model.network.config.hidden_size
    assert len(model.layer_modules()) == model.n_layers
    assert model.embedding_modules() == [model.network.embeddings]
    assert model.lora_target_modules() == ["query", "key", "value"]
    cells = pbmc[:40].copy()
    before = embed(cells, model, progress=False).matrix
    model.save_pretrained(tmp_path / "saved")
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "config.json" in names and "model.safetensors" in names
    assert "token_dictionary_gc95M.pkl" in names
    after = embed(cells, load_geneformer(tmp_path / "saved"), progress=False).matrix
    np.testing.assert_array_equal(before, after)


def test_run_with_finetuning_side_by_side(shared_dir, pbmc3k_path, tmp_path):
    import scfmbench

    # inputs capped at 128 tokens (each cell's top-ranked genes): fine-tuning time grows with
    # the input length (attention with its square), ~800 tokens per PBMC3k cell uncapped
    model_dir, _ = write_checkpoint(
        tmp_path / "gf", shared_dir, version="V2", weights="bin", head="cls",
        max_position_embeddings=128,
    )  # fmt: skip
    cells = ad.read_h5ad(pbmc3k_path)[::8].copy()
    result = scfmbench.run(
        cells,
        out=tmp_path,
        name="ft",
        models=[f"geneformer={model_dir}"],
        baselines=["majority"],
        probes=["logreg"],
        layerwise=False,
        figures=False,
        progress=False,
        design="study",
        n_splits=1,
        finetune={"epochs": 2, "learning_rate": 1e-3, "batch_size": 16},
    )
    methods = result.metrics["methods"]
    assert methods["geneformer+finetuned"]["kind"] == "finetuned"
    assert methods["geneformer-random+finetuned"]["kind"] == "control"
    curve = result.metrics["finetune"]["geneformer"]["epochs"]
    assert [e["epoch"] for e in curve] == [1, 2]
    assert curve[1]["train_loss"] < curve[0]["train_loss"]
    best = result.run_dir / "finetune" / "geneformer" / "seed42" / "best" / "model"
    assert (best / "model.safetensors").exists()
    report = (result.run_dir / "report.md").read_text()
    assert "## Frozen vs fine-tuned" in report
    # the report opens with the verdict: the frozen probe beats the best baseline (majority)
    test = next(c for c in result.metrics["comparisons"] if c["method"] == "geneformer+logreg")
    assert (test["against"], test["significant"], test["f1_diff"] > 0) == ("majority", True, True)
    lo, hi = test["f1_diff_ci95"]
    numbers = f"Δ macro F1 {test['f1_diff']:+.3f}, 95% CI {lo:.3f} to {hi:.3f}, Holm p = "
    numbers = (numbers + f"{test['p_holm']:.3f}").replace("-", "−")
    verdict = report.split("## Verdict\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert verdict[1] == f"- geneformer (frozen, best probe logreg): beats majority ({numbers})."
    assert verdict[2].startswith("- geneformer (fine-tuned): ")
