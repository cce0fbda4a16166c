"""Label efficiency: test macro F1 against the number of labelled training cells per class.

``run --train-sizes 1,5,10,25,50,all`` refits every probe of the run (baselines, frozen
probes, random-init controls) on nested, class-stratified subsets of each fold's training
cells, with the fold's own validation cells (which tune the probe) and test cells:

- For fold ``f`` and draw ``d`` (``0 .. train_size_seeds - 1``) every class's training cells
  are put in one random order (``numpy.random.default_rng([f_seed, d])``, classes in sorted
  order); size ``n`` keeps the first ``min(n, n_c)`` cells of each class ``c``, so each size
  holds every smaller size's cells. ``all`` is the whole training set: the run's own fit.
- Representations use no labels, so they are not refitted per size: HVG selection, PCA and
  scVI are fitted once per fold on all of its training cells (unlabelled), exactly as in the
  run, and only the probe sees the subset's labels. Embeddings are the run's (one pass per
  model). Fine-tuning is not swept (one fine-tuning per fold, size and draw is too costly).
- Macro F1 per (method, size): each fold's test score averaged over the draws, with the run's
  design interval (``scfmbench.evaluation.stats.design_estimate``) on those fold means. Its
  bootstrap is two-stage: a class-stratified resample of the fold's test cells (shared by the
  draws and by every method) and a resample of the draws
  (:func:`scfmbench.evaluation.section_stats.resample_draws`), so the
  interval covers the spread between draws also where the design's interval rests on the
  bootstrap alone (one test set, or folds that agree). Macro F1 averages the classes present in
  a held-out group's test cells, as the run's headline does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfmbench._progress import progress_bar
from scfmbench.benchmark.fitting import KeptFeatures
from scfmbench.benchmark.methods import Method
from scfmbench.benchmark.predict import (
    Prediction,
    Predictions,
    ProbeInputs,
    fit_and_predict_features,
    probe_grid,
)
from scfmbench.data.splits import Split, SplitSet
from scfmbench.evaluation.representations import SplitFeatures
from scfmbench.evaluation.section_stats import (
    ALL,
    sweep_interval_method,
    sweep_methods,
    sweep_stage,
)
from scfmbench.evaluation.stats import Design
from scfmbench.hashing import hash_json
from scfmbench.stages import StageStore

logger = logging.getLogger(__name__)

COMPACT_WIDTH = 256
"""Features of the run up to this many columns (PCA, scVI) are kept for the sweep; wider ones
(HVG expression) are rebuilt per fold, which is cheap and keeps memory flat."""
FIGURE = "figures/label_efficiency.png"

TrainSize = int | str


def nested_subsets(
    train_labels: pd.Series, sizes: Sequence[TrainSize], *, seed: Any
) -> dict[TrainSize, pd.Index]:
    """Nested class-stratified subsets of the training cells ``train_labels.index``.

    One permutation per class (classes in sorted order, one ``numpy.random.default_rng(seed)``);
    size ``n`` takes the first ``min(n, n_c)`` cells of class ``c``'s permutation, so a smaller
    size's cells are always among a larger size's. ``"all"`` takes every cell.

    Parameters
    ----------
    train_labels : pandas.Series
        Class of each training cell (index: cell names), length n_train.
    sizes : sequence of int or "all"
        Labelled cells per class.
    seed : int or sequence of int
        Seed of the generator (the sweep uses ``[fold seed, draw]``).

    Returns
    -------
    dict
        size → cell names (in the order of ``train_labels``).
    """
    values = train_labels.astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    rank = np.empty(len(values), dtype=np.int64)
    for cls in sorted(set(values)):
        members = np.flatnonzero(values == cls)
        rank[members[rng.permutation(len(members))]] = np.arange(len(members))
    return {
        size: train_labels.index.take(np.flatnonzero(rank < size))
        if isinstance(size, int)
        else train_labels.index  # "all"
        for size in sizes
    }


class CompactFeatures(KeptFeatures):
    """The run's baseline features per (representation, fold seed) that the sweep keeps.

    Only those of at most ``COMPACT_WIDTH`` columns are kept (PCA, scVI: costly to refit,
    small to hold).
    """

    def __init__(self) -> None:
        super().__init__(max_width=COMPACT_WIDTH)


def _subset_features(feats: SplitFeatures, train: pd.Index, subset: pd.Index) -> SplitFeatures:
    return replace(feats, train=feats.train[train.get_indexer(subset)])


def _record(prediction: Prediction, n_train: int) -> dict[str, Any]:
    return {
        "pred": prediction.predicted,
        "params": prediction.params,
        "val_macro_f1": prediction.val_macro_f1,
        "n_train": int(n_train),
    }


def _sweep_one(
    method: Method,
    split: Split,
    subsets: dict[int, dict[TrainSize, pd.Index]],
    feats_of: Callable[[], SplitFeatures],
    labels: pd.Series,
    code_of: dict[str, int],
    classes: list[str],
    grid: tuple[dict[str, Any], ...] | None,
    full: Prediction,
) -> dict[str, list[dict[str, Any]]]:
    """Fit ``method`` on every numeric size and draw of one fold.

    A subset equal to the whole training set, or to a subset already fitted, reuses that fit.
    """
    fitted: dict[str, dict] = {}
    out: dict[str, list[dict]] = {}
    feats = None
    for size in next(iter(subsets.values())):
        if size == ALL:
            continue
        runs = []
        for by_size in subsets.values():
            subset = by_size[size]
            if len(subset) == len(split.train):
                runs.append(_record(full, len(subset)))
                continue
            key = hash_json(list(subset))
            if key not in fitted:
                feats = feats if feats is not None else feats_of()
                prediction = fit_and_predict_features(
                    method,
                    _subset_features(feats, split.train, subset),
                    labels,
                    replace(split, train=subset),
                    code_of,
                    classes,
                    grid=grid,
                )
                fitted[key] = _record(prediction, len(subset))
            runs.append(fitted[key])
        out[str(size)] = runs
    return out


def label_efficiency(
    inputs: ProbeInputs,
    split_set: SplitSet,
    methods: list[Method],
    predictions: Predictions,
    stages: StageStore,
    *,
    features: dict[tuple[str, int], SplitFeatures] | None = None,
    run_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the ``metrics.json["label_efficiency"]`` block of a run (and its figure).

    Parameters
    ----------
    inputs : scfmbench.benchmark.predict.ProbeInputs
        The run's cells, embeddings and labels; of its ``config``, ``train_sizes``
        (labelled cells per class, ``"all"``) and ``train_size_seeds`` (draws per fold) are
        read, with the settings every probe and representation reads.
    split_set, stages
        As in :func:`scfmbench.benchmark.fitting.predict_all`.
    methods : list of Method
        The run's methods; fine-tuned ones are left out.
    predictions : dict
        The run's predictions ``{(method, fold seed): Prediction}``: the ``all`` size.
    features : dict, optional
        Baseline features ``{(representation, fold seed): SplitFeatures}`` kept from the
        run's own fits (:class:`CompactFeatures`); others are rebuilt once per fold.
    run_dir : Path, optional
        Where ``figures/label_efficiency.png`` goes (when ``config.figures``).

    Returns
    -------
    dict
        ``sizes``, ``draws``, ``capped`` {size: {class: training cells, fewest over folds}},
        ``n_train_cells`` {size: mean labelled cells per fold}, ``interval_method``,
        ``methods`` {name: {kind, sizes: {size: {mean, ci95, se, df, per_split,
        per_draw}}}} and ``figure``.
    """
    config, labels = inputs.config, inputs.labels
    sizes: list[TrainSize] = list(config.train_sizes or [])
    numeric = [s for s in sizes if s != ALL]
    draws = list(range(config.train_size_seeds))
    swept = [m for m in methods if m.probe != "finetune"]
    classes = list(labels.cat.categories)
    code_of = {c: i for i, c in enumerate(classes)}
    features = features if features is not None else {}
    fits: dict[tuple[str, int], dict[str, list[dict]]] = {}
    capped: dict[str, dict[str, int]] = {}
    n_train: dict[str, list[int]] = {str(s): [] for s in sizes}
    bar = progress_bar(
        total=len(swept) * len(split_set.splits),
        desc="label efficiency",
        unit="fit",
        progress=progress,
    )
    for split in split_set.splits:
        train_labels = labels.loc[split.train]
        counts = train_labels.astype(str).value_counts()
        for size in numeric:
            for cls, n in counts[counts < size].items():
                entry = capped.setdefault(str(size), {})
                entry[cls] = min(int(n), entry.get(cls, int(n)))
            n_train[str(size)].append(int(np.minimum(counts, size).sum()))
        if ALL in sizes:
            n_train[ALL].append(len(split.train))
        subsets = {d: nested_subsets(train_labels, sizes, seed=[split.seed, d]) for d in draws}
        built: dict[str, SplitFeatures] = {}

        def feats_of(method, split=split, built=built):
            if method.model is not None:
                return inputs.features(method, split)
            rep = method.representation
            if rep not in built:
                kept = features.get((rep, split.seed))
                if kept is None:
                    with stages.timed("label_efficiency:features"):
                        kept = inputs.features(method, split)
                built[rep] = kept
            return built[rep]

        for method in swept:
            grid = probe_grid(method.probe, config)
            key = inputs.cache_key(method, split, sizes=numeric, draws=draws)
            stage = sweep_stage(method.name, split.seed)
            payload = stages.load(stage, key)
            if payload is None:
                with stages.timed(f"label_efficiency:{method.name}"):
                    payload = _sweep_one(
                        method,
                        split,
                        subsets,
                        lambda m=method: feats_of(m),
                        labels,
                        code_of,
                        classes,
                        grid,
                        predictions[(method.name, split.seed)],
                    )
                stages.save(stage, key, payload)
            if ALL in sizes:
                full = predictions[(method.name, split.seed)]
                payload = {**payload, ALL: [_record(full, len(split.train))]}
            fits[(method.name, split.seed)] = payload
            bar.update()
    bar.close()
    for size, found in capped.items():
        logger.info(
            "label efficiency, %s cells per class: %s (fewest training cells in a fold) — "
            "these classes use all their training cells",
            size,
            ", ".join(f"{c} has {n}" for c, n in sorted(found.items())),
        )
    with stages.timed("label_efficiency:stats"):
        design = Design.of(split_set)
        block: dict[str, Any] = {
            "sizes": sizes,
            "draws": len(draws),
            "capped": capped,
            "n_train_cells": {s: float(np.mean(v)) for s, v in n_train.items()},
            "all_cells_per_class": float(
                np.mean([len(split.train) for split in split_set.splits]) / len(classes)
            ),
            "interval_method": sweep_interval_method(design, len(draws)),
            "validation": "each fold's validation cells (all labelled) tune every probe, as in "
            "the run; test cells are the run's",
            "representations": "HVG, PCA and scVI are fitted once per fold on all its training "
            "cells without labels; only the probe is refitted on the labelled subset",
            "methods": {},
        }
        block["methods"] = sweep_methods(
            {
                method.name: [
                    (
                        labels.loc[split.test].astype(str).to_numpy(),
                        {
                            size: [r["pred"] for r in runs]
                            for size, runs in fits[(method.name, split.seed)].items()
                        },
                    )
                    for split in split_set.splits
                ]
                for method in swept
            },
            {method.name: method.kind for method in swept},
            sizes,
            [str(split.seed) for split in split_set.splits],
            classes=classes,
            design=design,
            seed=config.seed,
        )
    if config.figures and run_dir is not None:
        with stages.timed("label_efficiency:figure"):
            write_figure(block, run_dir / FIGURE, title=f"{config.name}: label efficiency")
        block["figure"] = FIGURE
    return block


def figure_positions(block: dict[str, Any]) -> tuple[list[float], list[str]]:
    """Return the x positions (labelled cells per class, log axis) and tick labels of sizes.

    ``all`` sits at the mean training cells per class, at least twice the largest numeric
    size.
    """
    numeric = [s for s in block["sizes"] if s != ALL]
    x = [float(s) for s in numeric]
    ticks = [str(s) for s in numeric]
    if ALL in block["sizes"]:
        per_class = block["all_cells_per_class"]
        x.append(max(per_class, 2 * max(x, default=0.5)))
        ticks.append(f"all\n(~{per_class:.0f})")
    return x, ticks


def write_figure(block: dict[str, Any], path, *, title: str) -> None:
    """Macro F1 against labelled cells per class: one line per method, 95% CI band."""
    from scfmbench.report.figures import plot_label_efficiency

    x, ticks = figure_positions(block)
    curves = {
        name: [entry["sizes"][str(s)] for s in block["sizes"]]
        for name, entry in block["methods"].items()
    }
    dashed = {n for n, e in block["methods"].items() if e["kind"] == "control"}
    plot_label_efficiency(x, ticks, curves, path, title=title, dashed=dashed)
