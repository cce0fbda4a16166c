"""Geneformer adapter: a Hugging Face BERT checkpoint plus the rank-value tokenizer.

A model directory is what Hugging Face ships: ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin`` (``BertForMaskedLM`` or ``BertForSequenceClassification`` weights,
optionally ``module.``-prefixed). The dictionaries are found beside the model folder or above
it (a clone of the Hugging Face repository) and chosen by the model's ``vocab_size``.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anndata import AnnData
from pydantic import field_validator
from safetensors import SafetensorError
from transformers import BertConfig, BertModel

from scfmbench.data.matrix import check_counts_kind
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.hashing import hash_file, hash_json
from scfmbench.models.base import (
    FoundationModel,
    PaddedBatch,
    TokenizedCells,
    masked_mean,
    seeded_init,
)
from scfmbench.models.geneformer.dictionaries import (
    DICTS_FLAG,
    GeneformerDictionaries,
    find_dictionaries,
)
from scfmbench.models.geneformer.tokenizer import GeneformerTokenizer, check_version
from scfmbench.models.loading import LoadContext, ModelLayout, ModelOptions, register_model

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys of the pretraining / fine-tuning heads and buffers that the backbone does not use.
IGNORED_PREFIXES = ("cls.", "classifier.", "pooler.")
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
MAX_LISTED_KEYS = 5


def read_config(model_dir: Path) -> tuple[BertConfig, dict[str, Any]]:
    """Read the model's ``config.json`` as a ``BertConfig`` using SDPA attention, and as is."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {model_dir}; pass a Hugging Face Geneformer directory "
            "(config.json + model.safetensors or pytorch_model.bin)."
        )
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        config = BertConfig.from_dict(raw, attn_implementation="sdpa")
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid BERT config ({exc}); re-download config.json."
        ) from exc
    if raw.get("model_type", "bert") != "bert":
        raise CheckpointError(
            f"{path} has model_type {raw.get('model_type')!r}, not 'bert'; "
            "pass a Geneformer (BERT) checkpoint directory."
        )
    return config, raw


def find_weights(model_dir: Path) -> Path:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` in ``model_dir``."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise CheckpointError(
        f"no weights in {model_dir} (looked for {' and '.join(WEIGHT_FILES)}); download them "
        "from the Geneformer release, or use the random-init control (--model "
        "geneformer-random=DIR; random_init=True in Python)."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or PyTorch weights file; any corruption is a CheckpointError."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as exc:
        raise CheckpointError(
            f"cannot read weights {path} ({type(exc).__name__}: {_first_line(exc)}); "
            "the file is truncated or corrupt, re-download it."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict; re-download it."
        )
    return state


def _first_line(exc: Exception, limit: int = 160) -> str:
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else "no message"


def backbone_state(state: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """Strip the ``module.`` (DDP) and ``bert.`` prefixes; drop known head keys (logged).

    The dropped keys are those of the MLM and classifier heads and unused buffers.
    """
    kept: dict[str, torch.Tensor] = {}
    ignored = []
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    for key, tensor in state.items():
        name = key.removeprefix("bert.")
        if name.startswith(IGNORED_PREFIXES) or name in IGNORED_KEYS:
            ignored.append(key)
        else:
            kept[name] = tensor
    if ignored:
        logger.info(
            "%s: ignoring %d head/buffer keys (e.g. %s)", source.name, len(ignored), ignored[:3]
        )
    return kept


def load_backbone(config: BertConfig, weights: Path) -> BertModel:
    """Build a ``BertModel`` with the weights of ``weights`` (key mismatch: CheckpointError)."""
    network = BertModel(config, add_pooling_layer=False)
    state = backbone_state(read_state_dict(weights), source=weights)
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        problems = [" ".join(p.split()) for p in str(exc).split("\n\t")[1:3]]
        raise CheckpointError(
            f"weights in {weights} do not fit config.json ({'; '.join(problems)}); use the "
            "config.json that came with these weights."
        ) from exc
    missing = [k for k in result.missing_keys if k not in IGNORED_KEYS]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {weights} do not match a BERT backbone: {len(missing)} missing keys "
            f"{missing[:MAX_LISTED_KEYS]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:MAX_LISTED_KEYS]}; pass a Geneformer BertForMaskedLM or "
            "BertForSequenceClassification checkpoint."
        )
    return network


def random_backbone(config: BertConfig, *, seed: int) -> BertModel:
    """Build the architecture with seeded random weights (the global RNG state is untouched)."""
    return seeded_init(lambda: BertModel(config, add_pooling_layer=False), seed=seed)


def poolings_of(tokenizer: GeneformerTokenizer) -> tuple[str, ...]:
    """``("mean", "cls")`` for a tokenizer with a ``<cls>`` token (V2), else ``("mean",)``."""
    return ("mean", "cls") if tokenizer.cls_id is not None else ("mean",)


class GeneformerModel(FoundationModel):
    """Geneformer (V1 or V2): rank-value tokens into a BERT encoder, mean or ``<cls>`` pooling.

    Build with ``load_geneformer``. ``encode`` runs only the encoder layers up to ``layer``
    (0 = embeddings). The defaults are the reference extractor's (``EmbExtractor``): the
    second-to-last layer, pooled as ``emb_mode="cls"`` for V2 (the ``<cls>`` position) and
    ``emb_mode="cell"`` for V1 (mean over gene tokens; V1 has no ``<cls>``).
    """

    name = "geneformer"
    network: BertModel
    pad_token_id = 0
    default_pooling = "mean"
    poolings: tuple[str, ...] = ("mean", "cls")

    def __init__(
        self,
        network: BertModel,
        tokenizer: GeneformerTokenizer,
        *,
        model_dir: Path,
        checkpoint_sha256: str,
        random_init: bool = False,
    ) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.checkpoint_sha256 = checkpoint_sha256
        self.random_init = random_init
        self.pad_token_id = int(network.config.pad_token_id or 0)
        self.version = tokenizer.version
        self.poolings = poolings_of(tokenizer)
        self.default_pooling = "cls" if tokenizer.cls_id is not None else "mean"
        special = [tokenizer.cls_id, tokenizer.eos_id]
        self._special_ids = torch.tensor([t for t in special if t is not None], dtype=torch.long)

    @property
    def n_layers(self) -> int:
        """Number of BERT encoder layers."""
        return int(self.network.config.num_hidden_layers)

    @property
    def default_layer(self) -> int:
        """The second-to-last layer, as the reference ``EmbExtractor``."""
        return self.n_layers - 1

    # ---- fine-tuning hooks -----------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """BERT hidden size."""
        return int(self.network.config.hidden_size)

    def layer_modules(self) -> list[torch.nn.Module]:
        """Return the BERT encoder layers, bottom first."""
        return list(self.network.encoder.layer)

    def embedding_modules(self) -> list[torch.nn.Module]:
        """Return the BERT embeddings module."""
        return [self.network.embeddings]

    def lora_target_modules(self) -> list[str]:
        """Return the attention projections LoRA wraps."""
        return ["query", "key", "value"]

    def save_pretrained(self, directory: Path) -> None:
        """Write a Hugging Face folder plus the tokenizer's dictionaries.

        ``config.json`` + ``model.safetensors`` and the dictionary pickles, so
        ``load_geneformer(directory)`` reads it back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.network.save_pretrained(directory, safe_serialization=True)
        for source in self.tokenizer.dicts.files.values():
            shutil.copyfile(source, directory / Path(source).name)
        logger.debug("geneformer: saved to %s", directory)

    def settings(self) -> dict[str, Any]:
        """Return the cache-key settings plus the version and input size."""
        return {
            **super().settings(),
            "version": self.version,
            "max_length": self.tokenizer.model_input_size,
        }

    def tokenize(self, adata: AnnData, *, seed: int = DEFAULT_SEED) -> TokenizedCells:
        """Rank-value tokens of ``adata.X`` (raw counts); deterministic, ``seed`` is unused."""
        return self.tokenizer.tokenize(adata)

    def hidden_states(self, batch: PaddedBatch, *, layer: int) -> torch.Tensor:
        """Hidden states (B, L, hidden) after ``layer`` encoder layers (negative: from the end)."""
        states = self.layer_states(batch, up_to=layer % (self.n_layers + 1))
        return deque(states, maxlen=1)[0]  # the last, earlier layers freed on the way

    def layer_states(self, batch: PaddedBatch, *, up_to: int) -> Iterator[torch.Tensor]:
        """Hidden states (B, L, hidden) after 0, 1, …, ``up_to`` encoder layers, in turn."""
        hidden = self.network.embeddings(input_ids=batch.input_ids)
        yield hidden
        mask = batch.attention_mask
        attend = None if bool(mask.all()) else mask[:, None, None, :]
        for block in self.network.encoder.layer[:up_to]:
            out = block(hidden, attend)
            hidden = out[0] if isinstance(out, tuple) else out
            yield hidden

    def pool(self, hidden: torch.Tensor, batch: PaddedBatch, *, pooling: str) -> torch.Tensor:
        """Mean over gene tokens, or the ``<cls>`` position: (B, L, hidden) → (B, hidden)."""
        if pooling not in self.poolings:
            raise ConfigError(
                f"pooling {pooling!r} is not available for Geneformer {self.version}; "
                f"choose from {self.poolings}."
            )
        if pooling == "cls":
            return hidden[:, 0]
        genes = batch.attention_mask & ~torch.isin(
            batch.input_ids, self._special_ids.to(batch.input_ids.device)
        )
        return masked_mean(hidden, genes)

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        """Cell embeddings (B, hidden): mean over gene tokens, or the ``<cls>`` position."""
        return self.pool(self.hidden_states(batch, layer=layer), batch, pooling=pooling)


class GeneformerOptions(ModelOptions):
    """Options of the Geneformer loader (``model_options: {geneformer: {...}}``).

    Attributes
    ----------
    dicts : Path, GeneformerDictionaries or None
        Dictionary folder (``--geneformer-dicts``) or loaded dictionaries; default (``None``):
        found beside or above the model folder and chosen by ``vocab_size``
        (:func:`~scfmbench.models.geneformer.dictionaries.find_dictionaries`).
    version : {"V1", "V2"} or None
        Overrides the version detected from the dictionaries (default ``None``: detected).
    """

    dicts: Path | GeneformerDictionaries | None = None
    version: str | None = None

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: str | None) -> str | None:
        return None if value is None else check_version(value)


def _check_kind(
    kind: str,
    *,
    context: LoadContext,
    options: GeneformerOptions,
    where: str,
    obs: pd.DataFrame,
) -> None:
    """Refuse non-count values unless ``allow_normalized``, as the tokenizer does."""
    del options, obs
    check_counts_kind(
        kind, model="geneformer", allow_normalized=context.allow_normalized, where=where
    )


def _read_settings(
    model_dir: Path, context: LoadContext, options: GeneformerOptions
) -> tuple[BertConfig, dict[str, Any], GeneformerTokenizer]:
    """Read config.json and the dictionaries (not the weights): config, raw config, tokenizer."""
    if not model_dir.is_dir():
        state = "is a file, not a folder" if model_dir.exists() else "does not exist"
        raise CheckpointError(
            f"Geneformer model directory {model_dir} {state}; pass the downloaded "
            "Hugging Face folder (config.json + model.safetensors or pytorch_model.bin)."
        )
    config, raw_config = read_config(model_dir)
    dicts = options.dicts
    if not isinstance(dicts, GeneformerDictionaries):
        dicts = find_dictionaries(model_dir, vocab_size=config.vocab_size, dicts_dir=dicts)
    if config.vocab_size != len(dicts.token_dict):
        raise CheckpointError(
            f"{model_dir / 'config.json'} has vocab_size {config.vocab_size} but "
            f"{dicts.files['token_dictionary']} has {len(dicts.token_dict)} tokens; pass the "
            f"dictionaries of this model's corpus with {DICTS_FLAG} (V1: gc30M, V2: gc95M/gc104M)."
        )
    tokenizer = GeneformerTokenizer(
        dicts,
        version=options.version,
        max_position_embeddings=config.max_position_embeddings,
        gene_column=context.gene_column,
        allow_normalized=context.allow_normalized,
    )
    return config, raw_config, tokenizer


def _describe(path: Path, *, context: LoadContext, options: GeneformerOptions) -> ModelLayout:
    """Poolings (``cls`` with V2's ``<cls>`` token only) and layers, without the weights."""
    config, _, tokenizer = _read_settings(Path(path), context, options)
    return ModelLayout(poolings_of(tokenizer), int(config.num_hidden_layers))


@register_model("geneformer", GeneformerOptions, check_kind=_check_kind, describe=_describe)
def load_geneformer(
    path: Path, *, context: LoadContext, options: GeneformerOptions, random_init: bool
) -> GeneformerModel:
    """Load a Geneformer checkpoint directory (or its random-init control).

    Called through its :class:`~scfmbench.models.loading.ModelLoader`, e.g.
    ``load_geneformer(path, random_init=True, gene_column="gene_ids", seed=3)``.

    Parameters
    ----------
    path
        Hugging Face model directory: ``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``.
    context
        ``gene_column``: var column with gene identifiers, e.g. ``"gene_ids"`` (Ensembl IDs);
        ``allow_normalized``: tokenize non-count input with a warning instead of failing;
        ``seed``: seed of the random-init control.
    options
        Dictionaries and version (:class:`GeneformerOptions`).
    random_init
        Build the same architecture with random weights seeded by ``context.seed`` (the
        control; weights are not read, ``model_id`` is ``geneformer-random``).

    Returns
    -------
    GeneformerModel
        The model in eval mode on the CPU.

    Raises
    ------
    CheckpointError
        Missing/corrupt config, weights or dictionaries, or a vocabulary size that does not
        match the token dictionary.
    """
    model_dir = Path(path)
    config, raw_config, tokenizer = _read_settings(model_dir, context, options)
    seed = context.seed
    if random_init:
        network = random_backbone(config, seed=seed)
        sha = hash_json({"config": raw_config, "seed": seed, "init": "random"})
    else:
        weights = find_weights(model_dir)
        network = load_backbone(config, weights)
        sha = hash_file(weights)
    logger.info(
        "geneformer %s: %d layers, hidden %d, %s",
        tokenizer.version,
        config.num_hidden_layers,
        config.hidden_size,
        "random init" if random_init else f"weights sha256 {sha[:12]}",
    )
    return GeneformerModel(
        network, tokenizer, model_dir=model_dir, checkpoint_sha256=sha, random_init=random_init
    )
