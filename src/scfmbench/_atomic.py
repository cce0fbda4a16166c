"""Atomic file writes: write a temporary file beside the target, then rename it into place.

And the check, before any work, that an output folder can be written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from scfmbench.errors import ConfigError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); the result gets the mode of any new file
    tmp.chmod(0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """Return the process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npy(target: Path, array: np.ndarray) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``target`` with ``writer(tmp_path)`` (e.g. ``adata.write_h5ad``)."""
    with atomic_path(target) as tmp:
        writer(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def check_writable(path: Path) -> None:
    """Raise ConfigError when ``path``'s folder cannot be created or written.

    The nearest existing ancestor must be a folder in which a file can be created (tried with
    a temporary folder, removed at once): permission bits alone miss read-only file systems
    and, for root, ``/proc``-like folders.

    Parameters
    ----------
    path : pathlib.Path
        A folder, or a file (then its parent folder is checked).

    Raises
    ------
    ConfigError
        The nearest existing ancestor is a file, or no file can be created in it.
    """
    folder = path.parent if path.suffix else path
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"cannot write to {str(folder)!r}: {str(probe)!r} is a file, not a folder; choose "
            "another output location with --out."
        )
    reason = "permission denied"
    writable = os.access(probe, os.W_OK)
    if writable:
        try:
            with tempfile.TemporaryDirectory(dir=probe, prefix=".scfmbench-check-"):
                pass
        except OSError as exc:
            writable, reason = False, exc.strerror or type(exc).__name__
    if not writable:
        raise ConfigError(
            f"cannot write to {str(folder)!r} ({reason}); choose another "
            "output location with --out."
        )
