import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from scfmbench.stats import bootstrap_ci, holm, mcnemar_exact, paired_comparison


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
    assert majority["significant"] and majority["p_holm"] >= majority["bootstrap_p"]
    lo, hi = methods["pca+logreg"]["summary"]["accuracy"]["ci95"]
    assert lo <= methods["pca+logreg"]["summary"]["accuracy"]["mean"] <= hi
    scores = result.metrics["embeddings"]["pca"]
    assert scores["nmi"] > 0.7 and scores["ari"] > 0.7  # three well-separated types
    assert 0 <= scores["silhouette_label"] <= 1
