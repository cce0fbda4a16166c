"""Compare runs: one table of accuracy / macro F1 per method (rows) and run (columns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scfmbench._atomic import write_text
from scfmbench._tables import DASH, Cell, Section, Table, num, render_html, render_markdown, text
from scfmbench.errors import RunDirError
from scfmbench.report import is_control, load_run, mean_sd, method_label

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


def _labels(run_dirs: list[Path], names: list[str]) -> list[str]:
    """Run names, made unique with their parent folder (then an index) when they repeat."""
    labels = [
        f"{d.parent.name}/{n}" if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names, strict=True)
    ]
    return [f"{lab} #{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _listed(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if value else "none"
    return DASH if value is None else str(value)


def compare_tables(runs: list[tuple[str, Path, dict, dict | None]]) -> list[Section]:
    """The methods × runs table and a table of each run's data and key configuration."""
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
    info = Table(
        "runs",
        ["run", "folder", "data", "label key", "cells", "classes", "seeds", "reference"]
        + list(CONFIG_KEYS),
        caption="Runs: data and key configuration",
    )
    for label, run_dir, metrics, config in runs:
        run, diag = metrics["run"], metrics.get("diagnostics", {})
        config = config or {}
        info.rows.append(
            [
                text(label),
                text(str(run_dir)),
                text(run.get("data")),
                text(run.get("label_key")),
                num(diag.get("n_cells"), 0),
                num(len(run.get("classes") or []), 0),
                text(_listed(run.get("seeds"))),
                text(run.get("reference")),
                *[text(_listed(config.get(k))) for k in CONFIG_KEYS],
            ]
        )
    return [
        Section("compare", "Methods across runs", tables=[scores]),
        Section("runs", "Runs", tables=[info]),
    ]


def compare_runs(run_dirs: Sequence[Path], *, out: Path | None = None) -> Path:
    """Write ``compare.md`` and a self-contained ``compare.html`` to ``out``; return the HTML.

    ``out`` defaults to ``compare/`` beside the first run directory.
    """
    if not run_dirs:
        raise RunDirError("no run directories given; pass one or more runs/<name> folders")
    dirs = [Path(d) for d in run_dirs]
    loaded = [load_run(d) for d in dirs]
    labels = _labels(
        dirs, [m["run"].get("name", d.name) for d, (m, _) in zip(dirs, loaded, strict=True)]
    )
    runs = [(lab, d, m, c) for lab, d, (m, c) in zip(labels, dirs, loaded, strict=True)]
    sections = compare_tables(runs)
    out = Path(out) if out is not None else dirs[0].parent / "compare"
    title = f"scfmbench comparison — {len(runs)} runs"
    write_text(out / "compare.md", render_markdown(title, sections))
    html = out / "compare.html"
    write_text(html, render_html(title, sections, subtitle=", ".join(labels)))
    logger.debug("wrote %s and compare.md", html)
    return html
