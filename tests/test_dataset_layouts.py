"""Dataset layouts as published (CELLxGENE schema, Seurat conversions, 10x-style files) through
the CLI with default flags, and the model-input faults found on them (each a kind of error).

The files are converted here from the real PBMC3k and Kang 2018 data in ../shared; the models
are tiny checkpoints in the real formats with the real vocabularies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from scfmbench.data.matrix import expression_view
from scfmbench.data.validate import validate
from scfmbench.models import MODELS
from scfmbench.models.scgpt.network import ScGPTConfig, TransformerModel, to_flash_layout
from scfmbench.models.scgpt.tokenizer import load_scgpt_vocab
from tests._geneformer_factory import write_checkpoint
from tests._layouts import cellxgene, seurat, tenx
from tests.conftest import run_cli_in_process

PBMC3K = "data/pbmc3k_seurat_labels_2638x13714_counts.h5ad"
KANG = "data/kang2018_ifnb_muscat_1556x1267_counts.h5ad"
CLASSES = ["Naive CD4 T", "Memory CD4 T", "CD14+ Mono", "B"]
PER_CLASS = 30


def _subset(adata: ad.AnnData, classes: list[str], per_class: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(np.flatnonzero(adata.obs["cell_type"].astype(str) == c), per_class, False)
        for c in classes
    ]
    return adata[np.sort(np.concatenate(rows))].copy()


@pytest.fixture(scope="module")
def pbmc(shared_dir) -> ad.AnnData:
    return _subset(ad.read_h5ad(shared_dir / PBMC3K), CLASSES, PER_CLASS)


@pytest.fixture(scope="module")
def files(pbmc, tmp_path_factory) -> dict[str, Path]:
    """PBMC3k cells written in every layout."""
    root = tmp_path_factory.mktemp("layouts")
    layouts = {
        "cellxgene": cellxgene(pbmc),
        "seurat_scaled": seurat(pbmc, scaled=True),
        "seurat_counts_layer": seurat(pbmc, scaled=False, layer=True),
        "tenx": tenx(pbmc),
    }
    out = {}
    for name, adata in layouts.items():
        out[name] = root / f"{name}.h5ad"
        adata.write_h5ad(out[name])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_dir) -> dict[str, Path]:
    """Tiny Geneformer V2 and scGPT folders in the released formats."""
    root = tmp_path_factory.mktemp("models")
    gf, _ = write_checkpoint(root / "gf", shared_dir, version="V2")
    human = shared_dir / "vocab/scgpt/scGPT_human"
    scgpt = root / "scgpt"
    scgpt.mkdir()
    shutil.copy(human / "vocab.json", scgpt / "vocab.json")
    args = json.loads((human / "args.json").read_text())
    args.update(embsize=16, nheads=2, d_hid=32, nlayers=2)
    (scgpt / "args.json").write_text(json.dumps(args))
    torch.manual_seed(0)
    network = TransformerModel(
        ScGPTConfig.from_args(args, ntoken=len(load_scgpt_vocab(human / "vocab.json")))
    )
    torch.save(to_flash_layout(network.state_dict()), scgpt / "best_model.pt")
    return {"geneformer": gf, "scgpt": scgpt}


def _embed(capsys, data: Path, spec: str, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli_in_process(
        ["embed", str(data), "--model", spec, "--out", str(out), "--device", "cpu", "-q", *extra],
        capsys,
    )
    return code, err


def _embedded(path: Path, key: str) -> tuple[np.ndarray, dict]:
    adata = ad.read_h5ad(path)
    return adata.obsm[key], adata.uns[f"{key}_info"]["genes"]


# ---- validate and embed: each layout, default flags -------------------------------------------


@pytest.mark.parametrize(
    ("layout", "source", "ensembl", "symbol"),
    [
        ("cellxgene", "raw.X", "var_names", "feature_name"),
        ("seurat_scaled", "raw.X", None, "var_names"),
        ("seurat_counts_layer", "layers['counts']", None, "var_names"),
        ("tenx", "X", "gene_ids", "var_names"),
    ],
)
def test_validate_finds_the_counts_of_each_layout(files, capsys, layout, source, ensembl, symbol):
    code, out, _ = run_cli_in_process(["validate", str(files[layout]), "--json"], capsys)
    assert code == 0
    diag = json.loads(out)
    assert (diag["matrix_source"], diag["matrix_kind"]) == (source, "counts")
    assert diag["n_cells"] == len(CLASSES) * PER_CLASS and diag["n_genes"] == 13_714
    assert diag["gene_sources"] == {"ensembl": ensembl, "symbol": symbol}
    code, out, _ = run_cli_in_process(["validate", str(files[layout])], capsys)
    assert code == 0 and "symbols (scGPT, scFoundation): " in out


GENE_SOURCES = {  # layout → model → the identifiers it must read
    "cellxgene": {"geneformer": "var_names", "scgpt": "feature_name"},
    "seurat_scaled": {"geneformer": "var_names", "scgpt": "var_names"},
    "tenx": {"geneformer": "gene_ids", "scgpt": "var_names"},
}


@pytest.mark.parametrize("model", ["geneformer", "scgpt"])
def test_embed_gives_each_model_its_identifiers(files, models, tmp_path, capsys, model):
    matrices = {}
    for layout, sources in GENE_SOURCES.items():
        out = tmp_path / f"{layout}.h5ad"
        code, err = _embed(capsys, files[layout], f"{model}={models[model]}", out)
        assert code == 0, err
        matrices[layout], genes = _embedded(out, f"X_{model}")
        assert genes["gene_column"] == sources[model], layout
        assert genes["fraction_counts"] > 0.9
    # same counts and same identifiers after resolution → the same embeddings
    if model == "geneformer":  # Ensembl IDs from var_names (CELLxGENE) or var["gene_ids"]
        np.testing.assert_array_equal(matrices["cellxgene"], matrices["tenx"])
    else:  # symbols from var_names in both (feature_name holds the names before make.unique)
        np.testing.assert_array_equal(matrices["seurat_scaled"], matrices["tenx"])


def test_cellxgene_scfoundation_reads_feature_name(files, tmp_path, capsys, shared_dir):
    from tests._scfoundation_factory import write_checkpoint as write_scfoundation

    index = shared_dir / "vocab/scfoundation/OS_scRNA_gene_index.19264.tsv"
    write_scfoundation(tmp_path / "scf", pd.read_csv(index, sep="\t")["gene_name"].tolist())
    small = ad.read_h5ad(files["cellxgene"])[:6].copy()
    small.write_h5ad(tmp_path / "small.h5ad")
    code, err = _embed(
        capsys, tmp_path / "small.h5ad", f"scfoundation={tmp_path / 'scf'}", tmp_path / "out.h5ad"
    )
    assert code == 0, err
    matrix, genes = _embedded(tmp_path / "out.h5ad", "X_scfoundation")
    assert genes["gene_column"] == "feature_name" and matrix.shape == (6, 32)


# ---- run and transfer on CELLxGENE files --------------------------------------------------------


def _quick_config(path: Path, **values) -> Path:
    settings = {
        "n_splits": 1,
        "design": "study",
        "baselines": ["majority", "pca+logreg"],
        "probes": ["logreg"],
        "layerwise": False,
        "figures": False,
        "random_controls": False,
        "min_cells_per_class": 5,
        "n_pcs": 10,
        **values,
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def test_run_and_transfer_on_cellxgene_files(files, models, tmp_path, capsys, shared_dir):
    config = _quick_config(tmp_path / "run.yaml", models=[f"scgpt={models['scgpt']}"])
    code, err = _run(capsys, str(files["cellxgene"]), config, tmp_path / "runs", "cxg")
    assert code == 0, err
    doc = json.loads((tmp_path / "runs/cxg/metrics.json").read_text())
    scgpt = doc["diagnostics"]["models"]["scgpt"]
    assert scgpt["gene_column"] == "feature_name" and scgpt["n_matched"] > 11_000
    assert "scgpt+logreg" in doc["methods"]

    kang = _subset(ad.read_h5ad(shared_dir / KANG), ["CD4 T cells", "B cells"], 25, seed=1)
    cellxgene(kang).write_h5ad(tmp_path / "kang_cxg.h5ad")
    code, _, err = run_cli_in_process(
        [
            "transfer",
            "--train",
            str(files["cellxgene"]),
            "--test",
            str(tmp_path / "kang_cxg.h5ad"),
            "--one-way",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "tr",
            "--seed",
            "3",
            "--allow-feature-selected",  # the Kang 2018 subset holds 1,267 genes
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads((tmp_path / "runs/tr/metrics.json").read_text())
    results = doc["transfer"]["matrix"]["cellxgene"]["kang_cxg"]
    assert set(results) == {"majority", "pca+logreg", "scgpt+logreg"}
    assert any(
        "allowed by --allow-feature-selected" in w for w in results["scgpt+logreg"]["warnings"]
    )
    assert doc["run"]["seed"] == 3
    for dataset in ("cellxgene", "kang_cxg"):
        genes = doc["diagnostics"]["models"][f"scgpt ({dataset})"]
        assert genes["gene_column"] == "feature_name" and genes["n_matched"] > 1000
    report = (tmp_path / "runs/tr/report.md").read_text()
    assert "var['feature_name']" in report


# ---- model-input faults, each stopped with one line ---------------------------------------------


def _run(capsys, data: Path, config: Path, out: Path, name: str, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli_in_process(
        [
            "run",
            "--data",
            str(data),
            "--config",
            str(config),
            "--out",
            str(out),
            "--name",
            name,
            "-q",
            *extra,
        ],
        capsys,
    )
    return code, err


def _one_line_error(code: int, err: str, *parts: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]


def test_wrong_gene_column_names_the_columns(files, models, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    code, err = _embed(
        capsys, files["tenx"], f"geneformer={models['geneformer']}", out, "--gene-column", "ensembl"
    )
    _one_line_error(code, err, "no column 'ensembl'", "'gene_ids'", "'feature_types'")
    assert not out.exists()


def test_no_overlap_names_the_columns_it_looked_at(files, models, tmp_path, capsys):
    adata = ad.read_h5ad(files["cellxgene"])
    del adata.var["feature_name"]  # Ensembl IDs only: nothing for a symbol model
    adata.write_h5ad(tmp_path / "ids_only.h5ad")
    out = tmp_path / "x.npy"
    code, err = _embed(capsys, tmp_path / "ids_only.h5ad", f"scgpt={models['scgpt']}", out)
    _one_line_error(
        code,
        err,
        "0.0% of genes",
        "looking at ['feature_biotype', 'feature_is_filtered', 'var_names']",
        "--gene-column",
    )
    assert not out.exists()


def test_raw_counts_with_a_column_of_var(files, models, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    code, err = _embed(
        capsys, files["cellxgene"], f"scgpt={models['scgpt']}", out, "--gene-column", "feature_name"
    )
    assert code == 0, err
    assert _embedded(out, "X_scgpt")[1]["gene_column_reason"] == "--gene-column"


def test_filter_pass_strings_from_r_are_refused(files, models, tmp_path, capsys):
    adata = ad.read_h5ad(files["tenx"])
    adata.obs["filter_pass"] = np.where(np.arange(adata.n_obs) % 7, "TRUE", "FALSE")
    adata.write_h5ad(tmp_path / "r.h5ad")
    out = tmp_path / "x.h5ad"
    code, err = _embed(capsys, tmp_path / "r.h5ad", f"geneformer={models['geneformer']}", out)
    _one_line_error(code, err, "filter_pass", "['FALSE', 'TRUE']")
    assert not out.exists()


def test_no_cell_embeddable_stops_embed_and_run(pbmc, models, tmp_path, capsys):
    genes = ["ENSG00000167286", "ENSG00000090382", "ENSG00000156738", "ENSG99999999999"]
    counts = np.zeros((len(pbmc), 4), dtype=np.float32)
    counts[:, 3] = 5  # every count on the gene outside the vocabulary
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pbmc.obs[["cell_type"]].copy(),
        var=pd.DataFrame(index=genes),
    )
    adata.write_h5ad(tmp_path / "outside.h5ad")
    out = tmp_path / "x.npy"
    spec = f"geneformer={models['geneformer']}"
    selected = "--allow-feature-selected"  # 4 genes: past the feature-selection refusal
    code, err = _embed(capsys, tmp_path / "outside.h5ad", spec, out, selected)
    _one_line_error(code, err, "can embed none of the 120 cells", "--gene-column")
    assert not out.exists()
    config = _quick_config(tmp_path / "run.yaml", models=[spec], allow_feature_selected=True)
    code, err = _run(capsys, str(tmp_path / "outside.h5ad"), config, tmp_path / "runs", "none")
    _one_line_error(code, err, "can embed none")
    assert not (tmp_path / "runs" / "none").exists()


def test_filter_pass_applies_to_every_method(pbmc, models, tmp_path, capsys):
    adata = tenx(pbmc)
    failing = np.arange(adata.n_obs) % 10 == 0
    adata.obs["filter_pass"] = (~failing).astype(int)
    adata.write_h5ad(tmp_path / "fp.h5ad")
    config = _quick_config(tmp_path / "run.yaml", models=[f"geneformer={models['geneformer']}"])
    code, err = _run(capsys, str(tmp_path / "fp.h5ad"), config, tmp_path / "runs", "fp")
    assert code == 0, err
    doc = json.loads((tmp_path / "runs/fp/metrics.json").read_text())
    diag = doc["diagnostics"]
    assert diag["dropped_cells_filter_pass"] == int(failing.sum())
    assert diag["n_cells"] == adata.n_obs - int(failing.sum())
    assert diag["models"]["geneformer"]["n_dropped_cells"] == 0
    assert any("filter_pass" in w for w in diag["warnings"])


def test_models_see_the_original_duplicated_gene_names(pbmc, models):
    adata = tenx(pbmc)
    del adata.var["gene_ids"]
    adata.var_names = pbmc.var["gene_symbol"].astype(str).to_numpy()  # with duplicates
    assert not adata.var_names.is_unique
    model = MODELS.get("scgpt")(models["scgpt"])
    checked = validate(adata, min_cells_per_class=5)
    assert checked.adata.var_names.is_unique  # the baselines' bookkeeping
    assert list(checked.model_input.var_names) == list(adata.var_names)
    in_run = model.tokenize(checked.model_input)
    in_embed = model.tokenize(expression_view(adata))
    assert in_run.gene_match.n_matched == in_embed.gene_match.n_matched == 12_321
    np.testing.assert_array_equal(in_run.input_ids, in_embed.input_ids)


def test_streamed_run_on_cellxgene_with_filter_pass(pbmc, models, tmp_path, capsys):
    adata = cellxgene(pbmc)
    failing = np.arange(adata.n_obs) % 10 == 0
    adata.obs["filter_pass"] = ~failing
    adata.write_h5ad(tmp_path / "cxg_fp.h5ad")
    config = _quick_config(
        tmp_path / "run.yaml", models=[f"scgpt={models['scgpt']}"], chunk_size=50
    )
    code, err = _run(
        capsys, str(tmp_path / "cxg_fp.h5ad"), config, tmp_path / "runs", "streamed", "--backed"
    )
    assert code == 0, err
    diag = json.loads((tmp_path / "runs/streamed/metrics.json").read_text())["diagnostics"]
    assert (diag["matrix_source"], diag["dropped_cells_filter_pass"]) == ("raw.X", 12)
    assert diag["n_cells"] == adata.n_obs - 12
    assert diag["models"]["scgpt"]["gene_column"] == "feature_name"
