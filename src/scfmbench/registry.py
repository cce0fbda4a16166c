"""Name → factory registries for models and probes; adding one is one decorated function."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from scfmbench.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A named collection of factories, e.g. ``PROBES.get("logreg")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its object under ``name``.

        Raises
        ------
        ValueError
            ``name`` is registered twice.
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or raise a ConfigError listing the choices."""
        if name not in self._entries:
            choices = sorted(self._entries)
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose from {', '.join(choices)}."
                + did_you_mean(name, choices)
            )
        return self._entries[name]

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        """Tell whether ``name`` is registered."""
        return name in self._entries
