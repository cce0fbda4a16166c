"""``transfer.md``: a transfer run's label coverage, scores and paired tests per direction."""

from __future__ import annotations

from typing import Any

from scfmbench.report.coverage import coverage_lines
from scfmbench.report.tables import p_cell

__all__ = ["transfer_markdown"]


def transfer_markdown(doc: dict[str, Any]) -> str:
    """Render ``transfer.md``: label coverage, then per direction its scores and tests.

    Parameters
    ----------
    doc : dict
        A transfer's ``metrics.json`` document.

    Returns
    -------
    str
        Markdown text.
    """
    lines = ["# scfmbench cross-dataset transfer", ""]
    gaps = [
        line
        for direction, info in doc["transfer"]["directions"].items()
        for line in coverage_lines(direction, info.get("coverage") or {})
    ]
    if gaps:
        lines += ["## Label coverage", "", *[f"- {line}" for line in gaps], ""]
    for train_name, row in doc["transfer"]["matrix"].items():
        for test_name, results in row.items():
            info = doc["transfer"]["directions"][f"{train_name}->{test_name}"]
            warned = any(r.get("warnings") for r in results.values())
            lines += [
                f"## train {train_name} → test {test_name}",
                "",
                f"{info['n_shared_genes']} shared genes; {info['n_train_cells']} training "
                f"cells; {info['n_test_cells']} test cells; classes {info['classes']}; "
                f"test classes not in train (dropped): {info['dropped_test_classes'] or 'none'}",
                "",
                "| method | kind | accuracy | macro F1 | macro F1 95% CI |"
                + (" warnings |" if warned else ""),
                "| --- | --- | --- | --- | --- |" + (" --- |" if warned else ""),
            ]
            lines += [
                f"| {m} | {r['kind']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                + _interval_text(r.get("summary", {}).get("macro_f1", {}).get("ci95"))
                + " |"
                + (f" {'; '.join(r.get('warnings') or []) or '—'} |" if warned else "")
                for m, r in results.items()
            ]
            lines.append("")
            comparisons = info.get("comparisons") or []
            if comparisons:
                lines += [
                    "| method | vs | comparison | ΔF1 | ΔF1 95% CI | p (Holm) |",
                    "| --- | --- | --- | --- | --- | --- |",
                ]
                lines += [
                    f"| {c['method']} | {c['against']} | {c['kind']} | {c['f1_diff']:.3f} | "
                    f"{_interval_text(c['f1_diff_ci95'])} | "
                    f"{p_cell(c['p_holm'], significant=c['significant']).text} |"
                    for c in comparisons
                ]
                lines.append("")
    return "\n".join(lines)


def _interval_text(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"
