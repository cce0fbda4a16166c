import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from scfmbench.evaluation.bootstrap import draw_counts, resample_scores, stratified_samples
from scfmbench.evaluation.stats import (
    INTERVAL_METHODS,
    Design,
    bootstrap_p,
    design_estimate,
    holm,
    interval_method,
    mcnemar_exact,
    paired_comparison,
)
from tests._bootstrap import bootstrap_ci


def test_mcnemar_hand_made_table():
    # A right & B wrong on 10 cells, the reverse on 2: p = 2 * P(X <= 2 | n=12, 1/2) = 158/4096
    a = np.r_[np.ones(10, bool), np.zeros(2, bool), np.ones(30, bool)]
    b = np.r_[np.zeros(10, bool), np.ones(2, bool), np.ones(30, bool)]
    result = mcnemar_exact(a, b)
    assert (result["b"], result["c"]) == (10, 2)
    assert result["p"] == pytest.approx(158 / 4096)
    assert result["p"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)
    assert mcnemar_exact(a, a)["p"] == 1.0


def test_holm_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def make_predictions(seed=0, n=300, accuracy=0.8):
    rng = np.random.default_rng(seed)
    truth = rng.choice(["A", "B", "C"], n)
    noise = rng.choice(["A", "B", "C"], n)
    pred = np.where(rng.random(n) < accuracy, truth, noise)
    return truth, pred


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    truth, pred = make_predictions()
    ci = bootstrap_ci(truth, pred, classes=["A", "B", "C"], seed=3)
    assert ci == bootstrap_ci(truth, pred, classes=["A", "B", "C"], seed=3)
    assert ci["accuracy"][0] < accuracy_score(truth, pred) < ci["accuracy"][1]
    assert ci["macro_f1"][0] < f1_score(truth, pred, average="macro") < ci["macro_f1"][1]
    # a 95% interval of a proportion over 300 cells is about ±0.045 wide
    assert 0.06 < ci["accuracy"][1] - ci["accuracy"][0] < 0.12


def test_paired_comparison_detects_a_real_gain():
    truth, good = make_predictions(seed=1, accuracy=0.95)
    _, bad = make_predictions(seed=2, accuracy=0.6)
    result = paired_comparison([("42", truth, good, bad)], classes=["A", "B", "C"], seed=0)
    expected = f1_score(truth, good, average="macro") - f1_score(truth, bad, average="macro")
    assert result.f1_diff == pytest.approx(expected)
    assert result.f1_diff_ci95[0] > 0 and result.bootstrap_p < 0.01
    assert result.mcnemar_p < 1e-6
    same = paired_comparison([("42", truth, good, good)], classes=["A", "B", "C"])
    assert same.f1_diff == 0 and same.mcnemar_p == 1.0 and same.bootstrap_p == 1.0


def test_run_reports_statistics(tmp_path, tiny_adata):
    import scfmbench

    result = scfmbench.run(
        tiny_adata, out=tmp_path, name="s", n_splits=2, progress=False, figures=False
    )
    methods = result.metrics["methods"]
    best = result.metrics["run"]["best_baseline"]
    assert "significance" not in methods[best]
    majority = methods["majority"]["significance"]
    assert majority["baseline"] == best and majority["f1_diff"] < -0.5
    assert majority["significant"] and majority["p_holm"] >= majority["p"]
    # the best baseline is the one with the highest validation macro F1, not test
    val = {
        name: np.mean([s["val_macro_f1"] for s in methods[name]["splits"].values()])
        for name in methods
        if methods[name]["kind"] == "baseline"
    }
    assert best == max(val, key=val.get)
    assert result.metrics["run"]["best_baseline_chosen_by"].startswith("validation")
    lo, hi = methods["pca+logreg"]["summary"]["accuracy"]["ci95"]
    assert lo <= methods["pca+logreg"]["summary"]["accuracy"]["mean"] <= hi
    scores = result.metrics["embeddings"]["pca"]
    assert scores["nmi"] > 0.7 and scores["ari"] > 0.7  # three well-separated types
    assert 0 <= scores["silhouette_label"] <= 1


def test_scores_match_sklearn_over_all_training_classes():
    rng = np.random.default_rng(5)
    classes = ["A", "B", "C", "D"]
    true = rng.integers(0, 3, 50)  # class D has no test cells
    pred = np.where(rng.random(50) < 0.7, true, rng.integers(0, 5, 50))  # 4 = unassigned
    samples = stratified_samples(true, n_boot=20, seed=1)
    draws = draw_counts(true, n_boot=20, seed=1)
    assert draws.shape == (20, 50) and (draws.sum(axis=1) == 50).all()
    for row, idx in zip(draws, samples, strict=True):  # the same cells, counted
        assert row.tolist() == np.bincount(idx, minlength=50).tolist()
    keep = np.array([True, True, False, True])
    got = resample_scores(true, pred, 4, draws, keep=keep)
    for row, idx in enumerate(samples):
        t, p = true[idx], pred[idx]
        assert got["macro_f1"][row] == pytest.approx(
            f1_score(t, p, labels=[0, 1, 2, 3], average="macro", zero_division=0)
        )
        assert got["macro_f1_excl_small"][row] == pytest.approx(
            f1_score(t, p, labels=[0, 1, 3], average="macro", zero_division=0)
        )
        recalls = [np.mean(p[t == c] == c) for c in np.unique(t)]
        assert got["balanced_accuracy"][row] == pytest.approx(np.mean(recalls))
        assert got["accuracy"][row] == accuracy_score(t, p)
    assert classes  # D scores 0 (never predicted, no support), as sklearn with labels=


def test_stratified_bootstrap_keeps_every_class():
    true = np.array([0] * 40 + [1] * 3 + [2] * 1)
    samples = stratified_samples(true, n_boot=500, seed=0)
    assert samples.shape == (500, 44)
    for row in samples:
        assert np.bincount(true[row], minlength=3).tolist() == [40, 3, 1]
    assert (true[samples[:, -1]] == 2).all()  # the single Platelet-like cell is always there


def test_bootstrap_p_is_never_zero():
    replicates = np.linspace(0.1, 0.2, 999)  # all above 0
    assert bootstrap_p(replicates) == pytest.approx(2 / 1000)
    assert bootstrap_p(np.zeros(99)) == 1.0


def test_cv_interval_formula_by_hand():
    values = np.array([0.80, 0.90, 0.85, 0.70, 0.75])
    replicates = np.random.default_rng(0).normal(values[:, None], 0.01, (5, 400))
    estimate = design_estimate(values, replicates, Design("cv", n_folds=5))
    between = values.var(ddof=1)  # far above the within-fold bootstrap variance
    se = np.sqrt(between / 5)
    from scipy.stats import t

    half = t.ppf(0.975, 4) * se
    assert estimate.se == pytest.approx(se)
    assert estimate.ci95 == pytest.approx((0.8 - half, 0.8 + half))
    assert estimate.df == 4
    repeated = design_estimate(values, replicates, Design("repeated-cv", 5, 0.25))
    assert repeated.se == pytest.approx(np.sqrt((1 / 5 + 0.25) * between))


@pytest.mark.parametrize("name", ["cv", "holdout"])
def test_k_fold_interval_keeps_t_when_the_bootstrap_variance_is_larger(name):
    """The within-fold bootstrap floor enlarges the variance but adds no degrees of freedom:
    3 fold scores that happen to agree still get t with 2 df, never the normal quantile."""
    from scipy.stats import t

    values = np.array([0.800, 0.801, 0.799])  # agree far more than cell sampling allows
    replicates = np.random.default_rng(0).normal(values[:, None], 0.02, (3, 400))
    within = float(np.mean(replicates.var(axis=1, ddof=1)))
    assert within > values.var(ddof=1)
    estimate = design_estimate(values, replicates, Design(name, n_folds=3))
    se = np.sqrt(within / 3)
    half = t.ppf(0.975, 2) * se  # 4.30 · se (the normal quantile gave 1.96 · se)
    assert estimate.df == 2
    assert estimate.se == pytest.approx(se)
    assert estimate.ci95 == pytest.approx((0.8 - half, 0.8 + half))
    agreeing = design_estimate(np.array([0.75, 0.8, 0.85]), replicates, Design(name, n_folds=3))
    assert agreeing.df == 2  # the between-fold variance wins: the same quantile


def test_interval_method_names_the_interval_computed():
    assert interval_method(Design("cv", n_folds=5)) == INTERVAL_METHODS["cv"]
    assert interval_method(Design("holdout", n_folds=2)) == INTERVAL_METHODS["holdout"]
    assert interval_method(Design("repeated-cv", n_folds=5)) == INTERVAL_METHODS["repeated-cv"]
    directed = Design("holdout", n_folds=1)  # one test set: the percentile interval
    assert interval_method(directed) == (
        "one test set: 2.5% and 97.5% percentiles of a class-stratified bootstrap of its cells "
        "(cell sampling only; retraining variation is not covered)"
    )
    replicates = np.random.default_rng(1).normal(0.8, 0.02, (1, 400))
    estimate = design_estimate(np.array([0.8]), replicates, directed)
    assert estimate.df is None
    assert estimate.ci95 == pytest.approx(tuple(np.quantile(replicates[0], [0.025, 0.975])))


def simulate_folds(rng, *, n_rep, n_cells, n_folds, accuracy, spread, n_methods=1):
    """Vectorized: truth (n_rep, n_cells) over 3 classes and per-method predictions whose
    per-fold accuracy is ``accuracy`` plus a retraining effect N(0, spread²)."""
    truth = rng.integers(0, 3, (n_rep, n_cells))
    fold = np.arange(n_cells) % n_folds
    preds = []
    for _ in range(n_methods):
        per_fold = np.clip(accuracy + spread * rng.standard_normal((n_rep, n_folds)), 0, 1)
        right = rng.random((n_rep, n_cells)) < per_fold[:, fold]
        wrong = (truth + rng.integers(1, 3, (n_rep, n_cells))) % 3
        preds.append(np.where(right, truth, wrong))
    return truth, fold, preds


def test_cv_interval_covers_a_known_accuracy():
    """Coverage of the 95% interval on simulated 5-fold CV with known true accuracy 0.8 and
    fold-to-fold retraining variation: ≥ 93% of 300 replicates."""
    rng = np.random.default_rng(2024)
    n_rep, n_folds, n_boot = 300, 5, 200
    truth, fold, (pred,) = simulate_folds(
        rng, n_rep=n_rep, n_cells=200, n_folds=n_folds, accuracy=0.8, spread=0.03
    )
    covered = 0
    for r in range(n_rep):
        values, reps = [], []
        for j in range(n_folds):
            t, p = truth[r, fold == j], pred[r, fold == j]
            draws = draw_counts(t, n_boot=n_boot, seed=r * n_folds + j)
            values.append(np.mean(t == p))
            reps.append(resample_scores(t, p, 3, draws)["accuracy"])
        lo, hi = design_estimate(np.array(values), np.stack(reps), Design("cv", n_folds)).ci95
        covered += lo <= 0.8 <= hi
    assert covered / n_rep >= 0.93


def test_paired_test_holds_its_level_under_the_null():
    """Two methods of identical quality (independent errors, fold-to-fold variation): the
    design-aware paired test rejects at α = 0.05 in ≤ 6% of 300 replicates."""
    rng = np.random.default_rng(7)
    n_rep, n_folds = 300, 5
    names = np.array(["A", "B", "C"])
    truth, fold, (a, b) = simulate_folds(
        rng, n_rep=n_rep, n_cells=200, n_folds=n_folds, accuracy=0.8, spread=0.03, n_methods=2
    )
    rejected = mcnemar_rejected = 0
    for r in range(n_rep):
        sets = [
            (str(j), names[truth[r, fold == j]], names[a[r, fold == j]], names[b[r, fold == j]])
            for j in range(n_folds)
        ]
        result = paired_comparison(
            sets, classes=list(names), n_boot=200, seed=r, design=Design("cv", n_folds)
        )
        rejected += result.p < 0.05
        mcnemar_rejected += result.mcnemar_p < 0.05
        assert result.p > 0
    assert rejected / n_rep <= 0.06
    assert mcnemar_rejected / n_rep <= 0.06  # pooling disjoint folds is valid


def test_study_design_does_not_pool_overlapping_mcnemar_counts():
    truth, good = make_predictions(seed=1, accuracy=0.95)
    _, bad = make_predictions(seed=2, accuracy=0.6)
    splits = [("42", truth, good, bad), ("43", truth, good, bad)]
    result = paired_comparison(splits, classes=["A", "B", "C"], seed=0)
    assert result.mcnemar_p is None and set(result.mcnemar_p_per_split) == {"42", "43"}
    disjoint = paired_comparison(splits, classes=["A", "B", "C"], design=Design("cv", 2))
    assert disjoint.mcnemar_p is not None


def test_difference_interval_stays_within_its_possible_range():
    """A difference of two macro F1 scores lies in [-1, 1]; with 2 folds (t with 1 df) the
    unclipped interval of a large difference that varies between folds would pass 1."""
    truth, perfect = make_predictions(seed=1, accuracy=1.0)
    _, poor = make_predictions(seed=2, accuracy=0.6)
    _, chance = make_predictions(seed=3, accuracy=0.0)
    splits = [("42", truth, perfect, poor), ("43", truth, perfect, chance)]
    result = paired_comparison(splits, classes=["A", "B", "C"], design=Design("cv", 2), seed=0)
    lo, hi = result.f1_diff_ci95
    assert -1.0 <= lo < result.f1_diff < hi == 1.0  # clipped, as the scores' own intervals


def test_predictions_table_recomputes_every_statistic(tmp_path, tiny_adata):
    import gzip
    import json
    import subprocess
    import sys

    import pandas as pd

    import scfmbench
    from scfmbench.evaluation.run_stats import read_predictions
    from scfmbench.results import check_statistics

    result = scfmbench.run(
        tiny_adata, out=tmp_path, name="p", n_splits=3, progress=False, figures=False
    )
    run_dir = result.run_dir
    table = read_predictions(run_dir / "predictions.tsv.gz")
    assert list(table.columns[:7]) == ["method", "split", "repeat", "fold", "cell", "true", "pred"]
    for method, rows in table.groupby("method"):
        # disjoint test folds: every cell is tested exactly once per method
        assert sorted(rows["cell"]) == sorted(tiny_adata.obs_names), method
        assert set(rows["split"]) == {"42", "43", "44"}
    logreg = table[table["method"] == "pca+logreg"]
    proba = logreg[[c for c in table.columns if c.startswith("proba:")]].to_numpy()
    assert proba.shape == (60, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    classes = np.array([c.removeprefix("proba:") for c in table.columns if c.startswith("proba:")])
    assert (classes[proba.argmax(axis=1)] == logreg["pred"].to_numpy()).all()
    check = check_statistics(run_dir)
    assert check.differences == []
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert check.recomputed["comparisons"] == stored["comparisons"]
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "stats", str(run_dir)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [
        "recomputed run, methods, comparisons from predictions.tsv.gz: every value matches "
        "metrics.json",
        "not checked: embeddings (zero-shot scores of the embeddings, not of the predictions)",
    ]
    # a changed prediction is caught
    table.loc[table.index[0], "pred"] = "type_2" if table.loc[0, "pred"] != "type_2" else "type_1"
    with gzip.open(run_dir / "predictions.tsv.gz", "wt") as fh:
        pd.DataFrame(table).to_csv(fh, sep="\t", index=False)
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "stats", str(run_dir)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "differ (metrics.json vs recomputed):" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "scfmbench", "stats", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_transfer_interval_covers_a_known_accuracy():
    """Transfer: 5 training seeds scored on the same 200 target cells; each cell has its own
    difficulty (errors correlate across seeds) and each seed its own retraining effect. The
    interval of the seed mean covers the true accuracy 0.8 in ≥ 93% of 300 replicates."""
    rng = np.random.default_rng(11)
    n_rep, n_seeds, n_cells, n_boot = 300, 5, 200, 200
    truth = rng.integers(0, 3, (n_rep, n_cells))
    ease = rng.beta(8, 2, (n_rep, n_cells))  # mean 0.8: P(correct) of each target cell
    effect = 0.03 * rng.standard_normal((n_rep, n_seeds))
    right = rng.random((n_rep, n_seeds, n_cells)) < np.clip(ease[:, None] + effect[..., None], 0, 1)
    covered = 0
    for r in range(n_rep):
        samples = stratified_samples(truth[r], n_boot=n_boot, seed=r)
        values = right[r].mean(axis=1)
        reps = np.stack([right[r, j][samples].mean(axis=1) for j in range(n_seeds)])
        lo, hi = design_estimate(values, reps, Design("transfer", n_seeds)).ci95
        covered += lo <= 0.8 <= hi
    assert covered / n_rep >= 0.93


def test_planned_comparisons_pair_controls_and_fine_tuned_models():
    from scfmbench.evaluation.run_stats import planned_comparisons

    def entry(kind, probe, model, val):
        return {
            "kind": kind,
            "probe": probe,
            "model": model,
            "splits": {"42": {"val_macro_f1": val}},
        }

    methods = {
        "hvg+logreg": entry("baseline", "logreg", None, 0.80),
        "pca+logreg": entry("baseline", "logreg", None, 0.90),  # best on validation
        "gf+logreg": entry("frozen", "logreg", "gf", 0.70),
        "gf+knn": entry("frozen", "knn", "gf", 0.75),
        "gf-random+logreg": entry("control", "logreg", "gf-random", 0.30),
        "gf+finetuned": entry("finetuned", "finetune", "gf", 0.85),
        "gf-random+finetuned": entry("control", "finetune", "gf-random", 0.40),
    }
    planned = planned_comparisons(methods)
    assert ("hvg+logreg", "pca+logreg", "vs best baseline") in planned
    assert ("gf+logreg", "gf-random+logreg", "vs random-init control") in planned
    assert ("gf+finetuned", "gf-random+finetuned", "vs random-init control") in planned
    assert ("gf+finetuned", "gf+knn", "fine-tuned vs frozen") in planned  # best frozen on val
    assert ("gf+knn", "gf-random+knn", "vs random-init control") not in planned  # no control
    assert sum(kind == "vs best baseline" for *_, kind in planned) == 6


def test_repeated_cv_run_uses_the_corrected_variance(tmp_path, tiny_adata):
    import scfmbench
    from scfmbench.results import check_statistics

    result = scfmbench.run(
        tiny_adata,
        out=tmp_path,
        name="rcv",
        n_splits=2,
        n_repeats=2,
        baselines=["pca+logreg", "majority"],
        progress=False,
        figures=False,
    )
    run = result.metrics["run"]
    assert run["seeds"] == [42, 43, 44, 45] and run["design"]["name"] == "repeated-cv"
    assert run["interval_method"].startswith("repeated K-fold CV")
    (comparison,) = result.metrics["comparisons"]
    assert comparison["mcnemar_p"] is None  # each cell is tested twice: counts not pooled
    assert set(comparison["mcnemar_p_per_split"]) == {"42", "43", "44", "45"}
    assert result.metrics["methods"]["majority"]["summary"]["macro_f1"]["df"] == 3
    assert check_statistics(result.run_dir).differences == []


def test_draw_counts_are_kept_and_read_only(monkeypatch):
    import scfmbench.evaluation.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "_DRAWS", type(bootstrap._DRAWS)())
    monkeypatch.setattr(bootstrap, "DRAWS_KEPT", 2)
    true = np.repeat([0, 1, 2], [30, 5, 1])
    first = draw_counts(true, n_boot=50, seed=3)
    assert draw_counts(true, n_boot=50, seed=3) is first  # kept
    assert first.dtype == np.uint8 and not first.flags.writeable
    assert (first[:, -1] == 1).all()  # a class of one cell: drawn once in every resample
    other = draw_counts(true, n_boot=50, seed=4)
    assert not np.array_equal(other, first)
    draw_counts(true[:-1], n_boot=50, seed=3)  # a third set pushes the oldest out
    assert list(bootstrap._DRAWS) == [
        (true.astype(np.int64).tobytes(), 50, 4),
        (true[:-1].astype(np.int64).tobytes(), 50, 3),
    ]
    again = draw_counts(true, n_boot=50, seed=3)
    assert again is not first and np.array_equal(again, first)  # recomputed, same draws


def _edit_metrics(run_dir, edit):
    import json

    path = run_dir / "metrics.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_stats_checks_the_label_efficiency_section(tmp_path, tiny_adata, capsys):
    import json

    import scfmbench
    from tests.conftest import run_cli_in_process

    result = scfmbench.run(
        tiny_adata,
        out=tmp_path,
        name="le",
        n_splits=2,
        baselines=["hvg+logreg", "majority"],
        train_sizes=[1, 5, "all"],
        progress=False,
        figures=False,
    )
    run_dir = result.run_dir
    sources = "predictions.tsv.gz, stages/label_efficiency_*.json"
    counts = (
        "not checked: label_efficiency.capped, label_efficiency.n_train_cells, "
        "label_efficiency.all_cells_per_class (training-cell counts, not in the saved "
        "predictions); embeddings (zero-shot scores of the embeddings, not of the predictions)"
    )
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 0, err
    assert out.splitlines()[-2:] == [
        f"recomputed run, methods, comparisons, label_efficiency from {sources}: every value "
        "matches metrics.json",
        counts,
    ]
    stored = result.metrics["label_efficiency"]["methods"]["hvg+logreg"]["sizes"]["1"]["mean"]
    assert stored != 0.999

    def edit(doc):
        doc["label_efficiency"]["methods"]["hvg+logreg"]["sizes"]["1"]["mean"] = 0.999

    _edit_metrics(run_dir, edit)
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 1, err
    assert out.splitlines()[-3:] == [
        f"recomputed run, methods, comparisons, label_efficiency from {sources}: 1 value(s) "
        "differ (metrics.json vs recomputed):",
        f"  label_efficiency.methods.hvg+logreg.sizes.1.mean: 0.999 vs {json.dumps(stored)}",
        counts,
    ]
    # without the saved per-draw predictions the section is named as not checked
    stage = run_dir / "stages" / "label_efficiency_hvg__logreg_seed43.json"
    stage.unlink()
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 0, err
    assert out.splitlines()[-2:] == [
        "recomputed run, methods, comparisons from predictions.tsv.gz: every value matches "
        "metrics.json",
        "not checked: label_efficiency (no stages/label_efficiency_hvg__logreg_seed43.json: "
        "rerun the run to save it); embeddings (zero-shot scores of the embeddings, not of "
        "the predictions)",
    ]


def test_stats_checks_the_holdout_section(tmp_path, capsys):
    import json

    from scfmbench.benchmark.pipeline import run
    from tests.conftest import run_cli_in_process
    from tests.test_holdout import donor_adata

    result = run(
        donor_adata(),
        holdout_key="donor",
        baselines=["pca+logreg", "majority"],
        n_pcs=5,
        n_hvg=40,
        n_splits=2,
        figures=False,
        out=tmp_path,
        name="donors",
        progress=False,
    )
    run_dir = result.run_dir
    head = (
        "recomputed run, methods, comparisons, holdout from predictions.tsv.gz, "
        "random_split/predictions.tsv.gz"
    )
    embeddings = (
        "not checked: embeddings (zero-shot scores of the embeddings, not of the predictions)"
    )
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 0, err
    assert out.splitlines()[-2:] == [f"{head}: every value matches metrics.json", embeddings]
    row = result.metrics["holdout"]["methods"]["pca+logreg"]
    group_a = row["held_out"]["per_group"]["a"]

    def edit(doc):
        edited = doc["holdout"]["methods"]["pca+logreg"]
        edited["random_split"]["macro_f1"] = 0.5
        edited["drop"] = 0.5 - edited["held_out"]["macro_f1"]
        edited["held_out"]["per_group"]["a"] = 0.25

    _edit_metrics(run_dir, edit)
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 1, err
    drop = 0.5 - row["held_out"]["macro_f1"]
    assert out.splitlines()[-5:] == [
        f"{head}: 3 value(s) differ (metrics.json vs recomputed):",
        f"  holdout.methods.pca+logreg.drop: {json.dumps(drop)} vs {json.dumps(row['drop'])}",
        f"  holdout.methods.pca+logreg.held_out.per_group.a: 0.25 vs {json.dumps(group_a)}",
        "  holdout.methods.pca+logreg.random_split.macro_f1: 0.5 vs "
        f"{json.dumps(row['random_split']['macro_f1'])}",
        embeddings,
    ]
    # a run without the random split's saved document is named as not checked
    (run_dir / "random_split" / "metrics.json").unlink()
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert code == 0, err
    assert out.splitlines()[-2:] == [
        "recomputed run, methods, comparisons from predictions.tsv.gz: every value matches "
        "metrics.json",
        "not checked: holdout (no random_split/metrics.json and "
        "random_split/predictions.tsv.gz: rerun the run to save them); embeddings (zero-shot "
        "scores of the embeddings, not of the predictions)",
    ]


def test_stats_names_a_damaged_predictions_table(tmp_path, tiny_adata, capsys):
    import gzip

    import scfmbench
    from tests.conftest import run_cli_in_process

    result = scfmbench.run(
        tiny_adata,
        out=tmp_path,
        name="d",
        n_splits=2,
        baselines=["majority"],
        progress=False,
        figures=False,
    )
    run_dir = result.run_dir
    path = run_dir / "predictions.tsv.gz"
    good = path.read_bytes()
    fix = "rerun the same `scfmbench run` command to rewrite it, or restore the file from a backup"
    cases = {
        # a cut gzip ends in EOFError, which click would turn into a silent exit 1
        "truncated": (good[: len(good) // 2], "is truncated or corrupt (its gzip data end early)"),
        "not gzip": (b"method\tsplit\n", "is truncated or corrupt (Not a gzipped file (b'me'))"),
        "not a table": (
            gzip.compress(b"a\tb\n1\n1\t2\t3\n"),
            "is truncated or corrupt (Error tokenizing data. C error: Expected 2 fields in "
            "line 3, saw 3)",
        ),
        "no header of a table": (
            gzip.compress(b"garbage"),
            "lacks the column(s) method, split, true, pred of a predictions table (it has "
            "'garbage')",
        ),
        "columns missing": (
            gzip.compress(b"method\tsplit\trepeat\tfold\tcell\n"),
            "lacks the column(s) true, pred of a predictions table (it has 'method', 'split', "
            "'repeat', 'fold' and 1 more)",
        ),
    }
    before = sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p != path)
    for case, (data, problem) in cases.items():
        path.write_bytes(data)
        code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
        assert (code, out, err) == (2, "", f"error: {path} {problem}; {fix}\n"), case
        assert path.read_bytes() == data, case
    assert sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p != path) == before
    path.unlink()
    path.mkdir()
    code, out, err = run_cli_in_process(["stats", str(run_dir)], capsys)
    assert (code, out, err) == (2, "", f"error: cannot read {path} (Is a directory); {fix}\n")
