"""Sections of the studies a run can add: label efficiency, held-out groups and transfer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scfmbench.report.coverage import fold_lines
from scfmbench.report.tables import (
    Cell,
    Section,
    Table,
    figure_if_exists,
    interval,
    is_number,
    method_cell,
    num,
    text,
)


def label_efficiency_section(metrics: dict[str, Any], run_dir: Path | None = None) -> list[Section]:
    """Build "Label efficiency": test macro F1 [95% CI] per method and labelled cells per class.

    From ``metrics.json["label_efficiency"]`` (none without it); the curves' figure is shown
    when ``run_dir`` is given and holds it.
    """
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
    """Build "Transfer across datasets": macro F1 / accuracy per training data, method, target.

    From ``metrics.json["transfer"]["matrix"]``; none without it.
    """
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
    """Build "Random split vs held-out group" from ``metrics.json["holdout"]``.

    Per method the random-split and held-out macro F1 (95% CI) and the drop, per group the
    held-out macro F1, and the classes a fold could not score; none without the block.
    """
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
