"""The scVI baseline: seeded, trained without the test cells, probed like an embedding,
streamed like the other baselines, refused on data without counts."""

import json

import numpy as np
import pytest

import scfmbench
from scfmbench.data.cells import InMemoryCells
from scfmbench.data.splits import stratified_split
from scfmbench.evaluation.scvi import ScviOptions
from tests.test_pipeline import run_cli

FAST = {"max_epochs": 3, "n_hidden": 16, "n_latent": 4, "batch_size": 16}


@pytest.fixture
def fits(monkeypatch):
    """Rows of every count matrix scVI is trained on."""
    import scfmbench.evaluation.scvi as module

    seen = []
    train = module._train

    def spy(counts, sizes, options, seed):
        seen.append((counts.shape[0], list(sizes)))
        return train(counts, sizes, options, seed)

    monkeypatch.setattr(module, "_train", spy)
    return seen


def test_scvi_features_are_seeded_and_never_see_the_test_cells(tiny_adata, fits):
    from scfmbench.evaluation.scvi import scvi_features

    split = stratified_split(tiny_adata.obs["cell_type"], seed=0)
    cells = InMemoryCells.from_adata(tiny_adata)
    state = np.random.get_state()[1].copy()
    first = scvi_features(cells, split, kind="counts", seed=7, scvi=ScviOptions(**FAST))
    second = scvi_features(cells, split, kind="counts", seed=7, scvi=ScviOptions(**FAST))
    # the global NumPy random state is left as it was
    assert np.array_equal(np.random.get_state()[1], state)
    n_train, n_val, n_test = len(split.train), len(split.val), len(split.test)
    assert fits == [(n_train + n_val, [n_train, n_val])] * 2
    for a, b, n in zip(
        (first.train, first.val, first.test),
        (second.train, second.val, second.test),
        (n_train, n_val, n_test),
        strict=True,
    ):
        assert a.shape == (n, 4) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert first.info == {"n_genes": 40, "n_latent": 4, "epochs": 3, "transductive": False}
    # transductive: the test cells join the training cells (unlabelled)
    third = scvi_features(
        cells, split, kind="counts", seed=7, scvi=ScviOptions(**FAST, transductive=True)
    )
    assert fits[-1] == (n_train + n_val + n_test, [n_train, n_val, n_test])
    assert third.info["transductive"] is True and third.test.shape == (n_test, 4)


def test_scvi_is_probed_like_an_embedding_and_streams(tmp_path, tiny_adata):
    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    settings = {
        "baselines": ["scvi", "majority"],
        "probes": ["logreg", "knn"],
        "n_splits": 1,
        "design": "study",  # one random split keeps the test quick
        "figures": False,
        "progress": False,
        "scvi": FAST,
        "out": tmp_path / "runs",
    }
    memory = scfmbench.run(path, name="memory", backed=False, **settings)
    again = scfmbench.run(path, name="again", backed=False, **settings)
    backed = scfmbench.run(path, name="backed", backed=True, chunk_size=16, **settings)
    methods = memory.metrics["methods"]
    assert list(methods) == ["scvi+logreg", "scvi+knn", "majority"]
    entry = methods["scvi+logreg"]
    assert entry["kind"] == "baseline" and entry["representation"] == "scvi"
    assert entry["splits"]["42"]["macro_f1"] > 0.8  # three well-separated types
    for other in (again, backed):
        for name, scores in methods.items():
            assert other.metrics["methods"][name]["splits"] == scores["splits"], name


def test_scvi_needs_counts(tmp_path, tiny_adata):
    lognorm = tiny_adata.copy()
    lognorm.X = lognorm.X.log1p()
    path = tmp_path / "lognorm.h5ad"
    lognorm.write_h5ad(path)
    # the default baseline list leaves scvi out on data without counts
    with pytest.warns(UserWarning, match="no raw integer counts"):
        result = scfmbench.run(
            path, out=tmp_path, name="d", n_splits=1, design="study", figures=False, progress=False
        )
    assert [m for m in result.metrics["methods"] if m.startswith("scvi")] == []
    # asked for explicitly: one line, exit 2, nothing written
    config = tmp_path / "c.yaml"
    config.write_text("baselines: [scvi, majority]\nn_splits: 1\ndesign: study\n")
    done = run_cli(
        "run",
        "--data",
        str(path),
        "--config",
        str(config),
        "--out",
        str(tmp_path),
        "--name",
        "e",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: baseline 'scvi+logreg' needs raw integer counts but the data are lognorm; "
        "give the counts, or remove scvi from `baselines` (--no-scvi)."
    )
    assert not (tmp_path / "e").exists()


def test_no_scvi_flag_drops_it_from_the_defaults(tmp_path, tiny_adata):
    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    done = run_cli(
        "run",
        "--data",
        str(path),
        "--n-splits",
        "1",
        "--design",
        "study",
        "--out",
        str(tmp_path),
        "--name",
        "n",
        "--no-scvi",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    methods = json.loads((tmp_path / "n" / "metrics.json").read_text())["methods"]
    assert list(methods) == ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"]


def test_skipped_scvi_is_recorded_and_reported(tmp_path, pbmc3k_sess, caplog):
    """On log-normalized data the default scvi baseline is skipped, with a warning and a record."""
    import scanpy as sc

    adata = pbmc3k_sess[::9].copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    data = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(data)
    result = scfmbench.run(
        data, label_key="cell_type", out=tmp_path, name="ln", progress=False, figures=False
    )
    reason = "it needs raw counts (the data hold log-normalized values)"
    doc = json.loads((result.run_dir / "metrics.json").read_text())
    assert doc["skipped"] == {"scvi": reason}
    assert not any(name.startswith("scvi") for name in doc["methods"])
    assert f"scvi skipped: {reason}." in (result.run_dir / "report.md").read_text()
    assert f"scvi skipped: {reason}." in (result.run_dir / "report.html").read_text()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"scvi baseline skipped: {reason}" in r.getMessage() for r in warnings)


def test_validate_checks_an_explicit_scvi_against_the_data(tmp_path, capsys):
    """validate with a config naming scvi passes on counts and refuses log-normalized data,
    as run does."""
    import scanpy as sc

    from tests.conftest import make_tiny_adata, run_cli_in_process

    config = tmp_path / "scvi.yaml"
    config.write_text("baselines: [pca+logreg, scvi]\n")
    counts = make_tiny_adata()
    counts.write_h5ad(tmp_path / "counts.h5ad")
    code, _, stderr = run_cli_in_process(
        ["validate", str(tmp_path / "counts.h5ad"), "--config", str(config)], capsys
    )
    assert code == 0, stderr
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    counts.write_h5ad(tmp_path / "lognorm.h5ad")
    code, _, stderr = run_cli_in_process(
        ["validate", str(tmp_path / "lognorm.h5ad"), "--config", str(config)], capsys
    )
    assert code == 2
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: baseline 'scvi+logreg' needs raw integer counts but the data are lognorm"
        )
    )


def test_early_stopping_prints_nothing(tiny_adata, capfd, caplog):
    """scvi-tools prints why early stopping ended a fit; the run keeps it to its debug log."""
    import logging

    from scfmbench.evaluation.scvi import scvi_features

    cells = InMemoryCells.from_adata(tiny_adata)
    split = stratified_split(tiny_adata.obs["cell_type"], seed=0, fractions=(0.6, 0.2, 0.2))
    with caplog.at_level(logging.DEBUG, logger="scfmbench.evaluation.scvi"):
        features = scvi_features(
            cells, split, kind="counts", seed=0, scvi=ScviOptions(max_epochs=200, patience=1)
        )
    assert features.info["epochs"] < 200  # early stopping ended the fit
    assert capfd.readouterr().out == ""
    assert any("Signaling Trainer to stop" in r.getMessage() for r in caplog.records)


def test_quiet_training_plan_trains_the_same_weights(tiny_adata, monkeypatch):
    """Without the per-step training logs the fit, its early stop and the latent space are
    those of scvi-tools' own plan, bit for bit; the validation ELBO is still logged."""
    import scvi.train

    import scfmbench.evaluation.scvi as module

    logged = []
    log = scvi.train.TrainingPlan.log

    def counting(self, name, *args, **kwargs):
        logged.append(name)
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(scvi.train.TrainingPlan, "log", counting)
    cells = InMemoryCells.from_adata(tiny_adata)
    split = stratified_split(tiny_adata.obs["cell_type"], seed=0, fractions=(0.6, 0.2, 0.2))
    options = ScviOptions(**{**FAST, "max_epochs": 40}, patience=2)
    quiet = module.scvi_features(cells, split, kind="counts", seed=3, scvi=options)
    quiet_logged, logged[:] = list(logged), []
    monkeypatch.setattr(module, "_quiet_plan_class", lambda: scvi.train.TrainingPlan)
    stock = module.scvi_features(cells, split, kind="counts", seed=3, scvi=options)
    for a, b in ((quiet.train, stock.train), (quiet.val, stock.val), (quiet.test, stock.test)):
        np.testing.assert_array_equal(a, b)
    assert quiet.info == stock.info and quiet.info["epochs"] < 40  # stopped early, alike
    assert "train_loss" in logged and "train_loss" not in quiet_logged
    assert "elbo_validation" in quiet_logged
