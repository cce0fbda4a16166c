"""The embedding settings and their one set of defaults.

:class:`EmbedOptions` holds what decides an embedding and how it is computed (layer,
pooling, batch size, token budget, device, precision, seed, chunk size, all-layer pass).
``embed``, ``embed_h5ad`` and ``embed_tokens`` read their keyword defaults from
:data:`EMBED_DEFAULTS`, so a default is stated here only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from scfmbench.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
)
from scfmbench.errors import ConfigError

BatchSize = int | Literal["auto"]

PRECISIONS = ("float32", "bfloat16", "float16")
"""Accepted ``precision`` values; bfloat16 and float16 autocast on CUDA only."""


def parse_batch_size(value: int | str) -> BatchSize:
    """Read a batch size: ``"auto"``, a positive int, or its string form (``"64"``).

    Parameters
    ----------
    value : int or str
        The batch size as given (a CLI string or a number).

    Returns
    -------
    int or "auto"
        ``"auto"`` or the positive int.

    Raises
    ------
    ConfigError
        Anything else (0, negative, a bool, ``"3.5"``, ``"big"``).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ConfigError(
            f"batch size must be a positive integer or 'auto', got {value!r}; "
            "e.g. --batch-size 32 or --batch-size auto."
        )
    return size


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Parameters
    ----------
    precision : str
        ``float32``, ``bfloat16`` or ``float16``.

    Returns
    -------
    str
        ``precision`` unchanged.

    Raises
    ------
    ConfigError
        Any other value.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose float32, bfloat16 or float16.")
    return precision


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
"""Accepted ``device`` settings: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""


def check_device(device: str) -> str:
    """Return ``device`` if it is a device setting :data:`DEVICE_PATTERN` accepts.

    The form only: whether this machine has that GPU is checked when the device is resolved
    (:func:`scfmbench.embed.distributed.resolve_device`).

    Parameters
    ----------
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    str
        ``device`` unchanged.

    Raises
    ------
    ConfigError
        Any other value.
    """
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or auto.")
    return device


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is at least 1.

    Parameters
    ----------
    chunk_size : int
        Cells per chunk.

    Returns
    -------
    int
        ``chunk_size`` unchanged.

    Raises
    ------
    ConfigError
        ``chunk_size`` < 1.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be ≥ 1, got {chunk_size}; e.g. --chunk-size 2048.")
    return chunk_size


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed: the settings shared by ``embed``, ``embed_h5ad`` and the run.

    Built with keywords; the values are checked, and ``batch_size`` given as a string
    (``"64"``, ``"auto"``) is read as the int or ``"auto"``.

    Attributes
    ----------
    layer : int or None, default None
        Encoder layer to pool (0 = embeddings, ``n_layers`` = last, negative counts from
        the end); None: the model's ``default_layer``.
    pooling : str or None, default None
        One of the model's ``poolings``; None: its ``default_pooling``.
    batch_size : int or "auto", default 32
        Cells per batch, or ``"auto"``: start large and halve on out-of-memory (see
        :func:`scfmbench.embed.embed_tokens`).
    max_tokens : int or None, default None
        Most padded tokens (cells × longest cell) per batch; None: no budget.
    device : str, default "auto"
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
    precision : str, default "float32"
        ``float32``, or ``bfloat16`` / ``float16`` autocast on CUDA.
    seed : int, default DEFAULT_SEED (42)
        Seed of tokenizers that draw random numbers (scGPT); part of the cache key.
    chunk_size : int, default 2048
        Cells per saved chunk when caching; cells read at a time when streaming.
    all_layers : bool, default False
        Pool every layer in the same forward pass and cache each (needs a cache folder).

    Raises
    ------
    ConfigError
        An invalid batch size, precision, device or chunk size.
    """

    layer: int | None = None
    pooling: str | None = None
    batch_size: BatchSize = DEFAULT_BATCH_SIZE
    max_tokens: int | None = None
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION
    seed: int = DEFAULT_SEED
    chunk_size: int = DEFAULT_CHUNK_SIZE
    all_layers: bool = False

    def __post_init__(self) -> None:
        """Check the values; read a string ``batch_size``."""
        object.__setattr__(self, "batch_size", parse_batch_size(self.batch_size))
        check_precision(self.precision)
        check_device(self.device)
        check_chunk_size(self.chunk_size)

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> EmbedOptions:
        """Build the options from the entries of ``values`` named like its fields.

        Parameters
        ----------
        values : mapping
            E.g. the keyword arguments of ``embed`` (other entries are ignored).

        Returns
        -------
        EmbedOptions
            The checked options.
        """
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def replace(self, **changes: Any) -> EmbedOptions:
        """Return a copy with ``changes`` applied (and checked).

        Parameters
        ----------
        **changes
            Field name → new value.

        Returns
        -------
        EmbedOptions
            The changed copy.
        """
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """Return the options as keyword arguments of ``embed`` / ``embed_h5ad``.

        Returns
        -------
        dict
            Field name → value, e.g. ``embed(adata, model, **options.as_kwargs())``.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


EMBED_DEFAULTS = EmbedOptions()
"""The defaults of every embedding setting; ``embed`` and ``embed_h5ad`` read theirs here."""
