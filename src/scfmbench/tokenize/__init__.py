"""Tokenizers: turn an AnnData expression matrix into model token sequences."""

# scGPT
from scfmbench.tokenize._scgpt import bin_csr, bin_values, load_scgpt_vocab, tokenize_scgpt

__all__ = [
    # scGPT
    "bin_csr",
    "bin_values",
    "load_scgpt_vocab",
    "tokenize_scgpt",
]
