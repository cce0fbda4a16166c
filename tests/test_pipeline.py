import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import scfmbench
from scfmbench import ConfigError, RunConfig
from scfmbench.data.splits import load_splits


def strip_timings(path):
    doc = json.loads(path.read_text())
    doc.pop("timings")
    return doc


def test_run_writes_directory_and_is_deterministic(tmp_path, tiny_adata):
    first = scfmbench.run(tiny_adata, out=tmp_path / "1", name="a", progress=False, figures=False)
    second = scfmbench.run(tiny_adata, out=tmp_path / "2", name="a", progress=False, figures=False)
    for name in ("config.yaml", "metrics.json", "results.md", "splits/splits.json"):
        assert (first.run_dir / name).exists()
    assert strip_timings(first.run_dir / "metrics.json") == strip_timings(
        second.run_dir / "metrics.json"
    )
    table = first.table
    assert list(table.index) == [
        "hvg+logreg",
        "pca+logreg",
        "pca+xgboost",
        "majority",
        "scvi+logreg",
        "scvi+xgboost",
        "scvi+knn",
    ]
    # tiny data has strong markers: every real method beats the floor by far
    assert table.loc["hvg+logreg", "accuracy"] == pytest.approx(1.0)
    assert table.loc["majority", "accuracy"] == pytest.approx(2 / 6)


def test_rerun_reuses_stages(tmp_path, tiny_adata):
    first = scfmbench.run(tiny_adata, out=tmp_path, name="r", progress=False, figures=False)
    stage = first.run_dir / "stages" / "predict_pca__xgboost_seed42.json"
    stamp = stage.stat().st_mtime_ns
    second = scfmbench.run(tiny_adata, out=tmp_path, name="r", progress=False, figures=False)
    assert stage.stat().st_mtime_ns == stamp
    assert not any(k.startswith("probe:") for k in second.metrics["timings"])
    assert second.metrics["methods"] == first.metrics["methods"]


def test_rerun_with_fewer_methods_keeps_only_its_own_figures(tmp_path, tiny_adata):
    """A method dropped on a rerun in the same folder leaves no figure behind."""
    options = {"out": tmp_path, "name": "f", "n_splits": 2, "progress": False, "n_jobs": 1}
    first = scfmbench.run(tiny_adata, baselines=["pca+logreg", "hvg+logreg"], **options)
    figures = first.run_dir / "figures"
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "confusion_hvg__logreg.png",
        "confusion_pca__logreg.png",
        "forest_macro_f1.png",
        "umap_pca.png",
    ]
    second = scfmbench.run(tiny_adata, baselines=["pca+logreg"], **options)
    # one method: nothing to compare, so no forest plot either
    assert sorted(p.name for p in figures.glob("*.png")) == [
        "confusion_pca__logreg.png",
        "umap_pca.png",
    ]
    assert list(second.metrics["methods"]) == ["pca+logreg"]


def test_rerun_without_a_model_or_sweep_keeps_only_its_own_figures(tmp_path, pbmc3k, shared_dir):
    """Every figure the rerun does not draw goes (a model's layer curve, the label-efficiency
    curves), while the figures' stage records stay for reuse; a run without figures keeps
    none of an earlier run's."""
    from tests._geneformer_factory import write_checkpoint

    folder, _ = write_checkpoint(tmp_path / "gf", shared_dir, version="V2")
    options = {
        "out": tmp_path / "runs",
        "name": "f",
        "n_splits": 2,
        "baselines": ["pca+logreg"],
        "probes": ["logreg"],
        "min_cells_per_class": 10,
        "progress": False,
        "n_jobs": 1,
    }
    data = pbmc3k[:300].copy()
    first = scfmbench.run(
        data,
        models=[f"geneformer-random={folder}"],
        train_sizes=[5, "all"],
        train_size_seeds=1,
        **options,
    )
    figures = first.run_dir / "figures"
    assert sorted(p.name for p in figures.glob("*")) == [
        "confusion_geneformer-random__logreg.png",
        "confusion_pca__logreg.png",
        "forest_macro_f1.png",
        "label_efficiency.png",
        "layers_geneformer-random.png",
        "umap_geneformer-random.png",
        "umap_pca.png",
    ]
    records = sorted(p.name for p in (first.run_dir / "stages").glob("figure_*.json"))
    assert records == [
        "figure_confusion_geneformer-random__logreg.json",
        "figure_confusion_pca__logreg.json",
        "figure_forest_macro_f1.json",
    ]

    scfmbench.run(data, **options)
    assert sorted(p.name for p in figures.glob("*")) == [
        "confusion_pca__logreg.png",
        "umap_pca.png",
    ]
    assert sorted(p.name for p in (first.run_dir / "stages").glob("figure_*.json")) == records
    report = scfmbench.write_report(first.run_dir).read_text()
    assert "layers_" not in report and "label_efficiency.png" not in report

    scfmbench.run(data, figures=False, **options)
    assert sorted(p.name for p in figures.glob("*")) == []


def test_metrics_schema(tmp_path, tiny_adata, caplog):
    result = scfmbench.run(
        tiny_adata, out=tmp_path, name="s", n_splits=2, progress=False, figures=False
    )
    doc = json.loads((result.run_dir / "metrics.json").read_text())
    assert doc["schema_version"] == "2.3"
    assert doc["run"]["seeds"] == [42, 43]  # two folds of stratified cross-validation
    assert doc["run"]["design"]["name"] == "cv" and doc["run"]["design"]["n_folds"] == 2
    entry = doc["methods"]["pca+logreg"]
    assert set(entry["splits"]) == {"42", "43"}
    split = entry["splits"]["42"]
    assert split["n_test"] == 30  # disjoint test folds: every one of the 60 cells once
    assert entry["splits"]["43"]["n_test"] == 30
    assert np.asarray(split["confusion"]["matrix"]).sum() == 30
    assert set(split["per_class"]["type_0"]) == {"precision", "recall", "f1", "support"}
    assert {"balanced_accuracy", "macro_f1_excl_small"} <= set(entry["summary"])
    # every C from 1e-4 up separates the tiny data: the first (an edge of the grid) is kept
    assert split["params"] == {"C": 1e-4} and split["on_grid_edge"] is True
    # what the features were built from: 40 genes (fewer than n_hvg), and PCs capped by the
    # training cells (n_train − 1 < 50 asked)
    n_train = len(
        load_splits(result.run_dir / "splits", tiny_adata.obs["cell_type"]).splits[0].train
    )
    assert split["features"] == {"n_genes": 40, "n_pcs": min(50, n_train - 1, 40)}
    assert doc["methods"]["hvg+logreg"]["splits"]["42"]["features"] == {"n_genes": 40}
    assert doc["methods"]["majority"]["splits"]["42"]["features"] == {}
    assert (
        "warning: pca+logreg: the probe's best validation setting is on the edge of its grid "
        "in 2 of 2 splits (C=0.0001 in 2); a wider grid might score better."
    ) in caplog.text
    assert len(entry["summary"]["accuracy"]["values"]) == 2
    assert doc["methods"]["hvg+logreg"]["delta_vs_reference"]["accuracy"]["abs"] == 0.0
    assert doc["diagnostics"]["matrix_kind"] == "counts"


def test_unknown_config_key_did_you_mean(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("n_split: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_split'. Did you mean 'n_splits'"):
        RunConfig.from_yaml(path)


def test_unknown_probe_did_you_mean(tiny_adata, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^baseline 'pca\+logreq' of baselines: unknown probe 'logreq'.*Did you mean "
        "'logreg'",
    ):
        scfmbench.run(tiny_adata, out=tmp_path, baselines=["pca+logreq"], progress=False)
    assert not (tmp_path / "run").exists()


def test_pbmc3k_baselines(tmp_path, pbmc3k_path):
    result = scfmbench.run(
        pbmc3k_path,
        out=tmp_path,
        name="pbmc3k",
        design="study",  # the study's single random 80/10/10 split
        n_splits=1,
        progress=False,
        figures=False,
    )
    table = result.table
    # log-normalized HVGs + logistic regression is far above the study's frozen Geneformer
    assert table.loc["hvg+logreg", "accuracy"] > 0.85
    assert table.loc["pca+logreg", "macro_f1"] > 0.85
    assert table.loc["scvi+logreg", "macro_f1"] > 0.85  # the default scVI baseline (0.934)
    assert table.loc["majority", "accuracy"] == pytest.approx(70 / 263)
    assert result.metrics["methods"]["hvg+logreg"]["splits"]["42"]["n_test"] == 263


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "scfmbench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_end_to_end(tmp_path):
    done = run_cli("run", "--out", str(tmp_path), "--name", "demo", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "demo"
    for name in (
        "metrics.json",
        "results.md",
        "figures/umap_pca.png",
        "figures/confusion_pca__xgboost.png",
        "splits/split_seed42.tsv",
    ):
        assert (run_dir / name).exists(), name
    assert "| hvg+logreg | baseline |" in done.stdout
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["diagnostics"]["matrix_source"] == "raw.X"
    results = (run_dir / "results.md").read_text()
    summary = doc["methods"]["pca+logreg"]["summary"]["accuracy"]
    assert doc["run"]["seeds"] == [42, 43, 44, 45, 46]  # five splits by default
    assert f"| pca+logreg | baseline | {summary['mean']:.3f} ± {summary['sd']:.3f} |" in results


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--label-key", "celltype"], "adata.obs has no column 'celltype'"),
        (["run", "--data", "missing.h5ad"], "does not exist"),
        (["validate", "notes.txt"], "is not an .h5ad file"),
        (["run", "--model", "genformer=x"], "unknown model 'genformer'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message, capsys, monkeypatch):
    from tests.conftest import run_cli_in_process

    (tmp_path / "notes.txt").write_text("not data")
    monkeypatch.chdir(tmp_path)  # cli.main in this process: no interpreter start per case
    extra = ["--out", str(tmp_path / "runs")] if args[0] == "run" else []
    code, _, stderr = run_cli_in_process([*args, *extra], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()


def test_cli_validate_report(pbmc3k_path, tmp_path):
    done = run_cli("validate", str(pbmc3k_path), cwd=tmp_path)
    assert done.returncode == 0
    assert "expression: adata.X holds raw integer counts" in done.stdout
    assert "gene identifiers: symbol" in done.stdout
    assert "  Platelet: 14" in done.stdout


@pytest.mark.parametrize(
    ("name", "kind", "settings", "refused"),
    [
        ("geneformer", "counts", {}, False),
        ("geneformer", "corrected", {}, False),
        ("geneformer", "lognorm", {}, True),
        ("geneformer", "normalized", {"allow_normalized": True}, False),
        ("scfoundation", "lognorm", {}, True),
        ("scfoundation", "lognorm", {"allow_normalized": True}, False),
        ("scfoundation", "lognorm", {"pre_normalized": "T"}, False),
        ("scfoundation", "lognorm", {"pre_normalized": "A"}, False),
        ("scfoundation", "lognorm", {"pre_normalized": "F", "allow_normalized": True}, True),
        ("scfoundation", "counts", {"pre_normalized": "F"}, False),
        ("scfoundation", "counts", {"pre_normalized": "T"}, True),
        ("scfoundation", "counts", {"pre_normalized": "A"}, True),
        ("scfoundation", "normalized", {"pre_normalized": "T"}, True),
        ("scfoundation", "normalized", {"allow_normalized": True}, True),
        ("scgpt", "lognorm", {}, False),
        ("scgpt", "normalized", {}, False),
    ],
)
def test_each_model_refuses_a_matrix_kind_as_its_tokenizer_does(name, kind, settings, refused):
    """The loader's check, made before any checkpoint is read, against the tokenizer's own
    refusal of a matrix of that kind (the oracle: tokenize a tiny matrix of it)."""
    from scfmbench.data.matrix import classify_matrix, require_counts
    from scfmbench.errors import CountsRequiredError
    from scfmbench.models import MODELS, LoadContext
    from scfmbench.models.scfoundation.tokenizer import resolve_mode

    counts = np.array([[30.0, 0.0, 10.0], [0.0, 20.0, 90.0]])
    matrix = {
        "counts": counts,
        "corrected": counts * 1.5 + 0.25 * (counts > 0),
        "normalized": counts / counts.sum(1, keepdims=True) * 1e4,
        "lognorm": np.log1p(counts / counts.sum(1, keepdims=True) * 1e4),
    }[kind]
    assert classify_matrix(matrix) == kind
    allow = settings.get("allow_normalized", False)
    context = LoadContext(allow_normalized=allow)
    options = {k: v for k, v in settings.items() if k != "allow_normalized"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refusal = None
        try:  # what the tokenizer does with the matrix itself
            if name == "geneformer":
                require_counts(matrix, model=name, allow_normalized=allow, where="adata.X")
            elif name == "scfoundation":
                resolve_mode(
                    classify_matrix(matrix),
                    options.get("pre_normalized"),
                    allow_normalized=allow,
                    where="adata.X",
                )
        except CountsRequiredError as exc:
            refusal = str(exc)
        assert (refusal is not None) is refused
        loader = MODELS.get(name)
        obs = pd.DataFrame({"total_counts": [40.0, 110.0]})  # scFoundation's mode A reads it
        if refused:
            with pytest.raises(CountsRequiredError) as caught:
                loader.check_matrix_kind(kind, context, options, where="adata.X", obs=obs)
            assert str(caught.value) == refusal
        else:
            loader.check_matrix_kind(kind, context, options, where="adata.X", obs=obs)


def test_model_options_are_checked_against_the_loader():
    from scfmbench.benchmark.embedding import load_context
    from scfmbench.models import MODELS, LoadContext

    config = RunConfig.build(
        {"gene_column": "gene_ids", "model_options": {"scgpt": {"max_seq_len": 5}}}
    )
    context = load_context(config)
    assert context == LoadContext(seed=42, gene_column="gene_ids", allow_normalized=False)
    loader = MODELS.get("scgpt")
    scoped, options = loader.split_options(config.model_options["scgpt"], context)
    assert scoped == context and options.max_seq_len == 5
    scoped, _ = loader.split_options({"seed": 3}, context)  # a run-wide setting for one model
    assert scoped.seed == 3 and scoped.gene_column == "gene_ids"
    # unknown keys are refused when the config is built (tests/test_early_checks.py) and,
    # for a config made without validation, when the model is loaded
    bad = RunConfig.model_construct(model_options={"scgpt": {"max_seq_lem": 5}})
    with pytest.raises(
        ConfigError, match="unknown option 'max_seq_lem'.*Did you mean 'max_seq_len'"
    ):
        loader.split_options(bad.model_options["scgpt"], context)


def test_each_baseline_representation_is_built_once_per_split(tmp_path, tiny_adata, monkeypatch):
    from scfmbench.evaluation.representations import REPRESENTATIONS, pca_features

    calls = []

    def counted(cells, split, **options):
        calls.append(split.seed)
        return pca_features(cells, split, **options)

    monkeypatch.setitem(REPRESENTATIONS._entries, "pca", counted)
    result = scfmbench.run(tiny_adata, out=tmp_path, n_splits=2, figures=False, progress=False)
    assert {"pca+logreg", "pca+xgboost"} <= set(result.metrics["methods"])
    assert calls == [42, 43]  # pca+logreg and pca+xgboost share one PCA per split


def test_score_warnings_travel_with_model_methods():
    from types import SimpleNamespace

    from scfmbench.benchmark.document import score_warnings
    from scfmbench.benchmark.methods import Method

    config = RunConfig.build({"allow_normalized": True})
    diagnostics = SimpleNamespace(matrix_kind="lognorm", n_genes=2000, all_highly_variable=False)
    info = {"geneformer": {"fraction_counts": 0.61, "n_dropped_cells": 3}}
    frozen = Method("geneformer+logreg", "geneformer", "logreg", "frozen", "geneformer")
    found = score_warnings(frozen, config, diagnostics, info)
    assert found == [
        "ran on lognorm input, not raw counts (--allow-normalized)",
        "only 2000 genes (fewer than 5,000): a feature-selected matrix; geneformer ranks each "
        "cell's genes among far fewer genes than in pretraining (allowed by "
        "--allow-feature-selected)",
        "vocabulary genes hold 61% of the counts (< 80%)",
        "3 cells had no vocabulary gene and count as wrong for this model only",
    ]
    baseline = Method("pca+logreg", "pca", "logreg", "baseline")
    assert score_warnings(baseline, config, diagnostics, info) == []
    clean = SimpleNamespace(matrix_kind="counts", n_genes=20000, all_highly_variable=False)
    info = {"geneformer": {"fraction_counts": 0.9}}
    assert score_warnings(frozen, RunConfig(), clean, info) == []
    # corrected counts are used as counts without the flag: no --allow-normalized warning
    corrected = SimpleNamespace(matrix_kind="corrected", n_genes=20000, all_highly_variable=False)
    assert score_warnings(frozen, config, corrected, info) == []
    # allow_normalized given for one model only (model_options) warns for that model's rows
    lognorm = SimpleNamespace(matrix_kind="lognorm", n_genes=20000, all_highly_variable=False)
    one = RunConfig.build({"model_options": {"geneformer": {"allow_normalized": True}}})
    control = Method(
        "geneformer-random+logreg", "geneformer-random", "logreg", "control", "geneformer-random"
    )
    assert score_warnings(control, one, lognorm, info) == [
        "ran on lognorm input, not raw counts (--allow-normalized)"
    ]
    off = RunConfig.build({"allow_normalized": True, "model_options": {"scgpt": {"seed": 3}}})
    scgpt = Method("scgpt+logreg", "scgpt", "logreg", "frozen", "scgpt")
    assert score_warnings(scgpt, off, lognorm, {}) == [
        "ran on lognorm input, not raw counts (--allow-normalized)"
    ]


def test_logreg_grid_follows_design_and_config():
    from scfmbench.benchmark.predict import probe_grid
    from scfmbench.evaluation.probes import PROBES

    wide = [p["C"] for p in PROBES.get("logreg").grid]
    assert wide == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100, 1000])
    assert probe_grid("logreg", RunConfig()) is None  # the registered wide grid
    study = probe_grid("logreg", RunConfig(design="study"))
    assert study == ({"C": 0.01}, {"C": 0.1}, {"C": 1.0})  # the study's numbers reproduced
    chosen = probe_grid("logreg", RunConfig(logreg_c=[0.5, 2]))
    assert chosen == ({"C": 0.5}, {"C": 2.0})
    assert probe_grid("knn", RunConfig(design="study")) is None
