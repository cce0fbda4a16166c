"""Feature-selected count matrices (issue 18 item 7): refused for geneformer and scgpt unless
--allow-feature-selected, listed by validate, and the allowed warning travels with the scores."""

from __future__ import annotations

import html
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import scfmbench
from scfmbench.errors import DataError
from tests._geneformer_factory import write_checkpoint
from tests.conftest import make_tiny_adata, run_cli_in_process

REFUSAL = (
    "error: the count matrix (adata.X) has only 2000 genes (fewer than 5,000), a "
    "feature-selected subset, but geneformer ranks each cell's genes relative to the other "
    "genes present and it was pretrained on whole transcriptomes (about 12,000 genes of a PBMC "
    "count matrix match the vocabulary); give the full count matrix (e.g. adata.raw, or the "
    "data before sc.pp.highly_variable_genes(subset=True)) or pass --allow-feature-selected "
    "(allow_feature_selected: true) to run anyway."
)
ALLOWED = (
    "only 2000 genes (fewer than 5,000): a feature-selected matrix; geneformer ranks each "
    "cell's genes among far fewer genes than in pretraining (allowed by --allow-feature-selected)"
)
QUICK = {
    "baselines": ["majority", "pca+logreg"],
    "probes": ["logreg"],
    "layerwise": False,
    "figures": False,
    "random_controls": False,
    "design": "study",
    "n_splits": 1,
    "min_cells_per_class": 5,
}


@pytest.fixture(scope="module")
def hvg_file(tmp_path_factory, pbmc3k_path) -> Path:
    """Every 8th PBMC3k cell, raw counts of the 2,000 highly variable genes (the study's
    set-up: ``sc.pp.highly_variable_genes(subset=True)`` on the counts' lognorm copy)."""
    import scanpy as sc

    counts = ad.read_h5ad(pbmc3k_path)[::8].copy()
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, n_top_genes=2000, flavor="seurat", subset=True)
    selected = counts[:, lognorm.var_names].copy()
    selected.var["highly_variable"] = True
    path = tmp_path_factory.mktemp("hvg") / "pbmc_hvg.h5ad"
    selected.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def gf_dir(tmp_path_factory, shared_dir) -> Path:
    directory, _ = write_checkpoint(tmp_path_factory.mktemp("gf") / "gf", shared_dir)
    return directory


@pytest.fixture(scope="module")
def quick_yaml(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "quick.yaml"
    path.write_text(yaml.safe_dump(QUICK))
    return path


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_run_refuses_hvg_counts_before_loading_or_writing(hvg_file, gf_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["run", "--data", str(hvg_file), "--model", f"geneformer={gf_dir}", "--out", str(out)]
    code, _, err = run_cli_in_process([*args, "-q"], capsys)
    assert code == 2 and _error_lines(err) == [REFUSAL] and "Traceback" not in err
    assert not out.exists()
    # both rank- and bin-based models named; scgpt's folder is empty: refused before loading
    (tmp_path / "none").mkdir()
    code, _, err = run_cli_in_process([*args, "--model", f"scgpt={tmp_path / 'none'}"], capsys)
    (line,) = _error_lines(err)
    assert code == 2 and not out.exists()
    assert (
        "but geneformer ranks each cell's genes and scgpt bins each cell's values relative to "
        "the other genes present and they were pretrained" in line
    )


def test_embed_refuses_before_loading_the_model(hvg_file, tmp_path, capsys):
    npy = tmp_path / "e.npy"
    args = ["embed", str(hvg_file), "--out", str(npy), "-q"]
    (tmp_path / "none").mkdir()  # an empty folder: loading it would fail, refusing comes first
    code, _, err = run_cli_in_process([*args, "--model", f"scgpt={tmp_path / 'none'}"], capsys)
    (line,) = _error_lines(err)
    assert code == 2 and not npy.exists()
    assert line.startswith("error: the count matrix (adata.X) has only 2000 genes")
    assert "scgpt bins each cell's values" in line
    # scFoundation reads fixed gene positions: not refused, so the empty folder is the error
    code, _, err = run_cli_in_process(
        [*args, "--model", f"scfoundation={tmp_path / 'none'}"], capsys
    )
    (line,) = _error_lines(err)
    assert code == 2 and "feature-selected" not in line and "none" in line


def test_allowed_embed_keeps_the_warning(hvg_file, gf_dir, tmp_path, capsys, caplog):
    """In memory and streamed, the .h5ad records the warning and the same info."""
    warning = (
        "the count matrix (adata.X) has only 2000 genes (fewer than 5,000), a feature-selected "
        "subset; running geneformer on it anyway because --allow-feature-selected is set — "
        "scores are not comparable to the published models"
    )
    infos = {}
    for backed in ("--no-backed", "--backed"):
        out = tmp_path / f"e{backed}.h5ad"
        caplog.clear()
        code, _, err = run_cli_in_process(
            ["embed", str(hvg_file), "--model", f"geneformer={gf_dir}", "--out", str(out)]
            + ["--device", "cpu", "--allow-feature-selected", backed, "-q"],
            capsys,
        )
        assert code == 0, err
        assert warning in caplog.text
        embedded = ad.read_h5ad(out)
        info = embedded.uns["X_geneformer_info"]
        assert list(info["warnings"]) == [warning]
        assert embedded.obsm["X_geneformer"].shape[0] == embedded.n_obs
        assert info["tokenizer"]["tokenizer"] == "geneformer"
        assert info["tokenizer"]["gene_column"] == "gene_ids"
        assert info["genes"]["n_genes"] == 2000
        infos[backed] = info
    streamed = dict(infos["--backed"])
    assert streamed.pop("chunk_size") == 2048
    assert repr(streamed) == repr(dict(infos["--no-backed"]))


def test_allowed_run_carries_the_warning(hvg_file, gf_dir, quick_yaml, tmp_path, capsys, caplog):
    out = tmp_path / "runs"
    code, _, err = run_cli_in_process(
        [
            "run",
            "--data",
            str(hvg_file),
            "--model",
            f"geneformer={gf_dir}",
            "--config",
            str(quick_yaml),
            "--out",
            str(out),
            "--allow-feature-selected",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert "running geneformer on it anyway because --allow-feature-selected is set" in caplog.text
    run_dir = out / "pbmc_hvg"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["diagnostics"]["all_highly_variable"] is True
    assert metrics["diagnostics"]["n_genes"] == 2000
    methods = metrics["methods"]
    assert methods["geneformer+logreg"]["warnings"] == [ALLOWED]
    assert "warnings" not in methods["pca+logreg"] and "warnings" not in methods["majority"]
    lines = (run_dir / "results.md").read_text().splitlines()
    headline = {line.split(" | ")[0]: line for line in lines if " | frozen | " in line}
    headline.update({line.split(" | ")[0]: line for line in lines if " | baseline | " in line})
    assert headline["| geneformer+logreg"].endswith(f"| {ALLOWED} |")
    assert headline["| pca+logreg"].endswith("| — |")
    assert ALLOWED in html.unescape((run_dir / "report.html").read_text())


def test_baseline_only_run_is_unaffected(hvg_file, quick_yaml, tmp_path, capsys, caplog):
    out = tmp_path / "runs"
    args = ["run", "--data", str(hvg_file), "--config", str(quick_yaml), "--out", str(out), "-q"]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 0, err
    assert "feature-selected" not in err + caplog.text
    metrics = json.loads((out / "pbmc_hvg" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"majority", "pca+logreg"}
    assert not any("warnings" in entry for entry in metrics["methods"].values())


def test_validate_stops_with_the_refusal(hvg_file, tmp_path, capsys):
    """`validate --model` stops where `run` would (exit 2, run's line), for a feature-selected
    matrix and for log-normalized values; without a model it lists the problem."""
    import scanpy as sc

    code, out, err = run_cli_in_process(
        ["validate", str(hvg_file), "--model", "geneformer"], capsys
    )
    assert code == 2 and err.strip().splitlines() == [REFUSAL], err
    code, out, err = run_cli_in_process(
        ["validate", str(hvg_file), "--model", "scfoundation"], capsys
    )  # not refused: listed
    assert (
        code == 0
        and (
            "  - the count matrix (adata.X) has only 2000 genes (fewer than 5,000), a "
            "feature-selected subset; scfoundation sees far fewer genes than in pretraining"
        )
        in out.splitlines()
    ), err
    lognorm = ad.read_h5ad(hvg_file)
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    lognorm.write_h5ad(tmp_path / "lognorm.h5ad")
    args = ["validate", str(tmp_path / "lognorm.h5ad"), "--allow-feature-selected", "--model"]
    code, _, err = run_cli_in_process([*args, "geneformer"], capsys)
    assert code == 2 and err.startswith(
        "error: geneformer needs raw integer counts but adata.X holds log-normalized values"
    ), err
    facts = "  - no raw integer counts found; using lognorm values from adata.X"
    hint = (
        "  - count-based models refuse lognorm values unless --allow-normalized is given (name "
        "a model with --model to check it)"
    )
    code, out, err = run_cli_in_process([*args, "scgpt"], capsys)  # scGPT reads them
    assert code == 0 and facts in out.splitlines() and "--allow-normalized" not in out, err
    code, out, err = run_cli_in_process([*args, "geneformer", "--allow-normalized"], capsys)
    problems = out.splitlines()
    assert code == 0 and facts in problems and hint not in problems, err
    assert (
        "  - geneformer expects raw counts but adata.X holds log-normalized values (log-scale: "
        "non-integer, max ≤ 50); proceeding because allow_normalized is set — results are not "
        "comparable to the published model."
    ) in problems  # what the named model would run with, as for a feature-selected matrix
    code, out, err = run_cli_in_process(args[:-1], capsys)  # no model named
    assert code == 0 and facts in out.splitlines() and hint in out.splitlines(), err
    code, out, err = run_cli_in_process([*args[:-1], "--allow-normalized"], capsys)
    problems = out.splitlines()
    assert code == 0 and facts in problems and hint not in problems, err
    assert (
        "  - count-based models run on lognorm values with a warning, since allow_normalized "
        "is set; their scores are not comparable to the published models (name a model with "
        "--model to check it)"
    ) in problems
    code, out, _ = run_cli_in_process(
        ["validate", str(hvg_file), "--model", "scgpt", "--allow-feature-selected", "--json"],
        capsys,
    )
    assert code == 0
    assert (
        "the count matrix (adata.X) has only 2000 genes (fewer than 5,000), a feature-selected "
        "subset; running scgpt on it anyway because --allow-feature-selected is set — scores "
        "are not comparable to the published models"
    ) in json.loads(out)["warnings"]
    code, out, _ = run_cli_in_process(["validate", str(hvg_file)], capsys)
    assert code == 0
    assert (
        "  - the count matrix (adata.X) has only 2000 genes (fewer than 5,000), a "
        "feature-selected subset: geneformer and scgpt refuse it unless --allow-feature-selected "
        "is given (name a model with --model to check it)"
    ) in out.splitlines()
    code, _, err = run_cli_in_process(["validate", str(hvg_file), "--model", "genformer"], capsys)
    assert code == 2 and "unknown model 'genformer'" in err


def _all_hvg(n_genes: int) -> ad.AnnData:
    adata = make_tiny_adata(n_per_class=12, n_genes=n_genes)
    adata.var["highly_variable"] = True
    return adata


def test_all_highly_variable_is_refused_above_the_gene_threshold(tmp_path):
    adata = _all_hvg(6000)
    with pytest.raises(DataError) as caught:  # refused before the (empty) folder is loaded
        scfmbench.run(adata, out=tmp_path / "runs", models=[f"scgpt={tmp_path}"], progress=False)
    assert str(caught.value).startswith(
        "the count matrix (adata.X) has 6000 genes, all flagged var['highly_variable'], a "
        "feature-selected subset, but scgpt bins each cell's values"
    )
    assert not (tmp_path / "run").exists()
    # the streamed reader sees the same flag
    from scfmbench.data.backed import validate_backed

    path = tmp_path / "hvg.h5ad"
    adata.write_h5ad(path)
    backed = validate_backed(path, label_key="cell_type", min_cells_per_class=5, chunk_size=16)
    assert backed.diagnostics.all_highly_variable and backed.diagnostics.n_genes == 6000
    backed.close()


def test_full_counts_in_raw_are_not_feature_selected():
    from scfmbench.data.validate import validate

    full = make_tiny_adata(n_per_class=12, n_genes=6000)
    selected = full[:, :2000].copy()
    selected.X = np.log1p(selected.X)  # lognorm HVGs in X, counts of every gene in .raw
    selected.var["highly_variable"] = True
    selected.raw = full
    checked = validate(selected, min_cells_per_class=5)
    diag = checked.diagnostics
    assert (diag.matrix_source, diag.n_genes, diag.all_highly_variable) == ("raw.X", 6000, False)
    flagged = full.copy()
    flagged.var["highly_variable"] = [True] * 5999 + [False]
    assert not validate(flagged, min_cells_per_class=5).diagnostics.all_highly_variable


def test_yaml_field_allows_with_a_warning(tmp_path):
    from scfmbench.benchmark.document import score_warnings
    from scfmbench.benchmark.embedding import check_run_feature_selection
    from scfmbench.benchmark.methods import Method
    from scfmbench.config import RunConfig
    from scfmbench.data.validate import validate

    (tmp_path / "run.yaml").write_text(
        f"allow_feature_selected: true\nmodels: [scgpt={tmp_path}]\n"
    )
    config = RunConfig.from_yaml(tmp_path / "run.yaml")
    diag = validate(_all_hvg(6000), min_cells_per_class=5).diagnostics
    assert check_run_feature_selection(config, diag) == (
        "the count matrix (adata.X) has 6000 genes, all flagged var['highly_variable'], a "
        "feature-selected subset; running scgpt on it anyway because --allow-feature-selected "
        "is set — scores are not comparable to the published models"
    )
    method = Method("scgpt-random+logreg", "scgpt-random", "logreg", "control", "scgpt-random")
    assert score_warnings(method, config, diag, {}) == [
        "6000 genes, all flagged var['highly_variable']: a feature-selected matrix; scgpt bins "
        "each cell's values among far fewer genes than in pretraining (allowed by "
        "--allow-feature-selected)"
    ]
    # scFoundation is not refused; its scores still carry the warning
    config = RunConfig(models=[f"scfoundation={tmp_path}"])
    assert check_run_feature_selection(config, diag) is None
    method = Method("scfoundation+logreg", "scfoundation", "logreg", "frozen", "scfoundation")
    assert score_warnings(method, config, diag, {}) == [
        "6000 genes, all flagged var['highly_variable']: a feature-selected matrix; the model "
        "sees far fewer genes than in pretraining"
    ]


def test_transfer_refuses_the_shared_genes(pbmc3k_path, kang_path, tmp_path, capsys):
    args = ["transfer", "--train", str(pbmc3k_path), "--test", str(kang_path), "--one-way"]
    out = tmp_path / "runs"
    (tmp_path / "none").mkdir()  # an empty folder: the refusal comes before loading it
    code, _, err = run_cli_in_process(
        [*args, "--model", f"geneformer={tmp_path / 'none'}", "--out", str(out), "-q"], capsys
    )
    (line,) = _error_lines(err)
    assert code == 2 and not out.exists()
    kang = ad.read_h5ad(kang_path)
    shared = len(kang.var_names.intersection(ad.read_h5ad(pbmc3k_path).var_names))
    assert line.startswith(
        f"error: the count matrix of pbmc3k_seurat_labels_2638x13714_counts and "
        f"kang2018_ifnb_muscat_1556x1267_counts restricted to their shared genes has only "
        f"{shared} genes (fewer than 5,000), a feature-selected subset, but geneformer ranks"
    )


def test_allowed_transfer_carries_the_warning(
    pbmc3k_path, kang_path, gf_dir, quick_yaml, tmp_path, capsys
):
    ad.read_h5ad(pbmc3k_path)[::8].copy().write_h5ad(tmp_path / "pbmc.h5ad")
    kang = ad.read_h5ad(kang_path)[::4].copy()
    kang.write_h5ad(tmp_path / "kang.h5ad")
    out = tmp_path / "runs"
    code, _, err = run_cli_in_process(
        [
            "transfer",
            *("--train", str(tmp_path / "pbmc.h5ad"), "--test", str(tmp_path / "kang.h5ad")),
            *("--one-way", "--model", f"geneformer={gf_dir}", "--config", str(quick_yaml)),
            *("--out", str(out), "--name", "t", "--allow-feature-selected", "-q"),
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((out / "t" / "metrics.json").read_text())
    shared = doc["transfer"]["directions"]["pbmc->kang"]["n_shared_genes"]
    assert shared < 5000
    expected = (
        f"pbmc, kang: only {shared} genes (fewer than 5,000): a feature-selected matrix; "
        "geneformer ranks each cell's genes among far fewer genes than in pretraining "
        "(allowed by --allow-feature-selected)"
    )
    results = doc["transfer"]["matrix"]["pbmc"]["kang"]
    assert expected in results["geneformer+logreg"]["warnings"]
    assert "warnings" not in results["pca+logreg"]
    for page in ("transfer.md", "report.md", "report.html"):
        assert expected in html.unescape((out / "t" / page).read_text()), page
