"""`scfmbench compare` over run and transfer runs: each kind in its own table."""

from __future__ import annotations

import logging

import pytest

import scfmbench
from scfmbench.benchmark.transfer import transfer
from scfmbench.errors import RunDirError
from scfmbench.report.compare import compare_runs
from tests.conftest import make_tiny_adata

IDENTITY = {f"type_{k}": f"type_{k}" for k in range(3)}
FAST = {"baselines": ["majority", "pca+logreg"], "progress": False, "figures": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    a, b = make_tiny_adata(seed=0), make_tiny_adata(seed=1, cells="other")
    docs = {
        name: transfer(a, b, label_map=IDENTITY, out=out, name=name, n_splits=2, seed=seed, **FAST)
        for name, seed in (("t1", 42), ("t2", 7))
    }
    one_way = {"name": "one", "n_splits": 2, "both_directions": False}
    transfer(a, b, label_map=IDENTITY, out=out, **one_way, **FAST)
    scfmbench.run(a, out=out, name="cv", n_splits=3, **FAST)
    held = a.copy()
    held.obs["donor"] = ["d1", "d2", "d3"] * (held.n_obs // 3)
    scfmbench.run(held, out=out, name="held", n_splits=3, holdout_key="donor", **FAST)
    shift = {"holdout_key": "donor", "train_groups": ["d1", "d2"], "test_groups": ["d3"]}
    scfmbench.run(held, out=out, name="shift", n_splits=3, **shift, **FAST)
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


def _runs_table(text: str) -> dict[str, dict[str, str]]:
    lines = text[text.index("## Runs") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_compare_shows_each_runs_design_and_labels_runs_by_folder(runs, tmp_path):
    import shutil

    out, _ = runs
    copy = tmp_path / "cv_copy"
    shutil.copytree(out / "cv", copy)  # run.name in its metrics.json is still "cv"
    folders = [out / "cv", out / "held", out / "shift", out / "t1", copy]
    compare_runs(folders, out=tmp_path / "cmp")
    rows = _runs_table((tmp_path / "cmp" / "compare.md").read_text())
    assert list(rows) == ["cv", "held", "shift", "t1", "cv_copy"]
    # config.yaml of the held-out runs and of the transfer says design: cv
    assert [rows[r]["design"] for r in rows] == [
        "cv",
        "holdout by donor (3 folds)",
        "holdout by donor: d1, d2 → d3",
        "transfer (2 training seeds)",
        "cv",
    ]
    assert [rows[r]["n_splits"] for r in rows] == ["3", "3", "3", "2", "3"]
    assert rows["t1"]["data"] == "transfer: train ↔ test"
    compare_runs([out / "one"], out=tmp_path / "one")
    assert _runs_table((tmp_path / "one" / "compare.md").read_text())["one"]["data"] == (
        "transfer: train → test"
    )
    with pytest.raises(RunDirError, match=r"cv given twice; pass each run folder once$"):
        compare_runs([out / "cv", out / ".." / out.name / "cv"], out=tmp_path / "twice")
    with pytest.raises(RunDirError, match=r"holds runs, not a run: pass one or more of its run"):
        compare_runs([out], out=tmp_path / "parent")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "parent").exists()


def test_report_and_compare_given_a_file_say_so(runs, capsys):
    from tests.conftest import run_cli_in_process

    out, _ = runs
    line = (
        f"error: {out / 'cv' / 'metrics.json'} is a file, not a run folder; pass the folder "
        "that `scfmbench run` or `scfmbench transfer` wrote (runs/<name>), not a file inside it"
    )
    for command in (["report"], ["compare"], ["stats"]):
        code, _, err = run_cli_in_process([*command, str(out / "cv" / "metrics.json")], capsys)
        assert (code, err.strip()) == (2, line), command


def test_compare_out_that_is_a_file_says_so_and_writes_nothing(runs, tmp_path, capsys):
    from scfmbench.errors import ConfigError
    from tests.conftest import run_cli_in_process

    out, _ = runs
    a_file, dotted = tmp_path / "a_file", tmp_path / "compare.v1"  # a dot: still the folder
    a_file.write_text("kept\n")
    dotted.write_text("kept\n")
    cases = {a_file: a_file, a_file / "sub": a_file, dotted: dotted}
    for target, file in cases.items():
        line = (
            f"error: cannot write to '{target}': '{file}' is a file, not a folder; choose "
            "another output location with --out."
        )
        args = ["compare", str(out / "cv"), str(out / "held"), "--out", str(target)]
        code, stdout, err = run_cli_in_process(args, capsys)
        assert (code, stdout, err) == (2, "", f"{line}\n"), target
        with pytest.raises(ConfigError, match=r"is a file, not a folder"):
            compare_runs([out / "cv", out / "held"], out=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "compare.v1"]
    assert a_file.read_text() == dotted.read_text() == "kept\n"
    assert not (out / "compare").exists()
