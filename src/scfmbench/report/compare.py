"""Compare runs: one table of accuracy / macro F1 per method (rows) and run (columns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scfmbench._atomic import check_writable, write_text
from scfmbench.errors import RunDirError
from scfmbench.report.tables import (
    DASH,
    Cell,
    Section,
    Table,
    interval,
    is_control,
    mean_sd,
    method_label,
    num,
    render_html,
    render_markdown,
    text,
)
from scfmbench.results import read_config, read_metrics

logger = logging.getLogger(__name__)

CONFIG_KEYS = (
    "design",
    "n_splits",
    "n_repeats",
    "seed",
    "n_hvg",
    "n_pcs",
    "baselines",
    "probes",
    "models",
)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Name each run's column by its folder (with its parent, then an index, when repeated).

    The folder, not ``run.name`` in metrics.json, names a run: a folder copied or renamed
    keeps its old ``run.name``, and two such copies would otherwise share a label.
    """
    names = [d.resolve().name for d in run_dirs]
    labels = [
        f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names, strict=True)
    ]
    return [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def run_design(metrics: dict, config: dict) -> str:
    """Describe in words the design a run's scores come from.

    ``config.yaml`` holds the random-split design (``cv``, ``study``) even for a held-out
    group run and a transfer, so the design is read from metrics.json: a held-out-group run
    is ``holdout by KEY (N folds)`` (a directed shift ``holdout by KEY: A → B``), a transfer
    ``transfer (K training seeds)``.
    """
    if is_transfer(metrics):
        first = next(iter(metrics["transfer"]["directions"].values()), {})
        seeds = first.get("training_seeds") or []
        return f"transfer ({len(seeds)} training seeds)"
    holdout = metrics.get("holdout")
    if holdout and holdout.get("train_groups"):
        train, test = (", ".join(holdout[k]) for k in ("train_groups", "test_groups"))
        return f"holdout by {holdout['key']}: {train} → {test}"
    if holdout:
        return f"holdout by {holdout['key']} ({holdout['n_folds']} folds)"
    design = metrics["run"].get("design") or {}
    return str(design.get("name") or config.get("design") or DASH)


def _listed(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if value else "none"
    return DASH if value is None else str(value)


def is_transfer(metrics: dict) -> bool:
    """Return whether ``metrics`` is a transfer run's document (``run.kind == "transfer"``)."""
    return metrics["run"].get("kind") == "transfer"


def transfer_table(runs: list[tuple[str, Path, dict, dict | None]]) -> Table:
    """Tabulate the transfer runs: one row per direction (train → target) and method.

    Each cell is a run's target macro F1 (mean over training seeds) and its 95% interval;
    "—" where a run lacks that direction or method.
    """
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    kinds: dict[str, dict] = {}
    for label, _, metrics, _ in runs:
        for train, row in metrics["transfer"]["matrix"].items():
            for target, per_method in row.items():
                for name, scores in per_method.items():
                    rows.setdefault((f"{train} → {target}", name), {})[label] = scores
                    kinds.setdefault(name, scores)
    columns = ["direction", "method"]
    for label, *_ in runs:
        columns += [f"{label} macro F1", f"{label} macro F1 95% CI"]
    table = Table(
        "compare-transfer",
        columns,
        caption="Target cells, macro F1: mean over training seeds and 95% interval",
    )
    for (direction, name), per_run in rows.items():
        row = [text(direction), text(method_label(name, kinds[name]))]
        for label, *_ in runs:
            scores = per_run.get(label) or {}
            f1 = scores.get("summary", {}).get("macro_f1", {})
            row += [num(scores.get("macro_f1")), interval(f1.get("ci95"))]
        table.rows.append(row)
    return table


def compare_tables(runs: list[tuple[str, Path, dict, dict | None]]) -> list[Section]:
    """Build the comparison's tables.

    The methods × runs table of ``scfmbench run`` runs, the direction × method table of
    ``scfmbench transfer`` runs, and a table of each run's data and key configuration.

    A transfer run is scored on another dataset's cells, a run on held-out folds of its own
    data, so the two kinds never share a column: each gets its own table.
    """
    transfers = [r for r in runs if is_transfer(r[2])]
    within = [r for r in runs if not is_transfer(r[2])]
    sections = _methods_section(within, transfers) if within else []
    if transfers:
        sections.append(
            Section("compare-transfer", "Transfer across runs", tables=[transfer_table(transfers)])
        )
    return [*sections, _runs_section(runs)]


def _methods_section(runs: list, transfers: list) -> list[Section]:
    """Tabulate within-dataset runs: methods × runs (with a note naming transfer runs)."""
    methods: dict[str, str] = {}
    for _, _, metrics, _ in runs:
        for name, entry in metrics["methods"].items():
            if name not in methods or is_control(entry):
                methods[name] = method_label(name, entry)
    columns = ["method"]
    for label, *_ in runs:
        columns += [f"{label} accuracy", f"{label} macro F1"]
    scores = Table("compare", columns, caption="Test set, mean (± sd over splits)")
    for name, shown in methods.items():
        row = [Cell(shown, name, "control" if shown != name else "")]
        for _, _, metrics, _ in runs:
            entry = metrics["methods"].get(name)
            for metric in ("accuracy", "macro_f1"):
                row.append(mean_sd(entry["summary"][metric]) if entry else num(None))
        scores.rows.append(row)
    note = ""
    if transfers:
        note = mixed_runs_line([r[0] for r in transfers])
        logger.warning("warning: %s", note)
    return [Section("compare", "Methods across runs", tables=[scores], note=note)]


def mixed_runs_line(labels: list[str]) -> str:
    """One line on why transfer runs are not columns of the methods × runs table."""
    return (
        f"transfer run(s) {', '.join(labels)} are compared in 'Transfer across runs' only: "
        "they score methods on another dataset's cells, not on held-out folds of the same "
        "data, so their scores are not comparable with the other runs' columns"
    )


def _runs_section(runs: list) -> Section:
    """Each run's data and key configuration."""
    info = Table(
        "runs",
        ["run", "folder", "data", "label key", "cells", "classes", "seeds", "reference", "design"]
        + list(CONFIG_KEYS[1:]),
        caption="Runs: data and key configuration",
    )
    for label, run_dir, metrics, config in runs:
        run, diag = metrics["run"], metrics.get("diagnostics", {})
        config = config or {}
        data, seeds, classes = run.get("data"), run.get("seeds"), run.get("classes")
        if is_transfer(metrics):
            arrow = " ↔ " if len(metrics["transfer"]["directions"]) > 1 else " → "
            data = "transfer: " + arrow.join(map(str, run.get("datasets") or []))
            first = next(iter(metrics["transfer"]["directions"].values()), {})
            seeds, classes = first.get("training_seeds", run.get("seed")), first.get("classes")
        info.rows.append(
            [
                text(label),
                text(str(run_dir)),
                text(data),
                text(run.get("label_key")),
                num(diag.get("n_cells"), 0),
                num(len(classes or []), 0),
                text(_listed(seeds)),
                text(run.get("reference")),
                text(run_design(metrics, config)),
                *[text(_listed(config.get(k))) for k in CONFIG_KEYS[1:]],
            ]
        )
    return Section("runs", "Runs", tables=[info])


def compare_runs(run_dirs: Sequence[Path], *, out: Path | None = None) -> Path:
    """Write ``compare.md`` and a self-contained ``compare.html`` to ``out``; return the HTML.

    ``out`` defaults to ``compare/`` beside the first run directory.

    Raises
    ------
    RunDirError
        No run folder, one given twice, or one that is not a run
        (:func:`~scfmbench.results.read_metrics`).
    ConfigError
        ``out`` (or a folder above it) is a file, or cannot be written; nothing is written.
    """
    if not run_dirs:
        raise RunDirError("no run directories given; pass one or more runs/<name> folders")
    dirs = [Path(d) for d in run_dirs]
    twice = sorted({str(d) for d in dirs if [e.resolve() for e in dirs].count(d.resolve()) > 1})
    if twice:
        raise RunDirError(f"{', '.join(twice)} given twice; pass each run folder once")
    loaded = [(read_metrics(d).to_dict(), read_config(d)) for d in dirs]
    out = Path(out) if out is not None else dirs[0].parent / "compare"
    check_writable(out / "compare.md")  # checks `out` itself, even with a dot in its name
    labels = _labels(dirs)
    runs = [(lab, d, m, c) for lab, d, (m, c) in zip(labels, dirs, loaded, strict=True)]
    sections = compare_tables(runs)
    title = f"scfmbench comparison — {len(runs)} runs"
    write_text(out / "compare.md", render_markdown(title, sections))
    html = out / "compare.html"
    write_text(html, render_html(title, sections, subtitle=", ".join(labels)))
    logger.debug("wrote %s and compare.md", html)
    return html
