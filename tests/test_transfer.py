import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scfmbench import ConfigError, RunConfig, SchemaError, validate
from scfmbench.benchmark.transfer import (
    harmonize,
    load_label_map,
    transfer,
    transfer_baselines,
)


def test_unmapped_labels_are_listed():
    import pandas as pd

    labels = pd.Series(["B", "NK", "Mystery", "Other"])
    with pytest.raises(SchemaError, match=r"not in the label map: \['Mystery', 'Other'\]"):
        harmonize(labels, {"B": "B", "NK": None}, dataset="mine")
    shared = harmonize(labels.iloc[:2], {"B": "B", "NK": None}, dataset="mine")
    assert list(shared) == ["B"]


def test_label_map_yaml(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("T cell: T\nB cell: B\nDoublet: null\n")
    assert load_label_map(path) == {"T cell": "T", "B cell": "B", "Doublet": None}


def test_no_shared_labels(tiny_adata):
    other = tiny_adata.copy()
    other.obs["cell_type"] = other.obs["cell_type"].astype(str).str.replace("type", "kind")
    mapping = {f"type_{k}": f"t{k}" for k in range(3)} | {f"kind_{k}": f"k{k}" for k in range(3)}
    with pytest.raises(SchemaError, match="shares no labels"):
        transfer(tiny_adata, other, label_map=mapping, progress=False, figures=False)


def test_pbmc3k_to_kang_subsets(pbmc3k_path, kang_path, tmp_path):
    pbmc = ad.read_h5ad(pbmc3k_path)[::3].copy()
    kang = ad.read_h5ad(kang_path)[::3].copy()
    doc = transfer(
        pbmc,
        kang,
        out=tmp_path,
        name="t",
        baselines=["hvg+logreg", "majority"],
        n_splits=3,  # three training seeds, each scored on every target cell
        progress=False,
    )
    forward = doc["transfer"]["matrix"]["train"]["test"]
    logreg = forward["hvg+logreg"]
    assert set(logreg["seeds"]) == {"42", "43", "44"}
    per_seed = [s["accuracy"] for s in logreg["seeds"].values()]
    assert logreg["accuracy"] == pytest.approx(np.mean(per_seed))
    lo, hi = logreg["summary"]["accuracy"]["ci95"]
    assert lo <= logreg["accuracy"] <= hi and hi - lo > 0
    (test,) = doc["transfer"]["directions"]["train->test"]["comparisons"]
    assert (test["method"], test["against"]) == ("majority", "hvg+logreg")
    assert test["significant"] and test["p"] > 0 and test["mcnemar_p"] is None
    table = pd.read_csv(tmp_path / "t" / "predictions.tsv.gz", sep="\t")
    rows = table[(table["direction"] == "train->test") & (table["method"] == "hvg+logreg")]
    assert len(rows) == 3 * logreg["n_test"]  # every seed scored on every target cell
    assert set(doc["transfer"]["directions"]) == {"train->test", "test->train"}
    info = doc["transfer"]["directions"]["train->test"]
    assert info["classes"] == ["B", "CD14+ Mono", "CD4 T", "CD8 T", "FCGR3A+ Mono"]
    assert 1000 < info["n_shared_genes"] < 1267
    assert forward["hvg+logreg"]["accuracy"] > 0.75
    assert forward["hvg+logreg"]["accuracy"] > forward["majority"]["accuracy"] + 0.4
    assert (tmp_path / "t" / "transfer.md").exists()
    report = (tmp_path / "t" / "report.md").read_text()
    assert "## Transfer across datasets" in report
    assert f"{info['n_shared_genes']} shared genes" in report
    assert (tmp_path / "t" / "report.html").exists()


def test_transfer_cli_both_directions(pbmc3k_path, kang_path, tmp_path):
    import json
    import subprocess
    import sys

    config = tmp_path / "one_seed.yaml"  # one training seed: the default five fit 5x the models
    config.write_text("n_splits: 1\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scfmbench",
            "transfer",
            "--train",
            str(pbmc3k_path),
            "--test",
            str(kang_path),
            "--out",
            str(tmp_path),
            "--name",
            "pk",
            "--config",
            str(config),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "pk" / "metrics.json").read_text())
    pbmc, kang = pbmc3k_path.stem, kang_path.stem
    assert set(doc["transfer"]["matrix"]) == {pbmc, kang}
    forward = doc["transfer"]["matrix"][pbmc][kang]
    backward = doc["transfer"]["matrix"][kang][pbmc]
    assert forward["hvg+logreg"]["accuracy"] > 0.85
    assert backward["hvg+logreg"]["accuracy"] > 0.85
    assert forward["hvg+logreg"]["n_test"] == 1556
    assert f"train {pbmc} → test {kang}" in done.stdout
    # both datasets are counts: scVI is trained on the shared genes' counts of the training side
    assert doc["skipped"] == {}
    assert forward["scvi+logreg"]["n_test"] == 1556
    assert backward["scvi+logreg"]["accuracy"] > 0.5


def test_transfer_on_counts_gives_the_baselines_the_same_log_normalized_values(tiny_adata):
    """Counts on both sides: the combined matrix holds counts, and log-normalizing it per cell
    gives exactly the matrix built from each side's log-normalized values."""
    from scfmbench.benchmark.transfer_data import prepare_transfer
    from scfmbench.data.matrix import lognormalize

    train = validate(tiny_adata, min_cells_per_class=1)
    test = validate(tiny_adata[::2].copy(), min_cells_per_class=1)
    mapping = {c: c for c in tiny_adata.obs["cell_type"].unique()}
    counts, _, _ = prepare_transfer(
        train, test, mapping, names=("a", "b"), seed=0, fractions=(0.8, 0.1, 0.1)
    )
    assert counts.kind == "counts"
    test.diagnostics.matrix_kind = "corrected"  # count-like: log-normalized side by side
    lognorm, _, _ = prepare_transfer(
        train, test, mapping, names=("a", "b"), seed=0, fractions=(0.8, 0.1, 0.1)
    )
    assert lognorm.kind == "lognorm"
    by_cell = lognormalize(counts.combined.X, kind="counts")
    np.testing.assert_array_equal(by_cell.toarray(), lognorm.combined.X.toarray())


def test_scvi_in_a_transfer_needs_counts_on_both_sides():
    kinds = {"pbmc": "counts", "atlas": "lognorm"}
    with pytest.raises(ConfigError) as raised:
        transfer_baselines(RunConfig(baselines=["pca+logreg", "scvi"]), kinds)
    assert str(raised.value) == (
        "the scvi baseline cannot run in this transfer: it needs raw counts (atlas is "
        "lognorm); remove scvi from `baselines`."
    )
    methods, skipped = transfer_baselines(RunConfig(), kinds)
    assert [m.name for m in methods] == ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"]
    assert skipped == {"scvi": "it needs raw counts (atlas is lognorm)"}
    methods, skipped = transfer_baselines(RunConfig(), {"pbmc": "counts", "kang": "counts"})
    assert [m.name for m in methods][-3:] == ["scvi+logreg", "scvi+xgboost", "scvi+knn"]
    assert skipped == {}


def test_transfer_fits_in_workers_and_resumes(pbmc3k_path, kang_path, tmp_path, monkeypatch):
    import scfmbench.benchmark.fitting as fitting

    pbmc = ad.read_h5ad(pbmc3k_path)[::4].copy()
    kang = ad.read_h5ad(kang_path)[::4].copy()
    options = {
        "baselines": ["hvg+logreg", "pca+logreg", "pca+knn", "majority"],
        "n_splits": 2,
        "both_directions": False,
        "progress": False,
        "figures": False,
    }
    one = transfer(pbmc, kang, out=tmp_path, name="one", n_jobs=1, **options)
    two = transfer(pbmc, kang, out=tmp_path, name="two", n_jobs=2, **options)
    assert two["transfer"]["matrix"] == one["transfer"]["matrix"]
    saved = list((tmp_path / "two" / "directions").glob("*/stages/predict_*.json"))
    assert len(saved) == 4 * 2  # every method on both training seeds

    def refit(*args, **kwargs):
        raise AssertionError("a saved fit was fitted again")

    monkeypatch.setattr(fitting, "fit_and_predict_features", refit)
    again = transfer(pbmc, kang, out=tmp_path, name="two", n_jobs=1, **options)
    assert again["transfer"]["matrix"] == two["transfer"]["matrix"]


def test_labels_missing_from_the_default_map_name_it(tiny_adata, tmp_path):
    with pytest.raises(SchemaError) as raised:
        transfer(tiny_adata, tiny_adata.copy(), out=tmp_path, progress=False)
    assert str(raised.value) == (
        "labels of train not in the label map 'pbmc3k_kang2018': ['type_0', 'type_1', "
        "'type_2']; add them to a map given with --labels (map to null to drop those cells)."
    )
    assert not any(tmp_path.iterdir())


def test_a_missing_file_is_named_with_its_side(tiny_adata, tmp_path, capsys):
    from tests.conftest import run_cli_in_process

    data = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(data)
    args = ["transfer", "--out", str(tmp_path / "runs"), "-q"]
    code, _, err = run_cli_in_process([*args, "--train", str(data), "--test", "nope.h5ad"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: test data: data file 'nope.h5ad' does not exist; pass an .h5ad path or a "
        "built-in name (pbmc68k_reduced)."
    ], err
    assert not (tmp_path / "runs").exists()
