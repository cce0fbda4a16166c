"""YAML files read by scfmbench (configs, label maps): one line for a file that is not YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from scfmbench.errors import ConfigError

__all__ = ["load_yaml_file"]


def load_yaml_file(path: Path, what: str = "config file") -> Any:
    """Parse a YAML file; ConfigError (naming ``what``, the line and column) when it is not YAML.

    A folder, a binary file (an ``.h5ad`` given by mistake) or an unreadable file is refused
    with one line too.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; pass a YAML file.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
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
