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
    parse_batch_size,
)
from scfmbench.embed._stream import StreamedEmbeddings, embed_h5ad
from scfmbench.embed.base import MODELS, Embeddings, FoundationModel, PaddedBatch, TokenizedCells

__all__ = [
    "MODELS",
    "EmbeddingCache",
    "Embeddings",
    "FoundationModel",
    "PaddedBatch",
    "StreamedEmbeddings",
    "TokenizedCells",
    "collate",
    "embed",
    "embed_h5ad",
    "embed_tokens",
    "length_sorted_batches",
    "parse_batch_size",
]
