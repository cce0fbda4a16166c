"""Tokenizers: turn an AnnData expression matrix into model token sequences."""

from scfmbench.tokenize._geneformer import (
    GeneformerDictionaries,
    GeneformerTokenizer,
    GeneMapping,
    map_genes,
    rank_value_tokens,
    tokenize_cell_loop,
    tokenize_loop,
)
from scfmbench.tokenize._scgpt import bin_csr, bin_values, load_scgpt_vocab, tokenize_scgpt

__all__ = [
    # Geneformer
    "GeneMapping",
    "GeneformerDictionaries",
    "GeneformerTokenizer",
    "map_genes",
    "rank_value_tokens",
    "tokenize_cell_loop",
    "tokenize_loop",
    # scGPT
    "bin_csr",
    "bin_values",
    "load_scgpt_vocab",
    "tokenize_scgpt",
]
