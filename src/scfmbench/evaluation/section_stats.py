"""Statistics of a run's ``holdout`` and ``label_efficiency`` sections.

The run (:mod:`scfmbench.benchmark.holdout`, :mod:`scfmbench.benchmark.label_efficiency`)
builds both sections with these functions, and ``scfmbench stats`` rebuilds them with the
same functions from what the run saved: the held-out section from the run's statistics, the
random-split design's ``random_split/metrics.json`` and ``random_split/predictions.tsv.gz``
and ``splits/splits.json``; the label-efficiency section from each swept fit's predictions
(``stages/label_efficiency_<method>_seed<key>.json``, one list of predicted labels per size
and draw) and, for size ``all``, ``predictions.tsv.gz``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd

from scfmbench.evaluation.run_stats import design_from_run
from scfmbench.evaluation.stats import (
    N_BOOTSTRAP,
    Design,
    _codes,
    design_estimate,
    interval_method,
)
from scfmbench.stages import StageStore, safe_name

ALL = "all"
DRAW_STREAM = 1
"""Second seed word of the generator that picks draws in :func:`resample_draws` (the first is
the run's seed), so the picks never reuse the cell resamples' stream."""
RANDOM_SPLIT_DIR = "random_split"
"""Folder of a held-out run with the random-split design scored beside the held-out folds
(its ``splits/``, ``stages/``, ``metrics.json`` and ``predictions.tsv.gz``)."""
MACRO_F1_NOTE = (
    "macro F1 of a held-out fold averages the classes present in its test cells; test cells "
    "of classes the fold's training cells lack are dropped and listed per fold"
)
COUNT_KEYS = ("capped", "n_train_cells", "all_cells_per_class")
"""Label-efficiency keys that count training cells, which the saved predictions do not hold."""


UNCHECKED = {
    "embeddings": "zero-shot scores of the embeddings, not of the predictions",
    "layers": "layer-wise probes, whose predictions are not saved",
    "finetune": "training curves of the fine-tuning",
}
"""Sections of ``metrics.json`` that ``scfmbench stats`` does not recompute, and why."""
OUTSIDE = ("schema_version", "scfmbench_version", "run", "methods", "comparisons")
NOT_STATISTICS = ("diagnostics", "skipped", "timings", "holdout", "label_efficiency")
"""Sections without statistics, or that ``scfmbench.results.check_statistics`` handles."""


def unchecked_sections(stored: dict[str, Any]) -> list[str]:
    """Non-empty sections of ``stored`` with statistics that ``stats`` does not recompute.

    Returns
    -------
    list of str
        ``"<section> (<why>)"``, e.g. ``"embeddings (zero-shot scores of the embeddings, not
        of the predictions)"``.
    """
    return [
        f"{key} ({UNCHECKED.get(key, 'not recomputed from predictions')})"
        for key, value in stored.items()
        if key not in (*OUTSIDE, *NOT_STATISTICS) and value
    ]


def sweep_stage(method: str, seed: int | str) -> str:
    """Name of the saved stage with one method's label-efficiency fits on one fold."""
    return f"label_efficiency_{method}_seed{seed}"


def sweep_interval_method(design: Design, n_draws: int) -> str:
    """Say in words how the label-efficiency intervals of ``design`` are computed."""
    if n_draws > 1:
        return (
            f"{interval_method(design)}; each fold's test macro F1 is the mean over the "
            f"{n_draws} draws of labelled cells, and its bootstrap replicates resample the "
            "draws as well as the test cells (two-stage bootstrap), so the spread between "
            "draws is covered"
        )
    return (
        f"{interval_method(design)}; one draw of labelled cells per fold, so the spread "
        "between draws is not measured"
    )


def sweep_methods(
    folds: dict[str, list[tuple[np.ndarray, dict[str, list]]]],
    kinds: dict[str, str],
    sizes: list,
    names: list[str],
    *,
    classes: list[str],
    design: Design,
    seed: int,
) -> dict[str, Any]:
    """Return ``label_efficiency["methods"]``: each method's :func:`size_estimate` per size.

    Parameters
    ----------
    folds : dict
        Method → one ``(y_true (n_j,), {size: [y_pred (n_j,) per draw]})`` per fold, in the
        order of ``names``.
    kinds : dict
        Method → its kind (``baseline``, ``frozen``, ``control``).
    sizes : list of int or "all"
        The swept sizes.
    names : list of str
        Fold keys.
    classes, design, seed
        As in :func:`size_estimate`.

    Returns
    -------
    dict
        ``{method: {kind, sizes: {size: size_estimate(...)}}}``.
    """
    return {
        method: {
            "kind": kinds[method],
            "sizes": {
                str(size): size_estimate(
                    [(truth, preds[str(size)]) for truth, preds in per_fold],
                    names,
                    classes=classes,
                    design=design,
                    seed=seed,
                )
                for size in sizes
            },
        }
        for method, per_fold in folds.items()
    }


def recompute_sweep(
    block: dict[str, Any], doc: dict[str, Any], table: pd.DataFrame, stages: StageStore
) -> tuple[dict[str, Any] | None, list[str]]:
    """Rebuild a stored ``label_efficiency`` section from the saved per-draw predictions.

    Parameters
    ----------
    block : dict
        The stored ``metrics.json["label_efficiency"]``: its ``sizes``, ``draws`` and method
        ``kind`` say what to recompute.
    doc : dict
        The run's document (``run`` holds the fold keys, classes, design and stats seed).
    table : pandas.DataFrame
        The run's predictions table: test labels of every fold, and the size ``all``.
    stages : scfmbench.stages.StageStore
        The run's saved stages (one per swept method and fold, :func:`sweep_stage`).

    Returns
    -------
    (section, missing)
        The section with ``interval_method`` and ``methods`` recomputed (the training-cell
        counts :data:`COUNT_KEYS` copied as stored), or None with the stage files that are
        missing.
    """
    run = doc["run"]
    names = [str(s) for s in run["seeds"]]
    numeric = [str(s) for s in block["sizes"] if s != ALL]
    folds: dict[str, list[tuple[np.ndarray, dict[str, list]]]] = {}
    missing = []
    for method in block["methods"]:
        rows = cast(pd.DataFrame, table[table["method"] == method])
        folds[method] = []
        for name in names:
            fold = cast(pd.DataFrame, rows[rows["split"] == name])
            payload = stages.saved(sweep_stage(method, name))
            if payload is None or any(size not in payload for size in numeric):
                missing.append(f"stages/{safe_name(sweep_stage(method, name))}.json")
                continue
            preds = {size: [r["pred"] for r in payload[size]] for size in numeric}
            preds[ALL] = [fold["pred"].to_numpy(dtype=str)]
            folds[method].append((fold["true"].to_numpy(dtype=str), preds))
    if missing:
        return None, missing
    design = design_from_run(run)
    kinds = {name: entry["kind"] for name, entry in block["methods"].items()}
    methods = sweep_methods(
        folds,
        kinds,
        block["sizes"],
        names,
        classes=run["classes"],
        design=design,
        seed=run["stats_seed"],
    )
    return {
        **block,
        "interval_method": sweep_interval_method(design, block["draws"]),
        "methods": methods,
    }, []


def holdout_section(
    metrics: dict[str, Any], random_doc: dict[str, Any], index: dict[str, Any]
) -> dict[str, Any]:
    """Build ``metrics.json["holdout"]``: the random-split design beside the held-out folds.

    Parameters
    ----------
    metrics : dict
        The held-out run's document (``methods`` with per-fold scores and summaries, and
        ``run.interval_method``).
    random_doc : dict
        The random-split design's document (``random_split/metrics.json``).
    index : dict
        ``splits/splits.json["holdout"]``: the fold ``settings`` and per-fold ``folds`` info.

    Returns
    -------
    dict
        ``key``, ``mode``, ``train_groups``, ``test_groups``, ``n_folds``, ``macro_f1``,
        ``interval_method``, ``folds``, ``random_split`` and per method ``kind``,
        ``random_split`` {macro_f1, ci95}, ``held_out`` {macro_f1, ci95, per_group} and
        ``drop`` (random-split minus held-out macro F1; None without a random-split score).
    """
    folds = index["folds"]
    rows = {}
    for name, entry in metrics["methods"].items():
        held = entry["summary"]["macro_f1"]
        random = random_doc["methods"].get(name, {}).get("summary", {}).get("macro_f1")
        rows[name] = {
            "kind": entry["kind"],
            "random_split": None
            if random is None
            else {"macro_f1": random["mean"], "ci95": random.get("ci95")},
            "held_out": {
                "macro_f1": held["mean"],
                "ci95": held.get("ci95"),
                "per_group": {
                    folds[seed]["group"]: split["macro_f1"]
                    for seed, split in entry["splits"].items()
                },
            },
            "drop": None if random is None else random["mean"] - held["mean"],
        }
    settings = index["settings"]
    return {
        "key": settings["key"],
        "mode": "directed" if settings["train_groups"] else "leave-one-group-out",
        "train_groups": settings["train_groups"],
        "test_groups": settings["test_groups"],
        "n_folds": len(folds),
        "macro_f1": MACRO_F1_NOTE,
        "interval_method": metrics["run"].get("interval_method"),
        "folds": folds,
        "random_split": {
            "design": random_doc["run"]["design"],
            "seeds": random_doc["run"]["seeds"],
            "interval_method": random_doc["run"]["interval_method"],
            "best_baseline": random_doc["run"]["best_baseline"],
        },
        "methods": rows,
    }


def size_estimate(
    sets: list[tuple[np.ndarray, list]],
    names: list[str],
    *,
    classes: list[str],
    design: Design,
    seed: int,
    n_boot: int = N_BOOTSTRAP,
) -> dict[str, Any]:
    """Macro F1 of one method at one size over the design's test sets, with its interval.

    Parameters
    ----------
    sets : list of (y_true (n_j,), [y_pred (n_j,) per draw])
        Test labels of each fold and the predictions of every draw (strings).
    names : list of str
        Fold keys, in the order of ``sets``.
    classes : list of str
        The run's classes.
    design : Design
        The run's design (interval formula, see :func:`scfmbench.evaluation.stats.design_estimate`).
    seed : int
        Bootstrap seed (fold ``j`` uses ``seed + j``, as the run's own intervals do).

    Returns
    -------
    dict
        ``mean``, ``ci95`` [lo, hi], ``se``, ``df`` (None: bootstrap or normal),
        ``per_split`` {fold: mean over draws}, ``per_draw`` {fold: [macro F1 per draw]}.
    """
    from scfmbench.evaluation.bootstrap import score_sets

    coded = []
    for truth, preds in sets:
        true, codes = _codes(truth, preds, classes)
        coded.append((true, codes))
    scored = score_sets(
        coded,
        len(classes),
        n_boot=n_boot,
        seed=seed,
        same_cells=design.name == "transfer",
        present_only=design.present_only,
    )
    per_draw = [[p["macro_f1"] for p in points] for points, _ in scored]
    values = np.array([np.mean(v) for v in per_draw])
    rng = np.random.default_rng([seed, DRAW_STREAM])
    reps = np.stack(
        [resample_draws(np.stack([b["macro_f1"] for b in boots]), rng) for _, boots in scored]
    )
    estimate = design_estimate(values, reps, design)
    return {
        "mean": estimate.mean,
        "ci95": list(estimate.ci95),
        "se": estimate.se,
        "df": None if estimate.df is None or np.isinf(estimate.df) else estimate.df,
        "per_split": dict(zip(names, map(float, values), strict=True)),
        "per_draw": dict(zip(names, per_draw, strict=True)),
    }


def resample_draws(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two-stage bootstrap replicates of the mean over draws of one test set.

    Replicate ``b`` averages the cell resample ``b`` of ``D`` draws picked with replacement
    among the ``D`` draws, so its variance holds the spread between draws (about
    ``(D - 1) / D² · s²_draws``) on top of cell sampling (Davison & Hinkley 1997, §3.8).
    With one draw, or draws that agree on every resample, it is the plain mean over draws.

    Parameters
    ----------
    scores : numpy.ndarray
        Shape (D, B): each draw's score on each of the B shared cell resamples.
    rng : numpy.random.Generator
        Picks the draws, ``D`` per replicate (nothing is drawn when ``D == 1``).

    Returns
    -------
    numpy.ndarray
        Shape (B,).
    """
    n_draws, n_boot = scores.shape
    if n_draws == 1:
        return scores[0].copy()
    picked = rng.integers(0, n_draws, size=(n_boot, n_draws))
    return scores[picked, np.arange(n_boot)[:, None]].mean(axis=1)
