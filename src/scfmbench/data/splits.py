"""Stratified train/val/test splits, saved with a content hash and shared by every method.

Two designs (``docs/statistics.md``):

- ``cv`` (default): stratified K-fold cross-validation, optionally repeated; the K test folds
  of a repeat are disjoint and cover every cell once; the validation cells of a fold are
  carved from its training folds, per class. Fold ``i`` of repeat ``r`` is keyed by the
  integer ``seed + r·K + i`` (its file, stage and ``metrics.json`` key).
- ``study``: K independent random train/val/test splits (seeds ``seed .. seed + K - 1``), as in
  the study; their test sets overlap, so their intervals hold within a split only.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from scfmbench._atomic import write_json, write_text
from scfmbench.errors import SplitError
from scfmbench.hashing import hash_file, hash_json, hash_strings

logger = logging.getLogger(__name__)

SET_NAMES = ("train", "val", "test")
DESIGNS = ("cv", "study")


@dataclass(frozen=True)
class Split:
    """One stratified split (or cross-validation fold): cell names per set.

    ``seed`` keys the split and seeds everything trained on it; ``repeat`` and ``fold`` are
    set for cross-validation folds only.
    """

    seed: int
    train: pd.Index
    val: pd.Index
    test: pd.Index
    repeat: int | None = None
    fold: int | None = None
    group: str | None = None  # the held-out group(s) of a holdout fold

    @property
    def title(self) -> str:
        """``"seed 42"``, ``"fold 1 (repeat 1)"`` or ``"held out: 101"`` (1-based), for figures."""
        if self.group is not None:
            return f"held out: {self.group}"
        if self.fold is None:
            return f"seed {self.seed}"
        return f"fold {self.fold + 1} (repeat {(self.repeat or 0) + 1})"

    def assignment(self) -> pd.Series:
        """Series cell → 'train' | 'val' | 'test'."""
        parts = [pd.Series(name, index=getattr(self, name)) for name in SET_NAMES]
        return pd.concat(parts)


@dataclass(frozen=True)
class SplitSet:
    """The splits of one dataset: K random splits (``study``) or R × K folds (``cv``)."""

    splits: tuple[Split, ...]
    data_hash: str
    fractions: tuple[float, float, float]
    design: str = "study"
    n_repeats: int = 1

    @property
    def n_folds(self) -> int:
        """Folds per repeat (cv) or number of splits (study)."""
        return len(self.splits) // self.n_repeats

    @property
    def seeds(self) -> list[int]:
        """The seed of every split, in order."""
        return [s.seed for s in self.splits]


def labels_hash(labels: pd.Series) -> str:
    """Hash of cell names and their labels: splits are reusable while it is unchanged."""
    return hash_strings([*labels.index.astype(str), "\x1e", *labels.astype(str)])


def check_fractions(fractions: tuple[float, float, float]) -> None:
    """Raise SplitError unless ``fractions`` are three positive numbers summing to 1.

    Raises
    ------
    SplitError
        Naming the fractions given and an example.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SplitError(
            f"split fractions must be three positive numbers summing to 1, got {fractions}; "
            "use e.g. 0.8 0.1 0.1."
        )


def check_stratifiable(labels: pd.Series, *, n_folds: int | None = None) -> pd.Series:
    """Cells per class (sorted by class), as ``run`` and ``validate`` both check them.

    Raises
    ------
    SplitError
        A class with fewer than 3 cells (one per train/val/test) or, for ``n_folds``-fold
        cross-validation, fewer cells than folds.
    """
    need = max(3, n_folds or 0)
    sizes = labels.astype(str).value_counts().sort_index()
    too_small = sizes.loc[sizes < need]
    if len(too_small):
        listed = ", ".join(
            f"{k!r} has {v} cell{'s' if v != 1 else ''}" for k, v in too_small.items()
        )
        if n_folds:
            raise SplitError(
                f"cannot stratify {n_folds} folds: {listed}; each class needs ≥ {need} "
                "cells — raise min_cells_per_class, lower --n-splits, or merge the label."
            )
        raise SplitError(
            f"cannot stratify: {listed}; each class needs ≥ 3 cells (one per train/val/test) — "
            "raise min_cells_per_class to drop it or merge it into another label."
        )
    return sizes


def stratified_split(
    labels: pd.Series, *, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Split:
    """Split cells per class: ``round(n·val)`` and ``round(n·test)`` cells (at least 1 each).

    Classes are processed in sorted order with one seeded generator, so the split depends
    only on the labels and the seed.
    """
    check_fractions(fractions)
    rng = np.random.default_rng(seed)
    sizes = check_stratifiable(labels)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SET_NAMES}
    values = labels.astype(str).to_numpy()
    for cls in sizes.index:
        members = np.flatnonzero(values == cls)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = max(1, int(round(n * fractions[2])))
        n_val = max(1, int(round(n * fractions[1])))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    index = {name: labels.index[np.sort(np.concatenate(parts[name]))] for name in SET_NAMES}
    return Split(
        seed=seed,
        train=cast(pd.Index, index["train"]),
        val=cast(pd.Index, index["val"]),
        test=cast(pd.Index, index["test"]),
    )


def check_design(design: str, n_splits: int, n_repeats: int) -> None:
    """Raise SplitError for an unknown design or fold counts it cannot use."""
    if design not in DESIGNS:
        raise SplitError(f"unknown design {design!r}; choose from {list(DESIGNS)}.")
    if n_splits < 1 or n_repeats < 1:
        raise SplitError(f"n_splits and n_repeats must be ≥ 1, got {n_splits}, {n_repeats}.")
    if design == "cv" and n_splits < 2:
        raise SplitError(
            f"cross-validation needs ≥ 2 folds, got n_splits={n_splits}; use --n-splits 5, or "
            "--design study for one random train/val/test split."
        )
    if design == "study" and n_repeats != 1:
        raise SplitError("n_repeats applies to --design cv only; drop it or use --design cv.")


def cv_folds(
    labels: pd.Series,
    *,
    n_folds: int = 5,
    n_repeats: int = 1,
    seed: int = 42,
    val_fraction: float = 0.1,
) -> tuple[Split, ...]:
    """Stratified (repeated) K-fold cross-validation with a stratified validation set per fold.

    Repeat ``r`` shuffles with ``StratifiedKFold(random_state=seed + r)``; its K test folds
    are disjoint and together hold every cell once. The validation cells of fold ``i`` are
    ``max(1, round(n_c · val_fraction))`` cells of each class ``c`` drawn (generator seeded
    ``seed + r·K + i``) from that class's training-fold cells, leaving at least one to train.

    Parameters
    ----------
    labels : pandas.Series
        Class of each cell (index: cell names), length n_cells.
    n_folds, n_repeats : int
        K ≥ 2 folds per repeat, R ≥ 1 repeats (defaults 5 and 1).
    seed : int
        Seed of the first repeat (default 42).
    val_fraction : float
        Validation cells per class as a fraction of the class (default 0.1).

    Returns
    -------
    tuple of Split
        R·K folds with ``seed = seed + r·K + i``.

    Raises
    ------
    SplitError
        A class with fewer than 3 cells, or fewer cells than folds.
    """
    from sklearn.model_selection import StratifiedKFold

    check_design("cv", n_folds, n_repeats)
    values = labels.astype(str).to_numpy()
    sizes = check_stratifiable(labels, n_folds=n_folds)
    folds = []
    for repeat in range(n_repeats):
        kfold = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed + repeat)
        for i, (pool, test) in enumerate(kfold.split(np.zeros(len(values)), values)):
            fold_seed = seed + repeat * n_folds + i
            train_rows, val_rows = carve_validation(
                pool, values, sizes, seed=fold_seed, val_fraction=val_fraction
            )
            folds.append(
                Split(
                    seed=fold_seed,
                    train=cast(pd.Index, labels.index[train_rows]),
                    val=cast(pd.Index, labels.index[val_rows]),
                    test=cast(pd.Index, labels.index[np.sort(test)]),
                    repeat=repeat,
                    fold=i,
                )
            )
    return tuple(folds)


def carve_validation(
    pool: np.ndarray, values: np.ndarray, sizes: pd.Series, *, seed: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a stratified validation set from the training rows ``pool``.

    Class ``c`` gives ``max(1, round(sizes[c] · val_fraction))`` of its pool rows (at least one
    left to train), drawn in sorted class order with ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    pool : numpy.ndarray
        Row numbers (into ``values``) that may train or validate, shape (n_pool,).
    values : numpy.ndarray
        Class (string) of every row, shape (n_cells,).
    sizes : pandas.Series
        Cells per class (index: the classes to draw, sorted), e.g. from
        :func:`check_stratifiable`; every class needs ≥ 2 rows in ``pool``.
    seed : int
        Seed of the generator.
    val_fraction : float
        Validation share of each class.

    Returns
    -------
    (train rows, validation rows) : tuple of numpy.ndarray
        Sorted, disjoint, together ``pool``.
    """
    rng = np.random.default_rng(seed)
    val = []
    for cls in sizes.index:
        members = pool[values[pool] == cls]
        members = members[rng.permutation(len(members))]
        n_val = min(max(1, int(round(sizes[cls] * val_fraction))), len(members) - 1)
        val.append(members[:n_val])
    val_rows = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    return np.setdiff1d(pool, val_rows), val_rows


def make_splits(
    labels: pd.Series,
    *,
    n_splits: int = 1,
    seed: int = 42,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    design: str = "study",
    n_repeats: int = 1,
) -> SplitSet:
    """Make the splits of a design.

    ``study``: K random splits with seeds ``seed .. seed + K - 1``; ``cv``: :func:`cv_folds`
    with K = ``n_splits`` and validation fraction ``fractions[1]``.

    Raises
    ------
    SplitError
        Unknown design, bad fold counts or fractions, or classes too small to stratify.
    """
    check_design(design, n_splits, n_repeats)
    check_fractions(fractions)
    if design == "cv":
        splits = cv_folds(
            labels, n_folds=n_splits, n_repeats=n_repeats, seed=seed, val_fraction=fractions[1]
        )
    else:
        splits = tuple(
            stratified_split(labels, seed=s, fractions=fractions)
            for s in range(seed, seed + n_splits)
        )
    return SplitSet(
        splits=splits,
        data_hash=labels_hash(labels),
        fractions=cast(tuple[float, float, float], tuple(fractions)),
        design=design,
        n_repeats=n_repeats,
    )


def save_splits(
    split_set: SplitSet, directory: Path, labels: pd.Series, *, extra: dict | None = None
) -> None:
    """Write ``split_seed<S>.tsv`` (cell, label, set) per split and ``splits.json``.

    ``extra`` holds more JSON entries for ``splits.json``, e.g. the ``holdout`` settings; a
    cell in no set has an empty ``set``. Split files of an earlier design in ``directory``
    that ``split_set`` does not have are removed.
    """
    directory = Path(directory)
    files = {}
    for split in split_set.splits:
        assignment = split.assignment().reindex(labels.index)
        table = pd.DataFrame({"cell": labels.index, "label": labels.astype(str), "set": assignment})
        path = directory / f"split_seed{split.seed}.tsv"
        write_text(path, table.to_csv(sep="\t", index=False))
        files[str(split.seed)] = {"file": path.name, "sha256": hash_file(path)}
    index = {
        "data_hash": split_set.data_hash,
        "fractions": list(split_set.fractions),
        "design": split_set.design,
        "n_repeats": split_set.n_repeats,
        "seeds": split_set.seeds,
        "folds": {str(s.seed): [s.repeat, s.fold] for s in split_set.splits if s.fold is not None},
        "files": files,
        **(extra or {}),
    }
    index["content_hash"] = hash_json(index)
    write_json(directory / "splits.json", index)
    kept = {entry["file"] for entry in files.values()}
    for stale in directory.glob("split_seed*.tsv"):  # an earlier design's folds, not listed
        if stale.name not in kept:
            stale.unlink()


def load_splits(directory: Path, labels: pd.Series) -> SplitSet:
    """Read saved splits; raise SplitError when they do not belong to these cells/labels."""
    directory = Path(directory)
    index = json.loads((directory / "splits.json").read_text())
    if index["data_hash"] != labels_hash(labels):
        raise SplitError(
            f"the splits in {directory} were made for different cells or labels; "
            "delete that folder or use a new --name to make new splits."
        )
    if index.get("content_hash") != hash_json(
        {k: v for k, v in index.items() if k != "content_hash"}
    ):
        raise SplitError(
            f"{directory / 'splits.json'} was modified (checksum mismatch); delete it to remake."
        )
    folds = index.get("folds", {})
    splits = []
    for seed in index["seeds"]:
        entry = index["files"][str(seed)]
        path = directory / entry["file"]
        if hash_file(path) != entry["sha256"]:
            raise SplitError(f"{path} was modified (checksum mismatch); delete it to remake.")
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        sets = {name: pd.Index(table.loc[table["set"] == name, "cell"]) for name in SET_NAMES}
        repeat, fold = folds.get(str(seed), (None, None))
        splits.append(
            Split(
                seed=int(seed),
                train=sets["train"],
                val=sets["val"],
                test=sets["test"],
                repeat=repeat,
                fold=fold,
            )
        )
    return SplitSet(
        splits=tuple(splits),
        data_hash=index["data_hash"],
        fractions=tuple(index["fractions"]),
        design=index.get("design", "study"),
        n_repeats=int(index.get("n_repeats", 1)),
    )


def load_or_make_splits(
    directory: Path,
    labels: pd.Series,
    *,
    n_splits: int,
    seed: int,
    fractions: tuple[float, float, float],
    design: str = "study",
    n_repeats: int = 1,
) -> tuple[SplitSet, bool]:
    """Reuse saved splits when they match data, design, seeds and fractions; else make them.

    New splits are saved, so every method of a run, and every rerun, reads the same files.

    Returns
    -------
    tuple
        (splits, reused).
    """
    check_design(design, n_splits, n_repeats)
    wanted = list(range(seed, seed + n_splits * n_repeats))
    index_path = Path(directory) / "splits.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        same = (
            index.get("data_hash") == labels_hash(labels)
            and index.get("seeds") == wanted
            and index.get("design", "study") == design
            and index.get("n_repeats", 1) == n_repeats
            and np.allclose(index.get("fractions"), fractions)
        )
        if same:
            logger.info("reusing saved splits in %s", directory)
            return load_splits(directory, labels), True
    split_set = make_splits(
        labels,
        n_splits=n_splits,
        seed=seed,
        fractions=fractions,
        design=design,
        n_repeats=n_repeats,
    )
    save_splits(split_set, directory, labels)
    return split_set, False


TRAIN_SIZE_ALL = "all"
"""The ``train_sizes`` entry that means every training cell (the run's own fit)."""


def normalize_train_sizes(values: Any) -> list[int | str]:
    """Return the sorted, de-duplicated labelled-cells-per-class sizes, ``"all"`` last.

    Parameters
    ----------
    values : str or sequence of int/str
        ``"1,5,all"`` or ``[1, 5, "all"]``; numbers as whole numbers ≥ 1 (``"5"`` or ``5``).

    Returns
    -------
    list
        e.g. ``[1, 5, "all"]``.

    Raises
    ------
    ValueError
        An empty list, or an item that is neither ``all`` nor a whole number ≥ 1.
    """
    items = values.split(",") if isinstance(values, str) else values
    if not isinstance(items, list | tuple) or not items:
        raise ValueError("train sizes must be a list such as 1,5,10,25,50,all")
    sizes: set[int] = set()
    with_all = False
    for item in items:
        value = item.strip().lower() if isinstance(item, str) else item
        if value == TRAIN_SIZE_ALL:
            with_all = True
            continue
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"train size {item!r} is not a whole number ≥ 1 or 'all' (labelled cells per "
                "class); use e.g. --train-sizes 1,5,10,25,50,all"
            )
        sizes.add(value)
    return [*sorted(sizes), *([TRAIN_SIZE_ALL] if with_all else [])]
