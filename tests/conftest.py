"""Shared fixtures: tiny synthetic AnnData and the real datasets from ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# runs fit their probes in this process unless a test asks for workers (`n_jobs`): a
# monkeypatched function is only seen here, and tiny runs gain nothing from worker start-up
os.environ.setdefault("LOKY_MAX_CPU_COUNT", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per pytest-xdist worker and per process it starts: with -n 2 on two cores,
    # two BLAS/OpenMP threads each made the suite ~20% slower and crash tests ~2× slower.
    # The variables reach torch and subprocesses; numpy's BLAS was loaded before this file.
    from threadpoolctl import threadpool_limits

    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
    threadpool_limits(limits=1, user_api="blas")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def require_shared(relative: str | Path) -> Path:
    """Path to a file in ../shared (or an absolute path there); skip when absent locally,
    fail when CI=true."""
    path = SHARED_DIR / relative
    if not path.exists():
        message = f"{relative} not found beside the checkout (expected {path})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require_shared("data/MANIFEST.md")
    return SHARED_DIR


def make_tiny_adata(
    *,
    n_per_class: int = 20,
    n_genes: int = 40,
    n_classes: int = 3,
    seed: int = 0,
    cells: str = "cell",
) -> ad.AnnData:
    """Integer counts with class-specific marker genes; Ensembl-like gene IDs.

    Cells are named ``<cells>0``, ``<cells>1``, …: the two sides of a transfer need other
    names, or it refuses them as the same cells.
    """
    rng = np.random.default_rng(seed)
    n_cells = n_per_class * n_classes
    labels = np.repeat([f"type_{k}" for k in range(n_classes)], n_per_class)
    rates = np.full((n_cells, n_genes), 1.0)
    for k in range(n_classes):
        rows = labels == f"type_{k}"
        rates[np.ix_(rows, range(k * 5, k * 5 + 5))] = 12.0
    counts = rng.poisson(rates).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"{cells}{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame(index=[f"ENSG{100000 + i:011d}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="session")
def tiny_adata_sess() -> ad.AnnData:
    return make_tiny_adata()


@pytest.fixture
def tiny_adata(tiny_adata_sess) -> ad.AnnData:
    return tiny_adata_sess.copy()


@pytest.fixture(scope="session")
def pbmc3k_path() -> Path:
    return require_shared("data/pbmc3k_seurat_labels_2638x13714_counts.h5ad")


@pytest.fixture(scope="session")
def pbmc3k_sess(pbmc3k_path) -> ad.AnnData:
    return ad.read_h5ad(pbmc3k_path)


@pytest.fixture
def pbmc3k(pbmc3k_sess) -> ad.AnnData:
    return pbmc3k_sess.copy()


@pytest.fixture(scope="session")
def kang_path() -> Path:
    return require_shared("data/kang2018_ifnb_muscat_1556x1267_counts.h5ad")


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test interrupts: SIGINT back to its default action.

    A shell without job control starts background commands with SIGINT ignored, and a
    Python child then ignores Ctrl-C too (it installs its handler only over the default).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``scfmbench ARGS`` through ``cli.main`` in this process; (exit code, out, err)."""
    import sys

    from scfmbench.cli import main

    argv = sys.argv
    sys.argv = ["scfmbench", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err
