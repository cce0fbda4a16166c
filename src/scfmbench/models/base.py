"""Shared types for foundation-model adapters: tokenized cells, padded batches, embeddings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from scfmbench.data.genes import GeneMatch
from scfmbench.defaults import DEFAULT_SEED

_Built = TypeVar("_Built")


def seeded_init(build: Callable[[], _Built], *, seed: int) -> _Built:
    """Call ``build`` with torch's CPU generator seeded by ``seed``, then restore its state.

    The random-init controls build their networks this way, so the weights depend on the seed
    alone and the caller's random state is left as it was.

    Parameters
    ----------
    build
        Builds the network (its layers draw their initial weights from the global generator).
    seed
        Seed of the weights.

    Returns
    -------
    object
        What ``build`` returns.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the tokens ``keep`` marks: (B, L, D), (B, L) → (B, D).

    One batched matrix product (no (B, L, D) temporary, so pooling every layer of a pass
    costs little); a row with no kept token gives zeros.
    """
    weights = keep.to(hidden.dtype)
    total = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)
    return total / weights.sum(1, keepdim=True).clamp_min(1.0)


def obsm_key_for(model_id: str) -> str:
    """Where a model's embeddings are written in ``adata.obsm``.

    Parameters
    ----------
    model_id
        ``FoundationModel.model_id``, e.g. ``"geneformer-random"``.

    Returns
    -------
    str
        ``"X_"`` + the id with ``-`` as ``_``: ``geneformer-random`` → ``X_geneformer_random``.
    """
    return f"X_{model_id.replace('-', '_')}"


@dataclass(frozen=True)
class TokenizedCells:
    """Ragged token sequences, one per kept cell, stored flat with offsets.

    Cell ``i`` has tokens ``input_ids[offsets[i]:offsets[i + 1]]`` (and the same slice of
    ``values`` for models that take a value per token, like scGPT).
    """

    input_ids: np.ndarray  # (total_tokens,) int64
    offsets: np.ndarray  # (n_cells + 1,) int64
    obs_names: pd.Index  # the kept cells, in input order
    settings: dict[str, Any]  # everything that changes the tokens; part of the cache key
    values: np.ndarray | None = None  # (total_tokens,) float32, or None
    dropped: pd.Index = field(default_factory=lambda: pd.Index([]))  # cells with no tokens
    gene_match: GeneMatch | None = None

    @property
    def n_cells(self) -> int:
        """Number of kept cells."""
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per cell, shape (n_cells,)."""
        return np.diff(self.offsets)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids (and values) of cell ``i``."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], None if self.values is None else self.values[lo:hi]

    @classmethod
    def from_lists(
        cls,
        ids: list[np.ndarray],
        *,
        obs_names: pd.Index,
        settings: dict[str, Any],
        values: list[np.ndarray] | None = None,
        dropped: pd.Index | None = None,
        gene_match: GeneMatch | None = None,
    ) -> TokenizedCells:
        """Build from one token array (and value array) per cell, flattened with offsets."""
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        flat_ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
        flat_values = None
        if values is not None:
            flat_values = (
                np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
            )
        return cls(
            input_ids=flat_ids,
            offsets=offsets,
            obs_names=obs_names,
            settings=settings,
            values=flat_values,
            dropped=dropped if dropped is not None else pd.Index([]),
            gene_match=gene_match,
        )


@dataclass
class PaddedBatch:
    """A batch padded to its own longest sequence (dynamic padding)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) bool, True for real tokens
    values: torch.Tensor | None = None  # (B, L) float

    def to(self, device: torch.device | str) -> PaddedBatch:
        """Return the batch with every tensor on ``device``."""
        return PaddedBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            values=None if self.values is None else self.values.to(device),
        )


@dataclass(frozen=True)
class Embeddings:
    """Cell embeddings of one model, layer and pooling."""

    matrix: np.ndarray  # (n_cells, dim) float32
    obs_names: pd.Index
    model_id: str
    layer: int
    pooling: str
    checkpoint_sha256: str
    dropped: pd.Index = field(default_factory=lambda: pd.Index([]))
    from_cache: bool = False
    gene_match: GeneMatch | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)  # TokenizedCells.settings
    warnings: list[str] = field(default_factory=list)  # the tokenizer's, about the data


class FoundationModel(ABC):
    """One foundation model: tokenizer + network. Subclasses live in ``embed/_<name>.py``.

    Subclasses set ``name`` (e.g. ``"geneformer"``), register a loader in ``MODELS`` and
    implement ``tokenize`` and ``encode``; batching, caching and progress are shared.
    """

    name: ClassVar[str]
    pad_token_id: int = 0
    pad_value: float = 0.0
    default_pooling: str = "mean"  # may be set per instance (Geneformer V1 vs V2)
    poolings: ClassVar[tuple[str, ...]] = ("mean",)

    model_dir: Path
    checkpoint_sha256: str
    random_init: bool = False
    network: torch.nn.Module

    @property
    def model_id(self) -> str:
        """The model name, with ``-random`` for the random-init control."""
        return f"{self.name}-random" if self.random_init else self.name

    @property
    def obsm_key(self) -> str:
        """The ``adata.obsm`` key of this model's embeddings (:func:`obsm_key_for`)."""
        return obsm_key_for(self.model_id)

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of encoder layers (layer indices run from 0 = embeddings to n_layers)."""

    @property
    @abstractmethod
    def default_layer(self) -> int:
        """The layer the reference extractor uses."""

    @abstractmethod
    def tokenize(self, adata: AnnData, *, seed: int = DEFAULT_SEED) -> TokenizedCells:
        """Turn raw counts (``adata.X``) into token sequences; raise on bad input."""

    @abstractmethod
    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        """Return pooled cell embeddings of shape (B, hidden) for one padded batch."""

    def layer_states(self, batch: PaddedBatch, *, up_to: int) -> Iterator[torch.Tensor]:
        """Token states (B, L, hidden) after 0, 1, …, ``up_to`` encoder layers, in turn.

        Models that override this and ``pool`` get :meth:`encode_layers` in one pass.
        """
        raise NotImplementedError(f"{self.name} does not expose its layer states")

    def pool(self, hidden: torch.Tensor, batch: PaddedBatch, *, pooling: str) -> torch.Tensor:
        """Pool token states (B, L, hidden) of ``batch`` into cell embeddings (B, dim)."""
        raise NotImplementedError(f"{self.name} does not expose its pooling")

    def encode_layers(
        self, batch: PaddedBatch, *, layers: Sequence[int], pooling: str
    ) -> torch.Tensor:
        """Pooled cell embeddings of several layers from one forward pass.

        Each layer's token states are pooled as soon as that layer finishes, so no
        (layers × tokens × hidden) tensor is kept; the forward stops at the deepest layer
        asked for.

        Parameters
        ----------
        batch
            One padded batch of B cells.
        layers
            Layer indices (0 = embeddings … ``n_layers``; negative counts from the end).
        pooling
            One of ``poolings``.

        Returns
        -------
        torch.Tensor
            (len(layers), B, dim): entry ``i`` equals ``encode(batch, layer=layers[i], …)``.
        """
        wanted = [layer % (self.n_layers + 1) for layer in layers]
        try:
            states = self.layer_states(batch, up_to=max(wanted))
        except NotImplementedError:  # a model without layer states: one pass per layer
            return torch.stack([self.encode(batch, layer=w, pooling=pooling) for w in wanted])
        pooled: dict[int, torch.Tensor] = {}
        for depth, hidden in enumerate(states):
            if depth in wanted:
                pooled[depth] = self.pool(hidden, batch, pooling=pooling)
        return torch.stack([pooled[w] for w in wanted])

    # ---- hooks used by the fine-tuning engine (override in each adapter) ----------------

    def layer_modules(self) -> list[torch.nn.Module]:
        """Return the encoder layers in order (frozen from the bottom by ``freeze_layers``)."""
        raise NotImplementedError(f"{self.name} does not expose its encoder layers")

    def embedding_modules(self) -> list[torch.nn.Module]:
        """Token/value/position embedding modules (frozen with ``freeze_embeddings``)."""
        raise NotImplementedError(f"{self.name} does not expose its embedding modules")

    def lora_target_modules(self) -> list[str]:
        """Names of linear sub-modules that LoRA adapters wrap (peft ``target_modules``)."""
        raise NotImplementedError(f"{self.name} does not declare LoRA target modules")

    def make_classifier_head(self, n_classes: int) -> torch.nn.Module:
        """Classification head on the pooled embedding (default: one linear layer)."""
        return torch.nn.Linear(self.hidden_size, n_classes)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled cell embedding."""
        raise NotImplementedError(f"{self.name} does not report its hidden size")

    def save_pretrained(self, directory: Path) -> None:
        """Write the (fine-tuned) network in the model's own on-disk format."""
        raise NotImplementedError(f"{self.name} cannot save itself yet")

    def settings(self) -> dict[str, Any]:
        """Model-side settings that belong in the cache key (override to add more)."""
        return {"model": self.model_id, "checkpoint": self.checkpoint_sha256}
