"""Exception types. Every message is one line: what is wrong, where, what was found, and the fix."""

from __future__ import annotations


class ScfmbenchError(Exception):
    """Base class for errors that the CLI prints as one line and exits with code 2."""


class DataError(ScfmbenchError):
    """The data file cannot be read or its values are unusable (NaN, negative, empty)."""


class SchemaError(ScfmbenchError):
    """A required AnnData slot or column is missing or malformed."""


class GeneMatchError(ScfmbenchError):
    """Too few of the data's genes are in a model's vocabulary."""


class CheckpointError(ScfmbenchError):
    """A model directory or checkpoint file is missing, corrupt or inconsistent."""


class ConfigError(ScfmbenchError):
    """An unknown option, model, probe or an invalid value in the run configuration."""


class SplitError(ScfmbenchError):
    """A stratified split cannot be made (a class too small) or a saved split does not fit."""


class CountsRequiredError(DataError):
    """A count-based model was given normalized, log-transformed or scaled values."""


class RunDirError(ScfmbenchError):
    """A run directory is missing, or lacks (or has an unreadable) metrics.json."""


def setting(key: str) -> str:
    """Name a run setting both ways it can be given: ``train_groups (--train-groups)``.

    Messages about settings use it, since a value may come from a config file or a flag.
    """
    flag = FLAGS.get(key, key.replace("_", "-"))
    return f"{key} (--{flag})"


FLAGS = {"models": "model"}
"""Config keys whose command-line flag is spelt otherwise (``--model`` is given per model)."""
