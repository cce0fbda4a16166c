"""Foundation-model adapters and the shared embedding engine."""

from scfmbench.embed import (
    _geneformer,  # noqa: F401  (registers "geneformer")
    _scfoundation,  # noqa: F401  (registers "scfoundation")
    _scgpt,  # noqa: F401  (registers the "scgpt" model)
)
from scfmbench.embed._engine import (
    EmbeddingCache,
    collate,
    embed,
    embed_tokens,
    length_sorted_batches,
)
from scfmbench.embed.base import MODELS, Embeddings, FoundationModel, PaddedBatch, TokenizedCells

__all__ = [
    "MODELS",
    "EmbeddingCache",
    "Embeddings",
    "FoundationModel",
    "PaddedBatch",
    "TokenizedCells",
    "collate",
    "embed",
    "embed_tokens",
    "length_sorted_batches",
]
