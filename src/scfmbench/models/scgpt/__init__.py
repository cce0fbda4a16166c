"""scGPT (Cui et al. 2024; the scGPT_human checkpoint layout): adapter, network and tokenizer."""

from scfmbench.models.scgpt import adapter  # noqa: F401  (registers "scgpt")
