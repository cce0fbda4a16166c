"""Held-out groups: domain shift inside one dataset (``run --holdout-key COL``).

Each distinct value of ``obs[COL]`` (a donor, sample, condition or batch) is a group. The
``holdout`` design makes one fold per group: its test set is every cell of that group, its
training and validation cells a stratified split of the other groups' cells (validation
``max(1, round(n_c · f_val))`` cells per class, as in the ``cv`` design). With
``train_groups``/``test_groups`` it makes one directed fold instead (e.g. Kang 2018 control →
IFN-β stimulated).

A class the held-out cells have but the fold's training cells lack cannot be predicted: its
test cells are dropped from that fold (as a transfer drops target classes the training data
lacks) and listed per class in ``metrics.json["holdout"]["folds"]`` and the report. Macro F1
of a fold averages the classes present in its test cells (``stats`` design ``holdout``).

The run also scores its random-split design (``config.design``, default 5-fold cv) on the same
embeddings, so ``metrics.json["holdout"]`` holds, per method, the random-split and held-out
macro F1 with their intervals and the drop. ``docs/statistics.md`` gives the formulas.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfmbench.benchmark.document import build_metrics
from scfmbench.benchmark.finetuning import finetune_models
from scfmbench.benchmark.fitting import predict_all
from scfmbench.benchmark.methods import Method
from scfmbench.benchmark.predict import ProbeInputs
from scfmbench.benchmark.rundata import RunData, random_splits
from scfmbench.config import RunConfig
from scfmbench.data.splits import (
    Split,
    SplitSet,
    carve_validation,
    check_stratifiable,
    labels_hash,
    load_splits,
    save_splits,
)
from scfmbench.data.validate import ValidatedData
from scfmbench.errors import ConfigError, SchemaError, SplitError, setting
from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, write_predictions
from scfmbench.evaluation.section_stats import RANDOM_SPLIT_DIR, holdout_section
from scfmbench.hashing import hash_strings
from scfmbench.registry import did_you_mean
from scfmbench.report.coverage import fold_lines
from scfmbench.results import write_metrics
from scfmbench.stages import StageStore

logger = logging.getLogger(__name__)

DESIGN = "holdout"
RANDOM_SPLIT_CONTEXT = "random-split comparison: "
"""Put before the warnings about the random-split design scored beside the held-out folds."""


def check_holdout_options(
    key: str | None, train_groups: list[str] | None, test_groups: list[str] | None
) -> None:
    """Check the held-out-group options.

    Raises
    ------
    ConfigError
        Group lists without a column, one list without the other, or a value in both lists.
    """
    if key is None:
        if train_groups or test_groups:
            raise ConfigError(
                f"{setting('train_groups')} and {setting('test_groups')} name values of an obs "
                f"column; set {setting('holdout_key')} too, e.g. --holdout-key condition "
                "--train-groups ctrl --test-groups stim."
            )
        return
    if bool(train_groups) != bool(test_groups):
        given, missing = (
            ("train_groups", "test_groups") if train_groups else ("test_groups", "train_groups")
        )
        raise ConfigError(
            f"{setting(given)} needs {setting(missing)} too (a directed shift trains on one set "
            "of groups and tests on another); give both, or neither for one fold per group."
        )
    both = sorted(set(train_groups or []) & set(test_groups or []))
    if both:
        raise ConfigError(
            f"group(s) {both} are in both train_groups and test_groups; a held-out group "
            "must not be trained on — remove them from one list."
        )


GROUP_COLUMNS_FIX = f"choose a donor, sample, condition or batch column as {setting('holdout_key')}"


def group_labels(
    obs: pd.DataFrame,
    labels: pd.Series,
    key: str,
    *,
    min_cells: int = RunConfig.model_fields["min_cells_per_class"].default,
) -> pd.Series:
    """Return the group (as a string) of every run cell, index = ``labels.index``.

    A column of groups holds a few values shared by many cells. Two kinds of column are
    refused as a measurement per cell rather than groups: a float column with a non-integer
    value (e.g. ``percent_mt``), and a column whose median group has fewer than
    ``min_cells`` cells (about one group per cell, e.g. a cell barcode or ``nCount_RNA``),
    which would make one fold per cell.

    Parameters
    ----------
    obs : pandas.DataFrame
        The run's cell annotations, rows in the order of ``labels`` (n_cells rows).
    labels : pandas.Series
        The run's cell labels (n_cells).
    key : str
        The obs column holding the groups.
    min_cells : int
        Fewest cells the median group may hold (the run's ``min_cells_per_class``,
        default 10).

    Returns
    -------
    pandas.Series
        The group of each cell (strings), named ``key``.

    Raises
    ------
    SchemaError
        ``key`` is not a column of ``obs``, some cells have no value in it, or it holds a
        measurement rather than groups (non-integer numbers, or a median group smaller than
        ``min_cells``).
    """
    if key not in obs.columns:
        columns = [str(c) for c in obs.columns]
        raise SchemaError(
            f"{setting('holdout_key')} {key!r} is not an obs column; choose from {columns}."
            + did_you_mean(key, columns)
        )
    values = obs[key]
    missing = int(values.isna().sum())
    if missing:
        raise SchemaError(
            f"obs[{key!r}] has no value for {missing} cells; fill them in or choose another "
            f"{setting('holdout_key')}."
        )
    if pd.api.types.is_float_dtype(values.dtype):
        numbers = values.to_numpy(dtype=float)
        fractional = numbers[numbers != np.round(numbers)]
        if len(fractional):
            raise SchemaError(
                f"obs[{key!r}] holds non-integer numbers (e.g. {fractional[0]:g}), a "
                f"measurement per cell, not groups; {GROUP_COLUMNS_FIX} (store group codes "
                "as strings)."
            )
    groups = pd.Series(values.astype(str).to_numpy(), index=labels.index, name=key)
    sizes = groups.value_counts()
    median = float(sizes.median())
    if median < min_cells:
        raise SchemaError(
            f"obs[{key!r}] has {len(sizes)} groups for {len(groups)} cells (the median group "
            f"holds {median:g} cell{'' if median == 1 else 's'}, fewer than "
            f"min_cells_per_class={min_cells}): about one group per cell, one fold each; "
            f"{GROUP_COLUMNS_FIX}."
        )
    return groups


def _check_values(wanted: list[str], present: list[str], key: str, option: str) -> None:
    for value in wanted:
        if value not in present:
            raise SplitError(
                f"{option} value {value!r} is not in obs[{key!r}], which holds {present}."
                + did_you_mean(value, present)
            )


def holdout_folds(
    labels: pd.Series,
    groups: pd.Series,
    *,
    seed: int = 42,
    val_fraction: float = 0.1,
    train_groups: list[str] | None = None,
    test_groups: list[str] | None = None,
) -> tuple[tuple[Split, ...], dict[str, dict[str, Any]]]:
    """One fold per held-out group, or one directed fold ``train_groups`` → ``test_groups``.

    Fold ``i`` (groups in sorted order) is keyed ``seed + i``. Its training and validation
    cells are the training groups' cells split per class by
    :func:`scfmbench.data.splits.carve_validation` (generator seeded ``seed + i``); its test cells
    are the held-out group's cells of the classes those training cells hold.

    Parameters
    ----------
    labels : pandas.Series
        Class of each cell (index: cell names), length n_cells.
    groups : pandas.Series
        Group of each cell (strings, same index), e.g. from :func:`group_labels`.
    seed : int
        Key of the first fold and seed of its validation draw (default 42).
    val_fraction : float
        Validation cells per class as a fraction of the class's training-group cells
        (default 0.1).
    train_groups, test_groups : list of str, optional
        Both or neither: a directed shift (one fold).

    Returns
    -------
    (folds, info)
        The folds (``repeat`` 0, ``fold`` i, ``group`` the held-out group(s)); ``info`` maps
        each fold key (str) to ``group``, ``train_groups``, ``test_groups``, ``n_train``,
        ``n_val``, ``n_test``, ``test_classes_not_in_train`` (dropped test cells per class)
        and ``train_classes_without_test`` (training-group cells, train and validation, per
        class absent from the test cells).

    Raises
    ------
    SplitError
        One group only, an unknown group value, a training set with a class of 1–2 cells,
        or a held-out group with no cell of a training class.
    """
    key = str(groups.name or "group")
    present = sorted(groups.unique())
    if train_groups is None or test_groups is None:
        if len(present) < 2:
            raise SplitError(
                f"obs[{key!r}] holds one group only ({present[0]!r}); held-out groups need ≥ 2 "
                f"— choose another {setting('holdout_key')}."
            )
        plan = [([g for g in present if g != held], [held]) for held in present]
    else:
        _check_values(list(train_groups), present, key, setting("train_groups"))
        _check_values(list(test_groups), present, key, setting("test_groups"))
        plan = [(list(train_groups), list(test_groups))]
    values = labels.astype(str).to_numpy()
    folds, info = [], {}
    for i, (train_g, test_g) in enumerate(plan):
        fold_seed = seed + i
        name = ", ".join(test_g)
        pool = np.flatnonzero(groups.isin(train_g).to_numpy())
        try:
            sizes = check_stratifiable(labels.iloc[pool])
        except SplitError as exc:
            raise SplitError(f"holding out {key} {name!r}: {exc}") from None
        train_rows, val_rows = carve_validation(
            pool, values, sizes, seed=fold_seed, val_fraction=val_fraction
        )
        target = np.flatnonzero(groups.isin(test_g).to_numpy())
        trained = np.isin(values[target], sizes.index.to_numpy())
        if not trained.any():
            raise SplitError(
                f"held-out {key} {name!r} has no cell of a class its training groups hold "
                f"({list(sizes.index)}); choose another {setting('holdout_key')} or other "
                "groups."
            )
        dropped = pd.Series(values[target][~trained]).value_counts().sort_index()
        test_classes = set(values[target])
        folds.append(
            Split(
                seed=fold_seed,
                train=labels.index.take(train_rows),
                val=labels.index.take(val_rows),
                test=labels.index.take(np.sort(target[trained])),
                repeat=0,
                fold=i,
                group=name,
            )
        )
        info[str(fold_seed)] = {
            "group": name,
            "train_groups": train_g,
            "test_groups": test_g,
            "n_train": int(len(train_rows)),
            "n_val": int(len(val_rows)),
            "n_test": int(trained.sum()),
            "test_classes_not_in_train": {str(k): int(v) for k, v in dropped.items()},
            "train_classes_without_test": {
                str(c): int(n) for c, n in sizes.items() if c not in test_classes
            },
        }
    return tuple(folds), info


def load_or_make_holdout(
    directory: Path,
    labels: pd.Series,
    groups: pd.Series,
    *,
    seed: int,
    fractions: tuple[float, float, float],
    train_groups: list[str] | None = None,
    test_groups: list[str] | None = None,
) -> tuple[SplitSet, dict[str, dict[str, Any]], bool]:
    """Reuse the held-out folds saved in ``directory``, or make and save them.

    Saved folds are reused when made from the same cells, labels, groups and settings; else
    they are made (:func:`holdout_folds`) and saved there.

    ``splits.json`` records the settings and the per-fold ``info`` under ``holdout``.

    Returns
    -------
    (split set of design ``holdout``, per-fold info, reused)
    """
    settings = {
        "key": str(groups.name),
        "train_groups": list(train_groups) if train_groups else None,
        "test_groups": list(test_groups) if test_groups else None,
        "seed": seed,
        "val_fraction": float(fractions[1]),
        "groups_hash": hash_strings(groups.to_numpy()),
    }
    index_path = Path(directory) / "splits.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        saved = index.get("holdout") or {}
        if (
            index.get("design") == DESIGN
            and index.get("data_hash") == labels_hash(labels)
            and saved.get("settings") == settings
        ):
            logger.info("reusing saved held-out folds in %s", directory)
            loaded = load_splits(directory, labels)
            info = saved["folds"]
            splits = tuple(replace(s, group=info[str(s.seed)]["group"]) for s in loaded.splits)
            return replace(loaded, splits=splits), info, True
    folds, info = holdout_folds(
        labels,
        groups,
        seed=seed,
        val_fraction=fractions[1],
        train_groups=train_groups,
        test_groups=test_groups,
    )
    split_set = SplitSet(
        splits=folds,
        data_hash=labels_hash(labels),
        fractions=(fractions[0], fractions[1], fractions[2]),
        design=DESIGN,
        n_repeats=1,
    )
    save_splits(
        split_set, directory, labels, extra={"holdout": {"settings": settings, "folds": info}}
    )
    return split_set, info, False


def holdout_splits(directory: Path, data: RunData, config: RunConfig) -> tuple[SplitSet, bool]:
    """Return the run's held-out folds (``config.holdout_key`` and groups), saved there.

    Parameters
    ----------
    directory : pathlib.Path
        The run's ``splits/`` folder.
    data : ValidatedData or BackedData
        The run's cells (``labels`` and ``obs``).
    config : RunConfig
        ``holdout_key``, ``train_groups``, ``test_groups``, ``seed`` and ``fractions``.

    Returns
    -------
    (split set, reused)

    Raises
    ------
    ConfigError, SchemaError, SplitError
        See :func:`check_holdout_options`, :func:`group_labels`, :func:`holdout_folds`.
    """
    groups = _run_groups(data, config)
    split_set, info, reused = load_or_make_holdout(
        directory,
        data.labels,
        groups,
        seed=config.seed,
        fractions=config.fractions,
        train_groups=config.train_groups,
        test_groups=config.test_groups,
    )
    for fold in info.values():
        for line in fold_lines(fold):
            logger.warning(line)
    return split_set, reused


def _run_groups(data: RunData, config: RunConfig) -> pd.Series:
    """Return the group of every run cell (:func:`group_labels` of ``config.holdout_key``)."""
    key = config.holdout_key
    check_holdout_options(key, config.train_groups, config.test_groups)
    if key is None:
        raise ConfigError(f"held-out folds need {setting('holdout_key')}: an obs column of groups.")
    return group_labels(data.obs, data.labels, key, min_cells=config.min_cells_per_class)


def check_holdout_data(data: RunData, config: RunConfig) -> None:
    """Refuse held-out settings the data do not fit, as :func:`holdout_splits` would.

    Makes the folds without saving them, so a bad column, group value or fold stops the
    run (and ``validate``) before anything is fitted or written.

    Parameters
    ----------
    data : ValidatedData or BackedData
        The run's cells (``labels`` and ``obs``).
    config : RunConfig
        ``holdout_key``, ``train_groups``, ``test_groups``, ``seed`` and ``fractions``.

    Raises
    ------
    ConfigError, SchemaError, SplitError
        See :func:`check_holdout_options`, :func:`group_labels`, :func:`holdout_folds`.
    """
    holdout_folds(
        data.labels,
        _run_groups(data, config),
        seed=config.seed,
        val_fraction=config.fractions[1],
        train_groups=config.train_groups,
        test_groups=config.test_groups,
    )


def random_split_block(
    inputs: ProbeInputs,
    data: RunData,
    *,
    methods: list[Method],
    models: list[Any],
    model_info: dict[str, dict[str, Any]],
    reference: str,
    metrics: dict[str, Any],
    run_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """Build ``metrics.json["holdout"]``: the random-split design beside the held-out folds.

    It holds the folds, and per method the random-split macro F1 (the run's ``design``,
    scored on the same embeddings under ``RUN/random_split/``), the held-out macro F1 (from
    ``metrics["methods"]``) with their 95% intervals, and the drop
    (:func:`scfmbench.evaluation.section_stats.holdout_section`). The random-split design's
    document and predictions are saved as ``RUN/random_split/metrics.json`` and
    ``RUN/random_split/predictions.tsv.gz``.

    Fine-tuned methods are fine-tuned again on the random splits (``RUN/random_split/
    finetune/``); every other method reuses the run's embeddings and cells (``inputs``, a
    :class:`scfmbench.benchmark.predict.ProbeInputs`).
    """
    config = inputs.config
    folder = run_dir / RANDOM_SPLIT_DIR
    stages = StageStore(folder)
    labels = data.labels
    split_set = random_splits(folder / "splits", labels, config)
    scored = [m for m in methods if m.probe != "finetune"]
    predictions = predict_all(inputs, split_set, scored, stages, progress)
    # a streamed run cannot be fine-tuned: open_run_data refuses it
    if models and config.finetune is not None and isinstance(data, ValidatedData):
        finetune_models(
            config,
            data.model_input,
            labels,
            models,
            split_set,
            folder,
            predictions,
            scored,
            progress,
        )
    scoring = (config, data, split_set, scored, predictions, reference, model_info)
    random_doc, table = build_metrics(*scoring, context=RANDOM_SPLIT_CONTEXT)
    write_metrics(folder, random_doc)  # what `scfmbench stats` rebuilds this section from
    write_predictions(table, folder / PREDICTIONS_FILE)
    index = json.loads((run_dir / "splits" / "splits.json").read_text())
    return holdout_section(metrics, random_doc, index["holdout"])
