"""Cell-type classification sections of the report.

The headline and significance tables, per-class F1 and recall, and confusion matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfmbench.evaluation.metrics import REPORTED_METRICS
from scfmbench.report.tables import (
    DASH,
    Cell,
    Section,
    Table,
    figure_if_exists,
    interval,
    is_control,
    is_number,
    mean_sd,
    method_cell,
    method_label,
    num,
    p_cell,
    pct,
    text,
)
from scfmbench.stages import safe_name

PRIMARY = tuple(m for m in REPORTED_METRICS if m.primary)
"""The metrics shown with their 95% intervals and gains over the reference."""
LABEL = {m.key: m.label for m in REPORTED_METRICS}


def headline_table(metrics: dict[str, Any]) -> Table:
    """Tabulate each method's test-set scores, gains over the reference and significance.

    Parameters
    ----------
    metrics : dict
        A run's ``metrics.json``.

    Returns
    -------
    Table
        One row per method, in run order: each of ``REPORTED_METRICS`` as mean ± sd over
        splits (the primary ones with their 95% interval when the run has one; the others
        when some method has them), macro F1 without small classes (when the run has any),
        absolute and relative gains of the primary metrics over ``run.reference``, the Holm
        p-value against the best baseline (schema 1.0 runs) and warnings (when any).
    """
    methods = metrics["methods"]
    reference = metrics["run"]["reference"]
    best = metrics["run"].get("best_baseline")
    has_ci = {
        m.key: any("ci95" in e["summary"].get(m.key, {}) for e in methods.values()) for m in PRIMARY
    }
    has_sig = any("significance" in e for e in methods.values())
    if has_sig and best is None:
        best = next(e["significance"]["baseline"] for e in methods.values() if "significance" in e)
    columns = ["method", "kind"]
    for m in PRIMARY:
        columns += [m.label] + ([f"{m.label} 95% CI"] if has_ci[m.key] else [])
    small = metrics["run"].get("small_classes") or []
    excl = (
        f"{LABEL['macro_f1']} excl. classes < {metrics['run'].get('min_test_cells', 5)} test cells"
    )
    others = [
        m
        for m in REPORTED_METRICS
        if not m.primary and any(m.key in e["summary"] for e in methods.values())
    ]
    columns += [m.label for m in others]
    columns += [excl, f"{excl} 95% CI"] if small else []
    for i, m in enumerate(PRIMARY):
        columns += [f"Δabs {m.short}" + (f" vs {reference}" if i == 0 else ""), f"Δrel {m.short}"]
    columns += [f"p vs {best} (Holm)"] if has_sig else []
    has_warnings = any(e.get("warnings") for e in methods.values())
    columns += ["warnings"] if has_warnings else []
    table = Table("headline", columns, caption=f"Test set; gains relative to {reference}")
    for name, entry in methods.items():
        summary, gains = entry["summary"], entry.get("delta_vs_reference", {})
        first = method_cell(name, entry)
        if entry.get("constant_within_class"):  # its interval is explained by the † note
            first = Cell(f"{first.text} †", first.value, first.css)
        row = [first, text(entry.get("kind"))]
        for m in PRIMARY:
            row.append(mean_sd(summary[m.key]))
            if has_ci[m.key]:
                row.append(interval(summary[m.key].get("ci95")))
        row += [mean_sd(summary.get(m.key, {})) for m in others]
        if small:
            kept = summary.get("macro_f1_excl_small", {})
            row += [num(kept.get("mean")), interval(kept.get("ci95"))]
        for m in PRIMARY:
            gain = gains.get(m.key, {})
            row += [num(gain.get("abs")), pct(gain.get("rel"))]
        if has_sig:
            sig = entry.get("significance")
            if sig is None:
                row.append(Cell("best baseline" if name == best else DASH, None, "ref"))
            else:
                row.append(p_cell(sig.get("p_holm"), significant=sig.get("significant")))
        if has_warnings:
            row.append(text("; ".join(entry.get("warnings") or []) or None))
        table.rows.append(row)
    return table


def significance_table(metrics: dict[str, Any]) -> Table | None:
    """Tabulate every paired comparison of the run.

    Each method is compared with the best baseline, with its random-init control, and
    fine-tuned with frozen: the design-aware p, Holm over all of them, and the bootstrap and
    McNemar p-values alongside. Schema 1.0 runs have the tests against the best baseline
    only. None when the run has no comparisons.
    """
    methods = metrics["methods"]
    comparisons = metrics.get("comparisons")
    if comparisons is None:  # schema 1.0: tests against the best baseline only
        comparisons = [
            {**e["significance"], "method": n, "against": e["significance"].get("baseline")}
            for n, e in methods.items()
            if "significance" in e
        ]
    if not comparisons:
        return None
    columns = [
        "method",
        "vs",
        "comparison",
        "ΔF1",
        "ΔF1 95% CI",
        "Δacc",
        "p",
        "bootstrap p (cells only)",
        "McNemar p",
        "p (Holm)",
        "significant",
    ]
    table = Table(
        "significance",
        columns,
        caption="Paired tests on the same test cells (p: design-aware test of equal macro F1; "
        "p (Holm): p adjusted over all comparisons)",
    )
    for comparison in comparisons:
        name, other = comparison["method"], comparison.get("against")
        flag = comparison.get("significant")
        table.rows.append(
            [
                method_cell(name, methods.get(name, {})),
                method_cell(other, methods.get(other, {})) if other else text(None),
                text(comparison.get("kind", "vs best baseline")),
                num(comparison.get("f1_diff")),
                interval(comparison.get("f1_diff_ci95")),
                num(comparison.get("accuracy_diff")),
                p_cell(comparison.get("p", comparison.get("bootstrap_p"))),
                p_cell(comparison.get("bootstrap_p")),
                p_cell(comparison.get("mcnemar_p")),
                p_cell(comparison.get("p_holm"), significant=flag),
                Cell("yes" if flag else "no", int(bool(flag)), "sig" if flag else ""),
            ]
        )
    return table


def results_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Return the headline table as strings, one row per method, in run order.

    Parameters
    ----------
    metrics : dict
        A run's ``metrics.json``.

    Returns
    -------
    DataFrame
        The cells shown in the report's headline table (see :func:`headline_table`), one
        column per header.
    """
    return headline_table(metrics).frame()


def headline_section(metrics: dict[str, Any]) -> Section:
    """Build "Cell-type classification": the headline and significance tables and a note."""
    section = Section("headline", "Cell-type classification (test set)", tables=[])
    section.tables.append(headline_table(metrics))
    section.bullets += skipped_bullets(metrics)
    sig = significance_table(metrics)
    if sig is not None:
        section.tables.append(sig)
    note = (
        f"Gains are relative to {metrics['run']['reference']}: Δabs = method − reference, "
        "Δrel = Δabs / reference. Values are mean ± sd over splits."
    )
    run = metrics["run"]
    if run.get("interval_method"):
        note += f" 95% intervals: {run['interval_method']}."
    if run.get("small_classes"):
        note += (
            f" Classes with < {run.get('min_test_cells', 5)} test cells in a split (scores "
            f"rest on few cells): {', '.join(run['small_classes'])}."
        )
    if sig is not None:
        note += " * = significant after Holm correction (p < 0.05)."
    note += constant_note(metrics["methods"])
    if any(is_control(e) for e in metrics["methods"].values()):
        note += " Controls (random features) show the floor a representation must beat."
    section.note = note
    return section


def skipped_bullets(metrics: dict[str, Any]) -> list[str]:
    """One line per method left out of the run with its reason (``metrics["skipped"]``).

    Returns ``[]`` when nothing was skipped or the document predates the record.
    """
    return [f"{name} skipped: {reason}." for name, reason in metrics.get("skipped", {}).items()]


def constant_note(methods: dict[str, Any]) -> str:
    """Explain why a method predicting one label per class has a (near) zero-width interval.

    Returns ``""`` when no method does (``constant_within_class`` in its entry).
    """
    names = [n for n, e in methods.items() if e.get("constant_within_class")]
    if not names:
        return ""
    return (
        f" † {', '.join(names)}: one predicted label for all test cells of each class in "
        "every fold, so the class-stratified bootstrap (each class keeps its number of test "
        "cells) cannot change the score; the 95% interval holds only fold-to-fold variation "
        "and is (near) zero width by construction: it is conditional on the class "
        "proportions of these data and leaves out their own sampling variation."
    )


RARE_CLASS_FRACTION = 0.05


def rare_classes(metrics: dict[str, Any]) -> set[str]:
    """Return the classes with fewer than 5% of the validated cells (marked in per-class tables)."""
    sizes = (metrics.get("diagnostics") or {}).get("classes") or {}
    total = sum(sizes.values())
    return {c for c, n in sizes.items() if total and n < RARE_CLASS_FRACTION * total}


def _mean_of(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if is_number(v)]
    return float(np.mean(finite)) if finite else None


def per_class_table(metrics: dict[str, Any], *, metric: str = "f1") -> Table | None:
    """Tabulate ``metric`` (f1 or recall) per class and method (mean over splits).

    Each row also gives the class's test cells (mean over splits). Rare classes (< 5% of
    cells) are marked, since a model that misses them can still score a high accuracy. None
    when the run lists no classes.
    """
    methods = metrics["methods"]
    classes = list(metrics["run"].get("classes") or [])
    if not classes:
        return None
    rare = rare_classes(metrics)
    table = Table(
        f"per-class-{metric}",
        ["class", "test cells"] + [method_label(n, e) for n, e in methods.items()],
        caption=f"{'F1' if metric == 'f1' else 'Recall'} per class on the test set (mean over "
        "splits); rare classes (< 5% of cells) are marked ⚑",
    )
    for cls in classes:
        support, values = [], []
        for entry in methods.values():
            per_class = [s.get("per_class", {}).get(cls, {}) for s in entry["splits"].values()]
            support += [p.get("support") for p in per_class]
            values.append(num(_mean_of([p.get(metric) for p in per_class])))
        n_test = _mean_of(support)
        label = Cell(f"{cls} ⚑ rare", cls, "sig") if cls in rare else text(cls)
        table.rows.append([label, num(n_test, 0 if n_test == round(n_test or 0) else 1), *values])
    return table


def per_class_section(metrics: dict[str, Any]) -> list[Section]:
    """Build "Per-class F1 and recall" (none when the run lists no classes)."""
    tables = [
        t
        for t in (per_class_table(metrics), per_class_table(metrics, metric="recall"))
        if t is not None
    ]
    return [Section("per-class", "Per-class F1 and recall", tables=tables)] if tables else []


def confusion_table(name: str, entry: dict[str, Any], seed: str) -> Table | None:
    """Tabulate the confusion counts of one split (used where the figure was not written)."""
    confusion = entry.get("splits", {}).get(seed, {}).get("confusion")
    if not confusion:
        return None
    labels = list(confusion["labels"])
    table = Table(
        f"confusion-{safe_name(name)}",
        ["true \\ predicted", *labels],
        caption=f"{method_label(name, entry)} — test split seed {seed}",
    )
    table.rows = [
        [text(true), *[num(v, 0) for v in row]]
        for true, row in zip(labels, confusion["matrix"], strict=True)
    ]
    return table


def confusion_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    """Show each method's confusion-matrix figure (first split), or its counts as a table."""
    seeds = metrics["run"].get("seeds") or ["?"]
    section = Section("confusion", "Confusion matrices")
    for name, entry in metrics["methods"].items():
        title = f"{method_label(name, entry)} — test split seed {seeds[0]}"
        found = figure_if_exists(run_dir, f"figures/confusion_{safe_name(name)}.png", title)
        table = None if found else confusion_table(name, entry, str(seeds[0]))
        section.figures += found
        section.tables += [table] if table is not None else []
    if not (section.figures or section.tables):
        return []
    section.note = "Rows: true class, columns: predicted; numbers are cells"
    section.note += "; figure colours are row-normalized." if section.figures else "."
    return [section]
