"""The statistics of a run, computed from its per-cell predictions table.

``predictions.tsv.gz`` holds one row per method, split and test cell (``method``, ``split``,
``repeat``, ``fold``, ``cell``, ``true``, ``pred`` and, where the probe gives them,
``proba:<class>`` columns). Every score, interval and test in ``metrics.json`` is a function
of that table, the class list and the design, so ``scfmbench stats RUN_DIR`` recomputes them.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from scfmbench._atomic import write_with
from scfmbench.errors import DataError
from scfmbench.evaluation.metrics import HEADLINE_METRICS, classification_metrics, delta, summarize
from scfmbench.evaluation.stats import (
    MIN_TEST_CELLS,
    Design,
    holm,
    interval_method,
    method_intervals,
    paired_comparison,
)

PREDICTIONS_FILE = "predictions.tsv.gz"
ALPHA = 0.05
PROBA_PREFIX = "proba:"
NEEDED_COLUMNS = ("method", "split", "true", "pred")
"""Columns of a predictions table that the statistics are computed from."""
MIN_FOLDS = 5
"""With fewer folds (one repeat of K-fold CV) the intervals get a run-level warning."""

logger = logging.getLogger(__name__)


def design_warnings(design: dict[str, Any]) -> list[str]:
    """Run-level warnings about the resampling design (``metrics.json["run"]["warnings"]``).

    Parameters
    ----------
    design : dict
        ``metrics.json["run"]["design"]``: ``name``, ``n_folds`` (and ``n_repeats``).

    Returns
    -------
    list of str
        One line when a single repeat of K-fold CV has K < ``MIN_FOLDS`` (its intervals use
        Student t with K − 1 degrees of freedom); else empty.
    """
    k = design.get("n_folds", 0)
    if design.get("name") != "cv" or k >= MIN_FOLDS:
        return []
    quantile = float(scipy_stats.t.ppf(1 - ALPHA / 2, k - 1))
    usual = float(scipy_stats.t.ppf(1 - ALPHA / 2, MIN_FOLDS - 1))
    return [
        f"only {k} folds: each 95% interval rests on {k} fold scores and uses Student t with "
        f"K − 1 = {k - 1} degree(s) of freedom (t = {quantile:.2f}, vs {usual:.2f} with "
        f"{MIN_FOLDS} folds), so it is wide; use --n-splits {MIN_FOLDS} or more, or add "
        "--n-repeats 3 for repeated K-fold cross-validation"
    ]


def constant_within_class(table: pd.DataFrame, method: str) -> bool:
    """Whether ``method`` predicts one label for all test cells of each class in every split.

    Such a method (e.g. ``majority``) scores the same on every class-stratified bootstrap
    resample, so its interval holds no cell-sampling variation (see docs/statistics.md).
    """
    rows = table[table["method"] == method]
    return bool(rows.groupby(["split", "true"])["pred"].nunique().max() == 1)


def predictions_table(
    predictions: dict, labels: pd.Series, split_set, methods: list
) -> pd.DataFrame:
    """One tidy row per (method, split, test cell) from the run's prediction payloads.

    Parameters
    ----------
    predictions : dict
        ``{(method name, split seed): payload}`` with ``cells``, ``pred`` and optional
        ``proba`` (n_test × n_classes, None rows for unassigned cells).
    labels : pandas.Series
        True label of every cell of the run (categorical; its categories are the classes).
    """
    classes = list(labels.cat.categories)
    frames = []
    for method in methods:
        for split in split_set.splits:
            payload = predictions[(method.name, split.seed)]
            frame = pd.DataFrame(
                {
                    "method": method.name,
                    "split": str(split.seed),
                    "repeat": -1 if split.repeat is None else split.repeat,
                    "fold": -1 if split.fold is None else split.fold,
                    "cell": payload["cells"],
                    "true": labels.loc[payload["cells"]].astype(str).to_numpy(),
                    "pred": payload["pred"],
                }
            )
            proba = payload.get("proba")
            if proba is not None:
                values = np.array(
                    [row if row is not None else [np.nan] * len(classes) for row in proba],
                    dtype=float,
                )
                for i, cls in enumerate(classes):
                    frame[f"{PROBA_PREFIX}{cls}"] = values[:, i]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """Write the table as gzip-compressed TSV (probabilities with 6 significant digits)."""
    write_with(
        Path(path),
        lambda tmp: table.to_csv(
            tmp, sep="\t", index=False, compression="gzip", float_format="%.6g"
        ),
    )


def read_predictions(path: Path) -> pd.DataFrame:
    """Read a predictions table; labels and cell names stay strings (no NA parsing).

    Parameters
    ----------
    path : pathlib.Path
        A ``predictions.tsv.gz`` written by :func:`write_predictions`.

    Returns
    -------
    pandas.DataFrame
        One row per method, split and test cell; ``proba:<class>`` columns as floats.

    Raises
    ------
    DataError
        The file cannot be read, is truncated or corrupt (not gzip, or not a table), or lacks
        a column of :data:`NEEDED_COLUMNS`.
    """
    fix = "rerun the same `scfmbench run` command to rewrite it, or restore the file from a backup"
    try:
        table = pd.read_csv(
            path,
            sep="\t",
            compression="gzip",
            dtype={"method": str, "split": str, "cell": str, "true": str, "pred": str},
            keep_default_na=False,
        )
    # a cut gzip ends in EOFError, a damaged one in zlib.error or BadGzipFile (an OSError);
    # bytes that are not UTF-8 text or not rows of one width are ValueErrors
    except (EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise DataError(f"{path} is truncated or corrupt ({_reason(exc)}); {fix}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    missing = [c for c in NEEDED_COLUMNS if c not in table.columns]
    if missing:
        found = ", ".join(repr(str(c)[:30]) for c in table.columns[:4])
        more = f" and {len(table.columns) - 4} more" if len(table.columns) > 4 else ""
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} of a predictions table (it has "
            f"{found}{more}); {fix}"
        )
    for column in table.columns:
        if column.startswith(PROBA_PREFIX):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def _reason(exc: BaseException) -> str:
    """One line on why a file could not be parsed (the exception's text, whitespace folded)."""
    if isinstance(exc, EOFError):
        return "its gzip data end early"
    return " ".join(str(exc).split()) or type(exc).__name__


def design_from_run(run: dict) -> Design:
    """Return the :class:`~.stats.Design` recorded in ``metrics.json["run"]["design"]``."""
    info = run["design"]
    return Design(info["name"], n_folds=info["n_folds"], test_train_ratio=info["test_train_ratio"])


def small_classes(table: pd.DataFrame, classes: list[str]) -> list[str]:
    """Classes with fewer than ``MIN_TEST_CELLS`` test cells in some split."""
    first = table[table["method"] == table["method"].iloc[0]]
    counts = cast(pd.DataFrame, first.groupby("split")["true"].value_counts().unstack(fill_value=0))
    counts = counts.reindex(columns=classes, fill_value=0)
    return [c for c in classes if counts[c].min() < MIN_TEST_CELLS]


def _sets(table: pd.DataFrame, method: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rows = cast(pd.DataFrame, table[table["method"] == method])
    return {
        cast(str, split): (group["true"].to_numpy(dtype=str), group["pred"].to_numpy(dtype=str))
        for split, group in rows.groupby("split", sort=False)
    }


def method_statistics(
    doc: dict[str, Any], table: pd.DataFrame, *, seed: int, context: str = ""
) -> dict[str, Any]:
    """Per-split scores, summaries with 95% intervals, and paired tests of every method.

    Fills (and returns) ``doc["methods"][name]`` ``splits`` scores, ``summary`` and
    ``significance`` (and ``constant_within_class``, when true), plus ``doc["comparisons"]``
    and ``doc["run"]`` fields ``best_baseline``, ``small_classes``, ``interval_method`` and
    (when there are any) ``warnings``. Per-split ``params``/``val_macro_f1`` already in
    ``doc`` are kept. ``context`` is put before the warnings it gives (e.g.
    ``"random-split comparison: "``).
    """
    run = doc["run"]
    classes = run["classes"]
    design = design_from_run(run)
    small = small_classes(table, classes)
    run["small_classes"] = small
    run["min_test_cells"] = MIN_TEST_CELLS
    run["interval_method"] = interval_method(design)
    found = design_warnings(run["design"])
    if found:
        run["warnings"] = found
        for line in found:
            logger.warning("warning: %s%s", context, line)
    sets = {name: _sets(table, name) for name in doc["methods"]}
    for name, entry in doc["methods"].items():
        per_split = entry.setdefault("splits", {})
        for split, (truth, pred) in sets[name].items():
            scores = classification_metrics(
                truth, pred, classes=classes, present_only=design.present_only
            ).to_dict()
            kept = [scores["per_class"][c]["f1"] for c in classes if c not in small]
            scores["macro_f1_excl_small"] = float(np.mean(kept)) if kept else None
            per_split.setdefault(split, {}).update(scores)
        summary = {
            m: summarize([per_split[s][m] for s in sets[name]])
            for m in (*HEADLINE_METRICS, "macro_f1_excl_small")
            if all(per_split[s][m] is not None for s in sets[name])
        }
        estimates = method_intervals(
            list(sets[name].values()), design, classes=classes, seed=seed, small=small
        )
        for metric, estimate in estimates.items():
            summary.setdefault(metric, {"mean": estimate.mean})
            summary[metric].update(
                {
                    "ci95": list(estimate.ci95),
                    "se": estimate.se,
                    "df": None if estimate.df is None or np.isinf(estimate.df) else estimate.df,
                }
            )
        entry["summary"] = summary
        if constant_within_class(table, name):
            entry["constant_within_class"] = True
    reference = run["reference"]
    ref = doc["methods"][reference]["summary"]
    for entry in doc["methods"].values():
        entry["delta_vs_reference"] = {
            m: delta(entry["summary"][m]["mean"], ref[m]["mean"]) for m in HEADLINE_METRICS
        }
    _comparisons(doc, sets, design, seed=seed)
    return doc


def validation_score(entry: dict) -> float:
    """Return the mean validation macro F1 over splits (``-inf`` without any).

    The best baseline and frozen probe are chosen by it; the test cells never take part.
    """
    values = [s.get("val_macro_f1") for s in entry["splits"].values()]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("-inf")


def planned_comparisons(methods: dict[str, dict]) -> list[tuple[str, str, str]]:
    """List (method, against, kind) of every paired test.

    Each method is compared with the best baseline (by validation macro F1), each pretrained
    method with its own random-init control (same probe), and each fine-tuned model with its
    best frozen probe (by validation macro F1).
    """
    baselines = [n for n, e in methods.items() if e["kind"] == "baseline"]
    best = max(baselines, key=lambda n: validation_score(methods[n])) if baselines else None
    out = []
    if best is not None:
        out += [(n, best, "vs best baseline") for n in methods if n != best]
    for name, entry in methods.items():
        model = entry.get("model")
        if not model or entry["kind"] == "control":
            continue
        control = next(
            (
                n
                for n, e in methods.items()
                if e["kind"] == "control"
                and e.get("model") == f"{model}-random"
                and e["probe"] == entry["probe"]
            ),
            None,
        )
        if control is not None:
            out.append((name, control, "vs random-init control"))
    for name, entry in methods.items():
        if entry["probe"] != "finetune":
            continue
        frozen = [
            n
            for n, e in methods.items()
            if e.get("model") == entry.get("model") and e["probe"] != "finetune"
        ]
        if frozen:
            partner = max(frozen, key=lambda n: validation_score(methods[n]))
            out.append((name, partner, "fine-tuned vs frozen"))
    return out


def _comparisons(doc: dict, sets: dict, design: Design, *, seed: int) -> None:
    methods = doc["methods"]
    classes = doc["run"]["classes"]
    planned = planned_comparisons(methods)
    best = next((b for _, b, kind in planned if kind == "vs best baseline"), None)
    doc["run"]["best_baseline"] = best
    doc["run"]["best_baseline_chosen_by"] = "validation macro F1 (mean over splits)"
    results = []
    for name, other, kind in planned:
        paired = [
            (split, truth, pred, sets[other][split][1])
            for split, (truth, pred) in sets[name].items()
        ]
        results.append(
            (
                name,
                other,
                kind,
                paired_comparison(paired, classes=classes, seed=seed, design=design),
            )
        )
    p_holm = holm([r.p for *_, r in results])
    mcnemar_ps = [r.mcnemar_p for *_, r in results if r.mcnemar_p is not None]
    mcnemar_holm = iter(holm(mcnemar_ps))
    comparisons = []
    for (name, other, kind, r), adjusted in zip(results, p_holm, strict=True):
        entry = {
            "method": name,
            "against": other,
            "kind": kind,
            "f1_diff": r.f1_diff,
            "f1_diff_ci95": list(r.f1_diff_ci95),
            "f1_diff_per_split": r.f1_diff_per_split,
            "accuracy_diff": r.accuracy_diff,
            "accuracy_diff_ci95": list(r.accuracy_diff_ci95),
            "p": r.p,
            "p_holm": adjusted,
            "bootstrap_p": r.bootstrap_p,
            "mcnemar_p": r.mcnemar_p,
            "mcnemar_p_holm": next(mcnemar_holm) if r.mcnemar_p is not None else None,
            "mcnemar_p_per_split": r.mcnemar_p_per_split,
            "discordant": {
                "only_method_right": r.discordant[0],
                "only_other_right": r.discordant[1],
            },
            "significant": bool(adjusted < ALPHA),
        }
        comparisons.append(entry)
        if kind == "vs best baseline":
            methods[name]["significance"] = {
                **{k: v for k, v in entry.items() if k not in ("method", "against", "kind")},
                "baseline": other,
                "discordant": {
                    "only_method_right": r.discordant[0],
                    "only_baseline_right": r.discordant[1],
                },
            }
    doc["comparisons"] = comparisons
