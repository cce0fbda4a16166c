"""A transfer's settings: what it refuses, what it ignores, and its warnings about them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scfmbench.config import RunConfig
from scfmbench.errors import ConfigError

__all__ = ["TRANSFER_IGNORED", "TRANSFER_REFUSED", "transfer_settings", "transfer_warnings"]

TRANSFER_REFUSED = (
    "holdout_key",
    "train_groups",
    "test_groups",
    "reference",
    "finetune",
    "train_sizes",
    "train_size_seeds",
)
"""Run settings that ask for results a transfer does not make: refused, not ignored."""

TRANSFER_IGNORED = ("data", "design", "n_repeats", "layerwise", "batch_key", "backed", "chunk_size")
"""Run settings of a config shared with ``run`` that a transfer has no use for: ignored with
one warning (a transfer reads --train and --test and splits the training data its own way)."""


def transfer_settings(config: RunConfig | None, overrides: dict[str, Any]) -> RunConfig:
    """Return a transfer's settings: ``config`` with the ``overrides`` that were given.

    Parameters
    ----------
    config : RunConfig, optional
        Settings from ``--config``.
    overrides : dict
        RunConfig fields; ``None`` values are not given.

    Returns
    -------
    RunConfig
        The resolved settings.

    Raises
    ------
    ConfigError
        A bad value, or a setting that asks for what a transfer does not make
        (:data:`TRANSFER_REFUSED`, e.g. ``holdout_key``) set to anything but its default.
        Settings it ignores are said by :func:`transfer_warnings`.
    """
    values = config.model_dump() if config is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig.build(values)
    refused = _set_keys(cfg, TRANSFER_REFUSED)
    if refused:
        raise ConfigError(
            f"transfer does not make what {', '.join(refused)} ask for; remove "
            f"{'it' if len(refused) == 1 else 'them'} from the config {TRANSFER_DESIGN}, or "
            "use scfmbench run."
        )
    return cfg


TRANSFER_DESIGN = (
    "(a transfer reads --train and --test, trains on n_splits stratified splits of the "
    "training data and scores every cell of the test data)"
)


def _set_keys(cfg: RunConfig, keys: Iterable[str]) -> list[str]:
    """Return the settings among ``keys`` that ``cfg`` sets to other than their default."""
    return [key for key in keys if getattr(cfg, key) != RunConfig.model_fields[key].default]


def transfer_warnings(cfg: RunConfig) -> list[str]:
    """Warnings about a transfer's settings: those it ignores, and few training seeds.

    Given once the data and label map have been checked, so that an error comes alone.

    Parameters
    ----------
    cfg : RunConfig
        From :func:`transfer_settings`.

    Returns
    -------
    list of str
        Settings in :data:`TRANSFER_IGNORED` (e.g. ``design`` of a config shared with
        ``run``) that are set, and ``n_splits`` below 5.
    """
    found = []
    ignored = _set_keys(cfg, TRANSFER_IGNORED)
    if ignored:
        found.append(f"transfer ignores {', '.join(ignored)} of the config {TRANSFER_DESIGN}")
    if cfg.n_splits < 5:
        seeds = f"only {cfg.n_splits} training seed{'s' if cfg.n_splits > 1 else ''}"
        why = (
            "each 95% interval covers the sampling of target cells only, not retraining"
            if cfg.n_splits == 1
            else "the retraining variance in each 95% interval rests on that many scores "
            "(Student t with few degrees of freedom), so intervals are wide"
        )
        found.append(f"{seeds}: {why}; use --n-splits 5 or more")
    return found
