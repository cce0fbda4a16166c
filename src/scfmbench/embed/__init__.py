"""The embedding engine, blind to which model it runs.

Length-sorted batching, the layer cache, and streaming over files larger than memory.

The models themselves (adapters, networks, tokenizers) live in :mod:`scfmbench.models`.
Every embedding setting and its default is in :class:`EmbedOptions` (:data:`EMBED_DEFAULTS`).
"""

from scfmbench.embed.batching import collate, length_sorted_batches
from scfmbench.embed.cache import EmbeddingCache
from scfmbench.embed.distributed import env_rank, env_world_size, resolve_device
from scfmbench.embed.engine import embed, embed_tokens, resolve_layer_pooling
from scfmbench.embed.options import EMBED_DEFAULTS, BatchSize, EmbedOptions, parse_batch_size
from scfmbench.embed.stream import StreamedEmbeddings, embed_h5ad, should_stream

__all__ = [
    "EMBED_DEFAULTS",
    "BatchSize",
    "EmbedOptions",
    "EmbeddingCache",
    "StreamedEmbeddings",
    "collate",
    "embed",
    "embed_h5ad",
    "embed_tokens",
    "env_rank",
    "env_world_size",
    "length_sorted_batches",
    "parse_batch_size",
    "resolve_device",
    "resolve_layer_pooling",
    "should_stream",
]
