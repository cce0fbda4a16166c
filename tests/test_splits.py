import pandas as pd
import pytest

from scfmbench import SplitError
from scfmbench.data.splits import load_or_make_splits, load_splits, make_splits, stratified_split


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


def test_fewer_folds_remove_the_earlier_folds_files(tmp_path):
    labels = labels_of({"A": 30, "B": 30})
    options = {"seed": 42, "fractions": (0.8, 0.1, 0.1), "design": "cv"}
    load_or_make_splits(tmp_path, labels, n_splits=5, **options)
    assert len(list(tmp_path.glob("split_seed*.tsv"))) == 5
    fewer, reused = load_or_make_splits(tmp_path, labels, n_splits=3, **options)
    assert not reused
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "split_seed42.tsv",
        "split_seed43.tsv",
        "split_seed44.tsv",
        "splits.json",
    ]
    assert load_splits(tmp_path, labels).seeds == fewer.seeds == [42, 43, 44]


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


def test_cv_folds_are_disjoint_stratified_and_cover_every_cell():
    from scfmbench.data.splits import cv_folds

    labels = labels_of({"A": 100, "B": 40, "C": 10})
    folds = cv_folds(labels, n_folds=5, seed=42, val_fraction=0.1)
    assert [f.seed for f in folds] == [42, 43, 44, 45, 46]
    assert [(f.repeat, f.fold) for f in folds] == [(0, i) for i in range(5)]
    tested = [cell for f in folds for cell in f.test]
    assert sorted(tested) == sorted(labels.index)  # every cell tested exactly once
    for f in folds:
        assert not set(f.train) & set(f.val) and not set(f.val) & set(f.test)
        assert not set(f.train) & set(f.test)
        assert len(f.train) + len(f.val) + len(f.test) == 150
        for name, n in {"A": 100, "B": 40, "C": 10}.items():
            assert (labels.loc[f.test] == name).sum() == n // 5  # stratified test folds
            assert (labels.loc[f.val] == name).sum() == max(1, round(n * 0.1))
    again = cv_folds(labels, n_folds=5, seed=42)
    assert [list(f.test) for f in again] == [list(f.test) for f in folds]


def test_repeated_cv_reshuffles_each_repeat():
    from scfmbench.data.splits import cv_folds

    labels = labels_of({"A": 30, "B": 30})
    folds = cv_folds(labels, n_folds=3, n_repeats=2, seed=7)
    assert [f.seed for f in folds] == list(range(7, 13))
    first = {frozenset(f.test) for f in folds[:3]}
    second = {frozenset(f.test) for f in folds[3:]}
    assert first != second
    for repeat in (folds[:3], folds[3:]):
        assert sorted(c for f in repeat for c in f.test) == sorted(labels.index)


def test_cv_design_saved_reused_and_checked(tmp_path):
    labels = labels_of({"A": 30, "B": 30})
    options = {"n_splits": 3, "seed": 42, "fractions": (0.8, 0.1, 0.1), "design": "cv"}
    made, reused = load_or_make_splits(tmp_path, labels, **options)
    assert not reused and made.design == "cv"
    again, reused = load_or_make_splits(tmp_path, labels, **options)
    assert reused and again.design == "cv"
    assert [(s.repeat, s.fold) for s in again.splits] == [(0, 0), (0, 1), (0, 2)]
    assert [list(s.val) for s in again.splits] == [list(s.val) for s in made.splits]
    # the study design with the same seeds makes (and saves) other splits
    study, reused = load_or_make_splits(tmp_path, labels, **{**options, "design": "study"})
    assert not reused and study.design == "study" and study.splits[0].fold is None
    index = tmp_path / "splits.json"
    index.write_text(index.read_text().replace('"study"', '"cv"'))
    with pytest.raises(SplitError, match="splits.json was modified"):
        load_splits(tmp_path, labels)


def test_cv_needs_two_folds_and_enough_cells():
    labels = labels_of({"A": 30, "B": 4})
    with pytest.raises(SplitError, match="cross-validation needs ≥ 2 folds.*--design study"):
        make_splits(labels, n_splits=1, design="cv")
    with pytest.raises(SplitError, match="'B' has 4 cells"):
        make_splits(labels, n_splits=5, design="cv")
