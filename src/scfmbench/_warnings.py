"""Warnings about the data, recorded where a result keeps them (``result.json``, ``uns``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_CHURN = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Libraries' warnings about their own API: given as usual, never kept as about the data."""


@contextmanager
def recording_data_warnings(*, given: set[str] | None = None) -> Iterator[list[str]]:
    """Record the warnings raised inside the block, then give them as usual.

    Parameters
    ----------
    given : set of str or None, default None
        Warnings already given by earlier blocks of the same task (e.g. the chunks of a
        streamed embedding), updated here: a warning in it is recorded but not given again.
        None: give every warning.

    Yields
    ------
    list of str
        Filled when the block ends: each distinct message once, in order, of the warnings
        other than :data:`LIBRARY_CHURN` (e.g. normalized values used because
        ``allow_normalized`` is set).
    """
    kept: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield kept
    for warning in caught:
        seen = f"{warning.category.__name__}: {warning.message}"
        if given is not None and seen in given:
            continue
        if given is not None:
            given.add(seen)
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    about_data = [str(w.message) for w in caught if not issubclass(w.category, LIBRARY_CHURN)]
    kept.extend(dict.fromkeys(about_data))
