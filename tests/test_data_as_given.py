"""Data files shaped as people give them: each built from PBMC3k in the test, run through the
CLI, and held to the clean file's results or to one line, exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfmbench.data.matrix import classify_matrix, require_counts
from tests.conftest import run_cli_in_process

N_CELLS = 400
RUN_CONFIG = (
    "n_splits: 1\ndesign: study\nbaselines: [hvg+logreg, majority]\nfigures: false\n"
    "n_hvg: 200\nn_pcs: 10\n"
)
STRATIFY_ERROR = "'Singleton' has 1 cell; each class needs ≥ 5 cells"


@pytest.fixture(scope="module")
def clean(pbmc3k_path) -> ad.AnnData:
    """400 PBMC3k cells (every class above 10 cells but Platelet), raw counts in CSR X."""
    full = ad.read_h5ad(pbmc3k_path)
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, N_CELLS, replace=False))
    adata = full[rows].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("given")
    (path / "run.yaml").write_text(RUN_CONFIG)
    return path


@pytest.fixture(scope="module")
def clean_file(clean, folder) -> Path:
    return write(clean, folder / "clean.h5ad")


def write(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli_in_process([str(a) for a in args], capsys)


def run_metrics(data: Path, folder: Path, name: str, capsys, *extra) -> dict:
    args = ["run", "--data", data, "--config", folder / "run.yaml", "--out", folder / "runs"]
    code, _, err = cli([*args, "--name", name, "-q", *extra], capsys)
    assert code == 0, err
    return json.loads((folder / "runs" / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def clean_metrics(clean_file, folder) -> dict:
    from scfmbench.benchmark.pipeline import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run(
            str(clean_file),
            config=_config(folder),
            out=folder / "runs",
            name="clean",
            progress=False,
        )
    return result.metrics


def _config(folder: Path):
    from scfmbench.config import RunConfig

    return RunConfig.from_yaml(folder / "run.yaml")


def same_results(got: dict, expected: dict) -> None:
    """Identical scores of every method and embedding view (data names aside)."""
    assert got["methods"] == expected["methods"]
    assert got["embeddings"] == expected["embeddings"]
    assert got["run"]["classes"] == expected["run"]["classes"]


def one_error(code: int, err: str, message: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    return errors[0]


# ---- 1. duplicated cell names --------------------------------------------------------------


@pytest.fixture(scope="module")
def duplicated_file(clean, folder) -> Path:
    adata = clean.copy()
    names = adata.obs_names.to_numpy().copy()
    names[200:260] = names[:60]  # 60 barcodes twice, as after concat without make_unique
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.obs_names = names
    return write(adata, folder / "duplicated.h5ad")


DUPLICATED = (
    "duplicated.h5ad has 60 duplicated cell names (obs_names); make them unique "
    "(adata.obs_names_make_unique()) and write it again."
)


@pytest.mark.parametrize("backed", ["--no-backed", "--backed"])
@pytest.mark.parametrize("command", ["validate", "run", "embed"])
def test_duplicated_cell_names(command, backed, duplicated_file, folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "validate": ["validate", duplicated_file],
        "run": ["run", "--data", duplicated_file, "--out", out, "--name", "r"],
        # an empty model folder: the data is refused before any model is loaded
        "embed": ["embed", duplicated_file, "--model", f"geneformer={tmp_path / 'no_model'}"]
        + ["--out", out / "e.npy"],
    }[command]
    (tmp_path / "no_model").mkdir(exist_ok=True)
    code, _, err = cli([*args, backed], capsys)
    assert one_error(code, err, "duplicated") == f"error: {DUPLICATED}"
    assert not out.exists()


# ---- 2. no X, X as an empty null-encoded dataset, legacy layout --------------------------------


@pytest.fixture(scope="module")
def counts_only_files(clean, folder) -> dict[str, Path]:
    moved = ad.AnnData(obs=clean.obs, var=clean.var, layers={"counts": clean.X})
    no_x = write(moved, folder / "no_x.h5ad")
    null_x = folder / "null_x.h5ad"
    shutil.copy(no_x, null_x)
    with h5py.File(null_x, "r+") as f:  # how anndata ≥ 0.12 may write X=None
        empty = f.create_dataset("X", data=h5py.Empty("f"))
        empty.attrs.update({"encoding-type": "null", "encoding-version": "0.1.0"})
    return {"no_x": no_x, "null_x": null_x}


@pytest.mark.parametrize("case", ["no_x", "null_x"])
def test_counts_only_in_layers_streamed(case, counts_only_files, clean_metrics, folder, capsys):
    path = counts_only_files[case]
    code, out, err = cli(["validate", path, "--backed"], capsys)
    assert code == 0, err
    assert "expression: adata.layers['counts'] holds raw integer counts" in out
    metrics = run_metrics(path, folder, f"{case}_backed", capsys, "--backed")
    assert metrics["diagnostics"]["matrix_source"] == "layers['counts']"
    same_results(metrics, clean_metrics)


def write_legacy(adata: ad.AnnData, path: Path) -> Path:
    """The anndata 0.6 layout: structured-array obs/var, X a group with h5sparse_format."""
    matrix = sp.csr_matrix(adata.X)
    with h5py.File(path, "w") as f:
        f["obs"] = np.array(
            list(zip(adata.obs_names, adata.obs["cell_type"].astype(str), strict=True)),
            dtype=[("index", "S40"), ("cell_type", "S40")],
        )
        columns = [c for c in ("gene_ids", "gene_symbol") if c in adata.var]
        f["var"] = np.array(
            list(zip(adata.var_names, *(adata.var[c].astype(str) for c in columns), strict=True)),
            dtype=[("index", "S40"), *((c, "S40") for c in columns)],
        )
        group = f.create_group("X")
        group.attrs["h5sparse_format"] = "csr"
        group.attrs["h5sparse_shape"] = np.array(matrix.shape)
        group["data"], group["indices"], group["indptr"] = (
            matrix.data,
            matrix.indices,
            matrix.indptr,
        )
    return path


def test_legacy_layout(clean, clean_file, folder, capsys):
    path = write_legacy(clean, folder / "legacy.h5ad")
    code, _, err = cli(["validate", path, "--backed"], capsys)
    assert one_error(code, err, "legacy") == (
        "error: legacy.h5ad uses the legacy anndata (< 0.7) layout (structured-array obs/var, "
        "X marked only with h5sparse_format), which cannot be streamed; read it with "
        "anndata.read_h5ad and write it again with adata.write_h5ad, or pass --no-backed."
    )
    code, out, err = cli(["validate", path, "--no-backed"], capsys)  # anndata reads it
    assert code == 0, err
    assert out == cli(["validate", clean_file], capsys)[1]


# ---- 3. count-like non-integer, depth-normalized and log-scale matrices ----------------------


def test_count_like_matrix_gives_the_clean_results(clean, clean_metrics, folder, capsys):
    halved = clean.copy()
    halved.X = halved.X * 0.5  # non-integer, totals vary; depth normalization undoes it exactly
    path = write(halved, folder / "halved.h5ad")
    code, out, err = cli(["validate", path], capsys)
    assert code == 0, err
    assert "expression: adata.X holds count-like non-integer values" in out
    metrics = run_metrics(path, folder, "halved", capsys)
    assert metrics["diagnostics"]["matrix_kind"] == "corrected"
    assert "SoupX" in metrics["diagnostics"]["matrix_description"]
    same_results(metrics, clean_metrics)
    report = (folder / "runs" / "halved" / "report.md").read_text()
    assert "count type: corrected (count-like non-integer values" in report


def ambient_corrected(counts: sp.csr_matrix, seed: int = 0) -> sp.csr_matrix:
    """SoupX-like: subtract a per-cell share of an ambient profile, clip at 0."""
    rng = np.random.default_rng(seed)
    dense = counts.toarray().astype(np.float64)
    profile = dense.sum(axis=0) / dense.sum()
    contamination = rng.uniform(0.02, 0.2, size=(dense.shape[0], 1)) * dense.sum(1, keepdims=True)
    return sp.csr_matrix(np.clip(dense - contamination * profile, 0, None).astype(np.float32))


def test_matrix_kinds_by_their_values(clean):
    counts = clean.X
    corrected = ambient_corrected(counts)
    totals = np.asarray(corrected.sum(axis=1)).ravel()
    assert np.ptp(totals) > 1000 and (corrected.data % 1 != 0).any()
    assert classify_matrix(corrected) == "corrected"
    cp10k = sp.csr_matrix(sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts)
    assert classify_matrix(cp10k) == "normalized"
    logged = cp10k.copy()
    logged.data = np.log1p(logged.data)
    assert classify_matrix(logged) == "lognorm"
    log2_cpm = sp.csr_matrix(cp10k * 100)
    log2_cpm.data = np.log2(log2_cpm.data + 1)
    assert classify_matrix(log2_cpm) == "lognorm"
    assert classify_matrix(counts) == "counts"
    with pytest.warns(UserWarning, match="SoupX, CellBender"):
        assert require_counts(corrected, model="geneformer") == "corrected"
    with pytest.raises(Exception, match="depth-normalized values"):
        require_counts(cp10k, model="geneformer")


def test_corrected_counts_validate_cli(clean, folder, capsys):
    adata = clean.copy()
    adata.X = ambient_corrected(adata.X)
    path = write(adata, folder / "soupx.h5ad")
    code, out, err = cli(["validate", path, "--json"], capsys)
    assert code == 0, err
    diag = json.loads(out)
    assert (diag["matrix_kind"], diag["count_source"]) == ("corrected", None)
    assert any("depth-normalize them like counts" in w for w in diag["warnings"])


# ---- 5. labels that differ only by case or whitespace; placeholder labels ---------------------


@pytest.fixture(scope="module")
def respelled_file(clean, folder) -> Path:
    adata = clean.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    b_cells, nk_cells = np.flatnonzero(labels == "B"), np.flatnonzero(labels == "NK")
    labels[b_cells[:12]] = "B "
    labels[b_cells[12:23]] = "b"
    labels[nk_cells[:3]] = "NK "
    adata.obs["cell_type"] = labels
    return write(adata, folder / "respelled.h5ad")


def test_similar_labels_warned_and_merged(respelled_file, clean, clean_metrics, folder, capsys):
    n_b = int((clean.obs["cell_type"] == "B").sum())
    n_nk = int((clean.obs["cell_type"] == "NK").sum())
    code, out, err = cli(["validate", respelled_file], capsys)
    assert code == 0, err
    expected = (
        f"labels that differ only by case or whitespace are separate classes: 'B' ({n_b - 23}), "
        f"'B ' (12), 'b' (11); 'NK' ({n_nk - 3}), 'NK ' (3); merge them with "
        "--merge-similar-labels (merge_similar_labels: true)"
    )
    assert f"  - {expected}" in out.splitlines()
    apart = run_metrics(respelled_file, folder, "respelled", capsys)
    assert apart["diagnostics"]["similar_labels"] == [
        {"B": n_b - 23, "B ": 12, "b": 11},
        {"NK": n_nk - 3, "NK ": 3},
    ]
    assert set(apart["run"]["classes"]) == set(clean_metrics["run"]["classes"]) | {"B ", "b"}
    report = (folder / "runs" / "respelled" / "report.md").read_text()
    assert f"- warning: {expected}" in report
    merged = run_metrics(respelled_file, folder, "merged", capsys, "--merge-similar-labels")
    assert merged["diagnostics"]["merged_labels"] == {"B ": "B", "b": "B", "NK ": "NK"}
    same_results(merged, clean_metrics)


@pytest.mark.parametrize("placeholder", [np.nan, "", " ", "nan", "None", "NA", "unknown"])
def test_placeholder_labels_are_missing(placeholder, clean, folder, capsys):
    adata = clean.copy()
    labels = adata.obs["cell_type"].astype(object).to_numpy().copy()
    labels[[3, 50, 51]] = placeholder
    labels[7] = "Unassigned"
    adata.obs["cell_type"] = labels
    path = write(adata, folder / "placeholders.h5ad")
    code, out, err = cli(["validate", path, "--json"], capsys)
    assert code == 0, err
    diag = json.loads(out)
    assert diag["dropped_cells_missing_label"] == 4
    expected = clean.obs["cell_type"].astype(str).drop(clean.obs_names[[3, 7, 50, 51]])
    expected = expected.value_counts()
    assert diag["classes"] == {k: int(v) for k, v in expected.items() if v >= 10}


def test_label_map_placeholders_drop_cells(tmp_path):
    from scfmbench.benchmark.transfer import harmonize, load_label_map

    path = tmp_path / "map.yaml"
    path.write_text("B cell: B\nNK cell: unknown\nDC: NA\nPlatelet: None\nMono: ''\nT: null\n")
    mapping = load_label_map(path)
    assert mapping == {
        "B cell": "B",
        "NK cell": None,
        "DC": None,
        "Platelet": None,
        "Mono": None,
        "T": None,
    }
    labels = pd.Series(["B cell", "NK cell", "DC", "B cell"], index=list("abcd"))
    shared = harmonize(labels, {"B cell": "B", "NK cell": "Unassigned", "DC": "dc"}, dataset="x")
    assert shared.to_dict() == {"a": "B", "c": "dc", "d": "B"}


# ---- 6. validate refuses what run refuses ---------------------------------------------------


def test_validate_reports_what_run_refuses(clean, folder, tmp_path, capsys):
    adata = clean.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[0] = "Singleton"
    adata.obs["cell_type"] = labels
    path = write(adata, folder / "singleton.h5ad")
    (tmp_path / "one.yaml").write_text("min_cells_per_class: 1\n")
    out = tmp_path / "runs"
    code, _, run_err = cli(
        ["run", "--data", path, "--config", tmp_path / "one.yaml", "--out", out], capsys
    )
    run_line = one_error(code, run_err, STRATIFY_ERROR)
    assert not out.exists() or not any(out.iterdir())
    for args in (["--min-cells-per-class", "1"], ["--config", tmp_path / "one.yaml"]):
        for backed in ("--no-backed", "--backed"):
            code, stdout, err = cli(["validate", path, *args, backed], capsys)
            assert one_error(code, err, STRATIFY_ERROR) == run_line
            assert stdout == ""
    code, _, err = cli(["validate", path], capsys)  # default 10: the class is dropped
    assert code == 0, err


# ---- 7. transfer label-map coverage ---------------------------------------------------------


TRANSFER_MAP = """\
Naive CD4 T: CD4 T
Memory CD4 T: CD4 T
CD8 T: CD8 T
B: B
CD14+ Mono: CD14+ Mono
FCGR3A+ Mono: FCGR3A+ Mono
NK: NK
DC: unknown
Platelet: null
CD4 T cells: CD4 T
CD8 T cells: CD8 T
B cells: B
CD14+ Monocytes: CD14+ Mono
FCGR3A+ Monocytes: FCGR3A+ Mono
"""


def test_transfer_coverage_on_stderr_and_report(clean, clean_file, kang_path, tmp_path):
    kang = ad.read_h5ad(kang_path)[::4].copy()
    kang_file = write(kang, tmp_path / "kang.h5ad")
    (tmp_path / "map.yaml").write_text(TRANSFER_MAP)
    (tmp_path / "one_seed.yaml").write_text("n_splits: 1\n")  # coverage is the same for any seed
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "transfer", "--train", str(clean_file)]
        + ["--test", str(kang_file), "--labels", str(tmp_path / "map.yaml"), "--one-way"]
        + ["--out", str(tmp_path / "runs"), "--name", "t", "-q"]
        + ["--config", str(tmp_path / "one_seed.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    n_nk = int((clean.obs["cell_type"] == "NK").sum())
    line = (
        f"clean->kang: 1 training class(es) have no test cells, so they are trained but never "
        f"scored (training cells: 'NK' {n_nk}); map them to null to leave them out"
    )
    assert f"scfmbench: warning: {line}" in done.stderr.splitlines()
    doc = json.loads((tmp_path / "runs" / "t" / "metrics.json").read_text())
    coverage = doc["transfer"]["directions"]["clean->kang"]["coverage"]
    sizes = clean.obs["cell_type"].astype(str).value_counts()
    assert sizes["NK"] >= 10
    assert coverage == {
        "train_classes_without_test": {"NK": n_nk},
        "test_dropped_by_map": {},
        "test_classes_not_in_train": {},
        # DC maps to the placeholder 'unknown', Platelet to null (when not dropped as rare)
        "train_dropped_by_map": {k: int(sizes[k]) for k in ("DC", "Platelet") if sizes[k] >= 10},
    }
    report = (tmp_path / "runs" / "t" / "report.md").read_text().splitlines()
    first = next(i for i, text in enumerate(report) if text.startswith("- "))
    assert report[first] == f"- label coverage: {line}"
    assert done.stdout.splitlines()[4] == f"- {line}"


def test_transfer_coverage_of_dropped_test_cells():
    from scfmbench.report.coverage import coverage_lines

    lines = coverage_lines(
        "a->b",
        {
            "train_classes_without_test": {},
            "train_dropped_by_map": {"NK": 155},
            "test_dropped_by_map": {"DC": 11, "Platelet": 3},
            "test_classes_not_in_train": {"NK": 29},
        },
    )
    assert lines == [
        "a->b: dropped 155 training cells mapped to null by the label map ('NK' 155)",
        "a->b: dropped 14 test cells mapped to null by the label map ('DC' 11, 'Platelet' 3)",
        "a->b: dropped 29 test cells of classes the training data lacks ('NK' 29)",
    ]


@pytest.mark.parametrize("kind", ["corrected", "normalized"])
def test_streamed_last_chunk_of_one_cell(kind, clean, folder):
    """A last chunk of one cell (here a low-depth one whose halved counts stay below the
    log-scale maximum) cannot tell the non-integer kinds apart: it is accepted, and the file
    keeps its first chunk's kind."""
    from scfmbench.data.backed import validate_backed

    adata = clean.copy()
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    factor = 0.5 if kind == "corrected" else 1e4 / totals
    adata.X = sp.csr_matrix(sp.diags(np.broadcast_to(factor, totals.shape)) @ adata.X)
    path = write(adata, folder / f"{kind}_stream.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = validate_backed(path, chunk_size=N_CELLS - 1, progress=False)
    data.close()
    assert data.diagnostics.matrix_kind == kind


def test_validate_refuses_the_config_run_refuses(clean_file, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("baselines: [hvg+logregg]\n")
    out = tmp_path / "runs"
    code, _, run_err = cli(
        ["run", "--data", clean_file, "--config", tmp_path / "bad.yaml", "--out", out], capsys
    )
    run_line = one_error(code, run_err, "Did you mean 'logreg'")
    code, _, err = cli(["validate", clean_file, "--config", tmp_path / "bad.yaml"], capsys)
    assert (
        one_error(code, err, "baseline 'hvg+logregg' of baselines: unknown probe 'logregg'; ")
        == run_line
    )
    assert not out.exists()
