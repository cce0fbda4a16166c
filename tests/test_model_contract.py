"""The ``FoundationModel`` contract, checked for every registered model.

Each model in ``MODELS`` is built from a tiny checkpoint in its published format (real
vocabularies, 2 encoder layers) and embeds the same dozen PBMC3k cells: tokenize → collate →
encode shapes, the layer range and the reference defaults, every pooling, padding invariance,
the random-init control, save → load, and the hooks the fine-tuning engine calls.

A model registered in ``MODELS`` without an entry in ``CASES`` fails here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from anndata import AnnData

from scfmbench.config import FinetuneConfig
from scfmbench.embed import collate, embed, embed_tokens
from scfmbench.errors import ConfigError
from scfmbench.finetune.model import apply_trainability, enable_gradient_checkpointing
from scfmbench.models import MODELS, FoundationModel, TokenizedCells
from scfmbench.models.scfoundation.tokenizer import read_gene_index
from scfmbench.models.scgpt.tokenizer import load_scgpt_vocab
from tests._geneformer_factory import write_checkpoint as write_geneformer
from tests._scfoundation_factory import write_checkpoint as write_scfoundation
from tests._scgpt_fixtures import tiny_state, write_scgpt_dir
from tests.conftest import require_shared

pytestmark = pytest.mark.filterwarnings("ignore:scfoundation. dropped 1 cells")

N_CELLS = 12
N_GENES = 200
N_LAYERS = 2  # every tiny checkpoint
TOLERANCE = 1e-5


def _geneformer(folder: Path, shared_dir: Path, seed: int) -> Path:
    require_shared("vocab/geneformer/v2_gc95M")
    return write_geneformer(folder, shared_dir, version="V2", seed=seed)[0]


def _scgpt(folder: Path, shared_dir: Path, seed: int) -> Path:
    human = require_shared("vocab/scgpt/scGPT_human")
    n_tokens = len(load_scgpt_vocab(require_shared("vocab/scgpt/scGPT_human/vocab.json")))
    return write_scgpt_dir(folder, human, tiny_state(human, n_tokens=n_tokens, seed=seed))


def _scfoundation(folder: Path, shared_dir: Path, seed: int) -> Path:
    index = require_shared("vocab/scfoundation/OS_scRNA_gene_index.19264.tsv")
    return write_scfoundation(folder, list(read_gene_index(index)), seed=seed).parent


@dataclass(frozen=True)
class Case:
    """A tiny checkpoint of one model and what its adapter must declare for it."""

    write: Callable[[Path, Path, int], Path]  # (folder, shared dir, seed) → path to load
    default_layer: int  # of the 2-layer network
    default_pooling: str
    widths: dict[str, int]  # pooled width per pooling, every pooling the model has
    gradient_checkpointing: bool  # the network has gradient_checkpointing_enable


CASES: dict[str, Case] = {
    # EmbExtractor: second-to-last layer; a V2 model has <cls> and pools there (emb_mode="cls")
    "geneformer": Case(_geneformer, 1, "cls", {"cls": 32, "mean": 32}, True),
    # embed_data: the <cls> output of the last layer
    "scgpt": Case(_scgpt, 2, "cls", {"cls": 16, "mean": 16}, False),
    # get_embedding.py --pool_type all: last layer, [S, T, max, mean] of hidden 8
    "scfoundation": Case(_scfoundation, 2, "all", {"all": 32, "max": 8}, False),
}


def test_every_registered_model_has_a_tiny_checkpoint():
    assert sorted(CASES) == MODELS.names()


# ---- fixtures: one checkpoint and model per registered name --------------------------------


@pytest.fixture(scope="module", params=MODELS.names())
def name(request) -> str:
    if request.param not in CASES:
        pytest.fail(f"model {request.param!r} has no tiny checkpoint; add it to CASES")
    return request.param


@pytest.fixture(scope="module")
def case(name) -> Case:
    return CASES[name]


@pytest.fixture(scope="module")
def model_path(name, case, shared_dir, tmp_path_factory) -> Path:
    return case.write(tmp_path_factory.mktemp(name) / "model", shared_dir, 0)


@pytest.fixture(scope="module")
def model(name, model_path) -> FoundationModel:
    return MODELS.get(name)(model_path)


@pytest.fixture(scope="module")
def cells(pbmc3k_sess) -> AnnData:
    """12 PBMC3k cells × their 200 most expressed genes; the last cell has no counts."""
    rng = np.random.default_rng(0)
    adata = pbmc3k_sess[np.sort(rng.choice(pbmc3k_sess.n_obs, N_CELLS, replace=False))]
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    adata = adata[:, np.argsort(-totals, kind="stable")[:N_GENES]].copy()
    counts = adata.X.tolil()
    counts[N_CELLS - 1, :] = 0
    adata.X = counts.tocsr()
    adata.X.eliminate_zeros()
    return adata


@pytest.fixture(scope="module")
def tokens(model, cells) -> TokenizedCells:
    return model.tokenize(cells.copy())  # the default seed, as embed() uses


def encode(model, tokens, indices, *, layer: int, pooling: str) -> np.ndarray:
    """``model.encode`` of the cells ``indices`` as one padded batch, (B, dim) float32."""
    batch = collate(
        tokens, np.asarray(indices), pad_token_id=model.pad_token_id, pad_value=model.pad_value
    )
    with torch.inference_mode():
        return model.encode(batch, layer=layer, pooling=pooling).float().numpy()


def embed_default(model, cells, tokens) -> np.ndarray:
    """Embeddings of ``cells`` at the model's default layer and pooling, from ``tokens``."""
    return embed(cells.copy(), model, tokens=tokens, progress=False).matrix


@pytest.fixture(scope="module")
def pretrained(model, cells, tokens) -> np.ndarray:
    return embed_default(model, cells, tokens)


# ---- tokenize → collate → encode ---------------------------------------------------------


def test_tokenized_cells_are_consistent(model, tokens, cells):
    empty = cells.obs_names[-1]
    assert list(tokens.dropped) == [empty]
    assert list(tokens.obs_names) == list(cells.obs_names[:-1])  # kept cells, input order
    assert tokens.n_cells == N_CELLS - 1 == len(tokens.lengths)
    assert tokens.offsets[0] == 0 and tokens.offsets[-1] == len(tokens.input_ids)
    assert tokens.offsets.dtype == np.int64 and tokens.input_ids.dtype == np.int64
    assert np.all(tokens.lengths > 0)
    if tokens.values is not None:
        assert tokens.values.dtype == np.float32 and tokens.values.shape == tokens.input_ids.shape
    ids, values = tokens.cell(2)
    np.testing.assert_array_equal(ids, tokens.input_ids[tokens.offsets[2] : tokens.offsets[3]])
    assert (values is None) == (tokens.values is None)
    assert isinstance(tokens.settings, dict) and tokens.settings
    again = model.tokenize(cells.copy(), seed=0)
    np.testing.assert_array_equal(again.input_ids, tokens.input_ids)


def test_collate_pads_to_the_longest_cell(model, tokens):
    indices = np.array([4, 0, 7])
    lengths = tokens.lengths[indices]
    batch = collate(tokens, indices, pad_token_id=model.pad_token_id, pad_value=model.pad_value)
    shape = (3, int(lengths.max()))
    assert batch.input_ids.shape == shape and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.shape == shape and batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.sum(1).tolist() == lengths.tolist()
    assert (batch.values is None) == (tokens.values is None)
    for row, cell in enumerate(indices):
        ids, values = tokens.cell(cell)
        n = len(ids)
        assert batch.input_ids[row, :n].tolist() == ids.tolist()
        assert torch.all(batch.input_ids[row, n:] == model.pad_token_id)
        assert not batch.attention_mask[row, n:].any()
        if values is not None:
            assert batch.values.shape == shape and batch.values.dtype == torch.float32
            np.testing.assert_array_equal(batch.values[row, :n].numpy(), values)
            assert torch.all(batch.values[row, n:] == model.pad_value)


def test_encode_gives_the_declared_width(model, tokens, case):
    assert model.hidden_size == case.widths[model.default_pooling]
    pooled = encode(
        model, tokens, [4, 0, 7], layer=model.default_layer, pooling=model.default_pooling
    )
    assert pooled.shape == (3, model.hidden_size) and pooled.dtype == np.float32
    assert np.isfinite(pooled).all()
    batch = collate(
        tokens, np.arange(5), pad_token_id=model.pad_token_id, pad_value=model.pad_value
    )
    with torch.inference_mode():
        stacked = model.encode_layers(batch, layers=[0, 2, -1], pooling=model.default_pooling)
        assert stacked.shape == (3, 5, model.hidden_size)
        for row, layer in enumerate([0, 2, -1]):
            single = model.encode(batch, layer=layer, pooling=model.default_pooling)
            torch.testing.assert_close(stacked[row], single, rtol=0, atol=1e-6)


# ---- layers and poolings -------------------------------------------------------------------


def test_reference_defaults(name, model, cells, case, pretrained):
    assert model.n_layers == N_LAYERS
    assert (model.default_layer, model.default_pooling) == (
        case.default_layer,
        case.default_pooling,
    )
    assert sorted(model.poolings) == sorted(case.widths)
    assert model.model_id == name and not model.random_init
    emb = embed(cells.copy(), model, progress=False)
    assert (emb.layer, emb.pooling) == (case.default_layer, case.default_pooling)
    assert emb.model_id == name and list(emb.dropped) == [cells.obs_names[-1]]
    assert emb.matrix.shape == (N_CELLS - 1, model.hidden_size)
    np.testing.assert_array_equal(emb.matrix, pretrained)  # what embed_tokens gives as well


def test_every_layer_and_negative_indices(model, tokens, cells):
    pooling = model.default_pooling
    by_layer = {
        layer: embed_tokens(model, tokens, layer=layer, pooling=pooling, progress=False)
        for layer in range(-N_LAYERS - 1, N_LAYERS + 1)
    }
    for layer, matrix in by_layer.items():
        assert matrix.shape == (N_CELLS - 1, model.hidden_size), layer
        assert np.isfinite(matrix).all(), layer
    for layer in range(1, N_LAYERS + 2):  # -1 is the last layer, -(n_layers + 1) the embeddings
        np.testing.assert_array_equal(by_layer[-layer], by_layer[N_LAYERS + 1 - layer])
    for layer in range(N_LAYERS):
        assert not np.allclose(by_layer[layer], by_layer[layer + 1], atol=1e-4)
    for bad in (N_LAYERS + 1, -N_LAYERS - 2):
        with pytest.raises(ConfigError, match=f"layer {bad} is out of range"):
            embed(cells.copy(), model, layer=bad, progress=False)
    with pytest.raises(ConfigError, match="pooling 'nope' is not available"):
        embed(cells.copy(), model, pooling="nope", progress=False)


def test_every_pooling(model, tokens, case):
    pooled = {
        pooling: embed_tokens(
            model, tokens, layer=model.default_layer, pooling=pooling, progress=False
        )
        for pooling in model.poolings
    }
    for pooling, matrix in pooled.items():
        assert matrix.shape == (N_CELLS - 1, case.widths[pooling]), pooling
        assert np.isfinite(matrix).all(), pooling
    for a in pooled:
        for b in pooled:
            if a < b and pooled[a].shape == pooled[b].shape:
                assert not np.allclose(pooled[a], pooled[b], atol=1e-3), (a, b)


def test_padding_does_not_change_a_cell(model, tokens):
    shortest = int(np.argmin(tokens.lengths))
    everyone = np.arange(tokens.n_cells)
    assert tokens.lengths[shortest] < tokens.lengths.max()
    for layer in sorted({model.default_layer, model.n_layers}):
        for pooling in model.poolings:
            batched = encode(model, tokens, everyone, layer=layer, pooling=pooling)
            for cell in (shortest, 0):
                alone = encode(model, tokens, [cell], layer=layer, pooling=pooling)[0]
                np.testing.assert_allclose(
                    batched[cell], alone, rtol=TOLERANCE, atol=TOLERANCE, err_msg=pooling
                )


# ---- random init and save → load ----------------------------------------------------------


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_control(name, model, model_path, cells, tokens, pretrained):
    load = MODELS.get(name)
    rng_before = torch.random.get_rng_state()
    first, again, other = (load(model_path, random_init=True, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert first.model_id == f"{name}-random" and first.random_init
    assert _states_equal(first.network, again.network)
    assert not _states_equal(first.network, other.network)
    assert not _states_equal(first.network, model.network)
    assert first.checkpoint_sha256 == again.checkpoint_sha256
    assert len({first.checkpoint_sha256, other.checkpoint_sha256, model.checkpoint_sha256}) == 3
    a, b, c = (embed_default(m, cells, tokens) for m in (first, again, other))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-4)
    assert not np.allclose(a, pretrained, atol=1e-4)


def test_save_load_round_trip(name, model, cells, tokens, pretrained, tmp_path):
    model.save_pretrained(tmp_path / "best" / "model")
    reloaded = MODELS.get(name)(tmp_path / "best" / "model")
    assert reloaded.model_id == name and _states_equal(reloaded.network, model.network)
    np.testing.assert_array_equal(embed(cells.copy(), reloaded, progress=False).matrix, pretrained)
    # changed weights and a classifier head (as fine-tuning leaves them) are what is saved
    tuned = copy.deepcopy(model)
    tuned.make_classifier_head(3)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in tuned.network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tuned.save_pretrained(tmp_path / "tuned")
    reloaded = MODELS.get(name)(tmp_path / "tuned")
    expected = embed_default(tuned, cells, tokens)
    np.testing.assert_array_equal(embed_default(reloaded, cells, tokens), expected)
    assert not np.allclose(expected, pretrained, atol=1e-4)


# ---- fine-tuning hooks ---------------------------------------------------------------------


def _parameter_ids(modules) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


def _train_step(model, tokens, head) -> None:
    """One training forward (last layer, default pooling, as ``finetune``) and backward."""
    batch = collate(
        tokens, np.arange(4), pad_token_id=model.pad_token_id, pad_value=model.pad_value
    )
    model.network.train()
    pooled = model.encode(batch, layer=model.n_layers, pooling=model.default_pooling)
    head(pooled).logsumexp(dim=1).sum().backward()


def test_hooks_name_modules_of_the_network(model):
    network = _parameter_ids([model.network])
    layers = model.layer_modules()
    embeddings = model.embedding_modules()
    assert len(layers) == model.n_layers
    assert len(_parameter_ids(layers)) == sum(
        len(list(layer.parameters())) for layer in layers
    )  # distinct layers
    assert _parameter_ids(layers) <= network and _parameter_ids(embeddings) <= network
    assert _parameter_ids(embeddings) and not _parameter_ids(embeddings) & _parameter_ids(layers)
    module_names = {n.rsplit(".", 1)[-1] for n, _ in model.network.named_modules()}
    full_names = {n for n, _ in model.network.named_modules()}
    for target in model.lora_target_modules():
        assert target in full_names or target in module_names, target
    head = copy.deepcopy(model).make_classifier_head(5)  # scGPT attaches it to its network
    assert head(torch.zeros(4, model.hidden_size)).shape == (4, 5)


def test_freezing_embeddings_and_first_layer(model, tokens):
    tuned = copy.deepcopy(model)
    config = FinetuneConfig(freeze_embeddings=True, freeze_layers=1)
    head = tuned.make_classifier_head(3)
    assert apply_trainability(tuned, config) is None
    frozen = _parameter_ids([*tuned.embedding_modules(), tuned.layer_modules()[0]])
    trained = _parameter_ids(tuned.layer_modules()[1:])
    _train_step(tuned, tokens, head)
    for parameter in tuned.network.parameters():
        if id(parameter) in frozen:
            assert not parameter.requires_grad and parameter.grad is None
        elif id(parameter) in trained:
            assert parameter.requires_grad
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in tuned.network.parameters()
        if id(p) in trained
    )
    with pytest.raises(ConfigError, match=f"freeze_layers=3 but .* has {N_LAYERS} layers"):
        apply_trainability(copy.deepcopy(model), FinetuneConfig(freeze_layers=3))


def test_lora_adapters_train_merge_and_save(name, model, tokens, cells, pretrained, tmp_path):
    tuned = copy.deepcopy(model)
    head = tuned.make_classifier_head(3)
    tuner = apply_trainability(tuned, FinetuneConfig(lora=True, lora_r=2))
    trainable = [n for n, p in tuned.network.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for layer in tuned.layer_modules():  # every encoder layer gets adapters
        assert any("lora_" in n for n, _ in layer.named_parameters())
    _train_step(tuned, tokens, head)
    grads = [p.grad for n, p in tuned.network.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # as after training: adapters that change the output
        for n, p in tuned.network.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    tuned.network.eval()
    adapted = embed_default(tuned, cells, tokens)
    np.testing.assert_array_equal(embed_default(tuned, cells, tokens), adapted)  # as validation
    # what fine-tuning saves as best/model: a CPU copy, merged, after validation's forwards
    from scfmbench.finetune.model import cpu_copy

    tuned.network = cpu_copy(tuner, tuner).merge_and_unload()
    tuned.save_pretrained(tmp_path / "merged")
    reloaded = MODELS.get(name)(tmp_path / "merged")
    merged = embed_default(reloaded, cells, tokens)
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-5)
    assert not np.allclose(adapted, pretrained, atol=1e-4)


def test_gradient_checkpointing_as_declared(model, tokens, case, caplog):
    tuned = copy.deepcopy(model)
    head = tuned.make_classifier_head(3)
    # a module inside the last layer: it runs again in backward when the layer is checkpointed
    inner = [m for m in tuned.layer_modules()[-1].modules() if isinstance(m, torch.nn.Linear)][-1]
    calls = []
    inner.register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="scfmbench.finetune.model"):
        enable_gradient_checkpointing(tuned.network)
    _train_step(tuned, tokens, head)
    if case.gradient_checkpointing:
        assert len(calls) == 2 and not caplog.records
    else:  # trained without it, and the log says so
        assert len(calls) == 1
        assert "has no gradient_checkpointing_enable" in caplog.text


def test_masked_mean_is_the_mean_over_kept_tokens():
    import torch

    from scfmbench.models.base import masked_mean

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, generator=generator)
    keep = torch.rand(4, 7, generator=generator) > 0.4
    keep[2] = False  # a cell with no kept token
    pooled = masked_mean(hidden, keep)
    for row in range(4):
        kept = [hidden[row, t] for t in range(7) if keep[row, t]]
        expected = torch.stack(kept).mean(0) if kept else torch.zeros(5)
        torch.testing.assert_close(pooled[row], expected)
