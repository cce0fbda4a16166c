"""scGPT tokenizer: vocabulary, binning rule, <cls> layout, sampling, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scfmbench.embed import collate
from scfmbench.errors import CheckpointError, DataError, GeneMatchError
from scfmbench.models.scgpt.tokenizer import bin_csr, load_scgpt_vocab, tokenize_scgpt
from tests._reference_scgpt import bin_values
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import PBMC3K, TINY_GENES, make_tiny_adata, require_shared


def reference_bins(values: np.ndarray, n_bins: int, uniforms: np.ndarray) -> np.ndarray:
    """scGPT's rule written directly with np.quantile / np.digitize (one cell, non-zeros)."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    return np.ceil(uniforms * (right - left) + left).astype(np.int64)


# --- vocabulary ---------------------------------------------------------------------------------


def test_real_vocab_keeps_ids_and_special_tokens(scgpt_vocab):
    assert len(scgpt_vocab) == 60697
    assert (scgpt_vocab["<pad>"], scgpt_vocab["<cls>"], scgpt_vocab["<eoc>"]) == (
        60694,
        60695,
        60696,
    )


def test_vocab_appends_missing_special_tokens(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"A": 0, "B": 1, "<cls>": 2}))
    assert load_scgpt_vocab(path) == {"A": 0, "B": 1, "<cls>": 2, "<pad>": 3, "<eoc>": 4}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('["A", "B"]', "not a \\{gene symbol"),
        ('{"A": 0, "B": 0}', "same id"),
    ],
)
def test_vocab_bad_files(tmp_path, content, match):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_scgpt_vocab(path)


# --- binning ------------------------------------------------------------------------------------


def test_binning_hand_computed_without_ties():
    # non-zeros 3,1,2,5,4 (n=5), n_bins=5: edges at virtual indices 0, 4/3, 8/3, 4 of the sorted
    # values 1..5 = [1, 2.33, 3.67, 5]; 1 and 5 sit on edges but only one edge each → no choice
    values = np.array([0, 3, 1, 0, 2, 5, 4], dtype=np.float32)
    for seed in range(5):
        np.testing.assert_array_equal(
            bin_values(values, n_bins=5, seed=seed), [0, 2, 1, 0, 1, 4, 3]
        )


def test_binning_ties_at_edges_use_seeded_uniforms():
    # non-zeros 1,1,1,1,2 (n=5), n_bins=5: edges [1, 1, 1, 2]. A 1 is ≥ 3 edges (left digitize 3)
    # and > 0 edges (right digitize 0): bin = ceil(3 - 3u) ∈ {1, 2, 3}; the 2 gets 4.
    values = np.array([0, 1, 1, 0, 1, 1, 2], dtype=np.float64)
    u = np.random.default_rng(7).random(5)
    expected = np.zeros(7, dtype=np.int64)
    expected[[1, 2, 4, 5]] = np.ceil(3 - 3 * u[:4]).astype(np.int64)
    expected[6] = 4
    got = bin_values(values, n_bins=5, seed=7)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(bin_values(values, n_bins=5, seed=7), got)  # seeded
    seen = {int(b) for seed in range(40) for b in bin_values(values, n_bins=5, seed=seed)[[1, 2]]}
    assert seen == {1, 2, 3}


def test_single_value_cell_draws_from_all_bins():
    # one non-zero value equals all 50 edges: any bin 1..50 is possible, as in the reference
    draws = {int(bin_values(np.array([0.0, 7.0]), seed=s)[1]) for s in range(300)}
    assert draws <= set(range(1, 51)) and len(draws) > 30


def test_binning_matches_numpy_reference_on_counts():
    rng = np.random.default_rng(0)
    cells = [
        rng.geometric(0.3, size=int(rng.integers(1, 400))).astype(np.float32) for _ in range(200)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    u = np.random.default_rng(3).random(indptr[-1])
    got = bin_csr(indptr, np.concatenate(cells), n_bins=51, uniforms=u)
    expected = np.concatenate(
        [reference_bins(c, 51, u[indptr[i] : indptr[i + 1]]) for i, c in enumerate(cells)]
    )
    np.testing.assert_array_equal(got, expected)


nonneg_cells = arrays(
    np.float64,
    st.integers(1, 60),
    elements=st.one_of(
        st.just(0.0), st.integers(1, 30).map(float), st.floats(1e-3, 1e4, allow_nan=False)
    ),
)
count_cells = arrays(np.int64, st.integers(1, 60), elements=st.integers(0, 30))


@settings(max_examples=50, deadline=None)
@given(values=nonneg_cells, n_bins=st.integers(3, 60), seed=st.integers(0, 2**16))
def test_binning_properties(values, n_bins, seed):
    bins = bin_values(values, n_bins=n_bins, seed=seed)
    nonzero = values > 0
    assert (bins[~nonzero] == 0).all()
    assert ((bins[nonzero] >= 1) & (bins[nonzero] <= n_bins - 1)).all()
    # monotone: every value's bin ≤ every larger value's bin (equal values may differ: ties)
    levels = np.unique(values[nonzero])
    lowest = [bins[values == v].min() for v in levels]
    highest = [bins[values == v].max() for v in levels]
    assert all(h <= lo for h, lo in zip(highest[:-1], lowest[1:], strict=True))
    # only the order matters: scaling by 8 (exact in floating point) keeps the bins
    np.testing.assert_array_equal(bins, bin_values(values * 8.0, n_bins=n_bins, seed=seed))


@settings(max_examples=50, deadline=None)
@given(counts=count_cells, seed=st.integers(0, 2**16))
def test_binning_ignores_normalization(counts, seed):
    counts = counts.astype(np.float64)
    lognorm = np.log1p(counts / max(counts.sum(), 1.0) * 1e4)
    np.testing.assert_array_equal(bin_values(counts, seed=seed), bin_values(lognorm, seed=seed))


@settings(max_examples=50, deadline=None)
@given(
    counts=arrays(
        np.int64,
        st.tuples(st.integers(1, 6), st.just(len(TINY_GENES))),
        elements=st.integers(0, 20),
    ),
    seed=st.integers(0, 1000),
)
def test_tokens_are_the_nonzero_genes(counts, seed):
    vocab = {g: i + 10 for i, g in enumerate(TINY_GENES)} | {"<pad>": 0, "<cls>": 1, "<eoc>": 2}
    adata = AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=TINY_GENES))
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    tokens = tokenize_scgpt(adata, vocab=vocab, seed=seed, max_seq_len=100)
    kept = np.flatnonzero(counts.sum(1) > 0)
    assert list(tokens.obs_names) == [f"c{i}" for i in kept]
    for i, row in enumerate(kept):
        ids, values = tokens.cell(i)
        assert ids[0] == 1 and values[0] == -2
        np.testing.assert_array_equal(ids[1:], np.flatnonzero(counts[row]) + 10)
        assert ((values[1:] >= 1) & (values[1:] <= 50)).all()


# --- tokenize -----------------------------------------------------------------------------------


def test_tokenize_exact_tokens(scgpt_vocab):
    x = np.array(
        [
            [0, 3, 0, 1, 0, 0, 0, 0, 0, 0, 5, 0],
            [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0],
        ],
        dtype=np.float32,
    )
    adata = AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=TINY_GENES))
    adata.obs_names = ["a", "b", "c"]
    tokens = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=0)
    cls = scgpt_vocab["<cls>"]
    # cell a: CD3E (3) and CD79A (1); NOT_A_GENE_1 is not in the vocabulary
    ids, values = tokens.cell(0)
    np.testing.assert_array_equal(ids, [cls, scgpt_vocab["CD3E"], scgpt_vocab["CD79A"]])
    np.testing.assert_array_equal(values, [-2.0, 50.0, 1.0])
    ids, _ = tokens.cell(1)
    np.testing.assert_array_equal(ids, [cls, scgpt_vocab["CD3D"]])
    assert list(tokens.obs_names) == ["a", "b"] and list(tokens.dropped) == ["c"]
    assert tokens.values.dtype == np.float32 and tokens.input_ids.dtype == np.int64
    match = tokens.gene_match
    assert (match.n_matched, match.n_total, match.identifier_type) == (10, 12, "symbol")
    assert match.fraction_counts == pytest.approx(6 / 20)


def test_tokenize_gene_column_and_normalize_invariance(scgpt_vocab):
    adata = make_tiny_adata(n_cells=30)
    adata.var["symbol"] = adata.var_names
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    raw = tokenize_scgpt(adata, vocab=scgpt_vocab, gene_column="symbol", normalize=False)
    normed = tokenize_scgpt(adata, vocab=scgpt_vocab, gene_column="symbol", normalize=True)
    np.testing.assert_array_equal(raw.input_ids, normed.input_ids)
    np.testing.assert_array_equal(raw.values, normed.values)
    lognorm = adata.copy()
    x = lognorm.X.toarray()
    lognorm.X = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    pre = tokenize_scgpt(lognorm, vocab=scgpt_vocab, gene_column="symbol", normalize=False)
    np.testing.assert_array_equal(raw.values, pre.values)


def test_padding_and_cls_position(scgpt_vocab):
    tokens = tokenize_scgpt(make_tiny_adata(), vocab=scgpt_vocab)
    batch = collate(
        tokens, np.arange(tokens.n_cells), pad_token_id=scgpt_vocab["<pad>"], pad_value=-2.0
    )
    lengths = tokens.lengths
    assert batch.input_ids.shape == (tokens.n_cells, lengths.max())
    assert (batch.input_ids[:, 0] == scgpt_vocab["<cls>"]).all()
    assert (batch.values[:, 0] == -2).all()
    for row, n in enumerate(lengths):
        assert batch.attention_mask[row].sum() == n
        assert (batch.input_ids[row, n:] == scgpt_vocab["<pad>"]).all()
        assert (batch.values[row, n:] == -2).all()


def test_long_cells_are_sampled_with_cls_first_and_seeded(scgpt_vocab):
    adata = make_tiny_adata(n_cells=20)
    full = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=0)
    short = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=0, max_seq_len=4)
    again = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=0, max_seq_len=4)
    other = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=1, max_seq_len=4)
    np.testing.assert_array_equal(short.input_ids, again.input_ids)
    np.testing.assert_array_equal(short.values, again.values)
    assert not np.array_equal(short.input_ids, other.input_ids)
    assert (short.lengths == np.minimum(full.lengths, 4)).all()
    for i in range(full.n_cells):
        ids, values = short.cell(i)
        full_ids, full_values = full.cell(i)
        assert ids[0] == scgpt_vocab["<cls>"] and values[0] == -2
        # a subset of the cell's genes, in var order, with the bins of the whole cell
        positions = [int(np.flatnonzero(full_ids == g)[0]) for g in ids[1:]]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        np.testing.assert_array_equal(values[1:], full_values[positions])


def test_a_cells_tokens_do_not_depend_on_the_other_cells(scgpt_vocab):
    adata = make_tiny_adata(n_cells=30, seed=4)
    adata.X = adata.X.multiply(np.arange(1, adata.n_vars + 1) % 3 + 1).tocsr()  # many ties
    whole = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=9, max_seq_len=6)
    pieces = [
        tokenize_scgpt(adata[rows].copy(), vocab=scgpt_vocab, seed=9, max_seq_len=6)
        for rows in (slice(0, 7), slice(7, 30), [29, 3, 11])
    ]
    position = {name: i for i, name in enumerate(whole.obs_names)}
    for piece in pieces:
        for j, name in enumerate(piece.obs_names):
            ids, values = piece.cell(j)
            expected_ids, expected_values = whole.cell(position[name])
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_array_equal(values, expected_values)
    renamed = adata.copy()
    renamed.obs_names = [f"other{i}" for i in range(adata.n_obs)]
    moved = tokenize_scgpt(renamed, vocab=scgpt_vocab, seed=9, max_seq_len=6)
    assert not np.array_equal(moved.values, whole.values)  # the name is part of the seed


def test_binning_in_blocks_of_cells_changes_nothing(scgpt_vocab, monkeypatch):
    import scfmbench.models.scgpt.tokenizer as _scgpt

    adata = make_tiny_adata(n_cells=30, seed=5)
    whole = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=2)
    monkeypatch.setattr(_scgpt, "BIN_BLOCK_CELLS", 4)
    blocks = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=2)
    np.testing.assert_array_equal(blocks.input_ids, whole.input_ids)
    np.testing.assert_array_equal(blocks.values, whole.values)


def test_tokenize_is_deterministic(scgpt_vocab):
    adata = make_tiny_adata(n_cells=25, seed=3)
    a = tokenize_scgpt(adata, vocab=scgpt_vocab, seed=5)
    b = tokenize_scgpt(adata.copy(), vocab=scgpt_vocab, seed=5)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.settings == b.settings


# --- bad inputs ---------------------------------------------------------------------------------


def test_scaled_input_is_refused(scgpt_vocab):
    adata = make_tiny_adata()
    x = adata.X.toarray()
    adata.X = (x - x.mean(0)) / (x.std(0) + 1)
    with pytest.raises(DataError, match="scaled values .*pass raw counts or normalized data"):
        tokenize_scgpt(adata, vocab=scgpt_vocab)


def test_non_finite_input_is_refused(scgpt_vocab):
    adata = make_tiny_adata()
    x = adata.X.toarray()
    x[0, 0] = np.nan
    adata.X = x
    with pytest.raises(DataError, match="NaN"):
        tokenize_scgpt(adata, vocab=scgpt_vocab)


def test_ensembl_ids_get_an_identifier_hint(scgpt_vocab):
    genes = [f"ENSG{i:011d}" for i in range(len(TINY_GENES))]
    adata = make_tiny_adata(genes=genes)
    with pytest.raises(
        GeneMatchError, match="ensembl identifiers .* uses symbol identifiers.*--gene-column"
    ):
        tokenize_scgpt(adata, vocab=scgpt_vocab)


def test_bad_options(scgpt_vocab):
    adata = make_tiny_adata()
    with pytest.raises(DataError, match="max_seq_len"):
        tokenize_scgpt(adata, vocab=scgpt_vocab, max_seq_len=1)
    with pytest.raises(DataError, match="n_bins"):
        tokenize_scgpt(adata, vocab=scgpt_vocab, n_bins=2)
    with pytest.raises(CheckpointError, match="<cls>"):
        tokenize_scgpt(adata, vocab={"CD3D": 0})


def test_pbmc3k_overlap(scgpt_vocab):
    import anndata as ad

    adata = ad.read_h5ad(require_shared(PBMC3K))[:100].copy()
    by_names = tokenize_scgpt(adata, vocab=scgpt_vocab, gene_column="var_names")
    assert by_names.gene_match.n_matched == 12300  # make.unique names (".1") are not symbols
    tokens = tokenize_scgpt(adata, vocab=scgpt_vocab)
    match = tokens.gene_match.to_dict()
    assert match["gene_column"] == "gene_symbol"  # the original symbols, found by name
    assert (match["n_genes"], match["n_matched"]) == (13714, 12321)
    assert match["fraction_counts"] == pytest.approx(0.9637, abs=2e-3)
    assert tokens.n_cells == 100 and tokens.lengths.max() <= 1200


def test_missing_shared_fails_on_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="shared"):
        require_shared(tmp_path / "shared")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_shared(tmp_path / "shared")
