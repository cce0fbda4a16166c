"""Defaults shared by layers below the run configuration (read, never restated, elsewhere)."""

DEFAULT_SEED = 42
"""The seed of splits, probes, random-init controls, tokenization and fine-tuning unless set
(the study's seed); every command and function defaults to it."""
