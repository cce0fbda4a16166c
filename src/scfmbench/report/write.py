"""Report stage: results.md, report.md/report.html (``write_report``) and the run's figures.

The sections of a report are built once from ``metrics.json`` (and ``config.yaml``) and
rendered both as Markdown and as one self-contained HTML page; each section appears only when
its data exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from scfmbench._atomic import write_text
from scfmbench.hashing import hash_json
from scfmbench.report.classification import (
    confusion_section,
    headline_section,
    per_class_section,
    results_table,
)
from scfmbench.report.embeddings import layers_section, umap_section, zero_shot_section
from scfmbench.report.finetuning import finetune_section, frozen_vs_finetuned_section
from scfmbench.report.provenance import data_section, methods_section, timings_section
from scfmbench.report.studies import holdout_section, label_efficiency_section, transfer_section
from scfmbench.report.tables import Section, markdown_table, render_html, render_markdown
from scfmbench.report.verdict import forest_section, verdict_section, write_forest_figure
from scfmbench.results import read_config, read_metrics
from scfmbench.stages import StageStore, safe_name

logger = logging.getLogger(__name__)

__all__ = [
    "build_sections",
    "load_run",
    "markdown_table",
    "remove_stale_figures",
    "results_table",
    "write_figures",
    "write_report",
    "write_results_markdown",
]


# --------------------------------------------------------------------------- loading


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read a run directory's ``metrics.json`` and (when present) ``config.yaml``.

    The document as :func:`scfmbench.results.read_metrics` reads it (older schemas
    upgraded; RunDirError for a missing folder or an unreadable document), as a mapping, and
    the saved configuration (None without one).
    """
    return read_metrics(run_dir).to_dict(), read_config(run_dir)


# --------------------------------------------------------------------------- sections


def build_sections(
    metrics: dict[str, Any],
    *,
    run_dir: Path | None = None,
    config: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
) -> list[Section]:
    """Build the report's sections in order; optional ones only when their data exists.

    Parameters
    ----------
    metrics : dict
        A run's ``metrics.json`` (as :func:`load_run` reads it).
    run_dir : Path, optional
        The run folder. Without it, the sections that show figures from it (confusion
        matrices, UMAPs, layers, learning curves) are left out, and so is the forest plot.
    config : dict, optional
        The run's resolved ``config.yaml``, listed under "Methods and configuration".
    manifest : dict, optional
        The run's ``manifest.json``: software and hardware lines.

    Returns
    -------
    list of Section
        The verdict, the forest plot, data and diagnostics, methods and the headline tables
        (runs with methods), then each optional section whose data (or figure) exists.
    """
    sections = [*verdict_section(metrics), *forest_section(metrics, run_dir)]
    sections.append(data_section(metrics))
    if metrics["methods"]:  # a transfer run has only its transfer matrix
        sections += [methods_section(metrics, config, manifest), headline_section(metrics)]
    sections += frozen_vs_finetuned_section(metrics)
    sections += per_class_section(metrics)
    if run_dir is not None:
        sections += confusion_section(metrics, run_dir)
    sections += zero_shot_section(metrics)
    if run_dir is not None:
        sections += umap_section(metrics, run_dir)
        sections += layers_section(metrics, run_dir)
    sections += label_efficiency_section(metrics, run_dir)
    sections += transfer_section(metrics)
    sections += holdout_section(metrics)
    if run_dir is not None:
        sections += finetune_section(metrics, run_dir)
    sections += timings_section(metrics)
    return sections


# --------------------------------------------------------------------------- writers


def _title(metrics: dict[str, Any]) -> str:
    return f"scfmbench report — {metrics['run'].get('name', 'run')}"


def write_results_markdown(metrics: dict[str, Any], path: Path) -> None:
    """Write ``results.md``, the short Markdown summary of a run.

    It holds the verdict, Δ macro F1 vs the best baseline, the data diagnostics, then the
    headline table (and the held-out-group drops and label-efficiency table when the run has
    them).

    Parameters
    ----------
    metrics : dict
        The run's ``metrics.json``.
    path : Path
        Where to write it (atomically); the forest plot is looked up in its folder.
    """
    sections = [*verdict_section(metrics), *forest_section(metrics, Path(path).parent)]
    sections += [data_section(metrics), headline_section(metrics), *holdout_section(metrics)]
    sections += label_efficiency_section(metrics)
    write_text(path, render_markdown(f"scfmbench results — {metrics['run']['name']}", sections))


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable %s (%s)", path, exc)
        return None


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` (self-contained) and ``report.md`` from a run's metrics.json.

    Parameters
    ----------
    run_dir : Path
        A folder ``scfmbench run`` (or ``transfer``) wrote; its ``config.yaml`` and
        ``manifest.json`` are shown when present, its figures are embedded.

    Returns
    -------
    Path
        ``run_dir / "report.html"``; ``report.md`` is written beside it.

    Raises
    ------
    RunDirError
        When the folder does not exist or has no readable ``metrics.json``.
    """
    run_dir = Path(run_dir)
    metrics, config = load_run(run_dir)
    sections = build_sections(
        metrics, run_dir=run_dir, config=config, manifest=_read_manifest(run_dir)
    )
    run = metrics["run"]
    subtitle = (
        f"data {run.get('data')} · label {run.get('label_key')} · seeds {run.get('seeds')} · "
        f"scfmbench {metrics.get('scfmbench_version', '?')}"
    )
    write_text(run_dir / "report.md", render_markdown(_title(metrics), sections))
    html_path = run_dir / "report.html"
    write_text(html_path, render_html(_title(metrics), sections, subtitle=subtitle))
    logger.debug("wrote %s and report.md", html_path)
    return html_path


def write_figures(run_dir: Path, metrics: dict[str, Any], *, stages: StageStore) -> None:
    """Draw the confusion matrix of each method (first split) and the forest plot.

    The forest plot shows Δ macro F1 vs the best baseline; UMAPs come from the
    embedding-scores stage instead. A figure whose data did not change since it was drawn
    (recorded in ``stages``) is kept as is; one the run's report does not show (drawn by an
    earlier run in the folder) is removed (:func:`remove_stale_figures`).

    Parameters
    ----------
    run_dir : Path
        The run folder; figures go to ``run_dir / "figures"``.
    metrics : dict
        The run's ``metrics.json``.
    stages : StageStore
        The run's stage store, recording which data each figure was drawn from.
    """
    from scfmbench.report.figures import plot_confusion

    write_forest_figure(run_dir, metrics, stages=stages)
    figures = Path(run_dir) / "figures"
    first_seed = str(metrics["run"]["seeds"][0])
    for name, entry in metrics["methods"].items():
        confusion = entry["splits"][first_seed]["confusion"]
        path = figures / f"confusion_{safe_name(name)}.png"
        key = hash_json(confusion)
        if path.exists() and stages.load(f"figure_{path.stem}", key) is not None:
            continue
        plot_confusion(
            np.asarray(confusion["matrix"]),
            confusion["labels"],
            path,
            title=f"{name} — test split seed {first_seed}",
        )
        stages.save(f"figure_{path.stem}", key, str(path.name))
    remove_stale_figures(Path(run_dir), metrics)


def remove_stale_figures(run_dir: Path, metrics: dict[str, Any] | None) -> list[str]:
    """Remove every figure under ``run_dir / "figures"`` that the run's report does not show.

    They were drawn by an earlier run in the same folder (other methods or models, before
    ``--no-scvi``, a label-efficiency sweep or layer-wise probes this run left out); the
    report would not show them, but the folder would still hold them. The figures' stage
    records are kept: a rerun that draws one again with the same data reuses it.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    metrics : dict or None
        The run's ``metrics.json``: the figures :func:`build_sections` shows from
        ``figures/`` are kept. None, for a run that draws no figures: none are kept.

    Returns
    -------
    list of str
        The names of the figures removed, sorted.
    """
    figures = Path(run_dir) / "figures"
    shown: set[str] = set()
    if metrics is not None:
        sections = build_sections(metrics, run_dir=Path(run_dir))
        shown = {figure.rel for section in sections for figure in section.figures}
    removed = sorted(p.name for p in figures.glob("*.png") if f"figures/{p.name}" not in shown)
    for name in removed:
        (figures / name).unlink()
    if removed:
        logger.info("removed %d figure(s) this run does not draw: %s", len(removed), removed)
    return removed
