"""The run folder: checked writable before any work, its manifest and report written last."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from scfmbench._atomic import check_writable  # re-exported; compare checks --out with it too
from scfmbench.benchmark.rundata import IN_MEMORY
from scfmbench.config import RunConfig
from scfmbench.data.splits import labels_hash
from scfmbench.errors import ConfigError
from scfmbench.report.manifest import write_manifest
from scfmbench.report.write import write_report
from scfmbench.results import read_config

__all__ = [
    "check_folder_kind",
    "check_same_data",
    "check_writable",
    "finish_run_directory",
    "holds_finished_work",
    "run_directory",
]


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


def check_same_data(run_dir: Path, labels: pd.Series) -> None:
    """Refuse to resume, in ``run_dir``, a run made on other cells or labels.

    A run folder resumes its finished stages when the same command is rerun; its saved
    ``splits/splits.json`` records a hash of the cells and labels it was made from. Other
    data would leave the old run's files beside the new ones, so the run stops before
    writing anything. Changed settings on the same data are rerun, not refused.

    Parameters
    ----------
    run_dir : pathlib.Path
        The run folder (need not exist).
    labels : pandas.Series
        Cell type of each of the new run's cells, indexed by cell name.

    Raises
    ------
    ConfigError
        ``run_dir`` holds splits of other cells or labels.
    """
    index_path = run_dir / "splits" / "splits.json"
    try:
        saved = json.loads(index_path.read_text()).get("data_hash")
    except (OSError, ValueError, AttributeError):
        return  # no finished splits: nothing to mix with
    if saved is None or saved == labels_hash(labels):
        return
    try:
        data = read_config(run_dir) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    data = data if isinstance(data, dict) else {}
    saved = str(data.get("data") or "unknown file")
    if data.get("label_key"):
        saved += f", label key {data['label_key']!r}"
    raise ConfigError(
        f"{run_dir} holds a run of other cells or labels ({saved}); give another --name, or "
        "remove the folder"
    )


def check_folder_kind(run_dir: Path, kind: str, *, direction_dirs: list[str] | None = None) -> None:
    """Refuse to write a run into a transfer's folder, or a transfer into another folder.

    A folder's kind is read from its ``metrics.json`` (``run.kind``) or, for an unfinished
    one, from what it holds: ``directions/`` (a transfer's saved fits) or ``splits/`` (a
    run's). A transfer also refuses the folder of a transfer between other datasets (its
    ``directions/`` hold folders other than ``direction_dirs``): their fits would stay beside
    the new ones.

    Parameters
    ----------
    run_dir : pathlib.Path
        The folder to write (need not exist).
    kind : {"run", "transfer"}
        What is about to be written.
    direction_dirs : list of str, optional
        A transfer's folders under ``directions/`` (one per direction).

    Raises
    ------
    ConfigError
        ``run_dir`` holds the other kind of output, or a transfer of other datasets.
    """
    held = _folder_kind(run_dir)
    fix = "give another --name, or remove the folder"
    if held is not None and held != kind:
        raise ConfigError(f"{run_dir} holds a {held}, not a {kind}; {fix}.")
    saved = run_dir / "directions"
    if kind == "transfer" and direction_dirs is not None and saved.is_dir():
        other = sorted(p.name for p in saved.iterdir() if p.name not in direction_dirs)
        if other:
            raise ConfigError(
                f"{run_dir} holds a transfer of other datasets (directions {other}); {fix}."
            )


def _folder_kind(run_dir: Path) -> str | None:
    """``run`` or ``transfer`` for a folder holding one's output, else None."""
    try:
        saved = json.loads((run_dir / "metrics.json").read_text())
        return "transfer" if saved["run"].get("kind") == "transfer" else "run"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if (run_dir / "directions").is_dir():
        return "transfer"
    if (run_dir / "splits").is_dir():
        return "run"
    return None


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
