"""YAML files read by scfmbench (configs, label maps): one line for a file that is not YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scfmbench.errors import ConfigError

__all__ = ["load_yaml_file", "read_yaml"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that sets one key twice (it keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[arg-type]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"sets {key!r} twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    """A key set twice in one mapping; its message says which and where."""


def load_yaml_file(path: Path, what: str = "config file") -> Any:
    """Parse a YAML file; ConfigError (naming ``what``, the line and column) when it is not YAML.

    A folder, a binary file (an ``.h5ad`` given by mistake), an unreadable file or a mapping
    that sets one key twice (YAML would keep the last without a word) is refused with one
    line too.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; pass a YAML file.")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except _DuplicateKey as exc:
        raise ConfigError(f"{what} {str(path)!r} {exc}; keep one of them.") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{what} {str(path)!r} is not a text file (not UTF-8: binary data such as an "
            ".h5ad?); pass a YAML file."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}); check its permissions."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(
            f"{what} {str(path)!r} is not valid YAML{where}: {problem}; fix that line."
        ) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a config file's mapping of option: value.

    Raises
    ------
    ConfigError
        A missing file, one :func:`load_yaml_file` refuses, an empty file (it would run the
        built-in demo data without a word) or one that is not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path.")
    loaded = load_yaml_file(path)
    if loaded is None:
        raise ConfigError(
            f"config file {str(path)!r} is empty; write option: value lines in it (e.g. "
            "data: pbmc3k.h5ad) or leave out --config."
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value.")
    return loaded
