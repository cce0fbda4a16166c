import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfmbench import DataError, SchemaError, validate
from scfmbench.data.genes import detect_identifier_type
from scfmbench.data.io import load_dataset
from scfmbench.data.matrix import classify_matrix
from tests.conftest import run_cli_in_process


def quiet_validate(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return validate(adata, **kwargs)


def test_not_an_h5ad(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("gene,cell\nA,1\n")
    with pytest.raises(DataError, match="is not an .h5ad file"):
        load_dataset(path)


def test_truncated_h5ad(tmp_path, tiny_adata):
    path = tmp_path / "data.h5ad"
    tiny_adata.write_h5ad(path)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(path)


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("no/such/file.h5ad")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_nan_and_inf(tiny_adata, bad, word):
    X = tiny_adata.X.toarray()
    X[3, 2] = bad
    tiny_adata.X = sp.csr_matrix(X)
    with pytest.raises(DataError, match=rf"adata.X contains .*{word}"):
        quiet_validate(tiny_adata)


def test_negative_values_only(tiny_adata):
    counts = tiny_adata.X.toarray()
    scaled = counts - 3.0
    tiny_adata.X = sp.csr_matrix(scaled)
    n_negative, n_stored = int((scaled < 0).sum()), int((scaled != 0).sum())
    with pytest.raises(DataError) as raised:
        quiet_validate(tiny_adata)
    assert str(raised.value) == (
        "no usable expression matrix: every candidate has negative values (X: "
        f"{n_negative:,} negative of {n_stored:,} stored values (min -3): scaled); counts are "
        "never negative: fix those entries, or provide raw counts in X, layers['counts'] or .raw."
    )
    broken = counts.copy()
    broken[0, 0] = -1  # one bad entry among counts: not scaled data
    tiny_adata.X = sp.csr_matrix(broken)
    with pytest.raises(DataError) as raised:
        quiet_validate(tiny_adata)
    assert (
        f"(X: 1 negative of {int((broken != 0).sum()):,} stored values (min -1), the others "
        "integer counts)"
    ) in str(raised.value)


def test_no_cells_and_no_genes(tiny_adata):
    with pytest.raises(DataError, match="0 cells"):
        quiet_validate(tiny_adata[:0].copy())
    with pytest.raises(DataError, match="0 genes"):
        quiet_validate(tiny_adata[:, :0].copy())


def test_label_column_missing_lists_candidates(tiny_adata):
    tiny_adata.obs["donor"] = pd.Categorical(np.tile(["d1", "d2"], tiny_adata.n_obs // 2))
    with pytest.raises(SchemaError, match=r"no column 'celltype'.*\['cell_type', 'donor'\]"):
        quiet_validate(tiny_adata, label_key="celltype")


def test_single_class(tiny_adata):
    tiny_adata.obs["cell_type"] = "T"
    with pytest.raises(SchemaError, match="has 1 class .*at least 2"):
        quiet_validate(tiny_adata)


def test_warnings_and_drops(tiny_adata):
    X = tiny_adata.X.toarray()
    X[0] = 0  # an empty cell
    tiny_adata.X = sp.csr_matrix(X)
    labels = tiny_adata.obs["cell_type"].astype(str).to_numpy()
    labels[1] = "nan"
    labels[2:5] = "rare"
    tiny_adata.obs["cell_type"] = labels
    names = tiny_adata.var_names.to_numpy().copy()
    names[1] = names[0]
    tiny_adata.var_names = names
    with pytest.warns(UserWarning) as record:
        result = validate(tiny_adata, min_cells_per_class=10)
    messages = " | ".join(str(w.message) for w in record)
    diag = result.diagnostics
    assert diag.dropped_cells_no_counts == 1
    assert diag.dropped_cells_missing_label == 1
    assert diag.dropped_classes == {"rare": 3}
    assert diag.renamed_duplicate_genes == 1
    assert "rare (3)" in messages and "made unique" in messages
    assert result.adata.n_obs == 60 - 5
    assert result.adata.var_names.is_unique
    assert sorted(diag.classes) == ["type_0", "type_1", "type_2"]


def test_counts_found_in_layers_and_raw(tiny_adata):
    counts = tiny_adata.X.copy()
    lognorm = counts.copy()
    lognorm.data = np.log1p(lognorm.data) + 0.01
    with_layer = tiny_adata.copy()
    with_layer.layers["counts"] = counts
    with_layer.X = lognorm
    assert quiet_validate(with_layer).diagnostics.count_source == "layers['counts']"

    with_raw = tiny_adata.copy()
    with_raw.raw = with_raw
    with_raw.X = sp.csr_matrix(lognorm.toarray() - 1.0)  # scaled
    diag = quiet_validate(with_raw).diagnostics
    assert (diag.count_source, diag.matrix_kind) == ("raw.X", "counts")


def test_classify_matrix():
    counts = sp.csr_matrix(np.array([[0, 3, 1], [2, 0, 7]], dtype=np.float32))
    assert classify_matrix(counts) == "counts"
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    assert classify_matrix(logged) == "lognorm"
    # a count matrix times a non-integer factor: totals still vary with depth
    assert classify_matrix(counts * 37.3) == "corrected"
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert classify_matrix(sp.diags(1e4 / totals) @ counts) == "normalized"
    assert classify_matrix(sp.diags(1e4 / totals[1:]) @ counts[1:]) == "corrected"  # one cell
    assert classify_matrix(counts.toarray() - 1) == "scaled"


def test_identifier_type():
    assert detect_identifier_type(["ENSG00000141510", "ENSG00000012048.12"]) == "ensembl"
    assert detect_identifier_type(["TP53", "BRCA1", "CD3E"]) == "symbol"
    assert detect_identifier_type(["TP53", "ENSG00000012048"]) == "mixed"


def test_builtin_default_has_no_counts():
    result = quiet_validate(load_dataset("pbmc68k_reduced"), label_key="bulk_labels")
    diag = result.diagnostics
    assert (diag.matrix_source, diag.matrix_kind, diag.count_source) == ("raw.X", "lognorm", None)
    assert diag.dropped_classes == {"CD4+/CD45RA+/CD25- Naive T": 8}
    assert diag.n_cells == 692


def test_pbmc3k_raw_counts(pbmc3k):
    diag = quiet_validate(pbmc3k).diagnostics
    assert (diag.n_cells, diag.n_genes) == (2638, 13714)
    assert (diag.count_source, diag.identifier_type) == ("X", "symbol")
    assert diag.classes["Naive CD4 T"] == 697 and diag.classes["Platelet"] == 14
    assert diag.warnings == []


def test_validated_data_is_csr_float32(tiny_adata):
    tiny_adata.X = tiny_adata.X.toarray()
    result = quiet_validate(tiny_adata)
    assert sp.isspmatrix_csr(result.adata.X) and result.adata.X.dtype == np.float32
    assert isinstance(result.adata, ad.AnnData)


def test_gene_column_typo_suggests_the_column():
    from scfmbench.data.genes import resolve_gene_identifiers

    var = pd.DataFrame({"gene_ids": ["ENSG00000141510"], "gene_symbol": ["TP53"]}, index=["TP53"])
    with pytest.raises(SchemaError) as caught:
        resolve_gene_identifiers(var, vocabulary_kind="ensembl", model="m", gene_column="gene_id")
    assert str(caught.value) == (
        "adata.var has no column 'gene_id' (columns: ['gene_ids', 'gene_symbol']); pass "
        "--gene-column with one of those or 'var_names' for the index. Did you mean 'gene_ids'?"
    )


def test_validate_cli_refuses_a_misspelt_batch_key(tmp_path, tiny_adata, capsys):
    tiny_adata.obs["donor"] = "d1"
    tiny_adata.write_h5ad(tmp_path / "d.h5ad")
    (tmp_path / "c.yaml").write_text("batch_key: Donor\n")
    args = ["validate", str(tmp_path / "d.h5ad"), "--config", str(tmp_path / "c.yaml")]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 2 and "Did you mean 'donor'?" in err, err


def test_a_measurement_is_not_a_label_column():
    """A per-cell number picked as labels stops at once; integer-coded clusters still pass."""
    from tests.conftest import make_tiny_adata

    adata = make_tiny_adata(n_per_class=50)  # 150 cells
    rng = np.random.default_rng(0)
    adata.obs["nCount_RNA"] = rng.integers(500, 5000, adata.n_obs)
    with pytest.raises(SchemaError) as raised:
        quiet_validate(adata, label_key="nCount_RNA")
    distinct = adata.obs["nCount_RNA"].nunique()
    assert str(raised.value) == (
        f"label column 'nCount_RNA' holds numbers with {distinct} distinct values, most on "
        "fewer than 10 cells: it looks like a measurement, not cell types; pick another "
        "--label-key."
    )
    adata.obs["cluster"] = adata.obs["cell_type"].cat.codes.astype(np.int64)
    checked = quiet_validate(adata, label_key="cluster")
    assert sorted(checked.labels.unique()) == ["0", "1", "2"]


@pytest.mark.parametrize("as_text", [False, True])
def test_classes_named_by_numbers_are_warned_about(as_text):
    """Integer codes or scanpy's leiden strings: a warning that clusters make a circular task."""
    from tests.conftest import make_tiny_adata

    adata = make_tiny_adata(n_per_class=20)
    codes = {"type_0": 10, "type_1": 2, "type_2": 0}
    clusters = adata.obs["cell_type"].map(codes).astype(np.int64)
    adata.obs["leiden"] = clusters.astype(str).astype("category") if as_text else clusters
    with pytest.warns(UserWarning) as caught:
        checked = validate(adata, label_key="leiden")
    expected = (
        "label column 'leiden' names its 3 classes by numbers (0, 2, 10): if they are clusters "
        "computed from this data's expression, the scores measure agreement with that "
        "clustering, which favours the PCA baseline it was built from; prefer annotated cell "
        "types"
    )
    assert [str(w.message) for w in caught] == [expected]
    assert checked.diagnostics.warnings == [expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named classes: no warning
        validate(adata, label_key="cell_type")


def test_one_class_left_names_its_size_and_a_fix_that_helps():
    from tests.conftest import make_tiny_adata

    adata = make_tiny_adata()
    adata.obs["cell_type"] = "T"
    with pytest.raises(SchemaError) as raised:
        quiet_validate(adata)
    assert str(raised.value) == (
        "label column 'cell_type' has 1 class after filtering (T: 60 cells); classification "
        "needs at least 2 — pick another --label-key."
    )
