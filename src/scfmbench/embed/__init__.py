"""The embedding engine, blind to which model it runs: length-sorted batching, the layer
cache, and streaming over files larger than memory.

The models themselves (adapters, networks, tokenizers) live in :mod:`scfmbench.models`.
"""

from scfmbench.embed.engine import (
    EmbeddingCache,
    collate,
    embed,
    embed_tokens,
    length_sorted_batches,
    parse_batch_size,
)
from scfmbench.embed.stream import StreamedEmbeddings, embed_h5ad

__all__ = [
    "EmbeddingCache",
    "StreamedEmbeddings",
    "collate",
    "embed",
    "embed_h5ad",
    "embed_tokens",
    "length_sorted_batches",
    "parse_batch_size",
]
