"""scFoundation adapter: the checkpoint loader and the 4-part pooled cell embedding.

Follows the reference ``get_embedding.py`` for ``--input_type singlecell --output_type
cell`` (preprocessing and count tokens: :mod:`scfmbench.models.scfoundation.tokenizer`):
only tokens with a value > 0 (the non-zero genes) go through the encoder, in gene order, then
T and S; pooling ``all`` = concat(S, T, max over genes, mean over genes) → 4 × hidden, the
order of the script (``geneemb[:, -1]`` = S first, then ``geneemb[:, -2]`` = T); ``max`` =
max over all tokens (script ``--pool_type max``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.hashing import hash_file, hash_json
from scfmbench.models.base import FoundationModel, PaddedBatch, TokenizedCells, masked_mean
from scfmbench.models.loading import LoadContext, ModelLayout, register_model
from scfmbench.models.scfoundation.network import (
    RELEASED_CONFIG,
    VERSION_KEYS,
    CheckpointEntry,
    ScFoundationConfig,
    ScFoundationEncoder,
    load_encoder_state,
    random_encoder,
    read_checkpoint,
    save_checkpoint,
)
from scfmbench.models.scfoundation.tokenizer import (
    GENE_INDEX_FILE,
    ScFoundationOptions,
    check_totals_column,
    read_gene_index,
    resolve_mode,
    tokenize_scfoundation,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "models.ckpt"
POOLED_PARTS = ("S", "T", "max", "mean")
"""Blocks of the ``all`` pooled embedding, in order (each ``hidden`` wide)."""


def pool_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, *, pooling: str
) -> torch.Tensor:
    """Pool token states (B, L, D) whose last two real tokens are T and S.

    ``all`` → (B, 4D) = [S, T, max over genes, mean over genes]; ``max`` → (B, D) over all
    real tokens.
    """
    if pooling == "max":
        return _masked_max(hidden, attention_mask)
    if pooling != "all":
        raise ConfigError(
            f"pooling {pooling!r} is not available for scfoundation; choose from "
            f"{ScFoundationModel.poolings}."
        )
    lengths = attention_mask.sum(dim=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    s_token = hidden[rows, lengths - 1]
    t_token = hidden[rows, lengths - 2]
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    genes = columns.unsqueeze(0) < (lengths - 2).unsqueeze(1)  # (B, L)
    return torch.cat([s_token, t_token, _masked_max(hidden, genes), masked_mean(hidden, genes)], 1)


def _masked_max(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Maximum of token states over the tokens ``keep`` marks: (B, L, D), (B, L) → (B, D)."""
    return hidden.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)


class ScFoundationModel(FoundationModel):
    """scFoundation: non-zero genes + T, S → encoder → [S, T, max, mean] (4 × hidden).

    Build it with :func:`load_scfoundation`. ``network`` is the native
    :class:`~scfmbench.models.scfoundation.network.ScFoundationEncoder`.
    """

    name = "scfoundation"
    network: ScFoundationEncoder
    default_pooling = "all"
    poolings = ("all", "max")

    def __init__(
        self,
        network: ScFoundationEncoder,
        *,
        gene_index: dict[str, int],
        model_dir: Path,
        checkpoint_sha256: str,
        random_init: bool = False,
        options: ScFoundationOptions | None = None,
        context: LoadContext | None = None,
        entry: CheckpointEntry | None = None,
    ) -> None:
        config = network.config
        if config.seq_len != len(gene_index) + 2:
            raise CheckpointError(
                f"the scFoundation model has {config.seq_len} positions but the gene index has "
                f"{len(gene_index)} genes (+ T, S = {len(gene_index) + 2}); use the "
                f"{GENE_INDEX_FILE} of the same release."
            )
        self.network = network
        self.gene_index = gene_index
        self.model_dir = model_dir
        self.checkpoint_sha256 = checkpoint_sha256
        self.random_init = random_init
        self.options = options or ScFoundationOptions()
        self.context = context or LoadContext()
        self.entry = entry
        self.pad_token_id = config.seq_len  # the spare pos_emb row
        self.pad_value = float(config.pad_token_id)  # value → emb_pad, as the reference pads

    @property
    def n_layers(self) -> int:
        """Number of encoder layers."""
        return self.network.n_layers

    @property
    def default_layer(self) -> int:
        """The last layer, as the reference ``get_embedding.py``."""
        return self.network.n_layers

    def tokenize(self, adata: AnnData, *, seed: int = DEFAULT_SEED) -> TokenizedCells:
        """Non-zero index genes + T, S for each cell (deterministic; ``seed`` is unused)."""
        return tokenize_scfoundation(
            adata,
            gene_index=self.gene_index,
            options=self.options,
            gene_column=self.context.gene_column,
            allow_normalized=self.context.allow_normalized,
        )

    def hidden_states(self, batch: PaddedBatch, *, layer: int) -> torch.Tensor:
        """Token states (B, L, hidden) after ``layer`` encoder layers (negative counts back)."""
        if batch.values is None:
            raise ConfigError(
                "scfoundation needs token values; tokenize with ScFoundationModel.tokenize."
            )
        if layer < 0:
            layer += self.n_layers + 1
        return self.network(batch.values, batch.input_ids, batch.attention_mask, layer=layer)

    def layer_states(self, batch: PaddedBatch, *, up_to: int) -> Iterator[torch.Tensor]:
        """Token states (B, L, hidden) after 0, 1, …, ``up_to`` encoder layers, in turn."""
        if batch.values is None:
            raise ConfigError(
                "scfoundation needs token values; tokenize with ScFoundationModel.tokenize."
            )
        return self.network.layer_states(
            batch.values, batch.input_ids, batch.attention_mask, up_to=up_to
        )

    def pool(self, hidden: torch.Tensor, batch: PaddedBatch, *, pooling: str) -> torch.Tensor:
        """(B, 4 × hidden) for ``all``, (B, hidden) for ``max`` (see :func:`pool_tokens`)."""
        return pool_tokens(hidden, batch.attention_mask, pooling=pooling)

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        """Cell embeddings: (B, 4 × hidden) for ``all``, (B, hidden) for ``max``."""
        return self.pool(self.hidden_states(batch, layer=layer), batch, pooling=pooling)

    # ---- fine-tuning hooks --------------------------------------------------------------

    def layer_modules(self) -> list[nn.Module]:
        """Return the encoder's transformer layers, bottom first."""
        return list(self.network.encoder.transformer_encoder)

    def embedding_modules(self) -> list[nn.Module]:
        """Return the token (value) and position embeddings."""
        return [self.network.token_emb, self.network.pos_emb]

    def lora_target_modules(self) -> list[str]:
        """Attention (peft wraps ``nn.MultiheadAttention``: in- and out-projection) and FFN.

        ``out_proj`` alone would be ignored: ``nn.MultiheadAttention`` reads its weight
        without calling it.
        """
        return ["self_attn", "linear1", "linear2"]

    @property
    def hidden_size(self) -> int:
        """Width of the default (``all``) pooled embedding: 4 × hidden."""
        return len(POOLED_PARTS) * self.network.config.hidden_dim

    def make_classifier_head(self, n_classes: int) -> nn.Module:
        """Build the reference fine-tuning head (Linear → 256 → ReLU → Linear) on the embedding.

        The reference puts a non-affine BatchNorm in front; a non-affine LayerNorm is used
        here instead so batches of one cell work.
        """
        return nn.Sequential(
            nn.LayerNorm(self.hidden_size, elementwise_affine=False, eps=1e-6),
            nn.Linear(self.hidden_size, 256),
            nn.ReLU(),
            nn.Linear(256, n_classes),
        )

    def save_pretrained(self, directory: Path) -> None:
        """Write ``models.ckpt`` (released layout, decoder tensors kept) and the gene index."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entry = self.entry
        save_checkpoint(
            directory / CHECKPOINT_FILE,
            self.network,
            key=(entry.key if entry and entry.key else VERSION_KEYS["ce"]),
            raw_config=entry.raw_config if entry else _config_dict(self.network.config),
            decoder_state=entry.decoder_state if entry else {},
        )
        ordered = sorted(self.gene_index.items(), key=lambda kv: kv[1])
        pd.DataFrame(ordered, columns=pd.Index(["gene_name", "index"])).to_csv(
            directory / GENE_INDEX_FILE, sep="\t", index=False
        )

    def settings(self) -> dict[str, Any]:
        """Return the cache-key settings plus the pooled parts."""
        return {**super().settings(), "pooled_parts": list(POOLED_PARTS)}


def _config_dict(config: ScFoundationConfig) -> dict[str, Any]:
    """Return a flat reference-style config for ``config`` (random-init models without a file)."""
    if config.raw:
        return dict(config.raw)
    return {
        **{k: v for k, v in RELEASED_CONFIG.items() if k not in ("encoder",)},
        "seq_len": config.seq_len,
        "bin_num": config.bin_num,
        "bin_alpha": config.bin_alpha,
        "pad_token_id": config.pad_token_id,
        "mask_token_id": config.mask_token_id,
        "encoder": {
            "module_type": "transformer",
            "hidden_dim": config.hidden_dim,
            "depth": config.depth,
            "heads": config.heads,
        },
    }


def _find_file(path: Path, name: str) -> Path | None:
    """``path`` itself, or ``name`` in ``path`` (a folder) or beside it / one level up."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def _check_kind(
    kind: str,
    *,
    context: LoadContext,
    options: ScFoundationOptions,
    where: str,
    obs: pd.DataFrame,
) -> None:
    """Refuse values that ``pre_normalized`` does not fit, and mode A without its totals."""
    mode = resolve_mode(
        kind, options.pre_normalized, allow_normalized=context.allow_normalized, where=where
    )
    check_totals_column(mode, obs, options.total_counts_key)


def _describe(path: Path, *, context: LoadContext, options: ScFoundationOptions) -> ModelLayout:
    """Poolings only: the number of layers is stored with the weights, in ``models.ckpt``."""
    del path, context, options
    return ModelLayout(ScFoundationModel.poolings)


@register_model("scfoundation", ScFoundationOptions, check_kind=_check_kind, describe=_describe)
def load_scfoundation(
    path: Path, *, context: LoadContext, options: ScFoundationOptions, random_init: bool
) -> ScFoundationModel:
    """Load the released scFoundation checkpoint (``models.ckpt``) as a frozen encoder.

    Called through its :class:`~scfmbench.models.loading.ModelLoader`, e.g.
    ``load_scfoundation(folder, tgthighres="a5")``.

    Parameters
    ----------
    path
        ``models.ckpt`` or the folder holding it.
    context
        ``gene_column``: ``adata.var`` column with gene symbols; ``allow_normalized``: treat
        non-count input as ``pre_normalized="T"`` (with a warning) when ``pre_normalized`` is
        not given; ``seed``: seed of the random-init control.
    options
        Checkpoint entry, gene index and preprocessing (:class:`ScFoundationOptions`).
    random_init
        Same architecture and preprocessing, PyTorch default initialisation (seeded by
        ``context.seed``); model id ``scfoundation-random``. Uses the checkpoint's config when
        the file exists, else the released architecture.

    Returns
    -------
    ScFoundationModel
        The model in eval mode on the CPU.

    Raises
    ------
    CheckpointError
        Missing/corrupt file, unknown layout, weights that do not fit.
    """
    path = Path(path).expanduser()
    seed = context.seed
    version, gene_index = options.version, options.gene_index
    checkpoint = path if path.is_file() else path / CHECKPOINT_FILE
    index_path = Path(gene_index).expanduser() if gene_index else _find_file(path, GENE_INDEX_FILE)
    if index_path is None or not index_path.is_file():
        raise CheckpointError(
            f"no scFoundation gene index {GENE_INDEX_FILE} found at {index_path or path} or "
            "beside the checkpoint; pass gene_index= (the file ships with the scFoundation "
            "repository)."
        )
    genes = read_gene_index(index_path)
    entry: CheckpointEntry | None = None
    if random_init:
        if checkpoint.is_file():
            config = read_checkpoint(checkpoint, version=version).config
        else:
            config = ScFoundationConfig.from_dict(RELEASED_CONFIG, source="released architecture")
            logger.info(
                "scfoundation: no %s at %s; random control uses the released architecture",
                CHECKPOINT_FILE,
                path,
            )
        network = random_encoder(config, seed=seed)
        sha = hash_json({"random_init": seed, "config": repr(config)})
        logger.info("scfoundation: random-init control (seed %d), %s", seed, config.summary())
    else:
        entry = read_checkpoint(checkpoint, version=version)
        network = ScFoundationEncoder(entry.config)
        load_encoder_state(network, entry, source=str(checkpoint))
        sha = hash_file(checkpoint)
        logger.info("scfoundation: loaded %s (%s)", checkpoint, entry.config.summary())
    return ScFoundationModel(
        network.eval(),
        gene_index=genes,
        model_dir=checkpoint.parent,
        checkpoint_sha256=sha,
        random_init=random_init,
        options=options,
        context=context,
        entry=entry,
    )
