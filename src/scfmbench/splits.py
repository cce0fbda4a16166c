"""Stratified train/val/test splits, saved with a content hash and shared by every method."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scfmbench._atomic import write_json, write_text
from scfmbench.errors import SplitError
from scfmbench.hashing import hash_file, hash_json, hash_strings

logger = logging.getLogger(__name__)

SET_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One stratified split: cell names per set."""

    seed: int
    train: pd.Index
    val: pd.Index
    test: pd.Index

    def assignment(self) -> pd.Series:
        """Series cell → 'train' | 'val' | 'test'."""
        parts = [pd.Series(name, index=getattr(self, name)) for name in SET_NAMES]
        return pd.concat(parts)


@dataclass(frozen=True)
class SplitSet:
    """K repeated splits of one dataset (seeds ``seed .. seed + K - 1``)."""

    splits: tuple[Split, ...]
    data_hash: str
    fractions: tuple[float, float, float]

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.splits]


def labels_hash(labels: pd.Series) -> str:
    """Hash of cell names and their labels: splits are reusable while it is unchanged."""
    return hash_strings([*labels.index.astype(str), "\x1e", *labels.astype(str)])


def check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SplitError(
            f"split fractions must be three positive numbers summing to 1, got {fractions}; "
            "use e.g. 0.8 0.1 0.1."
        )


def check_stratifiable(labels: pd.Series) -> pd.Series:
    """Cells per class (sorted by class); SplitError when a class has fewer than 3 cells
    (one per train/val/test), as ``run`` and ``validate`` both report it."""
    sizes = labels.astype(str).value_counts().sort_index()
    too_small = sizes[sizes < 3]
    if len(too_small):
        listed = ", ".join(
            f"{k!r} has {v} cell{'s' if v > 1 else ''}" for k, v in too_small.items()
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
    return Split(seed=seed, **index)


def make_splits(
    labels: pd.Series,
    *,
    n_splits: int = 1,
    seed: int = 42,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> SplitSet:
    """K stratified splits with seeds ``seed .. seed + n_splits - 1``."""
    if n_splits < 1:
        raise SplitError(f"n_splits must be ≥ 1, got {n_splits}.")
    splits = tuple(
        stratified_split(labels, seed=s, fractions=fractions) for s in range(seed, seed + n_splits)
    )
    return SplitSet(splits=splits, data_hash=labels_hash(labels), fractions=tuple(fractions))


def save_splits(split_set: SplitSet, directory: Path, labels: pd.Series) -> None:
    """Write ``split_seed<S>.tsv`` (cell, label, set) per split and ``splits.json``."""
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
        "seeds": split_set.seeds,
        "files": files,
    }
    index["content_hash"] = hash_json(index)
    write_json(directory / "splits.json", index)


def load_splits(directory: Path, labels: pd.Series) -> SplitSet:
    """Read saved splits; raise SplitError when they do not belong to these cells/labels."""
    directory = Path(directory)
    index = json.loads((directory / "splits.json").read_text())
    if index["data_hash"] != labels_hash(labels):
        raise SplitError(
            f"the splits in {directory} were made for different cells or labels; "
            "delete that folder or use a new --name to make new splits."
        )
    splits = []
    for seed in index["seeds"]:
        entry = index["files"][str(seed)]
        path = directory / entry["file"]
        if hash_file(path) != entry["sha256"]:
            raise SplitError(f"{path} was modified (checksum mismatch); delete it to remake.")
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        sets = {name: pd.Index(table.loc[table["set"] == name, "cell"]) for name in SET_NAMES}
        splits.append(Split(seed=int(seed), **sets))
    return SplitSet(
        splits=tuple(splits), data_hash=index["data_hash"], fractions=tuple(index["fractions"])
    )


def load_or_make_splits(
    directory: Path,
    labels: pd.Series,
    *,
    n_splits: int,
    seed: int,
    fractions: tuple[float, float, float],
) -> tuple[SplitSet, bool]:
    """Reuse saved splits when they match data, seeds and fractions; else make and save them.

    Returns (splits, reused).
    """
    wanted = list(range(seed, seed + n_splits))
    index_path = Path(directory) / "splits.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        same = (
            index.get("data_hash") == labels_hash(labels)
            and index.get("seeds") == wanted
            and np.allclose(index.get("fractions"), fractions)
        )
        if same:
            logger.info("reusing saved splits in %s", directory)
            return load_splits(directory, labels), True
    split_set = make_splits(labels, n_splits=n_splits, seed=seed, fractions=fractions)
    save_splits(split_set, directory, labels)
    return split_set, False
