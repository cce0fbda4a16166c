"""Gaps in label coverage, in words: classes a transfer direction or a held-out fold drops.

The run logs these lines as warnings and the report lists them, so both say the same.
"""

from __future__ import annotations

from typing import Any


def coverage_lines(direction: str, coverage: dict[str, dict[str, int]]) -> list[str]:
    """Describe each gap in a direction's label coverage, one line per gap.

    Parameters
    ----------
    direction : str
        How the lines name the direction, e.g. ``"pbmc3k->kang2018"``.
    coverage : dict of str to dict of str to int
        :attr:`scfmbench.benchmark.transfer.TransferData.coverage`: per kind of gap
        (``train_classes_without_test``, ``train_dropped_by_map``, ``test_dropped_by_map``,
        ``test_classes_not_in_train``) the cells per class it concerns.

    Returns
    -------
    list of str
        One line per kind of gap found; empty when the label map covers every class.
    """

    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{k!r} {v}" for k, v in counts.items())

    lines = []
    if coverage.get("train_classes_without_test"):
        found = coverage["train_classes_without_test"]
        lines.append(
            f"{direction}: {len(found)} training class(es) have no test cells, so they are "
            f"trained but never scored (training cells: {listed(found)}); map them to null "
            "to leave them out"
        )
    for key, what in (
        ("train_dropped_by_map", "training cells mapped to null by the label map"),
        ("test_dropped_by_map", "test cells mapped to null by the label map"),
        ("test_classes_not_in_train", "test cells of classes the training data lacks"),
    ):
        if coverage.get(key):
            lines.append(
                f"{direction}: dropped {sum(coverage[key].values())} {what} "
                f"({listed(coverage[key])})"
            )
    return lines


def fold_lines(fold: dict[str, Any]) -> list[str]:
    """Describe the classes a held-out fold cannot score or trains without testing.

    Parameters
    ----------
    fold : dict
        One fold of ``metrics.json["holdout"]["folds"]``: its ``group`` and, per class,
        ``test_classes_not_in_train`` (test cells dropped, worded as for a transfer) and
        ``train_classes_without_test`` (left out of the fold's macro F1).

    Returns
    -------
    list of str
        One line per kind of gap; empty when the fold scores every class it trains.
    """
    where = f"held out {fold['group']}"
    lines = coverage_lines(
        where, {"test_classes_not_in_train": fold.get("test_classes_not_in_train") or {}}
    )
    absent = fold.get("train_classes_without_test") or {}
    if absent:
        lines.append(
            f"{where}: {len(absent)} training class(es) have no test cells and are left out of "
            f"this fold's macro F1 ({', '.join(map(repr, absent))})"
        )
    return lines
