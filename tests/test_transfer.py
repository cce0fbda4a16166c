import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from scfmbench import ConfigError, DataError, RunConfig, SchemaError, validate
from scfmbench.benchmark.transfer import (
    harmonize,
    load_label_map,
    transfer,
    transfer_baselines,
)
from tests.conftest import make_tiny_adata


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
    other = make_tiny_adata(cells="other")
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
    # p-values as in the report's tables: three decimals, "<0.001" below, "*" when significant
    shown = "<0.001" if test["p_holm"] < 0.001 else f"{test['p_holm']:.3f}"
    lo, hi = test["f1_diff_ci95"]
    row = (
        f"| majority | hvg+logreg | {test['kind']} | {test['f1_diff']:.3f} | "
        f"[{lo:.3f}, {hi:.3f}] | {shown} * |"
    )
    assert row in (tmp_path / "t" / "transfer.md").read_text().splitlines()
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
    assert done.stdout.splitlines()[-1] == f"run directory: {tmp_path / 'pk'}"
    assert done.stderr.count("only 1 training seed") == 1  # given once, not again at the end
    # both datasets are counts: scVI is trained on the shared genes' counts of the training side
    assert doc["skipped"] == {}
    assert forward["scvi+logreg"]["n_test"] == 1556
    assert backward["scvi+logreg"]["accuracy"] > 0.5


def test_transfer_on_counts_gives_the_baselines_the_same_log_normalized_values(tiny_adata):
    """Counts on both sides: the combined matrix holds counts, and log-normalizing it per cell
    gives exactly the matrix built from each side's log-normalized values."""
    from scfmbench.benchmark.transfer_data import prepare_transfer, shared_labels
    from scfmbench.data.matrix import lognormalize

    train = validate(tiny_adata, min_cells_per_class=1)
    test = validate(tiny_adata[::2].copy(), min_cells_per_class=1)
    mapping = {c: c for c in tiny_adata.obs["cell_type"].unique()}
    shared = shared_labels(train.labels, test.labels, mapping, names=("a", "b"))
    counts, _, _ = prepare_transfer(
        train, test, shared, names=("a", "b"), seed=0, fractions=(0.8, 0.1, 0.1)
    )
    assert counts.kind == "counts"
    test.diagnostics.matrix_kind = "corrected"  # count-like: log-normalized side by side
    lognorm, _, _ = prepare_transfer(
        train, test, shared, names=("a", "b"), seed=0, fractions=(0.8, 0.1, 0.1)
    )
    assert lognorm.kind == "lognorm"
    by_cell = lognormalize(counts.combined.X, kind="counts")
    np.testing.assert_array_equal(by_cell.toarray(), lognorm.combined.X.toarray())


def test_scvi_in_a_transfer_needs_counts_on_both_sides():
    kinds = {"pbmc": "counts", "atlas": "lognorm"}
    with pytest.raises(ConfigError) as raised:
        transfer_baselines(RunConfig(baselines=["pca+logreg", "scvi"]), kinds)
    assert str(raised.value) == (
        "the scvi baseline cannot run in this transfer: it needs raw counts (atlas holds "
        "log-normalized values); remove scvi from `baselines`."
    )
    methods, skipped = transfer_baselines(RunConfig(), kinds)
    assert [m.name for m in methods] == ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority"]
    assert skipped == {"scvi": "it needs raw counts (atlas holds log-normalized values)"}
    methods, skipped = transfer_baselines(RunConfig(), {"pbmc": "counts", "kang": "counts"})
    assert [m.name for m in methods][-3:] == ["scvi+logreg", "scvi+xgboost", "scvi+knn"]
    assert skipped == {}


def test_skipped_scvi_names_the_dataset_and_what_it_holds(caplog):
    """A dataset named like a kind (lognorm.h5ad) reads as a sentence, its values in words."""
    _, skipped = transfer_baselines(RunConfig(), {"pbmc3k": "counts", "lognorm": "lognorm"})
    reason = "it needs raw counts (lognorm holds log-normalized values)"
    assert skipped == {"scvi": reason}
    assert f"warning: scvi baseline skipped: {reason}" in caplog.messages
    _, skipped = transfer_baselines(RunConfig(), {"a": "corrected", "b": "normalized"})
    assert skipped == {
        "scvi": "it needs raw counts (a holds count-like non-integer values, b holds "
        "depth-normalized values)"
    }


def test_transfer_fits_in_workers_and_resumes(
    pbmc3k_path, kang_path, tmp_path, monkeypatch, capsys
):
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

    (direction,) = two["transfer"]["directions"]
    stages = {
        "read",
        "load_models",
        *(f"{direction} {stage}" for stage in ("prepare", "probes", "statistics")),
        *(f"{direction} features:{name}" for name in ("hvg", "pca", "none")),
        *(f"{direction} probe:{m}" for m in options["baselines"]),
        "total",
    }
    assert set(two["timings"]) == stages
    assert two["timings"]["total"]["cpu_seconds"] > two["timings"]["read"]["cpu_seconds"] > 0

    monkeypatch.setattr(fitting, "fit_and_predict_features", refit)
    capsys.readouterr()
    options["progress"] = True
    again = transfer(pbmc, kang, out=tmp_path, name="two", n_jobs=1, **options)
    assert again["transfer"]["matrix"] == two["transfer"]["matrix"]
    # nothing fitted: the bar starts full at the saved fits, and no fit is timed
    bars = [line for line in capsys.readouterr().err.split("\r") if "probes" in line]
    assert bars and all("8/8" in bar and "8 saved" in bar for bar in bars), bars
    assert not [stage for stage in again["timings"] if "probe" in stage]


def test_labels_missing_from_the_default_map_name_it(tiny_adata, tmp_path):
    with pytest.raises(SchemaError) as raised:
        transfer(tiny_adata, make_tiny_adata(cells="other"), out=tmp_path, progress=False)
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


TINY = {"baselines": ["pca+logreg", "majority"], "n_pcs": 5, "figures": False}


def tiny_pair(tmp_path):
    """Two files named cells.h5ad in folders a/ and b/; b lacks type_2 and is noisier."""
    paths = []
    for folder, seed in (("a", 0), ("b", 1)):
        adata = make_tiny_adata(seed=seed, cells=f"{folder}_cell")
        if folder == "b":
            adata = adata[adata.obs["cell_type"] != "type_2"].copy()
            noise = np.random.default_rng(seed).poisson(4.0, adata.shape).astype(np.float32)
            adata.X = sp.csr_matrix(adata.X.toarray() + noise)  # pyright: ignore[reportAttributeAccessIssue]
        (tmp_path / folder).mkdir()
        adata.write_h5ad(tmp_path / folder / "cells.h5ad")
        paths.append(tmp_path / folder / "cells.h5ad")
    return paths


def test_same_file_is_refused_and_same_names_get_their_folder(tmp_path, capsys):
    from scfmbench.benchmark.transfer_data import dataset_names
    from tests.conftest import run_cli_in_process

    a, b = tiny_pair(tmp_path)
    assert dataset_names(a, b) == ("a/cells", "b/cells")
    assert dataset_names(a, tmp_path / "b" / "other.h5ad") == ("cells", "other")
    (tmp_path / "c" / "a").mkdir(parents=True)
    assert dataset_names(a, tmp_path / "c" / "a" / "cells.h5ad") == (
        "cells (train)",
        "cells (test)",
    )
    data = make_tiny_adata()
    assert dataset_names(data, data.copy()) == ("train", "test")
    with pytest.raises(ConfigError, match=r"^--train and --test are the same AnnData; "):
        dataset_names(data, data)
    runs = tmp_path / "runs"
    link = tmp_path / "link.h5ad"
    link.symlink_to(a)
    for same in (str(a), str(tmp_path / "a" / ".." / "a" / "cells.h5ad"), str(link)):
        code, out, err = run_cli_in_process(
            [
                "transfer",
                "--train",
                str(a),
                "--test",
                same,
                "--out",
                str(runs),
                "-q",
                "--n-splits",
                "2",
            ],
            capsys,
        )  # the error alone: the warning about two training seeds would come after the checks
        assert (code, out) == (2, "")
        assert err.strip().splitlines() == [
            f"error: --train and --test are both {str(a)!r}; a transfer scores one dataset on "
            "another (score a dataset on its own held-out cells with scfmbench run)."
        ]
    copy = tmp_path / "copy.h5ad"
    copy.write_bytes(a.read_bytes())
    code, out, err = run_cli_in_process(
        ["transfer", "--train", str(a), "--test", str(copy), "--out", str(runs), "-q"], capsys
    )
    assert (code, err.strip()) == (
        2,
        f"error: --train {str(a)!r} and --test {str(copy)!r} hold the same bytes (a copy); a "
        "transfer scores one dataset on another (score a dataset on its own held-out cells with "
        "scfmbench run).",
    )
    assert not runs.exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("B: B\n  bad: : :\n")
    code, out, err = run_cli_in_process(
        ["transfer", "--train", str(a), "--test", str(b), "--labels", str(broken), "-q"], capsys
    )
    assert (code, err.strip()) == (
        2,
        f"error: label map {str(broken)!r} is not valid YAML at line 2, column 6: mapping "
        "values are not allowed here; fix that line.",
    )


def test_transfer_macro_f1_averages_the_target_classes(tmp_path, capsys, caplog):
    """A training class the target lacks is left out of macro F1 (as for a held-out group),
    not averaged in as an F1 of 0; checked against sklearn on the saved predictions."""
    from sklearn.metrics import f1_score

    from tests.conftest import run_cli_in_process

    a, b = tiny_pair(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text("baselines: [pca+logreg, majority]\nn_pcs: 5\nfigures: false\n")
    runs = tmp_path / "runs"
    args = ["transfer", "--train", str(a), "--test", str(b), "--labels", str(tmp_path / "m.yaml")]
    (tmp_path / "m.yaml").write_text("type_0: type_0\ntype_1: type_1\ntype_2: type_2\n")
    code, out, err = run_cli_in_process(
        [*args, "--config", str(config), "--out", str(runs), "--n-splits", "2", "--one-way", "-q"],
        capsys,
    )
    assert code == 0, err
    assert "a/cells->b/cells: 1 training class(es) have no test cells" in caplog.text
    run_dir = runs / "transfer_a_cells__b_cells"
    doc = json.loads((run_dir / "metrics.json").read_text())
    results = doc["transfer"]["matrix"]["a/cells"]["b/cells"]
    table = pd.read_csv(run_dir / "predictions.tsv.gz", sep="\t")
    for method in ("pca+logreg", "majority"):
        for seed in ("42", "43"):
            rows = table[(table["method"] == method) & (table["split"].astype(str) == seed)]
            present = sorted(set(rows["true"]))
            assert present == ["type_0", "type_1"] and len(rows) == 40
            oracle = f1_score(rows["true"], rows["pred"], labels=present, average="macro")
            every = f1_score(
                rows["true"],
                rows["pred"],
                labels=["type_0", "type_1", "type_2"],
                average="macro",
                zero_division=0,
            )
            assert results[method]["seeds"][seed]["macro_f1"] == pytest.approx(oracle)
            assert oracle != pytest.approx(every)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seeds"] == [42, 43]
    assert {name: entry["sha256"] for name, entry in manifest["datasets"].items()} == {
        "a/cells": hashlib.sha256(a.read_bytes()).hexdigest(),
        "b/cells": hashlib.sha256(b.read_bytes()).hexdigest(),
    }
    assert manifest["datasets"]["a/cells"]["path"] == str(a.resolve())
    saved_yaml = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {"data", "design", "layerwise"}.isdisjoint(saved_yaml)
    assert saved_yaml["label_key"] == "cell_type"  # detected on both sides
    saved = RunConfig.from_yaml(run_dir / "config.yaml")
    assert (saved.n_splits, saved.baselines, saved.n_pcs) == (2, ["pca+logreg", "majority"], 5)
    assert "warning: only 2 training seeds: the retraining variance" in caplog.text
    # a two-way transfer of the same files into the same folder keeps the direction run
    code, _, err = run_cli_in_process(
        [*args, "--config", str(config), "--out", str(runs), "--n-splits", "2", "-q"], capsys
    )
    assert code == 0, err
    two_way = json.loads((run_dir / "metrics.json").read_text())["transfer"]["matrix"]
    assert two_way["a/cells"]["b/cells"]["pca+logreg"]["seeds"] == results["pca+logreg"]["seeds"]
    assert list(two_way) == ["a/cells", "b/cells"]
    code, _, err = run_cli_in_process(  # and --one-way after it is no transfer of other data
        [*args, "--config", str(config), "--out", str(runs), "--n-splits", "2", "--one-way"],
        capsys,
    )
    assert code == 0, err


def test_a_label_map_leaving_one_training_class_is_refused(tmp_path, capsys):
    from tests.conftest import run_cli_in_process

    a, b = tiny_pair(tmp_path)
    (tmp_path / "m.yaml").write_text("type_0: shared\ntype_1: shared\ntype_2: null\n")
    runs = tmp_path / "runs"
    code, out, err = run_cli_in_process(
        ["transfer", "--train", str(a), "--test", str(b), "--labels", str(tmp_path / "m.yaml")]
        + ["--out", str(runs), "-q"],
        capsys,
    )
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        "error: a/cells keeps 1 class after the label map (['shared']); a classifier needs at "
        "least two: fix the label map."
    ]
    assert not runs.exists()
    with pytest.raises(ConfigError, match=r"^the label map maps 'B' to \['x'\], not a label; "):
        transfer(a, b, label_map={"B": ["x"]}, out=runs, progress=False)  # pyright: ignore[reportArgumentType]
    (tmp_path / "yes.yaml").write_text("type_0: yes\n")
    with pytest.raises(ConfigError, match=r"maps 'type_0' to True, not a label; .* 'yes'"):
        load_label_map(tmp_path / "yes.yaml")
    assert load_label_map(tmp_path / "m.yaml") == {
        "type_0": "shared",
        "type_1": "shared",
        "type_2": None,
    }


def test_settings_a_transfer_does_not_make_are_refused_others_ignored():
    from scfmbench.benchmark.transfer_settings import transfer_settings, transfer_warnings

    design = (
        "(a transfer reads --train and --test, trains on n_splits stratified splits of the "
        "training data and scores every cell of the test data)"
    )
    base = RunConfig(data="pbmc.h5ad", holdout_key="donor", reference="scvi+logreg", n_splits=3)
    with pytest.raises(ConfigError) as raised:
        transfer_settings(base, {"seed": 7})
    assert str(raised.value) == (
        "transfer does not make what holdout_key, reference ask for; remove them from the "
        f"config {design}, or use scfmbench run."
    )
    with pytest.raises(ConfigError, match=r"^transfer does not make what train_sizes ask for"):
        transfer_settings(None, {"train_sizes": [5]})
    # a config shared with `run`: what only a run uses is ignored, with one warning
    shared = RunConfig(data="pbmc.h5ad", design="study", layerwise=False, n_splits=5)
    cfg = transfer_settings(shared, {"seed": 7, "out": None})
    assert transfer_warnings(cfg) == [
        f"transfer ignores data, design, layerwise of the config {design}"
    ]
    assert (cfg.n_splits, cfg.seed) == (5, 7)
    # a transfer's own saved config.yaml is read back as is
    assert transfer_settings(RunConfig.build(yaml.safe_load(cfg.to_yaml())), {}) == cfg


@pytest.mark.parametrize(
    ("held", "kind", "message"),
    [
        ({"metrics.json": '{"run": {"kind": "transfer"}}'}, "run", "holds a transfer, not a run"),
        ({"metrics.json": '{"run": {"name": "r"}}'}, "transfer", "holds a run, not a transfer"),
        ({"splits/splits.json": "{}"}, "transfer", "holds a run, not a transfer"),
        ({"directions/x_to_y/stages/a.json": "{}"}, "run", "holds a transfer, not a run"),
        (
            {"directions/x_to_y/stages/a.json": "{}"},
            "transfer",
            "holds a transfer of other datasets (directions ['x_to_y'])",
        ),
        ({"directions/a_to_b/stages/a.json": "{}"}, "transfer", None),
        ({"config.yaml": "seed: 1\n"}, "transfer", None),
    ],
)
def test_run_and_transfer_folders_are_not_mixed(tmp_path, held, kind, message):
    from scfmbench.benchmark.output import check_folder_kind

    for name, content in held.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    directions = ["a_to_b", "b_to_a"] if kind == "transfer" else None
    if message is None:
        check_folder_kind(tmp_path, kind, direction_dirs=directions)
        return
    with pytest.raises(ConfigError) as raised:
        check_folder_kind(tmp_path, kind, direction_dirs=directions)
    assert str(raised.value) == f"{tmp_path} {message}; give another --name, or remove the folder."


def test_the_same_cells_on_both_sides_are_refused(pbmc3k_sess, tmp_path, capsys):
    """PBMC3k counts against the same cells log-normalized (shuffled: not a byte copy) or a
    subset of them are refused before anything is written, from files and in memory."""
    import scanpy as sc

    from tests.conftest import run_cli_in_process

    counts = pbmc3k_sess[::10].copy()  # 264 cells
    lognorm = counts[::-1].copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    counts.write_h5ad(tmp_path / "pbmc3k.h5ad")
    lognorm.write_h5ad(tmp_path / "lognorm.h5ad")
    runs = tmp_path / "runs"
    fix = (
        "; a transfer needs two different datasets (score one dataset on its own held-out "
        "cells with scfmbench run)."
    )
    args = ["transfer", "--train", str(tmp_path / "pbmc3k.h5ad"), "--out", str(runs), "-q"]
    args += ["--min-cells-per-class", "1"]  # 264 cells: DC and Platelet are small
    code, out, err = run_cli_in_process([*args, "--test", str(tmp_path / "lognorm.h5ad")], capsys)
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        f"error: pbmc3k and lognorm share 264 of their 264 cells (the same obs_names and expressed "
        f"genes){fix}"
    ]
    assert not runs.exists()
    part = counts[:133].copy()  # a subset, one cell renamed: counted on the smaller side
    part.obs_names = [*part.obs_names[:-1], "other-1"]
    part.write_h5ad(tmp_path / "part.h5ad")
    code, out, err = run_cli_in_process([*args, "--test", str(tmp_path / "part.h5ad")], capsys)
    assert (code, err.strip()) == (
        2,
        "error: pbmc3k and part share 132 of the 133 cells of part (the same obs_names and "
        f"expressed genes){fix}",
    )
    assert not runs.exists()
    with pytest.raises(DataError) as raised:  # in memory: the sides are named by their role
        transfer(counts, lognorm, out=runs, min_cells_per_class=1, progress=False)
    assert str(raised.value) == (
        f"train and test share 264 of their 264 cells (the same obs_names and expressed genes){fix}"
    )
    assert not runs.exists()


def test_a_chance_overlap_of_cell_names_passes(pbmc3k_sess, kang_path):
    """10x barcodes collide by chance between unrelated datasets: PBMC3k and Kang 2018 share
    one; a transfer is refused only above SHARED_CELLS_LIMIT of the smaller side's cells."""
    from scfmbench.benchmark.transfer_data import SHARED_CELLS_LIMIT, check_distinct_cells

    pbmc, kang = validate(pbmc3k_sess), validate(ad.read_h5ad(kang_path))
    assert pbmc.adata.obs_names.isin(kang.adata.obs_names).sum() == 1
    check_distinct_cells([("pbmc3k", pbmc), ("kang", kang)])
    assert SHARED_CELLS_LIMIT == 0.5
    a = validate(make_tiny_adata(), min_cells_per_class=1)  # 60 cells: cell0 .. cell59
    other = make_tiny_adata(seed=1, cells="other")
    other.obs_names = [f"cell{i}" if i < 30 else name for i, name in enumerate(other.obs_names)]
    check_distinct_cells([("a", a), ("b", validate(other, min_cells_per_class=1))])  # half
    other.obs_names = [f"cell{i}" if i < 31 else name for i, name in enumerate(other.obs_names)]
    check_distinct_cells([("a", a), ("b", validate(other, min_cells_per_class=1))])  # other cells
    same = make_tiny_adata()  # a's own cells under 31 of their names
    same.obs_names = [name if i < 31 else f"other{i}" for i, name in enumerate(same.obs_names)]
    with pytest.raises(DataError, match=r"^a and b share 31 of their 60 cells "):
        check_distinct_cells([("a", a), ("b", validate(same, min_cells_per_class=1))])
    # row numbers as names ("0", "1", …) are shared by unrelated files: their genes differ
    numbered = [make_tiny_adata(seed=seed) for seed in (0, 1)]
    for adata in numbered:
        adata.obs_names = [str(i) for i in range(adata.n_obs)]
    first, second = (validate(adata, min_cells_per_class=1) for adata in numbered)
    check_distinct_cells([("first", first), ("second", second)])
