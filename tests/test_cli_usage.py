"""Command-line usage errors and interruption, from a subprocess as a user meets them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import anndata as ad
import pytest

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
    "validate-missing-data": (["validate"], "Error: Missing argument 'DATA'."),
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
