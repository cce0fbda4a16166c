"""The one place progress bars are made: tqdm on stderr, quiet in a redirected log."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0
"""Seconds between a bar's updates when stderr is not a terminal (a log file, a CI job)."""


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool, **kwargs: Any) -> tqdm:
    """Return a tqdm bar on stderr, off unless ``progress``.

    On a terminal the bar redraws as tqdm's does (at most every 0.1 s). With stderr redirected
    to a file the bar writes at most one update every :data:`LOG_INTERVAL_S` seconds (and its
    last), so a long run's log holds a line of progress per half minute, not ten a second.

    Parameters
    ----------
    iterable : iterable, optional
        What the bar wraps (as ``tqdm(iterable)``); None for a bar updated by hand.
    progress : bool
        Show the bar; False disables it.
    **kwargs
        Passed to :class:`tqdm.tqdm` (``total``, ``desc``, ``unit``, ``initial``, ``leave``).
    """
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        disable=not progress,
        mininterval=0.1 if interactive else LOG_INTERVAL_S,
        maxinterval=10.0 if interactive else LOG_INTERVAL_S,
        **kwargs,
    )
