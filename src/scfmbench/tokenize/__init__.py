"""Tokenizers: turn an AnnData expression matrix into model token sequences."""

# Geneformer
from scfmbench.tokenize._geneformer import (
    GeneformerDictionaries,
    GeneformerTokenizer,
    GeneMapping,
    map_genes,
    rank_value_tokens,
    tokenize_cell_loop,
    tokenize_loop,
)

__all__ = [
    # Geneformer
    "GeneMapping",
    "GeneformerDictionaries",
    "GeneformerTokenizer",
    "map_genes",
    "rank_value_tokens",
    "tokenize_cell_loop",
    "tokenize_loop",
]
