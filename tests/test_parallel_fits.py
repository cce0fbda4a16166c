"""Probe fits in worker processes (`n_jobs`): the same predictions as in one process."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import anndata as ad
import joblib
import psutil
import pytest

import scfmbench
from scfmbench.benchmark.fitting import FitGroup, KeptFeatures, fit_workers, predict_all
from scfmbench.benchmark.methods import Method, baseline_methods
from scfmbench.benchmark.predict import ProbeInputs
from scfmbench.config import RunConfig
from scfmbench.data.cells import InMemoryCells
from scfmbench.data.splits import make_splits
from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, read_predictions
from scfmbench.stages import StageStore
from tests.conftest import default_sigint

SMALL_SCVI = {"max_epochs": 2, "patience": 2}


@pytest.fixture(scope="module")
def pbmc_subset(pbmc3k_path):
    # every 4th cell: all 9 classes, enough for 3-fold cross-validation
    return ad.read_h5ad(pbmc3k_path)[::4].copy()


def _run(data, out, name, **options):
    return scfmbench.run(data, out=out, name=name, progress=False, figures=False, **options)


def test_workers_fit_the_same_predictions_as_one_process(tmp_path, pbmc_subset):
    options = {
        "baselines": ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority", "scvi"],
        "n_splits": 3,
        "scvi": SMALL_SCVI,
    }
    alone = _run(pbmc_subset, tmp_path, "one", n_jobs=1, **options)
    pooled = _run(pbmc_subset, tmp_path, "two", n_jobs=2, **options)
    assert pooled.metrics["methods"] == alone.metrics["methods"]
    assert pooled.metrics["embeddings"] == alone.metrics["embeddings"]
    first = read_predictions(alone.run_dir / PREDICTIONS_FILE)
    second = read_predictions(pooled.run_dir / PREDICTIONS_FILE)
    assert first.equals(second)
    assert len(first) == 7 * pooled.diagnostics.n_cells  # 3 folds test every cell once

    timings = pooled.metrics["timings"]
    assert timings["probes"]["workers"] == 2
    assert 100 < timings["probes"]["workers_peak_rss_mb"] < 10_000  # each worker's own RSS
    assert "probes" not in alone.metrics["timings"]
    # the workers' CPU time is in the stages that ran there and in the total
    for stage in ("features:scvi", "features:pca", "probe:hvg+logreg", "probe:scvi+knn"):
        assert timings[stage]["cpu_seconds"] > 0, stage
    fitted = sum(
        e["cpu_seconds"] for n, e in timings.items() if n.startswith(("features:", "probe:"))
    )
    assert timings["total"]["cpu_seconds"] >= fitted
    assert timings["probes"]["cpu_seconds"] < fitted  # the parent only waited


def test_streamed_run_with_workers_equals_in_memory_run(tmp_path, pbmc_subset):
    path = tmp_path / "subset.h5ad"
    pbmc_subset.write_h5ad(path)
    options = {"baselines": ["hvg+logreg", "pca+logreg"], "n_splits": 2}
    memory = _run(path, tmp_path, "memory", n_jobs=1, backed=False, **options)
    streamed = _run(path, tmp_path, "streamed", n_jobs=2, backed=True, chunk_size=97, **options)
    assert streamed.metrics["timings"]["probes"]["workers"] == 2
    assert streamed.metrics["methods"] == memory.metrics["methods"]


def test_label_efficiency_reuses_features_built_by_workers(tmp_path, pbmc_subset):
    options = {
        "baselines": ["pca+logreg", "majority"],
        "n_splits": 2,
        "train_sizes": [5, "all"],
        "train_size_seeds": 1,
    }
    alone = _run(pbmc_subset, tmp_path, "one", n_jobs=1, **options)
    pooled = _run(pbmc_subset, tmp_path, "two", n_jobs=2, **options)
    assert pooled.metrics["label_efficiency"] == alone.metrics["label_efficiency"]
    # the sweep refitted on the PCA the workers built instead of computing it again
    assert "label_efficiency:features" not in pooled.metrics["timings"]
    assert "label_efficiency:features" not in alone.metrics["timings"]
    assert pooled.metrics["timings"]["features:pca"]["cpu_seconds"] > 0


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_only_features_of_the_kept_width_come_back(tmp_path, pbmc_subset, n_jobs):
    """The width is tested where the features are built: hvg's 2,000 columns never leave a
    worker when at most 50 are kept, pca's 50 do."""
    config = RunConfig(
        out=tmp_path, baselines=["hvg+logreg", "pca+logreg", "majority"], n_jobs=n_jobs
    )
    labels = pbmc_subset.obs["cell_type"].astype("category")
    inputs = ProbeInputs(
        config, InMemoryCells.from_adata(pbmc_subset), {}, {}, labels, "data", "counts"
    )
    split_set = make_splits(labels, n_splits=2, design="cv")
    kept = KeptFeatures(max_width=50)
    stages = StageStore(tmp_path / f"run{n_jobs}")
    predict_all(inputs, split_set, baseline_methods(config, "counts"), stages, False, kept)
    assert sorted(kept) == sorted((r, s.seed) for r in ("pca", "none") for s in split_set.splits)
    assert {feats.train.shape[1] for feats in kept.values()} == {50, 1}  # none: a constant
    every = KeptFeatures()
    stages = StageStore(tmp_path / f"again{n_jobs}")
    predict_all(inputs, split_set, baseline_methods(config, "counts"), stages, False, every)
    assert {(r, feats.train.shape[1]) for (r, _), feats in every.items()} == {
        ("pca", 50),
        ("hvg", 2000),
        ("none", 1),
    }


def test_fit_workers_follows_scikit_learn_n_jobs(monkeypatch):
    monkeypatch.setattr(joblib, "cpu_count", lambda: 8)
    assert fit_workers(1, 20) == 1
    assert fit_workers(3, 2) == 2  # never more workers than groups
    assert fit_workers(4, 20) == 4
    assert fit_workers(-1, 100) == 8
    assert fit_workers(-2, 100) == 7
    assert fit_workers(-9, 100) == 1
    assert fit_workers(-1, 0) == 1
    # every core unless the features would not fit in half the available memory; an
    # explicit count is used as given
    available = psutil.virtual_memory().available
    assert fit_workers(-1, 100, bytes_per_group=1e3) == 8
    assert fit_workers(-1, 100, bytes_per_group=available / 6.5) == 3
    assert fit_workers(-1, 100, bytes_per_group=available) == 1
    assert fit_workers(3, 100, bytes_per_group=available) == 3


def test_n_jobs_zero_is_refused_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "run", "--data", "pbmc68k_reduced", "--n-jobs", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n_jobs" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_with_workers_keeps_finished_fits_and_resumes(tmp_path, pbmc_subset):
    """Ctrl-C reaches the run and its workers (one process group); the fits already
    returned are kept, no worker outlives the run, and a rerun fits only the others.

    Three scVI fits on two workers: the third starts only when a first one is saved, so the
    interrupt always lands while it runs.
    """
    data = tmp_path / "subset.h5ad"
    pbmc_subset[::2].copy().write_h5ad(data)
    config = tmp_path / "config.yaml"
    config.write_text(
        "baselines: [scvi, pca+logreg, majority]\n"
        "scvi: {max_epochs: 40, patience: 40}\nfigures: false\nn_splits: 3\n"
    )
    args = [
        "run", "--data", str(data), "--label-key", "cell_type", "--config", str(config),
        "--out", str(tmp_path / "runs"), "--name", "r", "--n-jobs", "2",
    ]  # fmt: skip
    env = {**os.environ, "LOKY_MAX_CPU_COUNT": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "scfmbench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    stages = tmp_path / "runs" / "r" / "stages"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if stages.exists() and any(stages.glob("predict_*.json")):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted; finished stages are kept and a rerun resumes"
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a worker process outlived the interrupted run")
    kept = {p.name: p.stat().st_mtime_ns for p in stages.glob("predict_*.json")}
    assert 0 < len(kept) < 3 * 5  # 3 folds × (3 scvi probes + 2 baselines)

    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", *args], capture_output=True, text=True, env=env,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, mtime in kept.items():  # reused, not fitted again
        assert (stages / name).stat().st_mtime_ns == mtime, name
    metrics = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {
        "scvi+logreg", "scvi+xgboost", "scvi+knn", "pca+logreg", "majority",
    }  # fmt: skip


def test_ctrl_c_while_the_run_works_beside_the_workers_keeps_their_fits(tmp_path, pbmc_subset):
    """Fits the workers finish while the run does other work (``meanwhile``: embedding
    scores, layers) are saved as they finish, so Ctrl-C there keeps them; joblib's warning
    that they were "not used" is not shown, and a rerun reuses them as they are."""
    config = RunConfig.build(
        {"out": tmp_path, "baselines": ["pca+logreg", "majority"], "n_jobs": 2}
    )
    labels = pbmc_subset.obs["cell_type"].astype("category")
    inputs = ProbeInputs(
        config, InMemoryCells.from_adata(pbmc_subset), {}, {}, labels, "data", "counts"
    )
    split_set = make_splits(labels, n_splits=2, design="cv")
    methods = baseline_methods(config, "counts")
    expected = sorted(
        f"predict_{name}_seed{split.seed}.json"
        for name in ("pca__logreg", "majority")
        for split in split_set.splits
    )
    stages_dir = tmp_path / "run" / "stages"

    def saved() -> list[str]:
        return sorted(p.name for p in stages_dir.glob("*.json")) if stages_dir.exists() else []

    def interrupted_once_every_fit_is_done() -> None:
        deadline = time.monotonic() + 60
        while saved() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            predict_all(
                inputs,
                split_set,
                methods,
                StageStore(tmp_path / "run"),
                False,
                meanwhile=interrupted_once_every_fit_is_done,
            )
        gc.collect()
    assert saved() == expected
    assert [str(w.message) for w in caught if "tasks" in str(w.message)] == []

    # a worker stopped mid-write leaves its hidden temporary file: the rerun removes it
    (stages_dir / f".{expected[0]}.k3x9q_1z.tmp").write_text('{"key": "half')
    rerun = StageStore(tmp_path / "run")
    resumed = predict_all(inputs, split_set, methods, rerun, False)
    assert not [name for name in rerun.timings if name.startswith("probe:")]  # nothing fitted
    assert sorted(p.name for p in stages_dir.iterdir()) == expected
    alone = predict_all(
        inputs, split_set, methods, StageStore(tmp_path / "alone"), False
    )  # uninterrupted, in one process
    assert list(resumed) == list(alone)
    for key, prediction in alone.items():
        assert resumed[key].to_payload() == prediction.to_payload(), key


def test_group_bytes_bounds_the_widest_representation():
    from types import SimpleNamespace

    import numpy as np

    from scfmbench.benchmark.fitting import FitGroup, group_bytes
    from scfmbench.benchmark.methods import Method

    inputs = SimpleNamespace(
        config=SimpleNamespace(n_hvg=2000),
        labels=[0] * 1000,
        matrices={"gf": np.zeros((1000, 3000), dtype=np.float32)},
    )
    majority = FitGroup(None, [Method("majority", "none", "majority", "baseline")], ["k"])
    pca = FitGroup(None, [Method("pca+logreg", "pca", "logreg", "baseline")], ["k"])
    model = FitGroup(None, [Method("gf+logreg", "gf", "logreg", "frozen", "gf")], ["k"])
    assert group_bytes(inputs, [majority]) == 1 * 1000 * 8 * 3
    assert group_bytes(inputs, [majority, pca]) == 2000 * 1000 * 8 * 3
    assert group_bytes(inputs, [pca, model]) == 3000 * 1000 * 8 * 3


def test_groups_are_handed_out_costliest_first():
    def group(representation, probe, model=None):
        method = Method(f"{representation}+{probe}", representation, probe, "baseline", model)
        return FitGroup(split=None, methods=[method], keys=[""])  # type: ignore[arg-type]

    groups = [
        group("none", "majority"),
        group("gf", "logreg", model="gf"),
        group("pca", "logreg"),
        group("hvg", "logreg"),
        group("gf", "xgboost", model="gf"),
        group("scvi", "logreg"),
        group("gf", "knn", model="gf"),
    ]
    order = [g.methods[0].name for g in sorted(groups, key=lambda g: g.rank)]
    assert order == [
        "scvi+logreg",
        "gf+xgboost",
        "hvg+logreg",
        "gf+logreg",
        "gf+knn",
        "none+majority",
        "pca+logreg",
    ]


def test_loky_warning_of_a_worker_timing_out_is_dropped():
    """A worker that times out as a fit is queued is replaced by loky; its warning (which
    blames a memory leak) is not shown, and other warnings still are. In a fresh interpreter:
    pytest resets the warning filters of every test."""
    import subprocess
    import sys

    code = (
        "import warnings, scfmbench.benchmark.fitting\n"
        "warnings.warn('A worker stopped while some jobs were given to the executor. This can "
        "be caused by a too short worker timeout or by a memory leak.', UserWarning)\n"
        "warnings.warn('another warning', UserWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "another warning" in done.stderr
    assert "A worker stopped" not in done.stderr
