"""Geneformer tokenizer: exact tokens, reference loop equality, gene mapping and bad input."""

from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from scfmbench.errors import CheckpointError, CountsRequiredError, GeneMatchError
from scfmbench.models.geneformer.dictionaries import GeneformerDictionaries
from scfmbench.models.geneformer.ranking import rank_value_tokens
from scfmbench.models.geneformer.tokenizer import GeneformerTokenizer
from tests._reference_geneformer import tokenize_loop

PBMC3K = "data/pbmc3k_seurat_labels_2638x13714_counts.h5ad"
V1_DIR = "vocab/geneformer/v1_gc30M"
V2_DIR = "vocab/geneformer/v2_gc95M"

# A hand-made vocabulary: genes A..E with round medians; ALIAS maps onto C (collapse).
A, B, C, D, E = (f"ENSG{i:011d}" for i in range(1, 6))
ALIAS, UNMAPPED = "ENSG00000000099", "ENSG00000000077"
MEDIANS = {A: 1.0, B: 2.0, C: 0.5, D: 1.0, E: 4.0}
MAPPING = {**{g: g for g in MEDIANS}, ALIAS: C}


def write_dicts(directory: Path, *, version: str, suffix: str = "_gc95M") -> Path:
    """The hand-made dictionaries, pickled like the released ones."""
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if version == "V2" else ["<pad>", "<mask>"]
    tokens = {name: i for i, name in enumerate([*specials, *MEDIANS])}
    files = {
        "token_dictionary": tokens,
        "gene_median_dictionary": MEDIANS,
        "ensembl_mapping_dict": MAPPING,
        "gene_name_id_dict": {"GA": A, "GB": B, "GC": C, "GD": D, "GE": E},
    }
    directory.mkdir(parents=True, exist_ok=True)
    for kind, content in files.items():
        with open(directory / f"{kind}{suffix}.pkl", "wb") as fh:
            pickle.dump(content, fh)
    return directory


@pytest.fixture(scope="module")
def toy_v2(tmp_path_factory) -> GeneformerDictionaries:
    return GeneformerDictionaries.from_dir(write_dicts(tmp_path_factory.mktemp("v2"), version="V2"))


@pytest.fixture(scope="module")
def toy_v1(tmp_path_factory) -> GeneformerDictionaries:
    directory = write_dicts(tmp_path_factory.mktemp("v1"), version="V1", suffix="")
    return GeneformerDictionaries.from_dir(directory)


def toy_adata() -> ad.AnnData:
    genes = [A, B, C, D, UNMAPPED, ALIAS, E]
    counts = np.array(
        [
            [2, 2, 1, 2, 5, 1, 0],  # C = 1 + 1 (alias) → values C 4, A 2, D 2 (tie), B 1
            [4, 8, 1, 0, 0, 1, 0],  # A 4, B 4, C (1+1)/0.5 = 4: three-way exact tie
            [0, 0, 0, 0, 3, 0, 0],  # only an unmapped gene → dropped
            [0, 0, 0, 0, 0, 0, 0],  # empty → dropped
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(counts))])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


def tok(dicts: GeneformerDictionaries, name: str) -> int:
    return dicts.token_dict[name]


def test_hand_computed_tokens_v2(toy_v2):
    tokens = GeneformerTokenizer(toy_v2).tokenize(toy_adata())
    t = {g: tok(toy_v2, g) for g in MEDIANS}
    cls, eos = tok(toy_v2, "<cls>"), tok(toy_v2, "<eos>")
    assert list(tokens.obs_names) == ["c0", "c1"]
    assert list(tokens.dropped) == ["c2", "c3"]
    assert tokens.cell(0)[0].tolist() == [cls, t[C], t[A], t[D], t[B], eos]
    # exact ties keep the collapsed gene order: own-token genes in input order, then groups
    assert tokens.cell(1)[0].tolist() == [cls, t[A], t[B], t[C], eos]
    assert tokens.offsets.tolist() == [0, 6, 11]
    assert tokens.settings["version"] == "V2"
    assert tokens.settings["model_input_size"] == 4096


def test_hand_computed_tokens_v1_and_truncation(toy_v1, toy_v2):
    t1 = {g: tok(toy_v1, g) for g in MEDIANS}
    v1 = GeneformerTokenizer(toy_v1).tokenize(toy_adata())
    assert v1.cell(0)[0].tolist() == [t1[C], t1[A], t1[D], t1[B]]
    assert v1.settings["model_input_size"] == 2048
    short = GeneformerTokenizer(toy_v1, max_position_embeddings=2).tokenize(toy_adata())
    assert short.cell(0)[0].tolist() == [t1[C], t1[A]]
    assert short.cell(1)[0].tolist() == [t1[A], t1[B]]
    # V2 keeps input size − 2 genes, then <cls> … <eos>
    t2 = {g: tok(toy_v2, g) for g in MEDIANS}
    v2 = GeneformerTokenizer(toy_v2, max_position_embeddings=4).tokenize(toy_adata())
    assert v2.cell(0)[0].tolist() == [2, t2[C], t2[A], 3]


def test_gene_mapping_report_and_match(toy_v2):
    tokenizer = GeneformerTokenizer(toy_v2)
    mapping = tokenizer.map_genes(toy_adata().var)
    assert mapping.to_dict() == {
        "identifier_type": "ensembl",
        "n_genes": 7,
        "n_symbols": 0,
        "n_symbols_mapped": 0,
        "n_direct": 5,
        "n_mapped": 6,
        "n_tokens": 5,
        "n_collapsed_tokens": 1,
    }
    match = tokenizer.tokenize(toy_adata()).gene_match
    assert (match.n_matched, match.n_total) == (6, 7)
    assert match.fraction_counts == pytest.approx(1 - 8 / 30)  # 8 of 30 counts are unmapped


def test_symbols_map_through_gene_name_dictionary(toy_v2):
    adata = toy_adata()[:, [0, 1, 2, 3]].copy()
    adata.var_names = ["GA", "GB", "GC", "GD"]
    adata.var["ensembl"] = [A, B, C, D]
    by_symbol = GeneformerTokenizer(toy_v2, gene_column="var_names").tokenize(adata)
    by_id = GeneformerTokenizer(toy_v2, gene_column="ensembl").tokenize(adata)
    assert np.array_equal(by_symbol.input_ids, by_id.input_ids)
    default = GeneformerTokenizer(toy_v2).tokenize(adata)
    assert default.gene_match.gene_column == "ensembl"  # found by content
    assert by_symbol.gene_match.identifier_type == "symbol"


def test_version_detection_and_override(toy_v1, toy_v2):
    assert toy_v1.version == "V1" and toy_v2.version == "V2"
    with pytest.raises(CheckpointError, match="V2 needs <cls> and <eos>"):
        GeneformerTokenizer(toy_v1, version="V2")
    forced = GeneformerTokenizer(toy_v2, version="V1")
    assert (forced.cls_id, forced.model_input_size) == (None, 2048)


def test_missing_dictionary_file(tmp_path):
    directory = write_dicts(tmp_path / "d", version="V2")
    (directory / "token_dictionary_gc95M.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"no token_dictionary\*\.pkl .*--geneformer-dicts"):
        GeneformerDictionaries.from_dir(directory)


def test_dictionary_with_foreign_objects_is_refused(tmp_path):
    directory = write_dicts(tmp_path / "d", version="V2")
    with open(directory / "gene_median_dictionary_gc95M.pkl", "wb") as fh:
        pickle.dump({A: Path("x")}, fh)
    with pytest.raises(CheckpointError, match="cannot read Geneformer dictionary .*not allowed"):
        GeneformerDictionaries.from_dir(directory)


def test_log_normalized_and_scaled_input_fail(toy_v2):
    adata = toy_adata()
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(np.log1p(adata.X.toarray() / 3.3))
    with pytest.raises(CountsRequiredError, match="log-normalized"):
        GeneformerTokenizer(toy_v2).tokenize(lognorm)
    scaled = adata.copy()
    scaled.X = adata.X.toarray() - 1.0
    with pytest.raises(CountsRequiredError, match="scaled values"):
        GeneformerTokenizer(toy_v2).tokenize(scaled)


# --- real dictionaries and PBMC3k ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_dicts(shared_dir) -> dict[str, GeneformerDictionaries]:
    return {
        "V1": GeneformerDictionaries.from_dir(shared_dir / V1_DIR),
        "V2": GeneformerDictionaries.from_dir(shared_dir / V2_DIR),
    }


@pytest.fixture(scope="module")
def pbmc300(shared_dir) -> ad.AnnData:
    adata = ad.read_h5ad(shared_dir / PBMC3K)
    return adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()


def test_real_dictionaries_load(real_dicts):
    v1, v2 = real_dicts["V1"], real_dicts["V2"]
    assert (v1.version, len(v1.token_dict)) == ("V1", 25_426)
    assert (v2.version, len(v2.token_dict)) == ("V2", 20_275)
    assert v2.token_dict["<cls>"] == 2 and v2.token_dict["<eos>"] == 3


def test_pbmc3k_gene_mapping_matches_reference(real_dicts, pbmc300):
    mapping = GeneformerTokenizer(real_dicts["V2"], gene_column="gene_ids").map_genes(pbmc300.var)
    assert (mapping.n_direct, mapping.n_mapped, mapping.n_tokens) == (11_885, 11_965, 11_922)
    assert mapping.n_collapsed_tokens == 43
    by_symbol = GeneformerTokenizer(real_dicts["V2"], gene_column="var_names").map_genes(
        pbmc300.var
    )
    assert by_symbol.identifier_type == "symbol"
    assert by_symbol.n_symbols == 13_714 and by_symbol.n_symbols_mapped < 13_714


@pytest.mark.parametrize(
    ("version", "gene_column"), [("V1", "gene_ids"), ("V2", None), ("V2", "var_names")]
)
def test_vectorized_equals_loop_on_pbmc3k(real_dicts, pbmc300, version, gene_column):
    tokenizer = GeneformerTokenizer(real_dicts[version], gene_column=gene_column)
    tokens = tokenizer.tokenize(pbmc300)
    reference = tokenize_loop(
        sp.csr_matrix(pbmc300.X), tokenizer.map_genes(pbmc300.var), **tokenizer.rank_options()
    )
    assert tokens.n_cells == 300 and len(tokens.dropped) == 0
    for i in range(tokens.n_cells):
        assert np.array_equal(tokens.cell(i)[0], reference[i]), f"cell {i}"
    limit = 2048 if version == "V1" else 4096
    assert tokens.lengths.max() <= limit
    if version == "V2":
        assert (tokens.input_ids[tokens.offsets[:-1]] == 2).all()
        assert (tokens.input_ids[tokens.offsets[1:] - 1] == 3).all()


def test_ties_between_genes_sharing_a_median_follow_gene_order(real_dicts):
    dicts = real_dicts["V2"]
    by_median = defaultdict(list)
    for gene, median in dicts.gene_median.items():
        by_median[median].append(gene)
    genes = max(by_median.values(), key=len)[:6]  # 72 genes share one median value
    assert len(genes) == 6
    for order in (genes, genes[::-1]):
        adata = ad.AnnData(
            X=sp.csr_matrix(np.full((2, 6), 3.0, dtype=np.float32)),
            var=pd.DataFrame(index=order),
        )
        tokens = GeneformerTokenizer(dicts).tokenize(adata)
        expected = [2, *(dicts.token_dict[g] for g in order), 3]
        assert tokens.cell(0)[0].tolist() == expected
        assert tokens.cell(1)[0].tolist() == expected


@pytest.mark.parametrize(
    "names",
    [
        [f"Gm{i}" for i in range(200)] + ["Actb", "Gapdh", "Cd3e"],  # mouse-like symbols
        [f"XYZ{i}QQ" for i in range(200)],  # random symbols
    ],
)
def test_low_vocabulary_overlap_names_identifier_type(real_dicts, names):
    adata = ad.AnnData(
        X=sp.csr_matrix(np.ones((3, len(names)), dtype=np.float32)),
        var=pd.DataFrame(index=names),
    )
    with pytest.raises(GeneMatchError, match=r"only 0\.0% of genes .*look like symbol"):
        GeneformerTokenizer(real_dicts["V1"]).tokenize(adata)


# --- properties ---------------------------------------------------------------------------

toy_counts = st.lists(
    st.lists(st.integers(min_value=0, max_value=6), min_size=7, max_size=7),
    min_size=1,
    max_size=6,
)


@settings(max_examples=50, deadline=None)
@given(rows=toy_counts, max_genes=st.integers(min_value=1, max_value=6))
def test_rank_value_properties(toy_v2, rows, max_genes):
    tokenizer = GeneformerTokenizer(toy_v2, max_position_embeddings=max_genes + 2)
    counts = sp.csr_matrix(np.array(rows, dtype=np.float32))
    mapping = tokenizer.map_genes(toy_adata().var)
    ids, lengths = rank_value_tokens(counts, mapping, **tokenizer.rank_options())
    loop = tokenize_loop(counts, mapping, **tokenizer.rank_options())
    assert np.array_equal(ids, np.concatenate(loop)) if loop else len(ids) == 0
    assert lengths.tolist() == [len(x) for x in loop]
    token_median = dict(zip(mapping.tokens.tolist(), mapping.medians.tolist(), strict=True))
    dense = counts.toarray()
    summed = np.zeros((len(dense), mapping.n_tokens))
    for gene, column in enumerate(mapping.columns):
        if column >= 0:
            summed[:, column] += dense[:, gene]
    column_of = {t: j for j, t in enumerate(mapping.tokens.tolist())}
    for row, cell in enumerate(loop):
        n_nonzero = int((summed[row] > 0).sum())
        if n_nonzero == 0:
            assert len(cell) == 0
            continue
        assert len(cell) == min(n_nonzero, max_genes) + 2 <= n_nonzero + 2
        assert cell[0] == 2 and cell[-1] == 3 and not np.isin(cell[1:-1], [0, 1, 2, 3]).any()
        genes = cell[1:-1].tolist()
        values = [summed[row, column_of[t]] / token_median[t] for t in genes]
        assert values == sorted(values, reverse=True)
        assert all(summed[row, column_of[t]] > 0 for t in genes)  # zero genes never appear
        assert len(set(genes)) == len(genes)


def test_normalization_uses_total_counts_over_all_input_genes(toy_v2):
    from scfmbench.models.geneformer.ranking import _block_entries

    tokenizer = GeneformerTokenizer(toy_v2)
    adata = toy_adata()
    singles, indptr, groups = _block_entries(
        sp.csr_matrix(adata.X), tokenizer.map_genes(adata.var), target_sum=10_000
    )
    # cell 0: 13 counts in total, 5 of them on an unmapped gene; C sums its alias (1 + 1)
    assert indptr.tolist() == [0, 3, 5, 5, 5]
    np.testing.assert_array_equal(
        singles.values[:3], [2 / 13 * 10_000 / 1.0, 2 / 13 * 10_000 / 2.0, 2 / 13 * 10_000 / 1.0]
    )
    assert groups.rows.tolist() == [0, 1]
    np.testing.assert_array_equal(groups.values, [2 / 13 * 10_000 / 0.5, 2 / 14 * 10_000 / 0.5])


def test_input_layouts_give_the_same_tokens(toy_v2):
    """Dense X, unsorted CSR indices and explicit zeros tokenize like canonical CSR."""
    adata = toy_adata()
    expected = GeneformerTokenizer(toy_v2).tokenize(adata)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    csr = sp.csr_matrix(adata.X)
    rows = list(zip(csr.indptr[:-1], csr.indptr[1:], strict=True))
    unsorted = sp.csr_matrix(
        (
            np.concatenate([csr.data[a:b][::-1] for a, b in rows]),
            np.concatenate([csr.indices[a:b][::-1] for a, b in rows]),
            csr.indptr,
        ),
        shape=csr.shape,
    )
    assert not unsorted.has_sorted_indices
    zeros = np.append(csr.indptr[:-1], csr.nnz + 1)  # an explicit 0 for gene E in the last cell
    with_zeros = sp.csr_matrix(
        (np.append(csr.data, 0.0), np.append(csr.indices, 6), zeros), shape=csr.shape
    )
    for X in (unsorted, with_zeros):
        variant = adata.copy()
        variant.X = X
        assert np.array_equal(
            GeneformerTokenizer(toy_v2).tokenize(variant).input_ids, expected.input_ids
        )
    assert np.array_equal(GeneformerTokenizer(toy_v2).tokenize(dense).input_ids, expected.input_ids)


def test_filter_pass_cells_are_listed_as_dropped(toy_v2):
    adata = toy_adata()
    adata.obs["filter_pass"] = [0, 1, 1, 1]
    tokens = GeneformerTokenizer(toy_v2).tokenize(adata)
    assert list(tokens.obs_names) == ["c1"]
    assert sorted(tokens.dropped) == ["c0", "c2", "c3"]
    assert tokens.cell(0)[0].tolist()[1:-1] == [toy_v2.token_dict[g] for g in (A, B, C)]
