"""`scfmbench compare` over run and transfer runs: each kind in its own table."""

from __future__ import annotations

import logging

import pytest

import scfmbench
from scfmbench.benchmark.transfer import transfer
from scfmbench.report.compare import compare_runs
from tests.conftest import make_tiny_adata

IDENTITY = {f"type_{k}": f"type_{k}" for k in range(3)}
FAST = {"baselines": ["majority", "pca+logreg"], "progress": False, "figures": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    a, b = make_tiny_adata(seed=0), make_tiny_adata(seed=1)
    docs = {
        name: transfer(a, b, label_map=IDENTITY, out=out, name=name, n_splits=2, seed=seed, **FAST)
        for name, seed in (("t1", 42), ("t2", 7))
    }
    scfmbench.run(a, out=out, name="cv", n_splits=3, **FAST)
    return out, docs


def test_compare_transfer_runs_per_direction_and_method(runs, tmp_path):
    out, docs = runs
    compare_runs([out / "t1", out / "t2"], out=tmp_path)
    text = (tmp_path / "compare.md").read_text()
    assert "## Methods across runs" not in text  # no within-dataset run, no empty table
    header = (
        "| direction | method | t1 macro F1 | t1 macro F1 95% CI | t2 macro F1 | "
        "t2 macro F1 95% CI |"
    )
    assert header in text
    expected = []
    for train, target in (("train", "test"), ("test", "train")):
        for method in ("majority", "pca+logreg"):
            cells = [f"{train} → {target}", method]
            for name in ("t1", "t2"):
                scores = docs[name]["transfer"]["matrix"][train][target][method]
                lo, hi = scores["summary"]["macro_f1"]["ci95"]
                cells += [f"{scores['macro_f1']:.3f}", f"[{lo:.3f}, {hi:.3f}]"]
            expected.append("| " + " | ".join(cells) + " |")
    lines = text.splitlines()
    start = lines.index(header) + 2
    assert lines[start : start + 4] == expected
    assert "—" not in "\n".join(expected)


def test_compare_mixed_runs_says_what_is_not_comparable(runs, tmp_path, caplog):
    out, _ = runs
    with caplog.at_level(logging.WARNING, logger="scfmbench.report.compare"):
        compare_runs([out / "cv", out / "t1"], out=tmp_path)
    line = (
        "transfer run(s) t1 are compared in 'Transfer across runs' only: they score methods on "
        "another dataset's cells, not on held-out folds of the same data, so their scores are "
        "not comparable with the other runs' columns"
    )
    assert [r.getMessage() for r in caplog.records] == [f"warning: {line}"]
    text = (tmp_path / "compare.md").read_text()
    assert line in text
    methods = text[text.index("## Methods across runs") : text.index(line)]
    assert "| method | cv accuracy | cv macro F1 |" in methods and "t1" not in methods
    assert "| t1 | " in text and "| transfer: train ↔ test | — | — | 3 | 42, 43 |" in text
