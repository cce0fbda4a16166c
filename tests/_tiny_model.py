"""A tiny FoundationModel for fine-tuning tests: a 2-layer BERT over a small gene vocabulary.

Tokenization follows Geneformer's idea (genes ranked by count, highest first), without the
median normalization. The vocabulary is saved with the weights, so a saved model reloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from transformers import BertConfig, BertModel

from scfmbench.errors import CheckpointError
from scfmbench.models.base import FoundationModel, PaddedBatch, TokenizedCells
from scfmbench.models.loading import LoadContext, ModelLoader, ModelOptions

VOCAB_FILE = "vocab.json"
SPECIAL_TOKENS = 1  # 0 = <pad>


class TinyModel(FoundationModel):
    """2-layer BERT, hidden 32, on a fixed gene vocabulary; mean pooling."""

    name = "tiny"
    pad_token_id = 0

    def __init__(
        self,
        genes: list[str],
        *,
        network: BertModel | None = None,
        max_length: int = 48,
        hidden: int = 32,
        n_layers: int = 2,
        n_heads: int = 2,
        dropout: float = 0.0,
        seed: int = 0,
        random_init: bool = False,
        model_dir: Path | None = None,
    ) -> None:
        self.genes = list(genes)
        self.max_length = max_length
        self.random_init = random_init
        self.model_dir = Path(model_dir) if model_dir else Path(".")
        self.checkpoint_sha256 = "tiny" + ("-random" if random_init else "")
        if network is None:
            config = BertConfig(
                vocab_size=len(self.genes) + SPECIAL_TOKENS,
                hidden_size=hidden,
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                intermediate_size=2 * hidden,
                max_position_embeddings=max_length,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                pad_token_id=0,
            )
            torch.manual_seed(seed)
            network = BertModel(config, add_pooling_layer=False)
        self.network = network

    @property
    def n_layers(self) -> int:
        return self.network.config.num_hidden_layers

    @property
    def default_layer(self) -> int:
        return self.n_layers - 1

    @property
    def hidden_size(self) -> int:
        return self.network.config.hidden_size

    def tokenize(self, adata: AnnData, *, seed: int = 0) -> TokenizedCells:
        position = {g: i for i, g in enumerate(self.genes)}
        columns = np.array([position.get(g, -1) for g in adata.var_names])
        known = np.flatnonzero(columns >= 0)
        matrix = sp.csr_matrix(adata.X)[:, known]
        ids, kept, dropped = [], [], []
        for i in range(matrix.shape[0]):
            row = matrix.getrow(i)
            if row.nnz == 0:
                dropped.append(adata.obs_names[i])
                continue
            order = np.lexsort((row.indices, -row.data))[: self.max_length]
            ids.append(columns[known[row.indices[order]]] + SPECIAL_TOKENS)
            kept.append(adata.obs_names[i])
        return TokenizedCells.from_lists(
            ids,
            obs_names=pd.Index(kept),
            settings={"max_length": self.max_length, "n_genes": len(self.genes)},
            dropped=pd.Index(dropped),
        )

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        last = layer in (self.n_layers, -1)  # all hidden states cost memory in training
        out = self.network(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask.long(),
            output_hidden_states=not last,
        )
        hidden = out.last_hidden_state if last else out.hidden_states[layer]
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def layer_modules(self) -> list[torch.nn.Module]:
        return list(self.network.encoder.layer)

    def embedding_modules(self) -> list[torch.nn.Module]:
        return [self.network.embeddings]

    def lora_target_modules(self) -> list[str]:
        return ["query", "value"]

    def save_pretrained(self, directory: Path) -> None:
        directory = Path(directory)
        self.network.save_pretrained(directory)
        (directory / VOCAB_FILE).write_text(json.dumps(self.genes))


def _load_tiny(
    path: Path, *, context: LoadContext, options: ModelOptions, random_init: bool
) -> TinyModel:
    """Load a TinyModel saved with ``save_pretrained`` (or a fresh one for random_init)."""
    path = Path(path)
    if not (path / VOCAB_FILE).exists():
        raise CheckpointError(f"{path} has no {VOCAB_FILE}; save the model with save_pretrained.")
    genes = json.loads((path / VOCAB_FILE).read_text())
    if random_init:
        config = BertConfig.from_pretrained(path)
        torch.manual_seed(context.seed)
        return TinyModel(
            genes, network=BertModel(config, add_pooling_layer=False), random_init=True
        )
    network = BertModel.from_pretrained(path, add_pooling_layer=False)
    return TinyModel(genes, network=network, model_dir=path)


load_tiny = ModelLoader("tiny", ModelOptions, _load_tiny)
"""Not registered: a test puts it in ``MODELS`` for its own duration."""


def pbmc_subset(path: Path, *, n_cells: int = 300, n_genes: int = 1000, seed: int = 0):
    """``n_cells`` random PBMC3k cells and the ``n_genes`` most expressed genes of them."""
    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, size=n_cells, replace=False))
    adata = adata[cells].copy()
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    genes = list(adata.var_names[np.argsort(-totals, kind="stable")[:n_genes]])
    return adata, genes
