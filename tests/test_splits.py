import pandas as pd
import pytest

from scfmbench import SplitError, make_splits
from scfmbench.splits import load_or_make_splits, load_splits, stratified_split


def labels_of(sizes: dict[str, int]) -> pd.Series:
    values = [name for name, n in sizes.items() for _ in range(n)]
    return pd.Series(pd.Categorical(values), index=[f"c{i}" for i in range(len(values))])


def test_stratified_counts_per_class():
    labels = labels_of({"A": 100, "B": 40, "C": 10})
    split = stratified_split(labels, seed=42)
    for name, n_test in {"A": 10, "B": 4, "C": 1}.items():
        assert (labels.loc[split.test] == name).sum() == n_test
        assert (labels.loc[split.val] == name).sum() == n_test
    assert len(split.train) + len(split.val) + len(split.test) == 150
    assert not set(split.train) & set(split.test)
    assert not set(split.val) & set(split.test)


def test_repeated_splits_differ_and_repeat():
    labels = labels_of({"A": 50, "B": 50})
    first = make_splits(labels, n_splits=3, seed=42)
    again = make_splits(labels, n_splits=3, seed=42)
    assert first.seeds == [42, 43, 44]
    assert list(first.splits[0].test) == list(again.splits[0].test)
    assert list(first.splits[0].test) != list(first.splits[1].test)


def test_too_small_class_named():
    labels = labels_of({"A": 50, "Platelet": 2})
    with pytest.raises(SplitError, match="'Platelet' has 2 cells"):
        stratified_split(labels, seed=0)


def test_saved_and_reused(tmp_path):
    labels = labels_of({"A": 30, "B": 30})
    made, reused = load_or_make_splits(
        tmp_path, labels, n_splits=2, seed=42, fractions=(0.8, 0.1, 0.1)
    )
    assert not reused
    assert (tmp_path / "split_seed42.tsv").exists() and (tmp_path / "splits.json").exists()
    again, reused = load_or_make_splits(
        tmp_path, labels, n_splits=2, seed=42, fractions=(0.8, 0.1, 0.1)
    )
    assert reused
    assert [list(s.test) for s in again.splits] == [list(s.test) for s in made.splits]


def test_saved_splits_refuse_other_data(tmp_path):
    labels = labels_of({"A": 30, "B": 30})
    load_or_make_splits(tmp_path, labels, n_splits=1, seed=42, fractions=(0.8, 0.1, 0.1))
    other = labels.copy()
    other.iloc[0] = "B"
    with pytest.raises(SplitError, match="different cells or labels"):
        load_splits(tmp_path, other)


def test_bad_fractions():
    with pytest.raises(SplitError, match="summing to 1"):
        stratified_split(labels_of({"A": 10, "B": 10}), seed=0, fractions=(0.5, 0.1, 0.1))
