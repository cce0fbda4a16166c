"""Fine-tuning sections: each fine-tuned model beside its frozen probes, learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scfmbench.evaluation.metrics import delta
from scfmbench.report.classification import PRIMARY
from scfmbench.report.tables import Section, Table, figure_if_exists, method_cell, num, pct, text
from scfmbench.stages import safe_name


def frozen_vs_finetuned_table(metrics: dict[str, Any]) -> Table | None:
    """Tabulate each fine-tuned model beside its frozen probes: Δ = fine-tuned − frozen.

    Parameters
    ----------
    metrics : dict
        A run's ``metrics.json``.

    Returns
    -------
    Table or None
        One row per fine-tuned model and frozen (or control) method of the same model: the
        primary ``REPORTED_METRICS`` of both (test set, mean over splits) and the absolute
        and relative gains. None when no method was fine-tuned.
    """
    methods = metrics["methods"]
    tuned = {e["model"]: (n, e) for n, e in methods.items() if e["kind"] == "finetuned"}
    tuned_names = {n for n, _ in tuned.values()}
    columns = ["model", "frozen method"]
    columns += [f"{who} {m.short}" for who in ("frozen", "fine-tuned") for m in PRIMARY]
    columns += [f"Δ{kind} {m.short}" for m in PRIMARY for kind in ("abs", "rel")]
    table = Table("frozen-vs-finetuned", columns, caption="Test set, mean over splits")
    for model, (_, tuned_entry) in tuned.items():
        for name, entry in methods.items():
            if (
                entry.get("kind") not in ("frozen", "control")
                or name in tuned_names
                or entry["model"] != model
            ):
                continue
            row = [text(model), method_cell(name, entry)]
            means: dict[tuple[str, str], float] = {}
            for who, e in (("frozen", entry), ("tuned", tuned_entry)):
                for m in PRIMARY:
                    means[who, m.key] = e["summary"][m.key]["mean"]
                    row.append(num(means[who, m.key]))
            for m in PRIMARY:
                gain = delta(means["tuned", m.key], means["frozen", m.key])
                row += [num(gain["abs"]), pct(gain["rel"])]
            table.rows.append(row)
    return table if table.rows else None


def frozen_vs_finetuned_section(metrics: dict[str, Any]) -> list[Section]:
    """Build "Frozen vs fine-tuned" (none when no method was fine-tuned)."""
    table = frozen_vs_finetuned_table(metrics)
    if table is None:
        return []
    return [Section("frozen-vs-finetuned", "Frozen vs fine-tuned", tables=[table])]


def finetune_section(metrics: dict[str, Any], run_dir: Path) -> list[Section]:
    """Build "Fine-tuning learning curves": per model, losses and val macro F1 per epoch.

    Each model's curve figure (``metrics["finetune"][model]["curve_png"]``) is shown when
    it exists under ``run_dir``; none when the run fine-tuned nothing.
    """
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
