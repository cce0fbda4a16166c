"""The answer a report leads with: does each foundation model beat the best baseline.

Everything here is computed from ``metrics.json`` alone: the paired tests of every method
against the best baseline (chosen on validation macro F1) and against its random-init control,
with their Δ macro F1, 95% interval and Holm-adjusted p (see ``docs/statistics.md``).
:func:`verdict_lines` turns them into one sentence per claim, :func:`forest_rows` into the rows
of the forest plot of Δ macro F1; :func:`verdict_section` and :func:`forest_section` are the
report's first two sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scfmbench.report.tables import Section, Table, figure_if_exists, interval, is_number, num, text
from scfmbench.stages import StageStore

__all__ = [
    "FOREST_FIGURE",
    "ForestRow",
    "VerdictLine",
    "best_baseline",
    "caveat_line",
    "forest_rows",
    "forest_section",
    "forest_table",
    "paired_tests",
    "verdict_lines",
    "verdict_section",
    "write_forest_figure",
]

ALPHA = 0.05
FOREST_FIGURE = "figures/forest_macro_f1.png"
FEW_TEST_SETS = 5
"""Fewer test sets (folds or splits) than this get a caveat: wide intervals, coarse p."""
MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class VerdictLine:
    """One claim of the verdict and the sentence that states it.

    ``outcome`` is ``"beats"`` (significantly higher macro F1 after Holm), ``"worse"``
    (significantly lower), ``"no evidence"`` (not significant), ``"untested"`` (no paired test
    in ``metrics.json``) or ``"best baseline"`` (the line naming the best baseline).
    ``f1_diff`` = macro F1(method) − macro F1(against), the mean over test sets.
    """

    method: str
    against: str | None
    kind: str
    outcome: str
    f1_diff: float | None
    ci95: tuple[float, float] | None
    p_holm: float | None
    sentence: str


@dataclass(frozen=True)
class ForestRow:
    """One row of the forest plot: a method's Δ macro F1 vs the best baseline."""

    method: str
    kind: str | None
    f1_diff: float
    ci95: tuple[float, float] | None
    p_holm: float | None
    significant: bool


# --------------------------------------------------------------------------- reading


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", MINUS)


def _plain(value: float) -> str:
    return f"{value:.3f}".replace("-", MINUS)


def _p_text(p: float) -> str:
    """``Holm p < 0.001`` or ``Holm p = 0.410`` (three decimals, as in the report's tables)."""
    return "Holm p < 0.001" if p < 0.001 else f"Holm p = {p:.3f}"


def _ci(value: Any) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2 and all(map(is_number, value)):
        return float(value[0]), float(value[1])
    return None


def best_baseline(metrics: dict[str, Any]) -> str | None:
    """Return the baseline every method is tested against.

    That is ``run.best_baseline``; for runs that do not record it, the baseline named in the
    methods' ``significance``.
    """
    best = metrics["run"].get("best_baseline")
    if best is None:
        best = next(
            (
                e["significance"].get("baseline")
                for e in metrics["methods"].values()
                if "significance" in e
            ),
            None,
        )
    return best


def paired_tests(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every paired comparison of the run (``metrics["comparisons"]``).

    Plus a ``vs best baseline`` entry for any method whose ``significance`` has none there
    (schema 1.0).
    """
    found = list(metrics.get("comparisons") or [])
    seen = {(c.get("method"), c.get("against")) for c in found}
    for name, entry in metrics["methods"].items():
        sig = entry.get("significance")
        if sig and (name, sig.get("baseline")) not in seen:
            found.append(
                {**sig, "method": name, "against": sig.get("baseline"), "kind": "vs best baseline"}
            )
    return found


def _find(tests: list[dict], method: str, kind: str) -> dict[str, Any] | None:
    return next((c for c in tests if c.get("method") == method and c.get("kind") == kind), None)


def _line(
    subject: str, method: str, target: str, against: str | None, kind: str, test: dict | None
) -> VerdictLine:
    """Word one paired test of ``method`` (``subject`` in words) vs ``target``."""
    if test is None or not is_number(test.get("p_holm")) or not is_number(test.get("f1_diff")):
        return VerdictLine(
            method,
            against,
            kind,
            "untested",
            None,
            None,
            None,
            f"{subject}: no paired test against {target} in this run.",
        )
    diff, p, ci = float(test["f1_diff"]), float(test["p_holm"]), _ci(test.get("f1_diff_ci95"))
    significant = bool(test.get("significant", p < ALPHA))
    if significant and diff > 0:
        outcome, claim = "beats", f"beats {target}"
    elif significant and diff < 0:
        outcome, claim = "worse", f"worse than {target} on this data"
    else:
        outcome, claim = "no evidence", f"no evidence that it beats {target} on this data"
    numbers = f"Δ macro F1 {_signed(diff)}"
    if ci is not None:
        numbers += f", 95% CI {_plain(ci[0])} to {_plain(ci[1])}"
        if not significant and (ci[0] > 0 or ci[1] < 0):  # the interval is not Holm-corrected
            numbers += " before correcting for the run's other tests"
    numbers += f", {_p_text(p)}"
    sentence = f"{subject}: {claim} ({numbers})."
    return VerdictLine(method, against, kind, outcome, diff, ci, p, sentence)


def _validation_f1(entry: dict[str, Any]) -> float:
    from scfmbench.evaluation.run_stats import validation_score

    return validation_score(entry) if entry.get("splits") else float("-inf")


def _is_finetuned(entry: dict[str, Any]) -> bool:
    return entry.get("probe") == "finetune" or entry.get("kind") == "finetuned"


def _models(methods: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per pretrained model id (run order): its frozen and fine-tuned method names."""
    models: dict[str, dict[str, list[str]]] = {}
    for name, entry in methods.items():
        if entry.get("kind") not in ("frozen", "finetuned") or not entry.get("model"):
            continue
        parts = models.setdefault(entry["model"], {"frozen": [], "finetuned": []})
        parts["finetuned" if _is_finetuned(entry) else "frozen"].append(name)
    return models


def _best_baseline_line(metrics: dict[str, Any], best: str) -> VerdictLine:
    summary = (metrics["methods"].get(best) or {}).get("summary", {}).get("macro_f1", {})
    mean, ci = summary.get("mean"), _ci(summary.get("ci95"))
    sentence = f"Best baseline (highest validation macro F1): {best}"
    if is_number(mean):
        sentence += f", test macro F1 {_plain(mean)}"
        if ci is not None:
            sentence += f" (95% CI {_plain(ci[0])} to {_plain(ci[1])})"
    return VerdictLine(
        best,
        None,
        "best baseline",
        "best baseline",
        None,
        ci,
        None,
        sentence + ".",
    )


def verdict_lines(metrics: dict[str, Any]) -> list[VerdictLine]:
    """Return the verdict of a run, one sentence per claim, from its ``metrics.json``.

    First the best baseline (chosen on validation macro F1) with its test macro F1 and 95%
    interval. Then, for each foundation model in run order: its best frozen probe (the probe
    with the highest mean validation macro F1 — the test cells never choose) and its
    fine-tuned version when present, each against the best baseline, and each against its
    random-init control when the run has one. A run without foundation models gets one line
    per other method against the best baseline.

    Parameters
    ----------
    metrics : dict
        A run's ``metrics.json`` document (``run``, ``methods`` and, from schema 2.0,
        ``comparisons``).

    Returns
    -------
    list of VerdictLine
        Empty for a run without methods (a transfer run). A run without a baseline gets one
        line saying that nothing was compared.
    """
    methods = metrics.get("methods") or {}
    if not methods:
        return []
    best = best_baseline(metrics)
    if best is None:
        return [
            VerdictLine(
                "",
                None,
                "best baseline",
                "untested",
                None,
                None,
                None,
                "No baseline in this run, so no model was tested against one; add a baseline "
                "(e.g. hvg+logreg) to `baselines`.",
            )
        ]
    tests = paired_tests(metrics)
    lines = [_best_baseline_line(metrics, best)]
    models = _models(methods)
    if not models:
        for name, entry in methods.items():
            if name != best:
                subject = f"{name} (control)" if entry.get("kind") == "control" else name
                test = _find(tests, name, "vs best baseline")
                lines.append(_line(subject, name, best, best, "vs best baseline", test))
        return lines
    for model, parts in models.items():
        chosen = []
        if parts["frozen"]:
            frozen = max(parts["frozen"], key=lambda n: _validation_f1(methods[n]))
            chosen.append((frozen, f"{model} (frozen, best probe {methods[frozen].get('probe')})"))
        chosen += [(name, f"{model} (fine-tuned)") for name in parts["finetuned"]]
        for name, subject in chosen:
            test = _find(tests, name, "vs best baseline")
            lines.append(_line(subject, name, best, best, "vs best baseline", test))
        for name, subject in chosen:
            control = _find(tests, name, "vs random-init control")
            if control is not None:
                target = f"its random-init control {control['against']}"
                lines.append(
                    _line(
                        subject, name, target, control["against"], "vs random-init control", control
                    )
                )
    return lines


def caveat_line(metrics: dict[str, Any]) -> str | None:
    """Say what the design lets the intervals and p-values claim, in one line.

    The study design's intervals hold within its splits only; a held-out-group design tests
    under domain shift (a directed shift, with one test set, covers cell sampling only); few
    test sets give wide intervals and coarse p-values. None when
    there is nothing to add.
    """
    run = metrics["run"]
    design = (run.get("design") or {}).get("name", "study")
    n_sets = len(run.get("seeds") or [])
    parts = []
    if design == "study" and n_sets == 1:
        parts.append(
            "intervals and p-values cover the cell sampling of one random split only "
            "(retraining variation is not covered)"
        )
    elif design == "study":
        parts.append(
            f"intervals and p-values hold within these {n_sets} random splits only (their test "
            "sets overlap; retraining variation is not covered)"
        )
    if design == "holdout":
        key = (metrics.get("holdout") or {}).get("key")
        where = f" of obs[{key!r}]" if key else ""
        if n_sets == 1:  # a directed shift: the percentile interval of one test set
            parts.append(
                f"one test set, the test groups{where} (domain shift, not random cells): "
                "intervals and p-values cover the cell sampling of one training run only "
                "(retraining variation is not covered)"
            )
        else:
            parts.append(
                f"each test set is a held-out group{where} (domain shift, not random cells)"
            )
    if 0 < n_sets < FEW_TEST_SETS and not (design == "holdout" and n_sets == 1):
        noun = {"cv": "test fold", "repeated-cv": "test fold", "holdout": "held-out group"}
        parts.append(
            f"only {n_sets} {noun.get(design, 'test split')}{'s' if n_sets > 1 else ''}: "
            "intervals are wide and a true difference can go undetected"
        )
    if not parts:
        return None
    return "Caveats: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- forest plot


def forest_rows(metrics: dict[str, Any]) -> list[ForestRow]:
    """Δ macro F1 vs the best baseline of every other method, largest first.

    Returns
    -------
    list of ForestRow
        One per method with a ``vs best baseline`` test (values copied from
        ``metrics.json``), sorted by Δ macro F1 descending, ties in run order; empty when the
        run has no such tests.
    """
    methods = metrics.get("methods") or {}
    rows = []
    for test in paired_tests(metrics):
        if test.get("kind") != "vs best baseline" or not is_number(test.get("f1_diff")):
            continue
        name = test["method"]
        p = test.get("p_holm")
        rows.append(
            ForestRow(
                method=name,
                kind=(methods.get(name) or {}).get("kind"),
                f1_diff=float(test["f1_diff"]),
                ci95=_ci(test.get("f1_diff_ci95")),
                p_holm=float(p) if is_number(p) else None,
                significant=bool(test.get("significant")),
            )
        )
    return sorted(rows, key=lambda r: -r.f1_diff)


def _row_label(row: ForestRow) -> str:
    return f"{row.method} (control)" if row.kind == "control" else row.method


def write_forest_figure(run_dir: Path, metrics: dict[str, Any], *, stages: StageStore) -> None:
    """Draw ``figures/forest_macro_f1.png``.

    Skipped when the run has no tests against a baseline, or when the same rows were drawn
    before.
    """
    from scfmbench.hashing import hash_json
    from scfmbench.report.figures import plot_forest

    rows = forest_rows(metrics)
    if not rows:
        return
    best = best_baseline(metrics)
    path = Path(run_dir) / FOREST_FIGURE
    key = hash_json([best, [[_row_label(r), r.f1_diff, r.ci95, r.significant] for r in rows]])
    if path.exists() and stages.load(f"figure_{path.stem}", key) is not None:
        return
    plot_forest(
        [_row_label(r) for r in rows],
        [r.f1_diff for r in rows],
        [r.ci95 for r in rows],
        [r.significant for r in rows],
        path,
        xlabel=f"Δ macro F1 vs {best} (95% CI)",
        title=f"Δ macro F1 vs the best baseline ({best}); filled = significant (Holm p < 0.05)",
    )
    stages.save(f"figure_{path.stem}", key, path.name)


# --------------------------------------------------------------------------- sections


def verdict_section(metrics: dict[str, Any]) -> list[Section]:
    """Build the report's first section: the verdict sentences and the design caveats."""
    lines = verdict_lines(metrics)
    if not lines:
        return []
    note = caveat_line(metrics) or ""
    if len(lines) > 1:
        count = len(paired_tests(metrics))
        holm = f"adjusted over all {count} paired tests" if count > 1 else "the only paired test"
        note = (
            f"Δ = macro F1 of the method − that of the other, on the same test cells; Holm p: "
            f"{holm} of the run. " + note
        ).strip()
    return [Section("verdict", "Verdict", bullets=[line.sentence for line in lines], note=note)]


def forest_table(metrics: dict[str, Any]) -> Table | None:
    """Tabulate the forest plot's numbers: one row per method, in the plot's order."""
    rows = forest_rows(metrics)
    if not rows:
        return None
    from scfmbench.report.tables import p_cell

    table = Table(
        "forest",
        ["method", "kind", "Δ macro F1", "95% CI", "p (Holm)"],
        caption=f"Δ macro F1 vs the best baseline ({best_baseline(metrics)}), largest first",
    )
    for row in rows:
        table.rows.append(
            [
                text(_row_label(row), "control" if row.kind == "control" else ""),
                text(row.kind),
                num(row.f1_diff),
                interval(list(row.ci95) if row.ci95 else None),
                p_cell(row.p_holm, significant=row.significant),
            ]
        )
    return table


def forest_section(metrics: dict[str, Any], run_dir: Path | None = None) -> list[Section]:
    """Build the report's second section: the forest plot (when drawn) and its table."""
    table = forest_table(metrics)
    if table is None:
        return []
    title = "Δ macro F1 vs the best baseline"
    figures = figure_if_exists(run_dir, FOREST_FIGURE, title) if run_dir is not None else []
    return [
        Section(
            "forest",
            title,
            tables=[table],
            figures=figures,
            note="Bars: 95% intervals of the paired difference; * = significant after Holm "
            "correction (p < 0.05).",
        )
    ]
