"""The run folder: checked writable before any work, its manifest and report written last."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scfmbench.benchmark.rundata import IN_MEMORY
from scfmbench.config import RunConfig
from scfmbench.errors import ConfigError
from scfmbench.report.manifest import write_manifest
from scfmbench.report.write import write_report

__all__ = ["check_writable", "finish_run_directory", "holds_finished_work", "run_directory"]


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


def run_directory(config: RunConfig) -> Path:
    """Return the run's folder, ``config.out / config.name``.

    Raises
    ------
    ConfigError
        The run has no name (:func:`~.pipeline.resolve_config` gives every run one).
    """
    if config.name is None:
        raise ConfigError("the run has no name; pass --name NAME.")
    return Path(config.out) / config.name


def holds_finished_work(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any saved output besides ``config.yaml``."""
    return run_dir.exists() and any(
        path.is_file() and path.name != "config.yaml" for path in run_dir.rglob("*")
    )


def finish_run_directory(
    run_dir: Path, config: RunConfig, *, seeds: list[int], checkpoints: dict[str, str]
) -> None:
    """Write the run manifest and the HTML/Markdown report (last, so they see everything).

    Parameters
    ----------
    run_dir : pathlib.Path
        The run folder.
    config : RunConfig
        The run's settings (its data path goes into the manifest unless in memory).
    seeds : list of int
        The run's split keys.
    checkpoints : dict
        Model id → checkpoint SHA-256.
    """
    data = None if config.data == IN_MEMORY else config.data
    write_manifest(
        run_dir, config=config, data_path_or_none=data, seeds=seeds, checkpoints=checkpoints
    )
    write_report(run_dir)
