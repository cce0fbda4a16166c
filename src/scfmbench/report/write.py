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
import pandas as pd

from scfmbench._atomic import write_text
from scfmbench.evaluation.metrics import delta
from scfmbench.hashing import hash_json
from scfmbench.report.tables import (
    DASH,
    Cell,
    Figure,
    Section,
    Table,
    figure_if_exists,
    interval,
    is_number,
    markdown_table,
    num,
    pct,
    render_html,
    render_markdown,
    text,
)
from scfmbench.results import read_config, read_metrics
from scfmbench.stages import StageStore, safe_name

logger = logging.getLogger(__name__)

__all__ = [
    "build_sections",
    "load_run",
    "markdown_table",
    "results_table",
    "write_figures",
    "write_report",
    "write_results_markdown",
]

HEADLINE = ("accuracy", "macro_f1")
METRIC_LABEL = {"accuracy": "accuracy", "macro_f1": "macro F1", "weighted_f1": "weighted F1"}


# --------------------------------------------------------------------------- loading


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``metrics.json`` (:func:`scfmbench.results.read_metrics`) and (when present)
    ``config.yaml`` of a run directory; raises RunDirError as the reader does."""
    return read_metrics(run_dir).to_dict(), read_config(run_dir)


# --------------------------------------------------------------------------- cells


def mean_sd(summary: dict[str, Any]) -> Cell:
    """``mean ± sd`` over splits (plain mean for one split); sorted by the mean."""
    mean = summary.get("mean")
    if not is_number(mean):
        return Cell(DASH, None, "num")
    if len(summary.get("values", [])) > 1:
        return Cell(f"{mean:.3f} ± {summary['sd']:.3f}", float(mean), "num")
    return Cell(f"{mean:.3f}", float(mean), "num")


def is_control(entry: dict[str, Any]) -> bool:
    return entry.get("kind") == "control"


def method_label(name: str, entry: dict[str, Any]) -> str:
    """The method's name; controls carry a visible ``(control)`` in every table."""
    return f"{name} (control)" if is_control(entry) else name


def method_cell(name: str, entry: dict[str, Any]) -> Cell:
    return Cell(method_label(name, entry), name, "control" if is_control(entry) else "")


def p_cell(p: Any, *, significant: bool | None = None) -> Cell:
    """A p-value (``<0.001`` below that); ``*`` and a highlight when significant."""
    if not is_number(p):
        return Cell(DASH, None, "num")
    shown = "<0.001" if p < 0.001 else f"{p:.3f}"
    if significant:
        return Cell(f"{shown} *", float(p), "num sig")
    return Cell(shown, float(p), "num")


def _mean_of(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if is_number(v)]
    return float(np.mean(finite)) if finite else None


def design_text(run: dict[str, Any]) -> str:
    """How the test sets were made, in words (schema 1.0 runs: the random splits)."""
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


# --------------------------------------------------------------------------- tables


def headline_table(metrics: dict[str, Any]) -> Table:
    """Test-set accuracy and macro F1 per method (mean ± sd, 95% CI), gains, significance."""
    methods = metrics["methods"]
    reference = metrics["run"]["reference"]
    best = metrics["run"].get("best_baseline")
    has_ci = {m: any("ci95" in e["summary"].get(m, {}) for e in methods.values()) for m in HEADLINE}
    has_sig = any("significance" in e for e in methods.values())
    if has_sig and best is None:
        best = next(e["significance"]["baseline"] for e in methods.values() if "significance" in e)
    columns = ["method", "kind", "accuracy"]
    columns += ["accuracy 95% CI"] if has_ci["accuracy"] else []
    columns += ["macro F1"] + (["macro F1 95% CI"] if has_ci["macro_f1"] else [])
    small = metrics["run"].get("small_classes") or []
    excl = f"macro F1 excl. classes < {metrics['run'].get('min_test_cells', 5)} test cells"
    balanced = any("balanced_accuracy" in e["summary"] for e in methods.values())
    columns += ["weighted F1"] + (["balanced accuracy"] if balanced else [])
    columns += [excl, f"{excl} 95% CI"] if small else []
    columns += [f"Δabs acc vs {reference}", "Δrel acc", "Δabs F1", "Δrel F1"]
    columns += [f"p vs {best} (Holm)"] if has_sig else []
    has_warnings = any(e.get("warnings") for e in methods.values())
    columns += ["warnings"] if has_warnings else []
    table = Table("headline", columns, caption=f"Test set; gains relative to {reference}")
    for name, entry in methods.items():
        summary, gains = entry["summary"], entry.get("delta_vs_reference", {})
        row = [method_cell(name, entry), text(entry.get("kind"))]
        for metric in HEADLINE:
            row.append(mean_sd(summary[metric]))
            if has_ci[metric]:
                row.append(interval(summary[metric].get("ci95")))
        row.append(mean_sd(summary.get("weighted_f1", {})))
        if balanced:
            row.append(mean_sd(summary.get("balanced_accuracy", {})))
        if small:
            kept = summary.get("macro_f1_excl_small", {})
            row += [num(kept.get("mean")), interval(kept.get("ci95"))]
        for metric in HEADLINE:
            gain = gains.get(metric, {})
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
    """Every paired comparison: vs the best baseline, vs the random-init control, fine-tuned
    vs frozen (design-aware p, Holm over all of them; bootstrap and McNemar alongside)."""
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
    """The headline table as strings, one row per method, in run order."""
    return headline_table(metrics).frame()


def _model_of(name: str, entry: dict[str, Any]) -> str:
    return entry.get("model") or name.split("+", 1)[0]


def frozen_vs_finetuned_table(metrics: dict[str, Any]) -> Table | None:
    """Each fine-tuned model beside its frozen probes: Δ = fine-tuned − frozen."""
    methods = metrics["methods"]
    tuned = {
        _model_of(n, e): (n, e)
        for n, e in methods.items()
        if e.get("kind") == "finetuned" or n.endswith(("+finetune", "+finetuned"))
    }
    columns = [
        "model",
        "frozen method",
        "frozen acc",
        "frozen F1",
        "fine-tuned acc",
        "fine-tuned F1",
        "Δabs acc",
        "Δrel acc",
        "Δabs F1",
        "Δrel F1",
    ]
    table = Table("frozen-vs-finetuned", columns, caption="Test set, mean over splits")
    for model, (_, tuned_entry) in tuned.items():
        for name, entry in methods.items():
            if (
                entry.get("kind") not in ("frozen", "control")
                or name in dict(tuned.values())
                or _model_of(name, entry) != model
            ):
                continue
            row = [text(model), method_cell(name, entry)]
            means = {}
            for who, e in (("frozen", entry), ("tuned", tuned_entry)):
                for metric in HEADLINE:
                    means[who, metric] = e["summary"][metric]["mean"]
                    row.append(num(means[who, metric]))
            for metric in HEADLINE:
                gain = delta(means["tuned", metric], means["frozen", metric])
                row += [num(gain["abs"]), pct(gain["rel"])]
            table.rows.append(row)
    return table if table.rows else None


RARE_CLASS_FRACTION = 0.05


def rare_classes(metrics: dict[str, Any]) -> set[str]:
    """Classes with fewer than 5% of the validated cells (highlighted in per-class tables)."""
    sizes = (metrics.get("diagnostics") or {}).get("classes") or {}
    total = sum(sizes.values())
    return {c for c, n in sizes.items() if total and n < RARE_CLASS_FRACTION * total}


def per_class_table(metrics: dict[str, Any], *, metric: str = "f1") -> Table | None:
    """``metric`` (f1 or recall) per class and method (mean over splits), with test cells.

    Rare classes (< 5% of cells) are marked, since a model that misses them can still score
    a high accuracy.
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


def _walk_overlap(node: Any, label: str, found: dict[str, dict]) -> None:
    """Collect gene-overlap records (dicts with ``n_matched``) anywhere in the diagnostics."""
    if isinstance(node, dict):
        if "n_matched" in node:
            found.setdefault(node.get("model") or label, node)
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
    """Per model: checkpoint, layer, pooling, dropped cells, cache, vocabulary overlap."""
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


# --------------------------------------------------------------------------- sections


def transfer_data_section(metrics: dict[str, Any]) -> Section:
    """Both datasets of a transfer run and what each direction shared and dropped; gaps in the
    label map's coverage come first."""
    from scfmbench.benchmark.transfer import coverage_lines

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
    """Data summary and diagnostics: what was read, what was dropped, and why."""
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
    """Software and hardware lines from ``manifest.json`` (none when it is absent)."""
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
    """What each method is (kind, representation, probe, model, tuned params) and the config."""
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


def headline_section(metrics: dict[str, Any]) -> Section:
    section = Section("headline", "Cell-type classification (test set)", tables=[])
    section.tables.append(headline_table(metrics))
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


def constant_note(methods: dict[str, Any]) -> str:
    """Why a method that predicts one label per class has a (near) zero-width interval."""
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


def _single_table_section(key: str, title: str, table: Table | None) -> list[Section]:
    return [Section(key, title, tables=[table])] if table is not None else []


def confusion_table(name: str, entry: dict[str, Any], seed: str) -> Table | None:
    """Confusion counts of one split as a table (used where the figure was not written)."""
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
    """The confusion-matrix figure of each method (first split), or its counts as a table."""
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


ZERO_SHOT_COLUMNS = {
    "nmi": "NMI",
    "ari": "ARI",
    "silhouette_label": "cell-type ASW",
    "clisi": "cLISI",
    "graph_connectivity": "graph connectivity",
    "silhouette_batch": "batch ASW",
    "ilisi": "iLISI",
}


def _view_title(view: str) -> str:
    return "HVG-PCA (baseline view)" if view == "pca" else f"{view} embedding"


def zero_shot_section(metrics: dict[str, Any]) -> list[Section]:
    """One row per embedding (and the HVG-PCA view): the scib-metrics scores of
    ``metrics.json["embeddings"]``, without any classifier."""
    embeddings = metrics.get("embeddings") or {}
    if not embeddings:
        return []
    batch_keys = {info.get("batch_key") for info in embeddings.values()} - {None}
    columns = [
        key
        for key in ZERO_SHOT_COLUMNS
        if any(is_number(info.get(key)) for info in embeddings.values())
    ]
    table = Table(
        "zero-shot",
        ["view", *(ZERO_SHOT_COLUMNS[c] for c in columns), "cells"],
        caption="Zero-shot embedding quality (scib-metrics; 0–1, higher is better)",
    )
    for view, info in embeddings.items():
        table.rows.append(
            [text(view), *(num(info.get(c)) for c in columns), num(info.get("n_cells"), 0)]
        )
    note = (
        "NMI/ARI: Leiden clusters (15-neighbour graph, resolution with the best NMI) vs the "
        "labels; ASW: silhouette rescaled to 0–1; cLISI/iLISI: scaled local inverse Simpson "
        "index of the 90-neighbour graph; graph connectivity: share of each label's cells in "
        "its largest connected component."
    )
    if batch_keys:
        note += f" Batch mixing by {', '.join(sorted(batch_keys))}."
    else:
        note += " No batch/donor column: batch mixing not scored."
    return [Section("zero-shot", "Zero-shot embedding quality", tables=[table], note=note)]


def umap_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    embeddings = metrics.get("embeddings") or {}
    figures: list[Figure] = []
    for view, info in embeddings.items():
        title = _view_title(view)
        figures += figure_if_exists(run_dir, info.get("umap_png"), title)
        figures += figure_if_exists(run_dir, info.get("umap_batch_png"), f"{title} by batch")
    if not figures:
        return []
    return [Section("umap", "UMAPs", figures=figures)]


def _figure_any(run_dir: Path, candidates: list[str | None], title: str) -> list[Figure]:
    for rel in candidates:
        found = figure_if_exists(run_dir, rel, title)
        if found:
            return found
    return []


def layers_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    layers = metrics.get("layers") or {}
    if not layers:
        return []
    depth = sorted({int(p["layer"]) for points in layers.values() for p in points})
    table = Table("layers", ["layer", *layers], caption="Macro F1 of a probe on each layer")
    lookup = {m: {int(p["layer"]): p.get("macro_f1") for p in pts} for m, pts in layers.items()}
    table.rows = [[num(layer, 0), *[num(lookup[m].get(layer)) for m in layers]] for layer in depth]
    figures: list[Figure] = []
    for model in layers:
        figures += _figure_any(
            run_dir,
            [f"figures/layers_{model}.png", f"figures/layers_{safe_name(model)}.png"],
            f"{model}: macro F1 by layer",
        )
    return [Section("layers", "Layer-wise probes", tables=[table], figures=figures)]


def label_efficiency_section(metrics: dict[str, Any], run_dir: Path | None = None) -> list[Section]:
    """Test macro F1 [95% CI] per method and labelled-cells-per-class size, and the curves."""
    block = metrics.get("label_efficiency") or {}
    if not block.get("methods"):
        return []
    sizes = [str(s) for s in block["sizes"]]
    table = Table(
        "label-efficiency",
        ["method", *[f"{s} per class" if s != "all" else "all" for s in sizes]],
        caption="Test macro F1 [95% CI] by labelled training cells per class",
    )
    methods = metrics.get("methods", {})
    for name, entry in block["methods"].items():
        row = [method_cell(name, methods.get(name, entry))]
        for size in sizes:
            point = entry["sizes"][size]
            shown = f"{num(point.get('mean')).text} {interval(point.get('ci95')).text}"
            row.append(Cell(shown, point.get("mean"), "num"))
        table.rows.append(row)
    note = (
        f"Each probe is refitted on nested, class-stratified draws of each fold's training "
        f"cells ({block['draws']} draws per fold and size; 'all' is the run's own fit); "
        f"{block['validation']}. {block['representations']}. 95% intervals: "
        f"{block['interval_method']}."
    )
    capped = block.get("capped") or {}
    if capped:
        note += (
            " Classes with fewer training cells than a size use all of them: "
            + "; ".join(
                f"{size} per class: " + ", ".join(f"{c} ({n})" for c, n in found.items())
                for size, found in capped.items()
            )
            + "."
        )
    figures = (
        figure_if_exists(run_dir, block.get("figure"), "Label efficiency")
        if run_dir is not None
        else []
    )
    return [
        Section("label-efficiency", "Label efficiency", tables=[table], figures=figures, note=note)
    ]


def transfer_section(metrics: dict[str, Any]) -> list[Section]:
    matrix = (metrics.get("transfer") or {}).get("matrix") or {}
    if not matrix:
        return []
    tests = list(dict.fromkeys(t for row in matrix.values() for t in row))
    rows: dict[tuple[str, str], dict[str, Cell]] = {}
    warnings: dict[tuple[str, str], list[str]] = {}
    for train, row in matrix.items():
        for test, per_method in row.items():
            for method, scores in per_method.items():
                f1, acc = scores.get("macro_f1"), scores.get("accuracy")
                shown = f"{num(f1).text} / {num(acc).text}"
                rows.setdefault((train, method), {})[test] = Cell(
                    shown, float(f1) if is_number(f1) else None, "num"
                )
                warnings.setdefault((train, method), []).extend(scores.get("warnings") or [])
    warned = any(warnings.values())
    methods = metrics.get("methods", {})
    table = Table(
        "transfer",
        ["trained on", "method", *[f"→ {t}" for t in tests]] + (["warnings"] if warned else []),
        caption="Macro F1 / accuracy; rows: training data, columns: test data",
    )
    for (train, method), cells in rows.items():
        label = method_cell(method, methods.get(method, {}))
        shown = [text("; ".join(warnings[(train, method)]) or None)] if warned else []
        table.rows.append([text(train), label, *[cells.get(t, text(None)) for t in tests], *shown])
    return [Section("transfer", "Transfer across datasets", tables=[table])]


def holdout_section(metrics: dict[str, Any]) -> list[Section]:
    """The section "Random split vs held-out group": per method the random-split and
    held-out macro F1 (95% CI) and the drop, per group the held-out macro F1, and the classes
    a fold could not score (``metrics.json["holdout"]``; none without it)."""
    from scfmbench.benchmark.holdout import fold_lines

    block = metrics.get("holdout") or {}
    if not block.get("methods"):
        return []
    groups = [fold["group"] for fold in block["folds"].values()]
    table = Table(
        "holdout",
        [
            "method",
            "random-split macro F1",
            "95% CI",
            "held-out macro F1",
            "95% CI",
            "drop",
            *[f"held out {g}" for g in groups],
        ],
        caption=f"Random split vs held-out group (obs[{block['key']!r}]); drop = random − "
        "held-out macro F1",
    )
    methods = metrics.get("methods", {})
    for name, row in block["methods"].items():
        random = row.get("random_split") or {}
        held = row["held_out"]
        table.rows.append(
            [
                method_cell(name, methods.get(name, {})),
                num(random.get("macro_f1")),
                interval(random.get("ci95")),
                num(held["macro_f1"]),
                interval(held.get("ci95")),
                num(row.get("drop")),
                *[num(held["per_group"].get(g)) for g in groups],
            ]
        )
    design = block["random_split"]["design"]
    if block["mode"] == "directed":
        shift = f"trained on {block['train_groups']}, tested on {block['test_groups']}"
    else:
        shift = f"each of {len(groups)} groups held out in turn, trained on the others"
    bullets = [f"{shift}."]
    for fold in block["folds"].values():
        bullets += [f"{line}." for line in fold_lines(fold)]
    note = (
        f"Random split: {design['name']} with {design['n_folds']} folds on the same cells and "
        f"embeddings (95% intervals: {block['random_split']['interval_method']}). Held out: "
        f"95% intervals: {block.get('interval_method')}; {block['macro_f1']}."
    )
    return [Section("holdout", "Random split vs held-out group", bullets, [table], note=note)]


def finetune_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    finetune = metrics.get("finetune") or {}
    section = Section("learning-curves", "Fine-tuning learning curves")
    for model, info in finetune.items():
        epochs = info.get("epochs") or []
        if epochs:
            table = Table(
                f"curve-{safe_name(model)}",
                ["epoch", "train loss", "val loss", "val macro F1"],
                caption=model,
            )
            table.rows = [
                [
                    num(e.get("epoch"), 0),
                    num(e.get("train_loss"), 4),
                    num(e.get("val_loss"), 4),
                    num(e.get("val_macro_f1")),
                ]
                for e in epochs
            ]
            section.tables.append(table)
        section.figures += figure_if_exists(run_dir, info.get("curve_png"), f"{model} fine-tuning")
    return [section] if section.tables or section.figures else []


PEAK_KEYS = ("peak_memory_mb", "peak_rss_mb", "peak_gpu_memory_mb")


def timings_section(metrics: dict[str, Any]) -> list[Section]:
    """Seconds per stage, plus cells/s and peak memory when the stage recorded them."""
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


def build_sections(
    metrics: dict[str, Any],
    *,
    run_dir: Path | None = None,
    config: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
) -> list[Section]:
    """Report sections in order; optional ones only when their data (or figure) exists."""
    from scfmbench.report.verdict import forest_section, verdict_section

    sections = [*verdict_section(metrics), *forest_section(metrics, run_dir)]
    sections.append(data_section(metrics))
    if metrics["methods"]:  # a transfer run has only its transfer matrix
        sections += [methods_section(metrics, config, manifest), headline_section(metrics)]
    sections += _single_table_section(
        "frozen-vs-finetuned", "Frozen vs fine-tuned", frozen_vs_finetuned_table(metrics)
    )
    per_class = [
        t
        for t in (per_class_table(metrics), per_class_table(metrics, metric="recall"))
        if t is not None
    ]
    if per_class:
        sections.append(Section("per-class", "Per-class F1 and recall", tables=per_class))
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
    """``results.md``: the verdict, Δ macro F1 vs the best baseline, the data diagnostics,
    then the headline table (and the held-out-group drops and label-efficiency curves when the
    run has them)."""
    from scfmbench.report.verdict import forest_section, verdict_section

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

    Returns the path of ``report.html``. Raises ``RunDirError`` when the folder has no
    (readable) metrics.json.
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
    """Confusion matrix per method (first split) and the forest plot of Δ macro F1 vs the
    best baseline; UMAPs come from the embedding-scores stage."""
    from scfmbench.report.figures import plot_confusion
    from scfmbench.report.verdict import write_forest_figure

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
