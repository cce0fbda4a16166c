"""Command-line usage errors and interruption, from a subprocess as a user meets them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anndata as ad
import pytest

from tests.conftest import default_sigint, require_shared, run_cli_in_process

COMMANDS = ["run", "validate", "embed", "finetune", "transfer", "report", "compare"]

# (arguments, the line click prints)
USAGE_ERRORS = {
    **{
        f"{command}-unknown-option": (
            [command, "x.h5ad", "--n-splitz", "3"]
            if command not in {"run", "transfer"}
            else [command, "--n-splitz", "3"],
            "Error: No such option: --n-splitz",
        )
        for command in COMMANDS
    },
    "embed-missing-data": (["embed"], "Error: Missing argument 'DATA'."),
    "finetune-missing-data": (["finetune"], "Error: Missing argument 'DATA'."),
    "transfer-missing-train": (["transfer"], "Error: Missing option '--train'."),
    "report-missing-run-dir": (["report"], "Error: Missing argument 'RUN_DIR'."),
    "compare-missing-run-dirs": (["compare"], "Error: Missing argument 'RUN_DIRS"),
    "run-seed-not-int": (["run", "--seed", "x"], "Error: Invalid value for '--seed'"),
    "embed-layer-not-int": (
        ["embed", "x.h5ad", "--model", "scgpt=d", "--layer", "abc"],
        "Error: Invalid value for '--layer'",
    ),
    "unknown-command": (["bogus"], "Error: No such command 'bogus'."),
}


def scfmbench(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scfmbench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_prints_usage_and_exits_2(case, tmp_path):
    args, message = USAGE_ERRORS[case]
    done = scfmbench(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: "), done.stderr
    # click spells metavars in capitals, typer's own copy of click as the parameter name
    assert lines[-1].lower().startswith(message.lower()), done.stderr
    assert len(lines) <= 6, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0():
    done = scfmbench("run", "--help")
    assert done.returncode == 0 and "--label-key" in done.stdout, done.stderr


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("validate", "[DATA]"),
        ("embed", "{DATA}"),
        ("finetune", "{DATA}"),
        ("report", "{RUN_DIR}"),
        ("stats", "{RUN_DIR}"),
        ("compare", "{RUN_DIRS}..."),
    ],
)
def test_usage_lines_name_arguments_as_their_errors_do(command, usage, capsys):
    """The usage line spells an argument as 'Missing argument' does ({} required, [] not)."""
    code, out, _ = run_cli_in_process([command, "--help"], capsys)
    first = out.splitlines()[0]  # "Usage: <how python was started> report [OPTIONS] {RUN_DIR}"
    assert code == 0 and first.endswith(f" {command} [OPTIONS] {usage}"), first


def test_examples_of_the_main_help_keep_one_line_each():
    """In an 80-column terminal, each example and its comment stay on one line."""
    done = scfmbench("--help", env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.split("Examples:")[1].splitlines()]
    examples = [line for line in lines if line][:5]
    assert examples[0] == "scfmbench run        # the built-in demo data, scanpy's pbmc68k_reduced"
    assert all(line.startswith("scfmbench ") for line in examples), examples
    assert max(map(len, done.stdout.splitlines())) <= 80


def test_an_end_of_file_no_reader_caught_is_not_a_silent_exit(monkeypatch, capsys):
    """click turns EOFError into an abort (exit 1, no message); the CLI has no prompt."""
    import scfmbench.cli

    def ended_early(*args, **kwargs):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(scfmbench.cli, "compare_runs", ended_early)
    with pytest.raises(EOFError, match="Compressed file ended before"):
        run_cli_in_process(["compare", "runs/a"], capsys)


def test_sigint_keeps_finished_stages_and_resumes(tmp_path, pbmc3k_path):
    """Ctrl-C during the probes of a first run: exit 130, splits kept, a rerun finishes."""
    data = tmp_path / "subset.h5ad"
    ad.read_h5ad(pbmc3k_path)[:600].copy().write_h5ad(data)
    run_dir = tmp_path / "runs" / "r"
    args = [
        "run",
        "--data",
        str(data),
        "--label-key",
        "cell_type",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "r",
        "--n-splits",
        "2",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "scfmbench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    splits_file = run_dir / "splits" / "splits.json"
    deadline = time.time() + 300
    while time.time() < deadline and not splits_file.exists() and process.poll() is None:
        time.sleep(0.05)
    assert splits_file.exists(), "the run never wrote its splits"
    time.sleep(1.0)  # inside the probes
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted; finished stages are kept and a rerun resumes"
    )
    assert not (run_dir / "metrics.json").exists()
    kept = {path.name: path.stat().st_mtime_ns for path in (run_dir / "splits").iterdir()}
    assert "splits.json" in kept

    done = scfmbench(*args, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "metrics.json").exists()
    # the rerun reused the saved splits instead of writing them again
    for name, mtime in kept.items():
        assert (run_dir / "splits" / name).stat().st_mtime_ns == mtime, name


def test_bad_settings_stop_with_one_line(tmp_path, capsys):
    from tests.conftest import make_tiny_adata, run_cli_in_process

    data = tmp_path / "tiny.h5ad"
    make_tiny_adata().write_h5ad(data)
    other = tmp_path / "other.h5ad"
    make_tiny_adata(seed=1).write_h5ad(other)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    typo = tmp_path / "typo.yaml"
    typo.write_text("probes: [logreg, knnn]\n")
    transfer_run = tmp_path / "transfer_run"
    transfer_run.mkdir()
    (transfer_run / "metrics.json").write_text('{"run": {"kind": "transfer"}}')
    (transfer_run / "predictions.tsv.gz").write_bytes(b"")
    cases = {
        "out under a file": (
            ["run", "--data", str(data), "--out", str(a_file), "--name", "r"],
            f"error: cannot write to '{a_file}/r': '{a_file}' is a file, not a folder",
        ),
        "out under a file, checked before the data": (
            ["run", "--data", str(typo), "--out", str(a_file), "--name", "r"],
            f"error: cannot write to '{a_file}/r': '{a_file}' is a file, not a folder",
        ),
        "probe typo, validate": (
            ["validate", str(data), "--config", str(typo)],
            "error: probes: unknown probe 'knnn'",
        ),
        "probe typo, run without models": (
            ["run", "--data", str(data), "--config", str(typo), "--out", str(tmp_path / "o")],
            "error: probes: unknown probe 'knnn'",
        ),
        "label-efficiency draws without sizes": (
            ["run", "--data", str(data), "--train-size-seeds", "5", "--out", str(tmp_path / "o")],
            "error: train_size_seeds (--train-size-seeds) is 5 but train_sizes (--train-sizes) is "
            "not set: the draws are of labelled cells per class for the label-efficiency curve; "
            "set train_sizes (e.g. --train-sizes 1,5,10,all) or drop train_size_seeds",
        ),
        "reference typo": (
            ["run", "--data", str(data), "--reference", "pca+logregg", "--out", str(tmp_path)],
            "Did you mean 'pca+logreg'?",
        ),
        "reference left out by --no-scvi": (
            [
                "run",
                "--data",
                str(data),
                "--reference",
                "scvi+logreg",
                "--no-scvi",
                "--out",
                str(tmp_path / "o"),
            ],
            "error: reference method 'scvi+logreg' is not in this run: the scvi baseline is left "
            "out of it (--no-scvi, or baselines without scvi); add it back, or choose from "
            "['hvg+logreg', 'pca+logreg', 'pca+xgboost', 'majority'].",
        ),
        "transfer label column": (
            ["transfer", "--train", str(data), "--test", str(other), "--label-key-test", "ct"],
            "Pass --label-key-test with one of those.",
        ),
        "stats on a transfer run": (
            ["stats", str(transfer_run)],
            "is a transfer run; `scfmbench stats` recomputes runs of `scfmbench run` only",
        ),
    }
    for case, (args, message) in cases.items():
        code, _, err = run_cli_in_process(args, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (case, err)
        assert len(errors) == 1 and message in errors[0], (case, err)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file", "other.h5ad", "tiny.h5ad", "transfer_run", "typo.yaml"
    ]  # fmt: skip


def test_run_takes_min_cells_per_class(tmp_path, capsys):
    from tests.conftest import make_tiny_adata, run_cli_in_process

    adata = make_tiny_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[:3] = "Small"  # a 3-cell class: dropped at the default 10, kept at 3
    adata.obs["cell_type"] = labels
    data = tmp_path / "tiny.h5ad"
    adata.write_h5ad(data)
    config = tmp_path / "quick.yaml"
    config.write_text("baselines: [majority]\nfigures: false\nn_splits: 3\n")
    code, _, err = run_cli_in_process(
        ["run", "--data", str(data), "--config", str(config), "--out", str(tmp_path / "runs"),
         "--name", "r", "--min-cells-per-class", "3", "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert metrics["diagnostics"]["classes"]["Small"] == 3
    assert metrics["diagnostics"]["dropped_classes"] == {}


def test_run_name_holding_other_data_is_refused(tmp_path, pbmc3k_path, capsys):
    """A run folder of other data is not resumed: exit 2, one line, the folder untouched."""
    data = tmp_path / "pbmc300.h5ad"
    ad.read_h5ad(pbmc3k_path)[::9].copy().write_h5ad(data)  # 294 cells
    config = tmp_path / "fast.yaml"
    config.write_text("figures: false\nn_jobs: 1\n")
    kang = require_shared("data/kang2018_ifnb_muscat_1556x1267_counts.h5ad")
    common = ["--label-key", "cell_type", "--out", str(tmp_path / "runs"), "--name", "pbmc3k_b"]
    common += ["--config", str(config), "--no-scvi", "-q"]
    code, _, stderr = run_cli_in_process(["run", "--data", str(data), *common], capsys)
    assert code == 0, stderr
    run_dir = tmp_path / "runs" / "pbmc3k_b"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    code, _, stderr = run_cli_in_process(["run", "--data", str(kang), *common], capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} holds a run of other cells or labels ({data}, label key "
        "'cell_type'); give another --name, or remove the folder"
    ), stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before

    # the same command again resumes: every stage reused, nothing refused
    code, _, stderr = run_cli_in_process(["run", "--data", str(data), *common], capsys)
    assert code == 0, stderr


def test_validate_reads_the_data_of_its_config(tmp_path, capsys):
    """``validate --config run.yaml`` checks the data the run would read."""
    from tests.conftest import make_tiny_adata, run_cli_in_process

    data = tmp_path / "tiny.h5ad"
    adata = make_tiny_adata()
    adata.write_h5ad(data)
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\nmin_cells_per_class: 1\n")
    code, out, err = run_cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f"cells: {adata.n_obs} (of {adata.n_obs})"


def test_ctrl_c_says_what_was_kept():
    """embed keeps chunks only in a cache folder; saying a rerun resumes would be untrue."""
    from scfmbench._cli_options import kept_on_interrupt

    embed = ["embed", "d.h5ad", "--model", "geneformer=gf", "--out", "e.h5ad"]
    assert kept_on_interrupt(embed) == (
        "nothing was kept: embed keeps its finished chunks with --cache-dir DIR only"
    )
    for cached in (["--cache-dir", "cache"], ["--cache-dir=cache"]):
        assert (
            kept_on_interrupt([*embed, *cached]) == "finished stages are kept and a rerun resumes"
        )
    assert kept_on_interrupt(["run", "--data", "d.h5ad"]) == (
        "finished stages are kept and a rerun resumes"
    )
