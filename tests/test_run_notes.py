"""Run-level notes that change how a score reads: few folds, constant predictors, what the
cv design uses of ``fractions``, and old (schema 2.0) runs still read."""

from __future__ import annotations

import json

import pytest

import scfmbench
from scfmbench.evaluation.run_stats import design_warnings
from scfmbench.report.write import write_report
from scfmbench.results import check_statistics

FEW_FOLDS = (
    "only 2 folds: each 95% interval rests on 2 fold scores and uses Student t with K − 1 = 1 "
    "degree(s) of freedom (t = 12.71, vs 2.78 with 5 folds), so it is wide; use --n-splits 5 "
    "or more, or add --n-repeats 3 for repeated K-fold cross-validation"
)


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory, tiny_adata_sess):
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        logged = []
        patch.setattr(
            "scfmbench.evaluation.run_stats.logger.warning", lambda fmt, *a: logged.append(fmt % a)
        )
        result = scfmbench.run(
            tiny_adata_sess.copy(),
            out=out,
            name="k2",
            n_splits=2,
            baselines=["majority", "pca+logreg"],
            progress=False,
            figures=False,
        )
    return result, logged


def test_few_folds_warn_on_stderr_in_metrics_and_beside_the_design(two_folds):
    result, logged = two_folds
    assert result.metrics["run"]["warnings"] == [FEW_FOLDS]
    assert logged == [f"warning: {FEW_FOLDS}"]
    # as the warning says: every interval uses t with K − 1 = 1 df, whichever variance won
    for name, entry in result.metrics["methods"].items():
        dfs = {m: s["df"] for m, s in entry["summary"].items() if "ci95" in s}
        assert dfs == dict.fromkeys(["accuracy", "macro_f1", "balanced_accuracy"], 1.0) | (
            {"macro_f1_excl_small": 1.0} if "macro_f1_excl_small" in dfs else {}
        ), name
    for name in ("results.md", "report.md"):
        text = (result.run_dir / name).read_text()
        design = text.index("2-fold stratified cross-validation")
        assert text.index(f"warning: {FEW_FOLDS}") > design, name


@pytest.mark.parametrize(
    "design",
    [
        {"name": "cv", "n_folds": 5, "n_repeats": 1},
        {"name": "repeated-cv", "n_folds": 2, "n_repeats": 3},
        {"name": "study", "n_folds": 1},
        {"name": "transfer", "n_folds": 2},
    ],
)
def test_no_design_warning_where_the_interval_has_enough_df(design):
    assert design_warnings(design) == []


def test_design_warning_names_the_degrees_of_freedom():
    assert design_warnings({"name": "cv", "n_folds": 3}) == [
        FEW_FOLDS.replace("only 2 folds", "only 3 folds")
        .replace("2 fold scores", "3 fold scores")
        .replace("K − 1 = 1", "K − 1 = 2")
        .replace("t = 12.71", "t = 4.30")
    ]


def test_constant_predictor_gets_a_footnote_for_its_zero_width_interval(two_folds):
    result, _ = two_folds
    methods = result.metrics["methods"]
    assert methods["majority"]["constant_within_class"] is True
    assert "constant_within_class" not in methods["pca+logreg"]
    low, high = methods["majority"]["summary"]["macro_f1"]["ci95"]
    assert high - low < 1e-12  # every class keeps its test cells: the score cannot move
    low, high = methods["pca+logreg"]["summary"]["macro_f1"]["ci95"]
    assert high - low > 0
    for name in ("results.md", "report.md"):
        text = (result.run_dir / name).read_text()
        assert "† majority: one predicted label for all test cells of each class in every " in (
            text
        )
        assert "leaves out their own sampling variation." in text
        rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ")]
        assert "| majority †" in rows and "| pca+logreg" in rows  # the row the note is about
        assert "| pca+logreg †" not in rows


def test_cv_reports_the_validation_fraction_it_uses(two_folds, tmp_path, tiny_adata):
    result, _ = two_folds
    run = result.metrics["run"]
    assert run["val_fraction"] == 0.1 and "fractions" not in run
    assert (
        "validation 0.1 of each class carved from the training folds"
        in (result.run_dir / "results.md").read_text()
    )
    study = majority_run(tiny_adata, tmp_path, design="study")
    assert study.metrics["run"]["fractions"] == [0.8, 0.1, 0.1]
    assert "val_fraction" not in study.metrics["run"] and "warnings" not in study.metrics["run"]
    assert "train/val/test 0.8/0.1/0.1" in (study.run_dir / "results.md").read_text()


def test_a_schema_2_0_run_still_reads(two_folds, tmp_path):
    result, _ = two_folds
    old = tmp_path / "old"
    old.mkdir()
    doc = json.loads((result.run_dir / "metrics.json").read_text())
    doc["schema_version"] = "2.0"
    run = doc["run"]
    run["fractions"] = [0.8, run.pop("val_fraction"), 0.1]
    run.pop("warnings")
    doc["methods"]["majority"].pop("constant_within_class")
    (old / "metrics.json").write_text(json.dumps(doc))
    (old / "predictions.tsv.gz").write_bytes((result.run_dir / "predictions.tsv.gz").read_bytes())
    assert check_statistics(old).differences == []
    write_report(old)
    text = (old / "report.md").read_text()
    assert "validation 0.1 of each class carved from the training folds" in text
    assert "warning: only 2 folds" not in text and "† majority" not in text


def majority_run(adata, out, **options):
    """A quick run of the majority baseline only."""
    return scfmbench.run(
        adata, out=out, name="m", baselines=["majority"], progress=False, figures=False, **options
    )


def test_holdout_reports_the_validation_fraction_it_uses(tmp_path, tiny_adata):
    tiny_adata.obs["donor"] = ["d1", "d2"] * (tiny_adata.n_obs // 2)
    run = majority_run(tiny_adata, tmp_path, holdout_key="donor").metrics["run"]
    assert run["design"]["name"] == "holdout"
    assert run["val_fraction"] == 0.1 and "fractions" not in run


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_write_few_updates_into_a_log(monkeypatch, terminal):
    import io
    import time

    from scfmbench._progress import LOG_INTERVAL_S, progress_bar

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    stream = Stderr()
    monkeypatch.setattr("sys.stderr", stream)
    for _ in progress_bar(range(60), progress=True, desc="fits", file=stream):
        time.sleep(0.01)
    updates = stream.getvalue().count("\r")
    if terminal:  # 0.6 s at one redraw per 0.1 s
        assert updates >= 4
    else:  # the first and the last state only
        assert LOG_INTERVAL_S == 30.0 and updates <= 3
    assert "fits: 100%" in stream.getvalue()
    stream.truncate(0)
    for _ in progress_bar(range(3), progress=False, file=stream):
        pass
    assert stream.getvalue() == ""
