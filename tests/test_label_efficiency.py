"""Label efficiency (``run --train-sizes``): nested stratified subsets, the sweep and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import scfmbench
from scfmbench import ConfigError, RunConfig
from scfmbench.benchmark.label_efficiency import ALL, nested_subsets
from scfmbench.data.splits import load_splits, normalize_train_sizes
from scfmbench.evaluation.section_stats import resample_draws, size_estimate
from scfmbench.evaluation.stats import Design

from .conftest import make_tiny_adata, run_cli_in_process


def hand_made_labels() -> pd.Series:
    """Classes of 20, 7 and 3 cells, interleaved, with shuffled cell names."""
    values = ["A"] * 20 + ["B"] * 7 + ["C"] * 3
    order = np.random.default_rng(5).permutation(len(values))
    names = [f"cell{i:02d}" for i in range(len(values))]
    return pd.Series(np.asarray(values)[order], index=pd.Index(names)[::-1])


def test_nested_subsets_are_stratified_nested_and_seeded():
    labels = hand_made_labels()
    sizes = [1, 2, 5, 10, ALL]
    subsets = nested_subsets(labels, sizes, seed=[42, 0])
    class_sizes = {"A": 20, "B": 7, "C": 3}
    for size in sizes[:-1]:
        counts = labels.loc[subsets[size]].value_counts().to_dict()
        # exactly `size` cells per class, or all of a class that has fewer
        assert counts == {c: min(size, n) for c, n in class_sizes.items()}
        assert subsets[size].is_unique
        # the training cells' own order is kept
        assert list(subsets[size]) == [c for c in labels.index if c in set(subsets[size])]
    assert list(subsets[ALL]) == list(labels.index)
    for small, large in zip(sizes, sizes[1:], strict=False):
        assert set(subsets[small]) <= set(subsets[large]), (small, large)
    # the same seed draws the same cells, another draw other cells
    again = nested_subsets(labels, sizes, seed=[42, 0])
    assert all(list(again[s]) == list(subsets[s]) for s in sizes)
    other = nested_subsets(labels, sizes, seed=[42, 1])
    assert list(other[5]) != list(subsets[5])
    assert labels.loc[other[5]].value_counts().to_dict() == {"A": 5, "B": 5, "C": 3}


@pytest.mark.parametrize(
    ("given", "expected"),
    [("2,5,all", [2, 5, ALL]), ("all, 10,1,10", [1, 10, ALL]), ([25, "5"], [5, 25])],
)
def test_train_sizes_are_normalized(given, expected):
    assert normalize_train_sizes(given) == expected
    assert RunConfig.build({"train_sizes": given}).train_sizes == expected


def test_train_sizes_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_sizes: [50, 1, all, 5]\ntrain_size_seeds: 2\n")
    config = RunConfig.from_yaml(path)
    assert config.train_sizes == [1, 5, 50, ALL] and config.train_size_seeds == 2
    path.write_text("train_sizes: [1, 0.5]\n")
    with pytest.raises(ConfigError, match="train size 0.5 is not a whole number"):
        RunConfig.from_yaml(path)


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "few", "", [0], [True]])
def test_bad_train_sizes_are_refused(bad):
    with pytest.raises(ConfigError, match="train_sizes"):
        RunConfig.build({"train_sizes": bad})


def test_sweep_refits_every_probe_on_the_subsets_with_the_runs_val_and_test(
    tmp_path, tiny_adata, monkeypatch
):
    import scfmbench.benchmark.fitting as fitting
    import scfmbench.benchmark.label_efficiency as sweep_module

    calls = []
    original = fitting.fit_and_predict_features

    def spy(method, feats, labels, split, *args, **kwargs):
        calls.append((method.name, split.seed, split, feats.train.shape[0]))
        return original(method, feats, labels, split, *args, **kwargs)

    monkeypatch.setattr(fitting, "fit_and_predict_features", spy)
    monkeypatch.setattr(sweep_module, "fit_and_predict_features", spy)
    baselines = ["hvg+logreg", "pca+logreg", "majority"]

    # tiny data, 2 folds: 8 training cells per class, so size 9 is capped at the whole set
    def sweep():
        return scfmbench.run(
            tiny_adata,
            out=tmp_path,
            name="le",
            n_splits=2,
            baselines=baselines,
            train_sizes=[2, 5, 9, ALL],
            progress=False,
            figures=False,
        )

    result = sweep()
    labels = tiny_adata.obs["cell_type"].astype(str)
    splits = {s.seed: s for s in load_splits(tmp_path / "le" / "splits", labels).splits}
    run_calls = [c for c in calls if len(c[2].train) == len(splits[c[1]].train)]
    sweep_calls = [c for c in calls if len(c[2].train) < len(splits[c[1]].train)]
    assert len(run_calls) == len(baselines) * 2
    # one fit per method, fold, size (2 and 5; 9 reuses the run's fit) and draw (3)
    assert len(sweep_calls) == len(baselines) * 2 * 2 * 3
    for _, seed, split, n_rows in sweep_calls:
        saved = splits[seed]
        assert list(split.val) == list(saved.val) and list(split.test) == list(saved.test)
        assert set(split.train) < set(saved.train) and n_rows == len(split.train)
        assert set(labels.loc[split.train].value_counts()) <= {2, 5}
    block = result.metrics["label_efficiency"]
    assert block["sizes"] == [2, 5, 9, ALL] and block["draws"] == 3
    assert block["capped"] == {"9": {"type_0": 8, "type_1": 8, "type_2": 8}}
    assert block["n_train_cells"] == {"2": 6, "5": 15, "9": 24, "all": 24}
    classes = list(result.metrics["run"]["classes"])
    for name in baselines:
        sizes = block["methods"][name]["sizes"]
        summary = result.metrics["methods"][name]["summary"]["macro_f1"]
        # 'all' is the run's own fit, and its interval the run's
        assert sizes["all"]["mean"] == pytest.approx(summary["mean"], abs=1e-12)
        assert sizes["all"]["ci95"] == pytest.approx(summary["ci95"], abs=1e-12)
        assert sizes["9"]["per_draw"] == {
            s: [v[0]] * 3 for s, v in sizes["all"]["per_draw"].items()
        }
        for size in ("2", "5"):
            stage = (
                tmp_path
                / "le"
                / "stages"
                / f"label_efficiency_{name.replace('+', '__')}_seed42.json"
            )
            runs = json.loads(stage.read_text())["payload"][size]
            truth = labels.loc[splits[42].test]
            expected = [
                f1_score(truth, r["pred"], labels=classes, average="macro", zero_division=0)
                for r in runs
            ]
            assert sizes[size]["per_draw"]["42"] == pytest.approx(expected, abs=1e-12)
            assert sizes[size]["mean"] == pytest.approx(
                np.mean([np.mean(v) for v in sizes[size]["per_draw"].values()]), abs=1e-12
            )
            lo, hi = sizes[size]["ci95"]
            assert 0 <= lo <= sizes[size]["mean"] <= hi <= 1
    assert block["methods"]["majority"]["sizes"]["2"]["mean"] == pytest.approx(1 / 6)
    # a rerun reuses every fit and gives the same block
    again = sweep()
    assert again.metrics["label_efficiency"] == block
    assert not any(
        k.startswith("label_efficiency:") and "logreg" in k for k in again.metrics["timings"]
    )


def test_cli_train_sizes_end_to_end(tmp_path, capsys):
    data = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(data)
    args = ["run", "--data", str(data), "--label-key", "cell_type", "--out", str(tmp_path)]
    args += ["--n-splits", "2", "--no-scvi", "-q"]
    code, _, err = run_cli_in_process([*args, "--name", "plain"], capsys)
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    code, out, err = run_cli_in_process([*args, "--name", "le", "--train-sizes", "2,5,all"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "le"
    doc = json.loads((run_dir / "metrics.json").read_text())
    block = doc["label_efficiency"]
    assert block["sizes"] == [2, 5, "all"]
    assert list(block["methods"]) == list(doc["methods"])
    for entry in block["methods"].values():
        assert list(entry["sizes"]) == ["2", "5", "all"]
        for size, draws in (("2", 3), ("5", 3), ("all", 1)):
            assert set(entry["sizes"][size]["per_draw"]) == {"42", "43"}
            assert all(len(v) == draws for v in entry["sizes"][size]["per_draw"].values())
            assert len(entry["sizes"][size]["ci95"]) == 2
    # 'all' is the normal run's fit: the same macro F1 as a run without --train-sizes
    for name in ("hvg+logreg", "pca+xgboost"):
        f1 = plain["methods"][name]["summary"]["macro_f1"]
        assert block["methods"][name]["sizes"]["all"]["mean"] == f1["mean"]
        assert block["methods"][name]["sizes"]["all"]["ci95"] == f1["ci95"]
    assert doc["methods"] == plain["methods"]
    assert (run_dir / block["figure"]).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "## Label efficiency" in report and "| 2 per class | 5 per class | all |" in report
    assert "## Label efficiency" in (run_dir / "results.md").read_text()


@pytest.mark.parametrize("bad", ["0", "-1", "five", "2,x"])
def test_cli_bad_train_sizes_exit_2_with_one_line(tmp_path, capsys, bad):
    code, out, err = run_cli_in_process(
        ["run", "--out", str(tmp_path), "--name", "bad", "--train-sizes", bad], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid value for 'train_sizes'")
    assert "whole number ≥ 1 or 'all'" in lines[0] and "--train-sizes 1,5,10,25,50,all" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_resample_draws_is_the_plain_mean_when_draws_agree():
    rng = np.random.default_rng(0)
    row = rng.random(50)
    assert resample_draws(np.stack([row, row, row]), rng) == pytest.approx(row, abs=1e-15)
    assert np.array_equal(resample_draws(row[None, :], rng), row)


def test_resample_draws_adds_the_spread_between_draws():
    # three draws that differ by an offset, each with cell-sampling noise on B resamples
    rng = np.random.default_rng(1)
    n_boot, offsets = 40_000, np.array([0.0, 0.1, 0.3])
    scores = offsets[:, None] + rng.normal(0, 0.02, size=(3, n_boot))
    reps = resample_draws(scores, np.random.default_rng(2))
    # oracle, law of total variance over the draw picks, one replicate at a time:
    # Var = mean_b Var_pick(mean of 3 picked) + Var_b(mean of the 3 draws)
    within = np.mean([np.var(scores[:, b]) / 3 for b in range(0, n_boot, 7)])
    between = np.var(scores.mean(axis=0), ddof=1)
    assert np.var(reps, ddof=1) == pytest.approx(within + between, rel=0.05)
    # the cell-sampling-only replicates (mean over the draws) miss the draw spread
    assert np.var(scores.mean(axis=0)) < 0.1 * np.var(reps)
    assert reps.mean() == pytest.approx(offsets.mean(), abs=2e-3)


def _draw_sets(n_draws_wrong: list[int], n_cells: int = 60):
    """One test set of 3 classes; draw d mislabels the first n_draws_wrong[d] cells."""
    truth = np.array(["a", "b", "c"] * (n_cells // 3))
    preds = []
    for wrong in n_draws_wrong:
        pred = truth.copy()
        pred[:wrong] = np.roll(truth[:wrong], 1)
        preds.append(pred)
    return truth, preds


def test_size_estimate_interval_covers_the_spread_between_draws():
    truth, agreeing = _draw_sets([6, 6, 6])
    _, spread = _draw_sets([0, 6, 24])
    single = Design("cv", n_folds=1)  # a directed shift: one test set, percentile interval
    kwargs = dict(classes=["a", "b", "c"], design=single, seed=0)
    same = size_estimate([(truth, agreeing)], ["0"], **kwargs)
    apart = size_estimate([(truth, spread)], ["0"], **kwargs)
    one = size_estimate([(truth, agreeing[:1])], ["0"], **kwargs)
    # agreeing draws: exactly the one-draw interval
    assert same["ci95"] == pytest.approx(one["ci95"], abs=1e-12)
    expected = [f1_score(truth, p, average="macro") for p in spread]
    assert apart["per_draw"]["0"] == pytest.approx(expected, abs=1e-12)
    assert apart["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
    lo, hi = apart["ci95"]
    # the interval reaches past the draws' mean by more than cell sampling alone would
    assert hi - lo > 2 * (same["ci95"][1] - same["ci95"][0])
    assert lo < min(expected[1:]) and hi > np.mean(expected)


def test_size_estimate_averages_present_classes_for_held_out_groups():
    # group 1 holds no cell of class c: macro F1 averages a and b there, as the headline does
    truth0, preds0 = _draw_sets([3, 3])
    truth1 = np.array(["a", "b"] * 20)
    pred1 = truth1.copy()
    pred1[:4] = "c"
    design = Design("holdout", n_folds=2)
    out = size_estimate(
        [(truth0, preds0), (truth1, [pred1, pred1])],
        ["g0", "g1"],
        classes=["a", "b", "c"],
        design=design,
        seed=0,
    )
    present = f1_score(truth1, pred1, labels=["a", "b"], average="macro")
    assert out["per_draw"]["g1"] == pytest.approx([present, present], abs=1e-12)
    assert present > f1_score(truth1, pred1, labels=["a", "b", "c"], average="macro")
