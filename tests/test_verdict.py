"""The report's verdict: sentences from hand-made metrics, the forest plot's rows, and a real
run whose report leads with them."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from scfmbench.report.verdict import (
    FOREST_FIGURE,
    caveat_line,
    forest_rows,
    forest_table,
    verdict_lines,
    verdict_section,
    write_forest_figure,
)
from scfmbench.report.write import build_sections
from scfmbench.stages import StageStore
from tests.conftest import run_cli_in_process

BEST = "hvg+logreg"


def method(kind: str, probe: str, model: str | None, *, val: float, f1: float) -> dict:
    """A ``metrics.json`` method entry: validation macro F1 per split and a test summary."""
    return {
        "kind": kind,
        "probe": probe,
        "model": model,
        "splits": {"42": {"val_macro_f1": val}, "43": {"val_macro_f1": val}},
        "summary": {"macro_f1": {"mean": f1, "ci95": [f1 - 0.03, f1 + 0.03]}},
    }


def test(name: str, against: str, kind: str, diff: float, ci: list, p: float) -> dict:
    return {
        "method": name,
        "against": against,
        "kind": kind,
        "f1_diff": diff,
        "f1_diff_ci95": ci,
        "p": p / 3,
        "p_holm": p,
        "significant": p < 0.05,
    }


test.__test__ = False  # a builder, not a test


def doc(methods: dict, comparisons: list, *, design: str = "cv", n_sets: int = 5) -> dict:
    return {
        "run": {
            "best_baseline": BEST if BEST in methods else None,
            "design": {"name": design},
            "seeds": list(range(42, 42 + n_sets)),
            "classes": ["a", "b"],
        },
        "methods": methods,
        "comparisons": comparisons,
    }


def model_run(*, finetuned: bool = True, frozen_diff: float = 0.085) -> dict:
    """Two baselines, geneformer with two probes (knn wins on validation, logreg on test),
    its random-init controls and, optionally, its fine-tuned version."""
    methods = {
        BEST: method("baseline", "logreg", None, val=0.80, f1=0.812),
        "pca+logreg": method("baseline", "logreg", None, val=0.78, f1=0.79),
        "geneformer+logreg": method("frozen", "logreg", "geneformer", val=0.70, f1=0.95),
        "geneformer+knn": method("frozen", "knn", "geneformer", val=0.85, f1=0.90),
        "geneformer-random+logreg": method(
            "control", "logreg", "geneformer-random", val=0.5, f1=0.5
        ),
        "geneformer-random+knn": method("control", "knn", "geneformer-random", val=0.5, f1=0.5),
    }
    frozen_ci = [frozen_diff - 0.034, frozen_diff + 0.034]
    comparisons = [
        test("pca+logreg", BEST, "vs best baseline", -0.012, [-0.030, 0.006], 0.41),
        test("geneformer+logreg", BEST, "vs best baseline", 0.138, [0.1, 0.17], 0.001),
        test("geneformer+knn", BEST, "vs best baseline", frozen_diff, frozen_ci, 0.002),
        test("geneformer-random+logreg", BEST, "vs best baseline", -0.3, [-0.35, -0.25], 0.0004),
        test("geneformer-random+knn", BEST, "vs best baseline", -0.31, [-0.36, -0.26], 0.0004),
        test(
            "geneformer+logreg",
            "geneformer-random+logreg",
            "vs random-init control",
            0.45,
            [0.4, 0.5],
            0.0002,
        ),
        test(
            "geneformer+knn",
            "geneformer-random+knn",
            "vs random-init control",
            0.40,
            [0.35, 0.45],
            0.0002,
        ),
    ]
    if finetuned:
        methods["geneformer+finetuned"] = method(
            "finetuned", "finetune", "geneformer", val=0.9, f1=0.80
        )
        comparisons += [
            test("geneformer+finetuned", BEST, "vs best baseline", -0.2, [-0.25, -0.15], 0.0004),
            test(
                "geneformer+finetuned",
                "geneformer+knn",
                "fine-tuned vs frozen",
                -0.1,
                [-0.15, -0.05],
                0.003,
            ),
        ]
    return doc(methods, comparisons)


FIRST = (
    "Best baseline (highest validation macro F1): hvg+logreg, test macro F1 0.812 "
    "(95% CI 0.782 to 0.842)."
)
BEATS = (
    "geneformer (frozen, best probe knn): beats hvg+logreg (Δ macro F1 +0.085, 95% CI 0.051 "
    "to 0.119, Holm p = 0.002)."
)
BEATS_CONTROL = (
    "geneformer (frozen, best probe knn): beats its random-init control geneformer-random+knn "
    "(Δ macro F1 +0.400, 95% CI 0.350 to 0.450, Holm p < 0.001)."
)
WORSE = (
    "geneformer (fine-tuned): worse than hvg+logreg on this data (Δ macro F1 −0.200, 95% CI "
    "−0.250 to −0.150, Holm p < 0.001)."
)


def test_significantly_better_frozen_probe_chosen_on_validation_and_fine_tuned_worse():
    lines = verdict_lines(model_run())
    # the knn probe has the higher validation F1, so it speaks for geneformer although the
    # logreg probe scores higher on test
    assert [line.sentence for line in lines] == [FIRST, BEATS, WORSE, BEATS_CONTROL]
    assert [line.outcome for line in lines] == ["best baseline", "beats", "worse", "beats"]
    assert [line.method for line in lines[1:]] == [
        "geneformer+knn",
        "geneformer+finetuned",
        "geneformer+knn",
    ]
    assert lines[1].f1_diff == 0.085 and lines[1].p_holm == 0.002
    assert lines[1].ci95 == pytest.approx((0.051, 0.119))


def test_no_evidence_and_no_fine_tuned_model():
    metrics = model_run(finetuned=False, frozen_diff=-0.012)
    metrics["comparisons"][2].update(p_holm=0.41, significant=False)
    lines = verdict_lines(metrics)
    assert [line.sentence for line in lines[:2]] == [
        FIRST,
        "geneformer (frozen, best probe knn): no evidence that it beats hvg+logreg on this "
        "data (Δ macro F1 −0.012, 95% CI −0.046 to 0.022, Holm p = 0.410).",
    ]
    assert lines[1].outcome == "no evidence"
    assert len(lines) == 3 and lines[2].kind == "vs random-init control"
    assert not any("fine-tuned" in line.sentence for line in lines)


def test_significance_follows_holm_not_the_interval():
    """An interval that excludes 0 but a Holm p ≥ 0.05 is not a win."""
    metrics = model_run(finetuned=False)
    metrics["comparisons"][2].update(p_holm=0.095, significant=False)
    line = verdict_lines(metrics)[1]
    assert line.outcome == "no evidence" and line.ci95[0] > 0
    assert line.sentence == (
        "geneformer (frozen, best probe knn): no evidence that it beats hvg+logreg on this data "
        "(Δ macro F1 +0.085, 95% CI 0.051 to 0.119 before correcting for the run's other tests, "
        "Holm p = 0.095)."
    )


def test_baseline_only_run():
    methods = {
        BEST: method("baseline", "logreg", None, val=0.80, f1=0.812),
        "pca+logreg": method("baseline", "logreg", None, val=0.78, f1=0.79),
        "majority": method("baseline", "majority", None, val=0.05, f1=0.051),
        "random+logreg": method("control", "logreg", None, val=0.2, f1=0.2),
    }
    comparisons = [
        test("pca+logreg", BEST, "vs best baseline", -0.012, [-0.030, 0.006], 0.41),
        test("majority", BEST, "vs best baseline", -0.761, [-0.8, -0.7], 0.002),
        test("random+logreg", BEST, "vs best baseline", 0.02, [0.01, 0.03], 0.04),
    ]
    sentences = [line.sentence for line in verdict_lines(doc(methods, comparisons))]
    assert sentences == [
        FIRST,
        "pca+logreg: no evidence that it beats hvg+logreg on this data (Δ macro F1 −0.012, "
        "95% CI −0.030 to 0.006, Holm p = 0.410).",
        "majority: worse than hvg+logreg on this data (Δ macro F1 −0.761, 95% CI −0.800 to "
        "−0.700, Holm p = 0.002).",
        "random+logreg (control): beats hvg+logreg (Δ macro F1 +0.020, 95% CI 0.010 to 0.030, "
        "Holm p = 0.040).",
    ]


def test_runs_without_a_baseline_or_without_methods():
    lonely = doc({"gf+logreg": method("frozen", "logreg", "gf", val=0.8, f1=0.8)}, [])
    (line,) = verdict_lines(lonely)
    assert line.outcome == "untested" and line.sentence.startswith("No baseline in this run")
    assert verdict_lines(doc({}, [])) == []  # a transfer run has no methods
    untested = model_run(finetuned=False)
    untested["comparisons"] = []  # e.g. a schema 1.0 document without tests
    assert verdict_lines(untested)[1].sentence == (
        "geneformer (frozen, best probe knn): no paired test against hvg+logreg in this run."
    )


def test_schema_1_significance_is_read_when_comparisons_are_absent():
    metrics = model_run(finetuned=False)
    for comparison in metrics.pop("comparisons"):
        if comparison["kind"] == "vs best baseline":
            entry = metrics["methods"][comparison["method"]]
            entry["significance"] = {**comparison, "baseline": BEST}
    metrics["run"].pop("best_baseline")
    assert [line.sentence for line in verdict_lines(metrics)] == [FIRST, BEATS]


@pytest.mark.parametrize(
    "design, n_sets, expected",
    [
        ("cv", 5, None),
        (
            "cv",
            3,
            "Caveats: only 3 test folds: intervals are wide and a true difference can go "
            "undetected.",
        ),
        (
            "study",
            5,
            "Caveats: intervals and p-values hold within these 5 random splits only (their test "
            "sets overlap; retraining variation is not covered).",
        ),
        (
            "study",
            2,
            "Caveats: intervals and p-values hold within these 2 random splits only (their test "
            "sets overlap; retraining variation is not covered); only 2 test splits: intervals "
            "are wide and a true difference can go undetected.",
        ),
        (
            "study",
            1,
            "Caveats: intervals and p-values cover the cell sampling of one random split only "
            "(retraining variation is not covered); only 1 test split: intervals are wide and a "
            "true difference can go undetected.",
        ),
        (
            "holdout",
            2,
            "Caveats: each test set is a held-out group of obs['donor'] (domain shift, not random "
            "cells); only 2 held-out groups: intervals are wide and a true difference can go "
            "undetected.",
        ),
        (
            "holdout",
            1,
            "Caveats: one test set, the test groups of obs['donor'] (domain shift, not random "
            "cells): intervals and p-values cover the cell sampling of one training run only "
            "(retraining variation is not covered).",
        ),
    ],
)
def test_design_caveats(design, n_sets, expected):
    metrics = doc({}, [], design=design, n_sets=n_sets)
    metrics["holdout"] = {"key": "donor"} if design == "holdout" else None
    assert caveat_line(metrics) == expected


def test_forest_rows_are_the_tests_against_the_best_baseline(tmp_path):
    metrics = model_run()
    rows = forest_rows(metrics)
    expected = sorted(
        (c for c in metrics["comparisons"] if c["kind"] == "vs best baseline"),
        key=lambda c: -c["f1_diff"],
    )
    assert [r.method for r in rows] == [c["method"] for c in expected]
    assert [r.method for r in rows][:2] == ["geneformer+logreg", "geneformer+knn"]
    for row, comparison in zip(rows, expected, strict=True):
        assert row.f1_diff == comparison["f1_diff"]
        assert list(row.ci95) == comparison["f1_diff_ci95"]
        assert row.p_holm == comparison["p_holm"]
        assert row.significant == comparison["significant"]
        assert row.kind == metrics["methods"][row.method]["kind"]
    shown = forest_table(metrics).frame()
    assert shown["method"].tolist()[-2:] == [
        "geneformer-random+logreg (control)",
        "geneformer-random+knn (control)",
    ]
    assert shown.iloc[0].tolist() == [
        "geneformer+logreg",
        "frozen",
        "0.138",
        "[0.100, 0.170]",
        "0.001 *",
    ]
    assert shown.iloc[2].tolist() == [
        "pca+logreg",
        "baseline",
        "-0.012",
        "[-0.030, 0.006]",
        "0.410",
    ]
    stages = StageStore(tmp_path)
    write_forest_figure(tmp_path, metrics, stages=stages)
    figure = tmp_path / FOREST_FIGURE
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = figure.stat().st_mtime_ns
    write_forest_figure(tmp_path, metrics, stages=stages)  # same rows: not drawn again
    assert figure.stat().st_mtime_ns == stamp
    assert forest_rows(doc({}, [])) == []


def test_report_order_verdict_forest_then_data():
    metrics = model_run()
    metrics["run"].update(reference=BEST, name="hand-made", fractions=[0.7, 0.1, 0.2])
    metrics["run"]["design"].update(n_folds=5, n_repeats=1)
    for entry in metrics["methods"].values():
        entry["summary"].update(
            {m: {"mean": 0.5, "values": [0.5, 0.5], "sd": 0.0} for m in ("accuracy",)}
        )
        entry["summary"]["macro_f1"].update(values=[0.5, 0.5], sd=0.0)
    sections = build_sections(metrics)
    assert [s.key for s in sections[:4]] == ["verdict", "forest", "data", "methods"]
    assert sections[0].bullets == [FIRST, BEATS, WORSE, BEATS_CONTROL]
    assert "adjusted over all 9 paired tests" in sections[0].note


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def pbmc_small(tmp_path_factory, pbmc3k_path):
    """600 random PBMC3k cells and the 3,000 genes with the most counts in them."""
    adata = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, size=600, replace=False))].copy()
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals, kind="stable")[:3000])].copy()
    path = tmp_path_factory.mktemp("data") / "pbmc600.h5ad"
    adata.write_h5ad(path)
    return path


def test_real_run_report_leads_with_the_verdict(pbmc_small, tmp_path, capsys):
    """On these cells the baseline chosen on validation (pca+logreg) is worse than majority
    only: hvg+logreg scores higher on test, but with 3 folds (t with 2 df) neither it nor
    pca+knn is distinguishable from pca+logreg."""
    config = tmp_path / "run.yaml"
    config.write_text("baselines: [majority, hvg+logreg, pca+logreg, pca+knn]\n")
    args = ["run", "--data", str(pbmc_small), "--label-key", "cell_type", "--config", str(config)]
    args += ["--out", str(tmp_path), "--name", "v", "--n-splits", "3", "--no-scvi", "-q"]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 0, err
    run_dir = tmp_path / "v"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["best_baseline"] == "pca+logreg"
    tests = {c["method"]: c for c in metrics["comparisons"]}

    def numbers(name: str) -> str:
        c = tests[name]
        lo, hi = c["f1_diff_ci95"]
        shown = f"(Δ macro F1 {c['f1_diff']:+.3f}, 95% CI {lo:.3f} to {hi:.3f}"
        if not c["significant"] and (lo > 0 or hi < 0):
            shown += " before correcting for the run's other tests"
        return (shown + f", Holm p = {c['p_holm']:.3f}).").replace("-", "−")

    best = metrics["methods"]["pca+logreg"]["summary"]["macro_f1"]
    expected = [
        "Best baseline (highest validation macro F1): pca+logreg, test macro F1 "
        f"{best['mean']:.3f} (95% CI {best['ci95'][0]:.3f} to {best['ci95'][1]:.3f}).",
        f"majority: worse than pca+logreg on this data {numbers('majority')}",
        f"hvg+logreg: no evidence that it beats pca+logreg on this data {numbers('hvg+logreg')}",
        f"pca+knn: no evidence that it beats pca+logreg on this data {numbers('pca+knn')}",
    ]
    assert [tests[m]["significant"] for m in ("majority", "hvg+logreg", "pca+knn")] == [
        True,
        False,
        False,
    ]
    assert tests["hvg+logreg"]["f1_diff"] > 0
    for name in ("report.md", "results.md"):
        text = (run_dir / name).read_text()
        titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
        assert titles[:3] == ["Verdict", "Δ macro F1 vs the best baseline", "Data and diagnostics"]
        verdict = text.split("## Verdict\n\n", 1)[1].split("\n\n", 1)[0]
        assert verdict.splitlines() == [f"- {s}" for s in expected]
        assert "Caveats: only 3 test folds" in text
        forest = text.split("## Δ macro F1 vs the best baseline\n\n", 1)[1]
        block = forest.split("\n\n## ", 1)[0]
        rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ")][2:]
        assert [(r[0][2:], r[2]) for r in rows] == [
            (m, f"{tests[m]['f1_diff']:.3f}") for m in ("hvg+logreg", "pca+knn", "majority")
        ]
        assert "](figures/forest_macro_f1.png)" in forest
    assert (run_dir / FOREST_FIGURE).is_file()
    html = (run_dir / "report.html").read_text()
    assert (
        html.index('id="sec-verdict"') < html.index('id="sec-forest"') < html.index('id="sec-data"')
    )


def test_verdict_note_counts_the_paired_tests():
    methods = {
        BEST: method("baseline", "logreg", None, val=0.80, f1=0.812),
        "majority": method("baseline", "majority", None, val=0.05, f1=0.051),
    }
    comparisons = [test("majority", BEST, "vs best baseline", -0.761, [-0.8, -0.7], 0.002)]
    (section,) = verdict_section(doc(methods, comparisons))
    assert section.note == (
        "Δ = macro F1 of the method − that of the other, on the same test cells; Holm p: the "
        "only paired test of the run."
    )
    assert verdict_section(doc({}, [])) == []
