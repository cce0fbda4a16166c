"""The embedding engine, blind to which model it runs.

Length-sorted batching, the layer cache, and streaming over files larger than memory.

The models themselves (adapters, networks, tokenizers) live in :mod:`scfmbench.models`.
Every embedding setting and its default is in :class:`EmbedOptions` (:data:`EMBED_DEFAULTS`).
"""

from typing import TYPE_CHECKING

from scfmbench._lazy import lazy_attributes

if TYPE_CHECKING:
    from scfmbench.embed.batching import collate, length_sorted_batches
    from scfmbench.embed.cache import EmbeddingCache
    from scfmbench.embed.distributed import resolve_device
    from scfmbench.embed.engine import embed, embed_tokens, resolve_layer_pooling
    from scfmbench.embed.launch import env_rank, env_world_size, should_stream
    from scfmbench.embed.options import EMBED_DEFAULTS, BatchSize, EmbedOptions, parse_batch_size
    from scfmbench.embed.stream import StreamedEmbeddings, embed_h5ad

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

LAZY = {
    "collate": "scfmbench.embed.batching",
    "length_sorted_batches": "scfmbench.embed.batching",
    "EmbeddingCache": "scfmbench.embed.cache",
    "resolve_device": "scfmbench.embed.distributed",
    "env_rank": "scfmbench.embed.launch",
    "env_world_size": "scfmbench.embed.launch",
    "should_stream": "scfmbench.embed.launch",
    "embed": "scfmbench.embed.engine",
    "embed_tokens": "scfmbench.embed.engine",
    "resolve_layer_pooling": "scfmbench.embed.engine",
    "EMBED_DEFAULTS": "scfmbench.embed.options",
    "BatchSize": "scfmbench.embed.options",
    "EmbedOptions": "scfmbench.embed.options",
    "parse_batch_size": "scfmbench.embed.options",
    "StreamedEmbeddings": "scfmbench.embed.stream",
    "embed_h5ad": "scfmbench.embed.stream",
}
"""Imported on first use (PEP 562): the command line and a run without a model read the
light modules (options, launch) without loading torch."""


__getattr__, __dir__ = lazy_attributes(__name__, LAZY)
