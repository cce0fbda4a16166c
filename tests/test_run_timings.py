"""The stage breakdown a run records, and the thread settings that keep its cost down."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scfmbench
from scfmbench.evaluation.embedding_quality import embedding_quality

SCORE_STEPS = ("neighbors_s", "graph_s", "leiden_s", "silhouette_s", "lisi_s")


def test_run_records_features_probes_statistics_and_scores(tmp_path, tiny_adata):
    result = scfmbench.run(
        tiny_adata,
        out=tmp_path,
        name="t",
        progress=False,
        baselines=["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"],
        n_splits=2,
    )
    timings = result.metrics["timings"]
    # the representation of a split is built once and timed apart from the probes using it
    assert {"features:hvg", "features:pca", "features:none"} <= set(timings)
    assert {"probe:hvg+logreg", "probe:pca+logreg", "probe:pca+xgboost"} <= set(timings)
    assert {"statistics", "figures", "embedding_scores:pca", "total"} <= set(timings)
    assert "embedding_scores" not in timings  # one row per view instead
    scores = timings["embedding_scores:pca"]
    for step in (*SCORE_STEPS, "view_s", "umap_s"):
        assert scores[step] >= 0, step
    parts = sum(scores[s] for s in (*SCORE_STEPS, "view_s", "umap_s"))
    assert parts <= scores["seconds"] + 0.01
    for name, entry in timings.items():
        assert entry["cpu_seconds"] >= 0, name
    stages = sum(e["seconds"] for n, e in timings.items() if n != "total")
    assert stages <= timings["total"]["seconds"] + 0.01
    assert timings["total"]["cpu_seconds"] > 0


def test_rerun_times_only_what_it_computes(tmp_path, tiny_adata):
    options = {"baselines": ["pca+logreg"], "n_splits": 2, "figures": False, "progress": False}
    scfmbench.run(tiny_adata, out=tmp_path, name="r", **options)
    second = scfmbench.run(tiny_adata, out=tmp_path, name="r", **options)
    timings = second.metrics["timings"]
    assert not any(k.startswith(("features:", "probe:", "embedding_scores:")) for k in timings)
    assert "statistics" in timings


def test_embedding_quality_timings_leave_scores_unchanged():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    points = rng.normal(size=(120, 3)) + 4 * (labels[:, None] == np.array(["a", "b", "c"]))
    batches = np.tile(["x", "y"], 60)
    steps: dict[str, float] = {}
    timed = embedding_quality(points, labels, batches=batches, seed=0, timings=steps)
    assert timed == embedding_quality(points, labels, batches=batches, seed=0)
    assert set(steps) == {*SCORE_STEPS, "graph_connectivity_s"}
    assert all(v >= 0 for v in steps.values())


def test_pca_eigendecomposition_runs_on_one_blas_thread(monkeypatch):
    """The tridiagonal reduction thrashes on a shared machine with several BLAS threads; the
    components stay those of a full eigendecomposition (an independent oracle)."""
    import scipy.linalg
    from threadpoolctl import threadpool_info

    from scfmbench.data.cells import InMemoryCells
    from scfmbench.data.splits import Split
    from scfmbench.evaluation.representations import pca_features

    threads: list[int] = []
    eigh = scipy.linalg.eigh

    def spy(*args, **kwargs):
        threads.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return eigh(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "eigh", spy)
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(1.0, size=(90, 40)).astype(np.float32))
    names = pd.Index([f"c{i}" for i in range(90)])
    cells = InMemoryCells(counts, names)
    split = Split(seed=0, train=names[:70], val=names[70:80], test=names[80:])
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # as outside the test workers
        got = pca_features(cells, split, kind="counts", n_hvg=30, n_pcs=5)
    assert threads and set(threads) == {1}

    # oracle: the same HVG z-scores, a full numpy eigendecomposition of their covariance
    from scfmbench.data.matrix import lognormalize
    from scfmbench.evaluation.representations import GeneMoments, select_hvg

    moments = GeneMoments.of(cells, np.arange(70), kind="counts")
    genes = select_hvg(moments, n_top=30)
    mean, std = moments.mean_std_log(genes)
    lognorm = lognormalize(counts, kind="counts")[:, genes].toarray().astype(np.float64)
    scaled = np.clip((lognorm - mean) / std, -10, 10)
    train = scaled[:70]
    values, vectors = np.linalg.eigh(np.cov(train, rowvar=False))
    components = vectors[:, ::-1][:, :5].T
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(5), biggest])[:, None]
    expected = (scaled - train.mean(axis=0)) @ components.T
    np.testing.assert_allclose(got.train, expected[:70], atol=1e-4)
    np.testing.assert_allclose(got.test, expected[80:], atol=1e-4)
    assert values[-5] > values[-6] + 1e-6  # distinct eigenvalues: the components are unique


@pytest.mark.parametrize("n_cells", [3])
def test_embedding_quality_timings_on_too_few_cells(n_cells):
    steps: dict[str, float] = {}
    scores = embedding_quality(np.zeros((n_cells, 2)), np.array(["a"] * n_cells), timings=steps)
    assert scores["nmi"] is None and steps == {}


SCORES_SCRIPT = """
import json, numpy as np
from scfmbench.evaluation.embedding_quality import embedding_quality
from scfmbench.report.figures import umap_coordinates
rng = np.random.default_rng(0)
labels = np.repeat(["a", "b", "c"], 40)
points = rng.normal(size=(120, 3)) + 4 * (labels[:, None] == np.array(["a", "b", "c"]))
scores = embedding_quality(points, labels, seed=0)
scores["umap"] = umap_coordinates(points, seed=0).round(4).tolist()
print(json.dumps(scores))
"""


def test_compiled_code_is_kept_and_gives_the_same_scores(tmp_path):
    """A fresh process reuses the XLA and numba code of the first (same scores, same UMAP)."""
    import json
    import os
    import subprocess
    import sys

    def scores(setting: str) -> dict:
        env = {**os.environ, "SCFMBENCH_COMPILE_CACHE": setting, "MPLBACKEND": "Agg"}
        done = subprocess.run(
            [sys.executable, "-c", SCORES_SCRIPT], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    cache = tmp_path / "cache"
    first = scores(str(cache))
    assert any((cache / "jax").iterdir())
    assert scores(str(cache)) == first


def test_umap_kernels_cache_on_disk(tmp_path, monkeypatch):
    import umap.umap_

    from scfmbench import _compile_cache

    monkeypatch.setenv("SCFMBENCH_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(_compile_cache, "_done", set())
    _compile_cache.keep_umap_code()
    assert type(umap.umap_.smooth_knn_dist._cache).__name__ == "FunctionCache"
    monkeypatch.setenv("SCFMBENCH_COMPILE_CACHE", "off")
    assert _compile_cache.cache_root() is None


def test_umap_of_more_than_8192_cells():
    """From 8,192 cells scanpy's default neighbour search (pynndescent) failed on scipy's
    sparse arrays; below, the exact search is what scanpy ran before."""
    from scfmbench.report.figures import umap_coordinates

    rng = np.random.default_rng(0)
    big = rng.normal(size=(8200, 5)).astype(np.float32)
    coords = umap_coordinates(big, seed=0)
    assert coords.shape == (8200, 2) and np.isfinite(coords).all()


@pytest.mark.parametrize(("n_blobs", "expected"), [(1, "spectral"), (3, "spectral"), (40, "pca")])
def test_umap_starts_from_pca_when_the_graph_falls_apart(n_blobs, expected):
    """Far-apart blobs of 30 cells are as many components of UMAP's graph: up to 4 keep
    scanpy's spectral start, 40 start from the principal components (and still lay out)."""
    import anndata
    import scanpy as sc

    from scfmbench.report.figures import umap_coordinates, umap_start

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_blobs, 5)) * 1000
    points = (np.repeat(centres, 30, axis=0) + rng.normal(size=(30 * n_blobs, 5))).astype(
        np.float32
    )
    holder = anndata.AnnData(np.zeros((len(points), 1), dtype=np.float32))
    holder.obsm["X_rep"] = points
    sc.pp.neighbors(holder, use_rep="X_rep", transformer="sklearn", random_state=0)
    assert umap_start(holder.obsp["connectivities"], len(points)) == expected
    coords = umap_coordinates(points, seed=0)
    assert coords.shape == (len(points), 2) and np.isfinite(coords).all()
    if n_blobs == 40:  # umap-learn's PCA start: the layout keeps the blobs apart
        blob = np.repeat(np.arange(n_blobs), 30)
        spread = max(np.ptp(coords[blob == b], axis=0).max() for b in range(n_blobs))
        assert spread < np.ptp(coords, axis=0).max() / 4


@pytest.mark.parametrize("command", ["run", "transfer"])
def test_command_line_and_baseline_run_do_not_load_torch(tmp_path, tiny_adata, command):
    """torch and transformers take seconds to import: the CLI and a run or transfer without a
    model (and without scVI, which trains with torch) never load them."""
    import subprocess
    import sys

    data = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(data)
    args = ["run", "--data", str(data)]
    if command == "transfer":  # the other side: other cells of the same classes
        from tests.conftest import make_tiny_adata

        other = tmp_path / "other.h5ad"
        make_tiny_adata(seed=1, cells="other").write_h5ad(other)
        labels = tmp_path / "labels.yaml"
        classes = tiny_adata.obs["cell_type"].unique()
        labels.write_text("".join(f"{c}: {c}\n" for c in classes))
        args = ["transfer", "--train", str(data), "--test", str(other), "--labels", str(labels)]
    code = (
        "import sys\n"
        "from scfmbench.cli import app\n"
        "heavy = ('torch', 'transformers')\n"
        "assert not [m for m in heavy if m in sys.modules], 'import'\n"
        f"app({args!r} + ['--out', {str(tmp_path)!r}, '--no-scvi',\n"
        "     '--n-splits', '2', '--quiet'], standalone_mode=False)\n"
        "print('loaded', [m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "loaded []"


def test_ctrl_c_waits_for_the_end_of_a_deferred_block():
    """Compiled code (numba's LLVM) is not cut short: the interrupt comes after the block."""
    import os
    import signal

    from scfmbench.stages import deferred_interrupt

    steps = []
    # Python's own handler, also where the tests run with SIGINT ignored (in the background)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("block finished")
        assert steps == ["block finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with deferred_interrupt():  # no Ctrl-C: nothing raised
            steps.append("quiet")
        assert steps == ["block finished", "quiet"]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_interrupt():  # an ignored SIGINT stays ignored
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("ignored")
        assert steps == ["block finished", "quiet", "ignored"]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
