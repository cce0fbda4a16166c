"""The bad-input matrix: one line naming problem and fix, exit code 2, no partial output."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import make_tiny_adata


def write(adata, path: Path) -> str:
    adata.write_h5ad(path)
    return str(path)


def with_value(value: float):
    adata = make_tiny_adata()
    X = adata.X.toarray()
    X[1, 1] = value
    adata.X = sp.csr_matrix(X)
    return adata


def one_class():
    adata = make_tiny_adata()
    adata.obs["cell_type"] = "T"
    return adata


def one_cell_class():
    adata = make_tiny_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[0] = "Singleton"
    adata.obs["cell_type"] = labels
    return adata


def all_zero():
    adata = make_tiny_adata()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    return adata


def truncated(path: Path) -> str:
    make_tiny_adata().write_h5ad(path)
    path.write_bytes(path.read_bytes()[:2000])
    return str(path)


CASES = {
    "not_h5ad": (lambda p: (p.write_text("a,b\n1,2\n"), str(p))[1], [], "is not an .h5ad file"),
    "truncated": (truncated, [], "truncated or corrupt"),
    "label_missing": (
        lambda p: write(make_tiny_adata(), p),
        ["--label-key", "celltype"],
        "no column 'celltype'",
    ),
    "single_class": (lambda p: write(one_class(), p), [], "at least 2"),
    "one_cell_class": (
        lambda p: write(one_cell_class(), p),
        ["--config", "CFG1"],
        "'Singleton' has 1 cell",
    ),
    "nan": (lambda p: write(with_value(np.nan), p), [], "NaN"),
    "inf": (lambda p: write(with_value(np.inf), p), [], "infinite"),
    "negative": (lambda p: write(with_value(-2.0), p), [], "negative values"),
    "all_zero": (lambda p: write(all_zero(), p), [], "no cells left"),
    "unknown_config_key": (
        lambda p: write(make_tiny_adata(), p),
        ["--config", "CFG2"],
        "Did you mean 'n_splits'",
    ),
    "unknown_model": (
        lambda p: write(make_tiny_adata(), p),
        ["--model", "genformer=x"],
        "Did you mean 'geneformer'",
    ),
    "escaping_name": (lambda p: write(make_tiny_adata(), p), ["--name", "../x"], "one folder name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_cli(case, tmp_path):
    make, extra, message = CASES[case]
    data = make(tmp_path / "data.h5ad")
    (tmp_path / "cfg1.yaml").write_text("min_cells_per_class: 1\n")
    (tmp_path / "cfg2.yaml").write_text("n_split: 2\n")
    extra = [
        {"CFG1": str(tmp_path / "cfg1.yaml"), "CFG2": str(tmp_path / "cfg2.yaml")}.get(a, a)
        for a in extra
    ]
    out = tmp_path / "runs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scfmbench",
            "run",
            "--data",
            data,
            "--out",
            str(out),
            "-q",
            "--name",
            "r",
            *extra,
        ]
        if "--name" not in extra
        else [
            sys.executable,
            "-m",
            "scfmbench",
            "run",
            "--data",
            data,
            "--out",
            str(out),
            "-q",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):  # pragma: no cover - CI runs as root
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IREAD | stat.S_IEXEC)
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "run", "--out", str(locked)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "cannot write to" in done.stderr


def test_unwritable_output_dir_message(tmp_path, monkeypatch):
    import scfmbench
    from scfmbench.pipeline import check_writable

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(scfmbench.ConfigError, match="cannot write to .*choose another"):
        check_writable(tmp_path / "runs" / "x")
