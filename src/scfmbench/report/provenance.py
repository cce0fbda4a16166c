"""Sections on where a run's numbers come from.

The data and its diagnostics, the models' checkpoints and vocabulary overlap, the methods and
configuration, the software and hardware, and the time per stage.
"""

from __future__ import annotations

import json
from typing import Any

from scfmbench.report.coverage import coverage_lines
from scfmbench.report.tables import Cell, Section, Table, is_number, method_cell, num, text


def design_text(run: dict[str, Any]) -> str:
    """Say how the test sets were made, in words (schema 1.0 runs: the random splits)."""
    design = run.get("design") or {}
    seeds = run.get("seeds")
    if design.get("name") == "holdout":
        return (
            f"held-out groups: {design['n_folds']} fold(s), each testing every cell of its "
            f"held-out group (training and validation: the other groups); fold keys {seeds}"
        )
    if design.get("name") in ("cv", "repeated-cv"):
        repeats = design.get("n_repeats", 1)
        words = f"{design['n_folds']}-fold stratified cross-validation"
        if repeats > 1:
            words = f"{repeats} × repeated {words}"
        fraction = run.get("val_fraction", (run.get("fractions") or [None, None])[1])
        return (
            f"{words} (disjoint test folds, every cell tested once per repeat; validation "
            f"{fraction} of each class carved from the training folds); fold keys {seeds}"
        )
    fractions = "/".join(map(str, run.get("fractions", [])))
    return (
        f"splits: seeds {seeds} (train/val/test {fractions}; random splits whose test sets "
        "overlap: intervals hold within these splits only)"
    )


def _walk_overlap(node: Any, label: str, found: dict[str, dict]) -> None:
    """Collect gene-overlap records (dicts with ``n_matched``) anywhere in the diagnostics.

    Each record is keyed by the name it sits under: the model id of ``diagnostics["models"]``
    (``geneformer-random``, or ``geneformer (pbmc3k)`` in a transfer), which is the row of the
    models table. The record's own ``model`` field names the tokenizer's family
    (``geneformer`` for the model and its random-init control alike), so it is used only for a
    record that sits under no name.
    """
    if isinstance(node, dict):
        if "n_matched" in node:
            found.setdefault(label or node.get("model") or "", node)
            return
        for key, value in node.items():
            _walk_overlap(value, str(key) if label in ("", "models") else label, found)


def _gene_source(genes: dict[str, Any]) -> Cell:
    """Where a model's gene identifiers came from: ``var['col']`` or ``var_names``, with why."""
    column = genes.get("gene_column")
    if column is None:
        return text(None)
    shown = column if column == "var_names" else f"var[{column!r}]"
    reason = genes.get("gene_column_reason")
    return Cell(f"{shown} ({reason})" if reason else shown, shown)


def models_table(diag: dict[str, Any]) -> Table | None:
    """Tabulate per model: checkpoint, layer, pooling, dropped cells, cache, gene overlap.

    None when the diagnostics name no model and hold no gene-overlap record.
    """
    models = diag.get("models") or {}
    overlap: dict[str, dict] = {}
    _walk_overlap({k: v for k, v in diag.items() if k != "classes"}, "", overlap)
    names = list(dict.fromkeys([*models, *overlap]))
    if not names:
        return None
    table = Table(
        "models",
        [
            "model",
            "checkpoint sha256",
            "layer",
            "pooling",
            "cells without tokens",
            "from cache",
            "gene identifiers",
            "genes matched",
            "fraction of genes",
            "fraction of counts",
        ],
        caption="Foundation models: checkpoint and vocabulary overlap",
    )
    for name in names:
        info, genes = models.get(name, {}), overlap.get(name, {})
        sha = info.get("checkpoint_sha256")
        table.rows.append(
            [
                text(name),
                Cell(sha[:12] + "…", sha) if sha else text(None),
                num(info.get("layer"), 0),
                text(info.get("pooling")),
                num(info.get("n_dropped_cells"), 0),
                text(None if "from_cache" not in info else ("yes" if info["from_cache"] else "no")),
                _gene_source(genes),
                num(genes.get("n_matched"), 0),
                num(genes.get("fraction_genes")),
                num(genes.get("fraction_counts")),
            ]
        )
    return table


def _config_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "null" if value is None else str(value)


def transfer_data_section(metrics: dict[str, Any]) -> Section:
    """Build a transfer run's "Data and diagnostics".

    Both datasets and what each direction shared and dropped; gaps in the label map's
    coverage come first.
    """
    bullets = [
        f"label coverage: {line}"
        for direction, info in metrics["transfer"].get("directions", {}).items()
        for line in coverage_lines(direction, info.get("coverage") or {})
    ]
    diagnostics = metrics.get("diagnostics") or {}
    for name, diag in diagnostics.items():
        if name == "models":  # per model and dataset: the genes matched (table below)
            continue
        bullets.append(
            f"{name}: {diag.get('n_cells')} cells × {diag.get('n_genes')} genes, "
            f"{diag.get('matrix_kind')} from adata.{diag.get('matrix_source')}, "
            f"{diag.get('identifier_type')} identifiers, label column {diag.get('label_key')}"
        )
        bullets += [f"warning ({name}): {w}" for w in diag.get("warnings", [])]
    for direction, info in metrics["transfer"].get("directions", {}).items():
        bullets.append(
            f"{direction}: {info['n_shared_genes']} shared genes, {info['n_train_cells']} "
            f"training and {info['n_test_cells']} test cells; test classes not in training "
            f"(dropped): {info['dropped_test_classes'] or 'none'}"
        )
    section = Section("data", "Data and diagnostics", bullets=bullets)
    models = models_table({"models": diagnostics.get("models") or {}})
    if models is not None:
        section.tables.append(models)
    return section


def data_section(metrics: dict[str, Any]) -> Section:
    """Build "Data and diagnostics": what was read, what was dropped, and why."""
    if metrics["run"].get("kind") == "transfer":
        return transfer_data_section(metrics)
    run, diag = metrics["run"], metrics.get("diagnostics", {})
    bullets = [f"data: {run.get('data')}, label column: {run.get('label_key')}"]
    if "n_cells" in diag:
        bullets.append(
            f"cells × genes used: {diag['n_cells']} × {diag['n_genes']} "
            f"(input {diag.get('n_cells_input')} × {diag.get('n_genes_input')})"
        )
    if "matrix_kind" in diag:
        raw = diag.get("matrix_description") or (
            "raw integer counts" if diag.get("count_source") else "not raw counts"
        )
        bullets.append(
            f"count type: {diag['matrix_kind']} ({raw}) from adata.{diag.get('matrix_source')}"
        )
    if "identifier_type" in diag:
        bullets.append(f"gene identifiers: {diag['identifier_type']}")
    bullets.append(
        f"classes: {len(run.get('classes') or diag.get('classes', {}))}; " + design_text(run)
    )
    bullets += [f"warning: {w}" for w in run.get("warnings", [])]
    dropped = [
        f"{diag[key]} {what}"
        for key, what in (
            ("dropped_cells_no_counts", "cells without counts"),
            ("dropped_cells_missing_label", "cells without a label"),
        )
        if diag.get(key)
    ]
    bullets.append("dropped cells: " + (", ".join(dropped) if dropped else "none"))
    classes_dropped = diag.get("dropped_classes") or {}
    bullets.append(
        "dropped classes: "
        + (", ".join(f"{k} ({v})" for k, v in classes_dropped.items()) or "none")
    )
    if diag.get("renamed_duplicate_genes"):
        bullets.append(f"duplicated gene names made unique: {diag['renamed_duplicate_genes']}")
    bullets += [f"warning: {w}" for w in diag.get("warnings", [])]
    section = Section("data", "Data and diagnostics", bullets=bullets)
    models = models_table(diag)
    if models is not None:
        section.tables.append(models)
    if diag.get("classes"):
        table = Table("classes", ["class", "cells"], caption="Cells per class after validation")
        table.rows = [[text(k), num(v, 0)] for k, v in diag["classes"].items()]
        section.tables.append(table)
    return section


def environment_bullets(manifest: dict[str, Any] | None) -> list[str]:
    """Return the software and hardware lines of ``manifest.json`` (none when it is absent)."""
    if not manifest:
        return []
    own = manifest.get("scfmbench") or {}
    git = own.get("git") or {}
    commit = git.get("commit")
    where = f" (git {commit[:10]}{', modified' if git.get('dirty') else ''})" if commit else ""
    packages = ", ".join(
        f"{k} {v}" for k, v in (manifest.get("packages") or {}).items() if v and k != "scfmbench"
    )
    hw = manifest.get("hardware") or {}
    return [
        f"software: scfmbench {own.get('version')}{where}, python {manifest.get('python')}; "
        + packages,
        f"hardware: {hw.get('cpu')}, {hw.get('cores')} cores, {hw.get('ram_gb')} GB RAM, "
        f"GPU {hw.get('gpu') or 'none'}",
    ]


def methods_section(
    metrics: dict[str, Any],
    config: dict[str, Any] | None,
    manifest: dict[str, Any] | None = None,
) -> Section:
    """Build "Methods and configuration": each method, the software and the resolved config.

    Per method its kind, representation, probe, model, tuned params (first split) and
    validation macro F1; the reference and best baseline; the environment of ``manifest``.
    """
    run = metrics["run"]
    first = str(run["seeds"][0]) if run.get("seeds") else None
    table = Table(
        "methods",
        [
            "method",
            "kind",
            "representation",
            "probe",
            "model",
            f"params (seed {first})",
            "val macro F1",
        ],
        caption="Methods (probes tuned on the validation split)",
    )
    for name, entry in metrics["methods"].items():
        split = entry.get("splits", {}).get(first, {})
        params = split.get("params")
        table.rows.append(
            [
                method_cell(name, entry),
                text(entry.get("kind")),
                text(entry.get("representation")),
                text(entry.get("probe")),
                text(entry.get("model")),
                text(_config_value(params) if params else None),
                num(split.get("val_macro_f1")),
            ]
        )
    bullets = [f"reference for gains: {run.get('reference')}"]
    if run.get("best_baseline"):
        bullets.append(f"best baseline (significance tests): {run['best_baseline']}")
    if metrics.get("scfmbench_version"):
        bullets.append(
            f"scfmbench {metrics['scfmbench_version']}, "
            f"metrics schema {metrics.get('schema_version')}"
        )
    bullets += environment_bullets(manifest)
    section = Section("methods", "Methods and configuration", bullets=bullets, tables=[table])
    if config:
        resolved = Table("config", ["option", "value"], caption="Resolved configuration")
        resolved.rows = [[text(k), text(_config_value(v))] for k, v in config.items()]
        section.tables.append(resolved)
    return section


PEAK_KEYS = ("peak_memory_mb", "peak_rss_mb", "peak_gpu_memory_mb")


def timings_section(metrics: dict[str, Any]) -> list[Section]:
    """Build "Time per stage": seconds, plus cells/s and peak memory where recorded."""
    timings = metrics.get("timings") or {}
    if not timings:
        return []
    diag = metrics.get("diagnostics", {})
    rows = []
    ordered = sorted(timings.items(), key=lambda item: item[0] == "total")  # total last
    for stage, value in ordered:
        info = value if isinstance(value, dict) else {"seconds": value}
        seconds = info.get("seconds")
        rate = info.get("cells_per_s", info.get("cells_per_second"))
        if rate is None and is_number(seconds) and seconds > 0:
            n_cells = info.get("n_cells")
            model = stage.split(":", 1)[1] if ":" in stage else None
            cached = diag.get("models", {}).get(model, {}).get("from_cache", True)
            if n_cells is None and stage.startswith("embed:") and not cached:
                n_cells = diag.get("n_cells")
            rate = n_cells / seconds if is_number(n_cells) else None
        peaks = {k: info.get(k) for k in PEAK_KEYS}
        rows.append((stage, seconds, rate, peaks))
    total = timings.get("total")
    total = total.get("seconds") if isinstance(total, dict) else total
    show_rate = any(r[2] is not None for r in rows)
    shown_peaks = [k for k in PEAK_KEYS if any(r[3][k] is not None for r in rows)]
    columns = ["stage", "seconds", "share of total"]
    columns += ["cells/s"] if show_rate else []
    columns += [k.replace("_mb", " (MB)").replace("_", " ") for k in shown_peaks]
    table = Table("timings", columns, caption="Wall-clock time per stage")
    for stage, seconds, rate, peaks in rows:
        share = seconds / total if is_number(seconds) and is_number(total) and total else None
        row = [text(stage), num(seconds, 2), num(share, 2)]
        row += [num(rate, 1)] if show_rate else []
        row += [num(peaks[k], 0) for k in shown_peaks]
        table.rows.append(row)
    return [Section("timings", "Time per stage", tables=[table])]
