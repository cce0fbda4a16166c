"""The ``metrics.json`` document of a run or a transfer.

Its one schema version, its typed records, the one writer and the one reader, and the
recomputation of a run's statistics from its predictions table (``scfmbench stats``).

The layout of the document is given in the README (``metrics.json``); this module types its
header and its method entries and keeps the other sections as the mappings they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import pandas as pd
import yaml

from scfmbench._atomic import write_json
from scfmbench._version import __version__
from scfmbench.errors import RunDirError
from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, method_statistics, read_predictions
from scfmbench.evaluation.section_stats import (
    COUNT_KEYS,
    RANDOM_SPLIT_DIR,
    holdout_section,
    recompute_sweep,
    unchecked_sections,
)
from scfmbench.stages import StageStore

__all__ = [
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "MethodEntry",
    "MethodKind",
    "MetricsDocument",
    "StatisticsCheck",
    "check_statistics",
    "differences",
    "document_header",
    "value_differences",
    "read_config",
    "read_metrics",
    "recompute",
    "write_metrics",
]

SCHEMA_VERSION = "2.3"
"""Schema version of every ``metrics.json`` written (runs and transfers); 2.2 added
``skipped``; 2.3 adds each split's ``features``, gives every cv and holdout interval t with
K − 1 df and names a one-test-set holdout's percentile interval in ``run.interval_method``."""
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"

MethodKind = Literal["baseline", "frozen", "control", "finetuned"]
"""What a method is: a baseline, a probe on a frozen pretrained model, the same on its
random-init control, or an end-to-end fine-tuned model (its control is ``control`` too)."""
METHOD_KINDS: tuple[str, ...] = get_args(MethodKind)

_ENTRY_ORDER = (
    "kind",
    "representation",
    "probe",
    "model",
    "splits",
    "warnings",
    "summary",
    "constant_within_class",
    "delta_vs_reference",
    "significance",
)


@dataclass(frozen=True)
class MethodEntry:
    """One method of ``metrics.json["methods"]``.

    Attributes
    ----------
    kind : MethodKind
        ``baseline``, ``frozen``, ``control`` or ``finetuned``.
    model : str or None
        Model id of a foundation-model method (``geneformer``, ``scgpt-random``); None for a
        baseline.
    representation, probe : str or None
        E.g. ``pca`` and ``logreg``; a fine-tuned method's probe is ``finetune``.
    splits : dict
        Split key (str) → that split's scores, ``params``, ``val_macro_f1``, ….
    warnings : list of str, optional
        What changes how a foundation-model method's score reads.
    summary : dict, optional
        Metric → ``{mean, sd, values, ci95, se, df}`` over the splits.
    constant_within_class : bool, optional
        True when one label is predicted per class in every split.
    delta_vs_reference, significance : dict, optional
        Gains over the run's reference; the paired test against the best baseline.
    extra : dict
        Any other key of the entry, kept as read.
    """

    kind: MethodKind
    model: str | None
    representation: str | None = None
    probe: str | None = None
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] | None = None
    summary: dict[str, Any] | None = None
    constant_within_class: bool | None = None
    delta_vs_reference: dict[str, Any] | None = None
    significance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, entry: dict[str, Any]) -> MethodEntry:
        """Read the entry ``name`` of a current-schema document.

        Raises
        ------
        ValueError
            ``entry`` is not a mapping, or its ``kind`` is not a :data:`MethodKind`, or it
            has no ``model`` key.
        """
        if not isinstance(entry, dict):
            raise ValueError(f"method {name!r} is not a mapping")
        kind = entry.get("kind")
        if kind not in METHOD_KINDS:
            raise ValueError(f"method {name!r} has kind {kind!r}, not one of {METHOD_KINDS}")
        if "model" not in entry:
            raise ValueError(f"method {name!r} names no model")
        known = {k: entry[k] for k in _ENTRY_ORDER if k in entry}
        extra = {k: v for k, v in entry.items() if k not in known}
        return cls(**{**known, "kind": cast(MethodKind, kind)}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as written to ``metrics.json`` (unset optional fields left out)."""
        out: dict[str, Any] = {}
        for key in _ENTRY_ORDER:
            value = getattr(self, key)
            if value is not None or key == "model":
                out[key] = value
        return {**out, **self.extra}


@dataclass(frozen=True)
class MetricsDocument:
    """A ``metrics.json`` document.

    Attributes
    ----------
    run : dict
        ``metrics.json["run"]``: name, data, design, seeds, classes, … (``kind`` is
        ``transfer`` in a transfer's document).
    methods : dict
        Method name → :class:`MethodEntry`, in run order (empty for a transfer).
    schema_version, scfmbench_version : str or None
        As recorded (a 1.0 or 2.0 document keeps the version it was written with).
    diagnostics : dict, optional
        The data's (and models') diagnostics.
    comparisons : list of dict, optional
        Every paired test of the run.
    sections : dict
        The other top-level sections, in document order: ``skipped``, ``finetune``,
        ``label_efficiency``, ``holdout``, ``layers``, ``embeddings``, ``transfer``,
        ``timings``.
    """

    run: dict[str, Any]
    methods: dict[str, MethodEntry]
    schema_version: str | None = SCHEMA_VERSION
    scfmbench_version: str | None = __version__
    diagnostics: dict[str, Any] | None = None
    comparisons: list[dict[str, Any]] | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def is_transfer(self) -> bool:
        """Whether the document is a transfer's (``scfmbench transfer``)."""
        return self.run.get("kind") == "transfer"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> MetricsDocument:
        """Read a parsed ``metrics.json`` (schema 1.0, 2.0, 2.1, 2.2 or 2.3).

        Raises
        ------
        ValueError
            No ``run`` mapping, no ``methods`` mapping (outside a transfer), or a bad method
            entry (:meth:`MethodEntry.from_dict`).
        """
        if not isinstance(doc, dict) or not isinstance(doc.get("run"), dict):
            raise ValueError("no 'run'/'methods' entries")
        methods = doc.get("methods", {} if doc["run"].get("kind") == "transfer" else None)
        if not isinstance(methods, dict):
            raise ValueError("no 'run'/'methods' entries")
        header = ("schema_version", "scfmbench_version", "run", "diagnostics", "methods")
        return cls(
            run=doc["run"],
            methods={name: MethodEntry.from_dict(name, e) for name, e in methods.items()},
            schema_version=doc.get("schema_version"),
            scfmbench_version=doc.get("scfmbench_version"),
            diagnostics=doc.get("diagnostics"),
            comparisons=doc.get("comparisons"),
            sections={k: v for k, v in doc.items() if k not in (*header, "comparisons")},
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the document as written to ``metrics.json``."""
        out: dict[str, Any] = {}
        for key in ("schema_version", "scfmbench_version"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["run"] = self.run
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        out["methods"] = {name: entry.to_dict() for name, entry in self.methods.items()}
        if self.comparisons is not None:
            out["comparisons"] = self.comparisons
        return {**out, **self.sections}


def document_header() -> dict[str, str]:
    """Return the first two keys of every document: schema and scfmbench versions."""
    return {"schema_version": SCHEMA_VERSION, "scfmbench_version": __version__}


def write_metrics(run_dir: Path, doc: MetricsDocument | dict[str, Any]) -> Path:
    """Write ``run_dir/metrics.json`` (atomically) and return its path.

    Parameters
    ----------
    run_dir : pathlib.Path
        The run (or transfer) folder.
    doc : MetricsDocument or dict
        The document; a mapping is checked as :meth:`MetricsDocument.from_dict` does.

    Raises
    ------
    ValueError
        A mapping that is not a valid document.
    """
    document = doc if isinstance(doc, MetricsDocument) else MetricsDocument.from_dict(doc)
    path = Path(run_dir) / METRICS_FILE
    write_json(path, document.to_dict())
    return path


def _run_folder(run_dir: Path) -> Path:
    """Return ``run_dir`` as a Path; raise RunDirError when it is a file or does not exist."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunDirError(
            f"{run_dir} is a file, not a run folder; pass the folder that `scfmbench run` "
            "or `scfmbench transfer` wrote (runs/<name>), not a file inside it"
        )
    if not run_dir.is_dir():
        raise RunDirError(
            f"run directory {run_dir} does not exist; pass a folder that "
            "`scfmbench run` or `scfmbench transfer` wrote (runs/<name>)"
        )
    inside = sorted(p.parent.name for p in run_dir.glob(f"*/{METRICS_FILE}"))
    if not (run_dir / METRICS_FILE).exists() and inside:
        shown = ", ".join(str(run_dir / name) for name in inside[:5])
        raise RunDirError(
            f"{run_dir} holds runs, not a run: pass one or more of its run folders ({shown}"
            f"{', …' if len(inside) > 5 else ''})"
        )
    return run_dir


def read_metrics(run_dir: Path) -> MetricsDocument:
    """Read the ``metrics.json`` of a run (or transfer) folder.

    Every schema written so far (1.0, 2.0, 2.1) records each method's ``kind`` and ``model``;
    the sections 2.1 added are optional fields, so all three read as they are.

    Parameters
    ----------
    run_dir : pathlib.Path
        A folder written by ``scfmbench run`` or ``scfmbench transfer``.

    Returns
    -------
    MetricsDocument

    Raises
    ------
    RunDirError
        The path is a file or does not exist, the folder has no ``metrics.json``, or it is not
        valid JSON or not a valid document.
    """
    run_dir = _run_folder(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no metrics.json; run `scfmbench run` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(
            f"{path} is not valid JSON ({exc}); rerun `scfmbench run` to rewrite it"
        ) from None
    try:
        if not isinstance(raw, dict):
            raise ValueError("no 'run'/'methods' entries")
        return MetricsDocument.from_dict(raw)
    except ValueError as exc:
        raise RunDirError(f"{path} has {exc}; rerun `scfmbench run` to rewrite it") from None


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """Read the run's saved ``config.yaml`` (None when the folder has none)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def recompute(run_dir: Path) -> dict[str, Any]:
    """Recompute the statistics of ``run_dir/metrics.json`` from its predictions table.

    Parameters
    ----------
    run_dir : pathlib.Path
        A folder written by ``scfmbench run`` (schema 2.0 or later).

    Returns
    -------
    dict
        The recomputed metrics document (same keys as the stored one).

    Raises
    ------
    RunDirError, DataError
        ``run_dir`` is a file or does not exist, ``metrics.json`` or ``predictions.tsv.gz``
        is missing, the folder is a transfer's, or the table lacks a method (RunDirError);
        the table cannot be read, is truncated or corrupt, or lacks a column (DataError).
    """
    return _recompute(run_dir)[0]


def _recompute(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`recompute`, and the predictions table it read."""
    run_dir = _run_folder(run_dir)
    metrics_path, table_path = run_dir / METRICS_FILE, run_dir / PREDICTIONS_FILE
    for path in (metrics_path, table_path):
        if not path.exists():
            raise RunDirError(
                f"{path} does not exist; point `scfmbench stats` at a finished run directory "
                "(written by scfmbench run, schema 2.0 or later)."
            )
    document = read_metrics(run_dir)
    if document.is_transfer:
        raise RunDirError(
            f"{run_dir} is a transfer run; `scfmbench stats` recomputes runs of `scfmbench run` "
            "only (a transfer's statistics are in its metrics.json['transfer'], its per-cell "
            f"predictions in {PREDICTIONS_FILE})."
        )
    doc = document.to_dict()
    table = read_predictions(table_path)
    missing = sorted(set(doc["methods"]) - set(table["method"]))
    if missing:
        raise RunDirError(f"{table_path} has no predictions for {missing}; rerun the benchmark.")
    return method_statistics(doc, table, seed=doc["run"]["stats_seed"]), table


STATISTICS_KEYS = ("methods", "comparisons")


def value_differences(
    stored: Any, recomputed: Any, path: str = "", *, tol: float = 1e-9
) -> list[tuple[str, Any, Any]]:
    """Where two documents differ, with the two values there.

    Parameters
    ----------
    stored, recomputed : Any
        Two JSON-like values (mappings, lists, numbers, strings, None).
    path : str
        Path of the two values (default: the root).
    tol : float
        Numbers within ``tol`` (absolute) count as equal (default 1e-9); two NaN are equal.

    Returns
    -------
    list of (path, stored value, recomputed value)
        E.g. ``("methods.pca+logreg.summary.macro_f1.ci95[0]", 0.81, 0.82)``; a key only one
        side has gives :data:`ABSENT` on the other.
    """
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = []
        for key in sorted(set(stored) | set(recomputed), key=str):
            where = f"{path}.{key}" if path else str(key)
            out += value_differences(
                stored.get(key, ABSENT), recomputed.get(key, ABSENT), where, tol=tol
            )
        return out
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return [(path, stored, recomputed)]
        out = []
        for i, (a, b) in enumerate(zip(stored, recomputed, strict=True)):
            out += value_differences(a, b, f"{path}[{i}]", tol=tol)
        return out
    numbers = (int, float)
    if (
        isinstance(stored, numbers)
        and isinstance(recomputed, numbers)
        and not isinstance(stored, bool)
        and not isinstance(recomputed, bool)
    ):
        if np.isnan(stored) and np.isnan(recomputed):
            return []
        return [] if abs(stored - recomputed) <= tol else [(path, stored, recomputed)]
    return [] if stored == recomputed else [(path, stored, recomputed)]


ABSENT = "(absent)"


def differences(stored: Any, recomputed: Any, path: str = "", *, tol: float = 1e-9) -> list[str]:
    """Paths where two documents differ (of :func:`value_differences`), e.g. ``run.classes``."""
    return [where for where, *_ in value_differences(stored, recomputed, path, tol=tol)]


@dataclass(frozen=True)
class StatisticsCheck:
    """What ``scfmbench stats`` found.

    Attributes
    ----------
    recomputed : dict
        The recomputed document (``run``, ``methods``, ``comparisons``, and ``holdout`` and
        ``label_efficiency`` when they were recomputed).
    differences : list of (path, stored value, recomputed value)
        Every value that differs (:func:`value_differences`).
    sources : list of str
        The saved files the statistics were recomputed from (relative to the run folder).
    checked : list of str
        The sections compared.
    not_checked : list of str
        Sections and keys present in ``metrics.json`` that were not compared, each with why.
    """

    recomputed: dict[str, Any]
    differences: list[tuple[str, Any, Any]]
    sources: list[str]
    checked: list[str]
    not_checked: list[str]


def check_statistics(run_dir: Path) -> StatisticsCheck:
    """Recompute a run's statistics and compare them with the stored ``metrics.json``.

    ``run``, ``methods`` and ``comparisons`` are recomputed from ``predictions.tsv.gz``;
    ``holdout`` from them and ``random_split/metrics.json`` and
    ``random_split/predictions.tsv.gz`` (the random-split design) with
    ``splits/splits.json``; ``label_efficiency`` (all but the training-cell counts
    ``capped``, ``n_train_cells`` and ``all_cells_per_class``) from the per-draw predictions
    in ``stages/label_efficiency_<method>_seed<key>.json``. A section whose files are
    missing (a run of an earlier version) is listed as not checked, as are ``embeddings``,
    ``layers`` and ``finetune``.

    Parameters
    ----------
    run_dir : pathlib.Path
        A folder written by ``scfmbench run``.

    Returns
    -------
    StatisticsCheck
        Schema 2.0 runs lack the 2.1 annotations, which do not count as differences.

    Raises
    ------
    RunDirError, DataError
        See :func:`recompute`.
    """
    run_dir = Path(run_dir)
    recomputed, table = _recompute(run_dir)  # checks that both files exist
    stored = read_metrics(run_dir).to_dict()
    sources, checked = [PREDICTIONS_FILE], ["run", *STATISTICS_KEYS]
    not_checked = []
    if "holdout" in stored:
        folder = run_dir / RANDOM_SPLIT_DIR
        needed = [folder / METRICS_FILE, folder / PREDICTIONS_FILE]
        if all(path.is_file() for path in needed):
            index = json.loads((run_dir / "splits" / "splits.json").read_text())["holdout"]
            random_doc = recompute(folder)
            recomputed["holdout"] = holdout_section(recomputed, random_doc, index)
            sources.append(f"{RANDOM_SPLIT_DIR}/{PREDICTIONS_FILE}")
            checked.append("holdout")
        else:
            not_checked.append(
                f"holdout (no {RANDOM_SPLIT_DIR}/{METRICS_FILE} and "
                f"{RANDOM_SPLIT_DIR}/{PREDICTIONS_FILE}: rerun the run to save them)"
            )
    if "label_efficiency" in stored:
        block, missing = recompute_sweep(
            stored["label_efficiency"], recomputed, table, StageStore(run_dir)
        )
        if block is None:
            not_checked.append(
                f"label_efficiency (no {missing[0]}{' …' if len(missing) > 1 else ''}: rerun "
                "the run to save it)"
            )
        else:
            recomputed["label_efficiency"] = block
            sources.append("stages/label_efficiency_*.json")
            checked.append("label_efficiency")
            keys = ", ".join(f"label_efficiency.{k}" for k in COUNT_KEYS if k in block)
            not_checked.append(f"{keys} (training-cell counts, not in the saved predictions)")
    not_checked += unchecked_sections(stored)
    diff = []
    for key in checked:
        diff += value_differences(stored.get(key), recomputed.get(key), key)
    if stored.get("schema_version", "2.0") == "2.0":  # schema 2.1 added these annotations
        diff = [d for d in diff if not d[0].endswith((".constant_within_class", "run.warnings"))]
    return StatisticsCheck(recomputed, diff, sources, checked, not_checked)
