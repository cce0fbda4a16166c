"""scFoundation (Hao et al. 2024; the xTrimoGene checkpoint layout): adapter and network."""

from scfmbench.models.scfoundation import adapter  # noqa: F401  (registers "scfoundation")
