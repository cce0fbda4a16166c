"""Files named .h5ad that hold another format: recognised by content, reader named, exit 2;
an AnnData zarr store is read directly and gives the same results as the .h5ad file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from tests.conftest import run_cli_in_process


def scfmbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scfmbench", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def subset(pbmc3k_path) -> ad.AnnData:
    return ad.read_h5ad(pbmc3k_path)[:300].copy()


def write_loom(adata: ad.AnnData, path: Path) -> None:
    """The loom layout (loompy.org spec): genes × cells ``matrix``, row/col attributes."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("matrix", data=adata.X.T.toarray())
        handle.create_group("layers")
        handle.create_group("row_attrs")["Gene"] = np.array(adata.var_names, dtype="S")
        handle.create_group("col_attrs")["CellID"] = np.array(adata.obs_names, dtype="S")
        handle.attrs["LOOM_SPEC_VERSION"] = "3.0.0"


def write_10x_matrix(group: h5py.Group, adata: ad.AnnData) -> None:
    """The 10x genes × cells CSC arrays (= the cells × genes CSR of ``adata.X``)."""
    counts = adata.X.tocsr()
    group["barcodes"] = np.array(adata.obs_names, dtype="S")
    group["data"] = counts.data.astype(np.int32)
    group["indices"] = counts.indices.astype(np.int64)
    group["indptr"] = counts.indptr.astype(np.int64)
    group["shape"] = np.array([adata.n_vars, adata.n_obs], dtype=np.int32)


def write_10x_v3(adata: ad.AnnData, path: Path) -> None:
    """Cell Ranger ≥ 3 ``filtered_feature_bc_matrix.h5``: one ``matrix`` group."""
    with h5py.File(path, "w") as handle:
        matrix = handle.create_group("matrix")
        write_10x_matrix(matrix, adata)
        features = matrix.create_group("features")
        features["id"] = np.array(adata.var["gene_ids"], dtype="S")
        features["name"] = np.array(adata.var_names, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
        features["genome"] = np.array(["hg19"] * adata.n_vars, dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])


def write_10x_v2(adata: ad.AnnData, path: Path) -> None:
    """Cell Ranger 2 ``filtered_gene_bc_matrices_h5.h5``: one group per genome."""
    with h5py.File(path, "w") as handle:
        genome = handle.create_group("hg19")
        write_10x_matrix(genome, adata)
        genome["genes"] = np.array(adata.var["gene_ids"], dtype="S")
        genome["gene_names"] = np.array(adata.var_names, dtype="S")


def test_10x_fixture_is_what_scanpy_reads(subset, tmp_path):
    import scanpy as sc

    for write in (write_10x_v3, write_10x_v2):
        path = tmp_path / f"{write.__name__}.h5"
        write(subset, path)
        read = sc.read_10x_h5(path)
        assert read.shape == subset.shape
        assert (read.X != subset.X).nnz == 0
        assert list(read.obs_names) == list(subset.obs_names)


FOREIGN = {
    "loom": (write_loom, "is a loom file", "scanpy.read_loom"),
    "10x-v3": (write_10x_v3, "is a 10x Cell Ranger feature-barcode matrix (v3 .h5)", "read_10x_h5"),
    "10x-v2": (write_10x_v2, "is a 10x Cell Ranger gene-barcode matrix (v2 .h5)", "read_10x_h5"),
}


@pytest.mark.parametrize(
    ("kind", "command"),
    [("loom", "validate"), ("10x-v3", "validate"), ("10x-v2", "validate"), ("loom", "run"),
     ("10x-v3", "embed")],
)  # fmt: skip
def test_foreign_format_named_with_its_reader(kind, command, subset, tmp_path, capsys):
    write, what, reader = FOREIGN[kind]
    data = tmp_path / "data.h5ad"
    write(subset, data)
    out = tmp_path / "out"
    empty = tmp_path / "model"  # an empty model folder: the file is refused before loading it
    empty.mkdir()
    args = {
        "validate": ["validate", str(data)],
        "run": ["run", "--data", str(data), "--out", str(out)],
        "embed": ["embed", str(data), "--model", f"scgpt={empty}", "--out", str(out / "e.npy")],
    }[command]
    code, _, stderr = run_cli_in_process(args, capsys)  # cli.main in this process
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert f"'{data}' {what}, not an .h5ad file; convert it with `" in errors[0]
    assert reader in errors[0]
    assert not out.exists()


def test_directory_that_is_not_zarr(tmp_path):
    folder = tmp_path / "data.h5ad"
    folder.mkdir()
    done = scfmbench("validate", str(folder))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: '{folder}' is a directory but not an AnnData zarr store (no .zgroup or "
        "zarr.json); pass the .h5ad file itself."
    )


def test_hdf5_without_anndata_groups(tmp_path):
    path = tmp_path / "data.h5ad"
    with h5py.File(path, "w") as handle:
        handle["counts"] = np.zeros((3, 3))
    done = scfmbench("validate", str(path))
    assert done.returncode == 2
    assert "is an HDF5 file without AnnData's obs and var groups (found ['counts'])" in (
        done.stderr
    )


def test_zarr_store_runs_like_the_h5ad_file(subset, tmp_path, capsys):
    def in_process(*args: str) -> subprocess.CompletedProcess:
        """The CLI in this process: five interpreter starts would take most of the test."""
        code, out, err = run_cli_in_process(list(args), capsys)
        return subprocess.CompletedProcess(args, code, out, err)

    h5ad = tmp_path / "clean.h5ad"
    subset.write_h5ad(h5ad)
    store = tmp_path / "store.h5ad"  # a zarr directory with a misleading suffix
    subset.write_zarr(store)
    config = tmp_path / "run.yaml"
    config.write_text(
        "n_splits: 1\ndesign: study\nbaselines: [pca+logreg, majority]\nfigures: false\n"
    )

    checks = [in_process("validate", str(p), "--label-key", "cell_type") for p in (h5ad, store)]
    assert [c.returncode for c in checks] == [0, 0], checks[1].stderr
    assert checks[1].stdout.replace(str(store), "X") == checks[0].stdout.replace(str(h5ad), "X")

    metrics = []
    for path, name in ((h5ad, "h5ad"), (store, "zarr")):
        done = in_process(
            "run", "--data", str(path), "--label-key", "cell_type", "--config", str(config),
            "--out", str(tmp_path / "runs"), "--name", name, "-q",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        metrics.append(json.loads((tmp_path / "runs" / name / "metrics.json").read_text()))
    assert metrics[1]["methods"] == metrics[0]["methods"]
    assert metrics[1]["diagnostics"] == metrics[0]["diagnostics"]

    streamed = in_process("validate", str(store), "--backed")
    assert streamed.returncode == 2
    assert "is an AnnData zarr store; streaming (--backed, torchrun) reads HDF5 .h5ad" in (
        streamed.stderr
    )
