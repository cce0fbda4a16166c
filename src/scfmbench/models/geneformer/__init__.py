"""Geneformer (Theodoris et al. 2023; V1 and V2 checkpoints): adapter, network and tokenizer."""

from scfmbench.models.geneformer import adapter  # noqa: F401  (registers "geneformer")
