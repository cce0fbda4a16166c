"""Held-out groups (``run --holdout-key``): fold construction, scoring, CLI and report."""

from __future__ import annotations

import hashlib
import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scfmbench.benchmark.holdout import (
    check_holdout_options,
    group_labels,
    holdout_folds,
    load_or_make_holdout,
)
from scfmbench.errors import ConfigError, SchemaError, SplitError
from scfmbench.evaluation.metrics import classification_metrics
from scfmbench.evaluation.stats import Design, method_intervals
from tests.conftest import make_tiny_adata, run_cli_in_process


def cells_of(table: dict[str, dict[str, int]]) -> tuple[pd.Series, pd.Series]:
    """(labels, groups) from {group: {class: n cells}}; cells named g<group>_<i>."""
    labels, groups, names = [], [], []
    for group, sizes in table.items():
        for cls, n in sizes.items():
            for _ in range(n):
                names.append(f"g{group}_{len(names)}")
                labels.append(cls)
                groups.append(group)
    index = pd.Index(names)
    return (
        pd.Series(pd.Categorical(labels), index=index),
        pd.Series(groups, index=index, name="donor"),
    )


DONORS = {
    "a": {"B": 30, "T": 50, "NK": 12},
    "b": {"B": 20, "T": 41, "NK": 9},
    "c": {"B": 25, "T": 33, "NK": 15},
}


def test_one_fold_per_group_and_no_held_out_cell_in_train_or_val():
    labels, groups = cells_of(DONORS)
    folds, info = holdout_folds(labels, groups, seed=42, val_fraction=0.1)
    assert [f.group for f in folds] == ["a", "b", "c"]
    assert [f.seed for f in folds] == [42, 43, 44]
    assert [f.fold for f in folds] == [0, 1, 2]
    for fold in folds:
        held = set(groups.index[groups == fold.group])
        assert set(fold.test) == held  # every class of the group is trained on
        assert not held & set(fold.train) and not held & set(fold.val)
        assert not set(fold.train) & set(fold.val)
        assert set(fold.train) | set(fold.val) == set(groups.index[groups != fold.group])
        entry = info[str(fold.seed)]
        assert (entry["n_train"], entry["n_val"], entry["n_test"]) == (
            len(fold.train),
            len(fold.val),
            len(fold.test),
        )
        assert entry["test_classes_not_in_train"] == {}
        assert entry["train_classes_without_test"] == {}


def test_validation_share_is_stratified_per_class():
    labels, groups = cells_of(DONORS)
    folds, _ = holdout_folds(labels, groups, seed=42, val_fraction=0.1)
    for fold in folds:
        others = [g for g in DONORS if g != fold.group]
        for cls in ("B", "T", "NK"):
            n_class = sum(DONORS[g][cls] for g in others)
            expected_val = min(max(1, int(round(n_class * 0.1))), n_class - 1)
            assert (labels.loc[fold.val] == cls).sum() == expected_val
            assert (labels.loc[fold.train] == cls).sum() == n_class - expected_val


def test_classes_absent_from_training_are_dropped_and_reported():
    table = {
        "a": {"B": 20, "T": 20, "Rare": 7},  # Rare only here
        "b": {"B": 20, "T": 20, "NK": 6},  # NK only here
        "c": {"B": 20, "T": 20, "NK": 5},
    }
    labels, groups = cells_of(table)
    folds, info = holdout_folds(labels, groups, seed=7, val_fraction=0.1)
    by_group = {f.group: f for f in folds}
    held_a = by_group["a"]
    assert info["7"]["test_classes_not_in_train"] == {"Rare": 7}
    assert info["7"]["train_classes_without_test"] == {"NK": 11}
    assert set(labels.loc[held_a.test]) == {"B", "T"}
    assert len(held_a.test) == 40
    rare = set(labels.index[labels == "Rare"])
    assert not rare & (set(held_a.train) | set(held_a.val) | set(held_a.test))
    # holding out b: NK is trained from c's 5 cells; Rare (a) trained, not tested
    assert info["8"]["test_classes_not_in_train"] == {}
    assert info["8"]["train_classes_without_test"] == {"Rare": 7}
    assert set(labels.loc[by_group["b"].test]) == {"B", "T", "NK"}


def test_directed_split_is_exact():
    table = {g: {"B": 12, "T": 15} for g in ("ctrl1", "ctrl2", "stim", "other")}
    labels, groups = cells_of(table)
    folds, info = holdout_folds(
        labels, groups, seed=42, train_groups=["ctrl1", "ctrl2"], test_groups=["stim"]
    )
    assert len(folds) == 1
    (fold,) = folds
    assert fold.group == "stim" and fold.title == "held out: stim"
    assert set(fold.test) == set(groups.index[groups == "stim"])
    assert set(fold.train) | set(fold.val) == set(groups.index[groups.isin(["ctrl1", "ctrl2"])])
    assert not set(groups.index[groups == "other"]) & (
        set(fold.train) | set(fold.val) | set(fold.test)
    )
    assert info["42"]["train_groups"] == ["ctrl1", "ctrl2"]
    assert info["42"]["test_groups"] == ["stim"]


def test_folds_are_saved_and_reused_and_keyed_by_the_settings(tmp_path):
    labels, groups = cells_of(DONORS)
    made, info, reused = load_or_make_holdout(
        tmp_path, labels, groups, seed=42, fractions=(0.8, 0.1, 0.1)
    )
    assert not reused and (tmp_path / "split_seed44.tsv").exists()
    saved = json.loads((tmp_path / "splits.json").read_text())
    assert saved["design"] == "holdout" and saved["holdout"]["settings"]["key"] == "donor"
    again, _, reused = load_or_make_holdout(
        tmp_path, labels, groups, seed=42, fractions=(0.8, 0.1, 0.1)
    )
    assert reused
    assert [f.group for f in again.splits] == ["a", "b", "c"]
    assert [list(f.test) for f in again.splits] == [list(f.test) for f in made.splits]
    assert [list(f.val) for f in again.splits] == [list(f.val) for f in made.splits]
    directed, _, reused = load_or_make_holdout(
        tmp_path,
        labels,
        groups,
        seed=42,
        fractions=(0.8, 0.1, 0.1),
        train_groups=["a"],
        test_groups=["c"],
    )
    assert not reused and len(directed.splits) == 1
    moved = groups.copy()
    moved.iloc[0] = "b"  # other groups, same cells and labels: new folds
    _, _, reused = load_or_make_holdout(tmp_path, labels, moved, seed=42, fractions=(0.8, 0.1, 0.1))
    assert not reused


def test_bad_groups_are_refused():
    labels, groups = cells_of({"a": {"B": 10, "T": 10}})
    with pytest.raises(SplitError, match=r"holds one group only \('a'\)"):
        holdout_folds(labels, groups)
    labels, groups = cells_of(DONORS)
    with pytest.raises(
        SplitError,
        match=r"test_groups \(--test-groups\) value 'cc' is not in obs\['donor'\], "
        r"which holds \['a', 'b', 'c'\]",
    ):
        holdout_folds(labels, groups, train_groups=["a"], test_groups=["cc"])
    small, small_groups = cells_of({"a": {"B": 10, "T": 10}, "b": {"B": 10, "T": 2}})
    with pytest.raises(SplitError, match=r"holding out donor 'a': .*'T' has 2 cells"):
        holdout_folds(small, small_groups)
    disjoint, disjoint_groups = cells_of({"a": {"B": 10}, "b": {"T": 10}})
    with pytest.raises(SplitError, match="has no cell of a class its training groups hold"):
        holdout_folds(disjoint, disjoint_groups)


def test_holdout_options_and_columns_are_checked():
    with pytest.raises(ConfigError, match=r"set holdout_key \(--holdout-key\) too"):
        check_holdout_options(None, ["ctrl"], ["stim"])
    with pytest.raises(
        ConfigError, match=r"train_groups \(--train-groups\) needs test_groups \(--test-groups\)"
    ):
        check_holdout_options("condition", ["ctrl"], None)
    with pytest.raises(ConfigError, match=r"\['ctrl'\] are in both"):
        check_holdout_options("condition", ["ctrl"], ["ctrl", "stim"])
    labels, groups = cells_of(DONORS)
    obs = pd.DataFrame({"donor_id": groups.to_numpy()}, index=labels.index)
    with pytest.raises(SchemaError, match="'donor' is not an obs column.*Did you mean 'donor_id'"):
        group_labels(obs, labels, "donor")
    obs.iloc[3, 0] = None
    with pytest.raises(SchemaError, match="no value for 1 cells"):
        group_labels(obs, labels, "donor_id")


def test_a_measurement_per_cell_is_not_a_group_column():
    labels, groups = cells_of(DONORS)
    n = len(labels)
    assert n == 235
    obs = pd.DataFrame(
        {
            "percent_mt": np.linspace(0.5, 9.5, n),
            "n_counts": np.arange(n) // 2,  # integers, two cells per value
            "dose": np.repeat([0.0, 1.0, 2.0], [100, 100, n - 200]),  # integer-valued floats
            "donor": groups.to_numpy(),
        },
        index=labels.index,
    )
    fix = re.escape(PER_CELL_FIX)
    with pytest.raises(
        SchemaError,
        match=rf"^obs\['percent_mt'\] holds non-integer numbers \(e.g. 0.5\), a measurement "
        rf"per cell, not groups; {fix} \(store group codes as strings\)\.$",
    ):
        group_labels(obs, labels, "percent_mt")
    with pytest.raises(
        SchemaError,
        match=r"^obs\['n_counts'\] has 118 groups for 235 cells \(the median group holds 2 "
        rf"cells, fewer than min_cells_per_class=10\): about one group per cell, one fold "
        rf"each; {fix}\.$",
    ):
        group_labels(obs, labels, "n_counts")
    assert group_labels(obs, labels, "n_counts", min_cells=2).nunique() == 118
    assert sorted(group_labels(obs, labels, "dose").unique()) == ["0.0", "1.0", "2.0"]
    assert group_labels(obs, labels, "donor").value_counts().to_dict() == {
        "a": 92,
        "c": 73,
        "b": 70,
    }


def subsample(source, n_cells: int, path):
    """Write ``n_cells`` cells of ``source`` drawn with a fixed seed (in file order) to ``path``."""
    adata = ad.read_h5ad(source)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))
    adata[rows].copy().write_h5ad(path)
    return path


@pytest.fixture
def pbmc800(pbmc3k_path, tmp_path):
    """800 PBMC3k cells drawn with a fixed seed; obs holds percent_mt and nCount_RNA."""
    return subsample(pbmc3k_path, 800, tmp_path / "pbmc800.h5ad")


PER_CELL_FIX = "choose a donor, sample, condition or batch column as holdout_key (--holdout-key)"
PER_CELL_COLUMNS = {
    "percent_mt": "error: obs['percent_mt'] holds non-integer numbers (e.g. 3.01778), a "
    f"measurement per cell, not groups; {PER_CELL_FIX} (store group codes as strings).",
    "nCount_RNA": "error: obs['nCount_RNA'] has 680 groups for 796 cells (the median group "
    "holds 1 cell, fewer than min_cells_per_class=10): about one group per cell, one fold "
    f"each; {PER_CELL_FIX}.",
}


@pytest.mark.parametrize("key", list(PER_CELL_COLUMNS))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_per_cell_column_is_refused_before_any_fit(pbmc800, tmp_path, capsys, key, command):
    runs = tmp_path / "runs"
    args = {
        "run": ["run", "--data", str(pbmc800), "--out", str(runs), "-q"],
        "validate": ["validate", str(pbmc800)],
    }[command]
    code, out, err = run_cli_in_process([*args, "--holdout-key", key], capsys)
    assert (code, out) == (2, "")
    lines = [line for line in err.splitlines() if not line.startswith("scfmbench: warning")]
    assert lines == [PER_CELL_COLUMNS[key]]
    assert not runs.exists()


def test_kang_donor_and_condition_columns_are_groups(kang_path, capsys):
    for key in ("donor_id", "condition", "sample_id"):
        code, out, err = run_cli_in_process(
            ["validate", str(kang_path), "--holdout-key", key], capsys
        )
        assert code == 0, err


def f1_by_hand(truth: list[str], pred: list[str], cls: str) -> float:
    tp = sum(t == cls and p == cls for t, p in zip(truth, pred, strict=True))
    fp = sum(t != cls and p == cls for t, p in zip(truth, pred, strict=True))
    fn = sum(t == cls and p != cls for t, p in zip(truth, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_held_out_macro_f1_averages_the_classes_present():
    classes = ["B", "NK", "T"]
    truth = ["B", "B", "B", "T", "T", "T", "T"]  # no NK in this held-out group
    pred = ["B", "NK", "B", "T", "T", "B", "NK"]
    expected = (f1_by_hand(truth, pred, "B") + f1_by_hand(truth, pred, "T")) / 2
    scores = classification_metrics(truth, pred, classes=classes, present_only=True)
    assert scores.macro_f1 == pytest.approx(expected)
    everything = classification_metrics(truth, pred, classes=classes)
    assert everything.macro_f1 == pytest.approx(expected * 2 / 3)  # NK scores 0 there
    sets = [(np.array(truth), np.array(pred)), (np.array(["B", "NK"]), np.array(["B", "B"]))]
    second = (f1_by_hand(["B", "NK"], ["B", "B"], "B") + 0.0) / 2
    estimates = method_intervals(sets, Design("holdout", n_folds=2), classes=classes, seed=0)
    assert estimates["macro_f1"].mean == pytest.approx((expected + second) / 2)


def donor_adata() -> ad.AnnData:
    """Tiny counts, 3 classes × 30 cells in donors a/b/c; type_2 only in donor a."""
    adata = make_tiny_adata(n_per_class=30, n_classes=3, seed=3)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    donors = np.array(["a", "b", "c"] * 30)
    donors[labels == "type_2"] = "a"
    adata.obs["donor"] = donors
    return adata


def test_run_scores_held_out_folds_and_the_random_split(tmp_path):
    from scfmbench.benchmark.pipeline import run
    from scfmbench.evaluation.run_stats import read_predictions
    from scfmbench.results import check_statistics

    adata = donor_adata()
    options = {
        "holdout_key": "donor",
        "baselines": ["pca+xgboost", "pca+logreg", "majority"],
        "n_pcs": 5,
        "n_hvg": 40,
        "n_splits": 3,
        "figures": False,
        "out": tmp_path,
        "name": "donors",
    }
    result = run(adata, progress=False, **options)
    metrics = result.metrics
    assert metrics["run"]["design"]["name"] == "holdout"
    assert metrics["run"]["seeds"] == [42, 43, 44]
    block = metrics["holdout"]
    assert block["mode"] == "leave-one-group-out" and block["n_folds"] == 3
    held_a = block["folds"]["42"]
    assert held_a["group"] == "a"
    assert held_a["test_classes_not_in_train"] == {"type_2": 30}
    assert held_a["n_test"] == 20
    assert block["folds"]["43"]["train_classes_without_test"] == {"type_2": 30}
    table = read_predictions(result.run_dir / "predictions.tsv.gz")
    fold_a = table[(table["split"] == "42") & (table["method"] == "pca+xgboost")]
    assert len(fold_a) == 20 and "type_2" not in set(fold_a["pred"]) | set(fold_a["true"])
    for name in ("pca+xgboost", "pca+logreg", "majority"):
        row = block["methods"][name]
        held = metrics["methods"][name]["summary"]["macro_f1"]["mean"]
        assert row["held_out"]["macro_f1"] == held
        assert row["random_split"]["macro_f1"] is not None
        assert row["drop"] == pytest.approx(row["random_split"]["macro_f1"] - held)
        assert set(row["held_out"]["per_group"]) == {"a", "b", "c"}
    assert block["random_split"]["seeds"] == [42, 43, 44]
    random_splits = result.run_dir / "random_split" / "splits"
    manifest = json.loads((result.run_dir / "manifest.json").read_text())["splits"]
    assert {k: v for k, v in manifest.items() if k.startswith("random_split/")} == {
        f"random_split/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in random_splits.iterdir()
    } and "random_split/splits.json" in manifest
    assert check_statistics(result.run_dir).differences == []
    markdown = (result.run_dir / "results.md").read_text()
    assert "## Random split vs held-out group" in markdown
    assert "held out a: dropped 30 test cells of classes the training data lacks" in markdown
    splits_file = result.run_dir / "splits" / "splits.json"
    before = splits_file.stat().st_mtime_ns
    again = run(adata, progress=False, **options)
    assert splits_file.stat().st_mtime_ns == before
    assert again.metrics["holdout"]["methods"] == block["methods"]
    cv = run(adata, progress=False, **{**options, "holdout_key": None})  # same folder, cv
    assert cv.metrics["run"]["design"]["name"] == "cv" and "holdout" not in cv.metrics
    assert not (result.run_dir / "random_split").exists()  # the held-out run's, not this one's


@pytest.fixture
def kang_subsample(kang_path, tmp_path):
    """600 Kang 2018 cells drawn with a fixed seed (keeps the end-to-end run short)."""
    return subsample(kang_path, 600, tmp_path / "kang600.h5ad")


def test_directed_kang_shift_from_the_cli(kang_subsample, tmp_path, capsys, caplog):
    config = tmp_path / "config.yaml"
    config.write_text("baselines: [pca+logreg, majority]\nn_pcs: 20\nfigures: false\n")
    args = [
        "run", "--data", str(kang_subsample), "--config", str(config), "--no-scvi",
        "--holdout-key", "condition", "--train-groups", "ctrl", "--test-groups", "stim",
        "--out", str(tmp_path), "--name", "kang", "-q", "--n-splits", "2",
    ]  # fmt: skip
    code, out, err = run_cli_in_process(args, capsys)
    assert code == 0, err
    # two folds are the random-split side's: the held-out headline is one test set
    few = [line for line in caplog.messages if "only 2 folds" in line]
    assert len(few) == 1 and few[0].startswith(
        "warning: random-split comparison: only 2 folds: each 95% interval"
    ), caplog.messages
    run_dir = tmp_path / "kang"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    condition = ad.read_h5ad(kang_subsample).obs["condition"].astype(str)
    split = pd.read_csv(run_dir / "splits" / "split_seed42.tsv", sep="\t")
    assert set(split.loc[split["set"] == "test", "cell"]) == set(
        condition.index[condition == "stim"]
    )
    assert set(split.loc[split["set"] != "test", "cell"]) == set(
        condition.index[condition == "ctrl"]
    )
    block = metrics["holdout"]
    assert block["key"] == "condition" and block["mode"] == "directed"
    assert (block["train_groups"], block["test_groups"]) == (["ctrl"], ["stim"])
    assert block["folds"]["42"]["n_test"] == int((condition == "stim").sum())
    assert list(block["methods"]) == ["pca+logreg", "majority"]
    logreg = block["methods"]["pca+logreg"]
    assert 0.5 < logreg["held_out"]["macro_f1"] <= 1
    lo, hi = logreg["held_out"]["ci95"]
    assert lo <= logreg["held_out"]["macro_f1"] <= hi
    assert logreg["random_split"]["ci95"][0] <= logreg["random_split"]["macro_f1"]
    single = (  # one test set: the percentile interval, not the K-fold t interval
        "one test set: 2.5% and 97.5% percentiles of a class-stratified bootstrap of its cells "
        "(cell sampling only; retraining variation is not covered)"
    )
    assert metrics["run"]["interval_method"] == block["interval_method"] == single
    assert metrics["methods"]["pca+logreg"]["summary"]["macro_f1"]["df"] is None
    for report in ("report.md", "results.md"):
        text = (run_dir / report).read_text()
        assert "## Random split vs held-out group" in text
        assert "trained on ['ctrl'], tested on ['stim']" in text
        assert f"| {logreg['drop']:.3f} |" in text
        assert f"95% intervals: {single}. " in text  # the headline table's note
        assert f"Held out: 95% intervals: {single}; " in text
        assert "only 1 held-out group" not in text
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    sources = "predictions.tsv.gz, random_split/predictions.tsv.gz"
    assert code == 0 and f"holdout from {sources}: every value matches metrics.json" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--holdout-key", "donr"],
            "error: holdout_key (--holdout-key) 'donr' is not an obs column",
        ),
        (
            ["--holdout-key", "donor", "--train-groups", "a", "--test-groups", "z"],
            "error: test_groups (--test-groups) value 'z' is not in obs['donor'], which "
            "holds ['a', 'b', 'c'].",
        ),
        (
            ["--train-groups", "a", "--test-groups", "b"],
            "error: train_groups (--train-groups) and test_groups (--test-groups)",
        ),
        (["--holdout-key", "batch"], "error: obs['batch'] holds one group only ('x')"),
    ],
)
def test_bad_holdout_options_exit_2_with_one_line(tmp_path, capsys, extra, message):
    adata = donor_adata()
    adata.obs["batch"] = "x"
    path = tmp_path / "donors.h5ad"
    adata.write_h5ad(path)
    args = ["run", "--data", str(path), "--no-scvi", "--out", str(tmp_path / "runs"), "-q"]
    code, out, err = run_cli_in_process([*args, *extra], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert not (tmp_path / "runs" / "donors").exists()


DONOR_COLUMNS = "['cell_type', 'donor', 'batch']"
VALIDATE_AS_RUN = {
    "holdout key typo": (
        "holdout_key: donr\n",
        ["--holdout-key", "donr"],
        "error: holdout_key (--holdout-key) 'donr' is not an obs column; choose from "
        f"{DONOR_COLUMNS}. "
        "Did you mean 'donor'?",
    ),
    "group value not in the column": (
        "holdout_key: donor\ntrain_groups: [a]\ntest_groups: [C]\n",
        ["--holdout-key", "donor", "--train-groups", "a", "--test-groups", "C"],
        "error: test_groups (--test-groups) value 'C' is not in obs['donor'], which holds "
        "['a', 'b', 'c'].",
    ),
    "reference typo": (
        "reference: pca+logregg\n",
        ["--reference", "pca+logregg"],
        "error: reference method 'pca+logregg' is not in this run; choose from ['hvg+logreg', "
        "'pca+logreg', 'pca+xgboost', 'majority', 'scvi+logreg', 'scvi+xgboost', 'scvi+knn']. "
        "Did you mean 'pca+logreg'?",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATE_AS_RUN))
def test_validate_stops_with_runs_line(tmp_path, capsys, case):
    yaml_text, flags, message = VALIDATE_AS_RUN[case]
    adata = donor_adata()
    adata.obs["batch"] = "x"
    path = tmp_path / "donors.h5ad"
    adata.write_h5ad(path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    runs = tmp_path / "runs"
    code, _, err = run_cli_in_process(
        ["run", "--data", str(path), "--config", str(config), "--out", str(runs), "-q"], capsys
    )
    assert (code, err.strip()) == (2, message)
    assert not runs.exists()
    for args in (["--config", str(config)], flags):
        for backed in ("--no-backed", "--backed"):
            code, out, err = run_cli_in_process(["validate", str(path), *args, backed], capsys)
            assert (code, out, err.strip()) == (2, "", message), args


def test_validate_accepts_the_run_settings_run_accepts(tmp_path, capsys):
    path = tmp_path / "donors.h5ad"
    donor_adata().write_h5ad(path)
    args = ["--holdout-key", "donor", "--train-groups", "a,b", "--test-groups", "c"]
    code, out, err = run_cli_in_process(
        ["validate", str(path), *args, "--reference", "majority"], capsys
    )
    assert code == 0, err
    assert "label column: cell_type (3 classes)" in out


def test_reference_may_name_a_model_method_before_it_is_loaded():
    from scfmbench.benchmark.methods import baseline_methods, check_reference
    from scfmbench.config import RunConfig

    config = RunConfig(baselines=["majority"], probes=["logreg", "knn"])
    baselines = baseline_methods(config)
    assert check_reference(config, baselines, []) == "majority"
    chosen = config.model_copy(update={"reference": "geneformer-random+knn"})
    assert check_reference(chosen, baselines, ["geneformer"]) == "geneformer-random+knn"
    no_controls = chosen.model_copy(update={"random_controls": False})
    with pytest.raises(
        ConfigError,
        match=r"^reference method 'geneformer-random\+knn' is not in this run; choose from "
        r"\['majority', 'geneformer\+logreg', 'geneformer\+knn'\]\. "
        r"Did you mean 'geneformer\+knn'\?$",
    ):
        check_reference(no_controls, baselines, ["geneformer"])
    only_control = no_controls.model_copy(update={"reference": "scgpt-random+logreg"})
    assert check_reference(only_control, baselines, ["scgpt-random=/ckpt"]) == (
        "scgpt-random+logreg"
    )


@pytest.mark.slow
def test_models_controls_and_finetuning_run_on_the_held_out_folds(kang_path, tmp_path, shared_dir):
    """A tiny Geneformer, its random-init control and both fine-tuned: all on the same folds."""
    from scfmbench.benchmark.pipeline import run
    from scfmbench.evaluation.run_stats import read_predictions
    from tests._geneformer_factory import write_checkpoint

    # inputs capped at 128 tokens: six quick fine-tunings
    model_dir, _ = write_checkpoint(
        tmp_path / "gf", shared_dir, version="V2", max_position_embeddings=128
    )
    kang = ad.read_h5ad(kang_path)
    cells = kang[np.sort(np.random.default_rng(1).choice(kang.n_obs, 160, replace=False))].copy()
    result = run(
        cells,
        out=tmp_path,
        name="gf",
        models=[f"geneformer={model_dir}"],
        gene_column="gene_ids",
        allow_feature_selected=True,  # the Kang subset holds 1,267 genes
        baselines=["majority"],
        probes=["logreg"],
        layerwise=False,
        figures=False,
        progress=False,
        n_splits=2,
        holdout_key="condition",
        train_groups=["ctrl"],
        test_groups=["stim"],
        finetune={"epochs": 1, "learning_rate": 1e-3, "batch_size": 16},
    )
    names = [
        "majority",
        "geneformer+logreg",
        "geneformer-random+logreg",
        "geneformer+finetuned",
        "geneformer-random+finetuned",
    ]
    assert sorted(result.metrics["methods"]) == sorted(names)
    block = result.metrics["holdout"]
    assert sorted(block["methods"]) == sorted(names)
    assert all(block["methods"][n]["random_split"] is not None for n in names)
    stim = set(cells.obs_names[cells.obs["condition"].astype(str) == "stim"])
    table = read_predictions(result.run_dir / "predictions.tsv.gz")
    for name in names:
        assert set(table.loc[table["method"] == name, "cell"]) == stim
    random_dir = result.run_dir / "random_split" / "finetune" / "geneformer"
    assert sorted(p.name for p in random_dir.iterdir()) == ["seed42", "seed43"]
    assert (result.run_dir / "finetune" / "geneformer" / "seed42").is_dir()


def test_group_lists_take_one_group_and_numbers_as_text(tmp_path):
    from scfmbench.config import RunConfig

    path = tmp_path / "shift.yaml"
    path.write_text("holdout_key: donor\ntrain_groups: ctrl\ntest_groups: [101, 102.5]\n")
    config = RunConfig.from_yaml(path)
    assert config.train_groups == ["ctrl"] and config.test_groups == ["101", "102.5"]


def test_label_efficiency_of_held_out_groups_averages_present_classes(tmp_path):
    # donors b and c hold no type_2 cell: the sweep's macro F1 averages the classes present
    # in each held-out group, so its 'all' size is the headline score and interval
    from scfmbench.benchmark.pipeline import run

    result = run(
        donor_adata(),
        progress=False,
        holdout_key="donor",
        baselines=["pca+logreg", "majority"],
        n_pcs=5,
        n_hvg=40,
        train_sizes=[3, "all"],
        figures=False,
        out=tmp_path,
        name="donors",
    )
    block = result.metrics["label_efficiency"]
    assert "two-stage bootstrap" in block["interval_method"]
    for name in ("pca+logreg", "majority"):
        headline = result.metrics["methods"][name]["summary"]["macro_f1"]
        every = block["methods"][name]["sizes"]
        assert every["all"]["mean"] == pytest.approx(headline["mean"], abs=1e-12)
        assert every["all"]["ci95"] == pytest.approx(headline["ci95"], abs=1e-12)
        folds = result.metrics["holdout"]["folds"]
        per_group = result.metrics["holdout"]["methods"][name]["held_out"]["per_group"]
        assert {folds[k]["group"]: v for k, v in every["all"]["per_split"].items()} == (
            pytest.approx(per_group, abs=1e-12)
        )
