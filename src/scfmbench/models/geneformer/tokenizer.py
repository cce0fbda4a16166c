"""Geneformer rank-value tokenizer, token-exact with the reference ``TranscriptomeTokenizer``.

Per cell: raw counts of input genes that map to the same vocabulary gene are summed, each
gene's count is divided by the cell's total count (over *all* input genes), multiplied by
``target_sum`` and divided by the gene's median from the median dictionary (float64, in that
order). Nonzero genes are ranked by this value, highest first, and the top genes are kept:
V1 ``2048`` genes, V2 ``<cls>`` + ``4094`` genes + ``<eos>``.

The reference reads the total from ``obs["n_counts"]`` (conventionally the cell's total
counts); here it is always computed from ``X`` over all input genes, mapped or not. Within a
cell it is a constant factor, so it cannot change the ranking beyond float64 rounding.

Tie rule (the reference's unstable argsort leaves it machine-dependent): genes with exactly
equal values keep the *collapsed gene order*, i.e. genes that map to a token of their own in
input order, followed by the summed groups in order of their first member.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.genes import (
    ENSEMBL_RE,
    GeneIdentifiers,
    GeneMatch,
    detect_identifier_type,
    match_genes,
    resolve_gene_identifiers,
    strip_version,
)
from scfmbench.data.matrix import check_finite, require_counts, to_csr
from scfmbench.data.validate import filter_pass_mask
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.hashing import hash_file, hash_json
from scfmbench.models.base import TokenizedCells

logger = logging.getLogger(__name__)

DICTIONARY_KINDS = (
    "token_dictionary",
    "gene_median_dictionary",
    "gene_name_id_dict",
    "ensembl_mapping_dict",
)
REQUIRED_KINDS = ("token_dictionary", "gene_median_dictionary")
CORPUS_SUFFIXES = ("_gc104M", "_gc95M", "_gc30M", "")
INPUT_SIZES = {"V1": 2048, "V2": 4096}
TARGET_SUM = 10_000
TIE_RULE = "stable-by-collapsed-gene-order"
TOKENIZER_REVISION = 1
CHUNK_CELLS = 256  # small blocks keep the working set in cache
DICTS_FLAG = "--geneformer-dicts"

# Dictionary pickles hold only builtins and numpy scalars; anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class _DictionaryUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dictionary")


def _load_dictionary(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _DictionaryUnpickler(fh).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read Geneformer dictionary {path} ({type(exc).__name__}: {exc}); "
            f"replace it with the released file or pass another directory with {DICTS_FLAG}."
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"Geneformer dictionary {path} holds a {type(obj).__name__}, not a dict; "
            f"pass the released dictionaries with {DICTS_FLAG}."
        )
    return obj


def _find_dictionary(directory: Path, kind: str) -> Path | None:
    found = [directory / f"{kind}{s}.pkl" for s in CORPUS_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise CheckpointError(
            f"{directory} holds several {kind} files ({', '.join(p.name for p in found)}); "
            f"keep one corpus's dictionaries per directory and pass it with {DICTS_FLAG}."
        )
    return found[0] if found else None


# Where a clone of the Hugging Face repository keeps the dictionaries, relative to the repository
# root: V2 (gc95M/gc104M) in geneformer/, V1 (gc30M) in geneformer/gene_dictionaries_30m/.
DICTIONARY_SUBDIRS = (
    ".",
    "geneformer",
    "geneformer/gene_dictionaries_30m",
    "gene_dictionaries_30m",
)
SEARCH_LEVELS = 3  # the model folder, its parent (the repository root) and one more


def dictionary_sets(directory: Path) -> list[dict[str, Path]]:
    """The dictionary sets in ``directory``, one per corpus suffix (``_gc104M``, ``_gc95M``,
    ``_gc30M`` or none), each ``{kind: path}`` with at least the required kinds."""
    sets = []
    for suffix in CORPUS_SUFFIXES:
        files = {kind: directory / f"{kind}{suffix}.pkl" for kind in DICTIONARY_KINDS}
        files = {kind: path for kind, path in files.items() if path.is_file()}
        if all(kind in files for kind in REQUIRED_KINDS):
            sets.append(files)
    return sets


def find_dictionaries(
    model_dir: Path, *, vocab_size: int, dicts_dir: Path | None = None
) -> GeneformerDictionaries:
    """The dictionaries whose token dictionary has ``vocab_size`` tokens.

    Searched in ``dicts_dir`` when given, else in the model folder and up to two folders
    above it (a clone of the Hugging Face repository: ``Geneformer-V1-10M/`` beside
    ``geneformer/gene_dictionaries_30m/*_gc30M.pkl``, ``Geneformer-V2-104M/`` beside
    ``geneformer/*_gc104M.pkl``), each folder with its ``DICTIONARY_SUBDIRS``. The first set
    with the model's vocabulary size wins (25,426 tokens: gc30M; 20,275: gc95M/gc104M).

    Raises:
        CheckpointError: no dictionaries found, or none of the model's vocabulary size.
    """
    bases = [Path(dicts_dir)] if dicts_dir is not None else []
    if dicts_dir is None:
        bases = [model_dir, *list(Path(model_dir).resolve().parents)[: SEARCH_LEVELS - 1]]
    if dicts_dir is not None and not Path(dicts_dir).is_dir():
        raise CheckpointError(
            f"Geneformer dictionary directory {dicts_dir} does not exist; pass the folder "
            f"with token_dictionary*.pkl and gene_median_dictionary*.pkl via {DICTS_FLAG}."
        )
    seen: list[str] = []
    for base in bases:
        for sub in DICTIONARY_SUBDIRS:
            directory = base / sub
            if not directory.is_dir():
                continue
            for files in dictionary_sets(directory):
                size = len(_load_dictionary(files["token_dictionary"]))
                seen.append(f"{files['token_dictionary']} ({size} tokens)")
                if size == vocab_size:
                    logger.info(
                        "geneformer: dictionaries %s (%d tokens)", files["token_dictionary"], size
                    )
                    return GeneformerDictionaries.from_files(**files)
    where = dicts_dir if dicts_dir is not None else f"{model_dir} or the folders above it"
    if not seen:
        raise CheckpointError(
            f"no token_dictionary*.pkl with gene_median_dictionary*.pkl in {where}; pass the "
            f"folder holding the Geneformer dictionaries with {DICTS_FLAG}."
        )
    raise CheckpointError(
        f"the model has vocab_size {vocab_size} but the dictionaries found have other sizes "
        f"({'; '.join(seen[:4])}); pass this model's corpus dictionaries with {DICTS_FLAG} "
        "(25,426 tokens: gc30M for V1; 20,275: gc95M/gc104M for V2)."
    )


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The four Geneformer dictionaries (token, gene median, gene name → ID, ID mapping).

    Load with ``from_dir`` (accepts ``*_gc30M.pkl``, ``*_gc95M.pkl``, ``*_gc104M.pkl`` and the
    old unsuffixed names) or ``from_files``. Without an ensembl mapping dictionary the mapping
    is the identity over the token dictionary (as in the reference); without a gene-name
    dictionary only Ensembl identifiers can be tokenized.
    """

    token_dict: dict[str, int] = field(repr=False)
    gene_median: dict[str, float] = field(repr=False)
    ensembl_mapping: dict[str, str] = field(repr=False)
    gene_name_id: dict[str, str] | None = field(repr=False)
    files: dict[str, Path]
    sha256: str

    @classmethod
    def from_dir(cls, directory: str | Path) -> GeneformerDictionaries:
        """Load the dictionaries found in ``directory`` (no other location is searched)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(
                f"Geneformer dictionary directory {directory} does not exist; pass the folder "
                f"with token_dictionary*.pkl and gene_median_dictionary*.pkl via {DICTS_FLAG}."
            )
        files = {kind: _find_dictionary(directory, kind) for kind in DICTIONARY_KINDS}
        for kind in REQUIRED_KINDS:
            if files[kind] is None:
                raise CheckpointError(
                    f"no {kind}*.pkl (e.g. {kind}_gc95M.pkl or {kind}.pkl) in {directory}; "
                    f"pass the folder holding the Geneformer dictionaries with {DICTS_FLAG}."
                )
        return cls.from_files(**{kind: p for kind, p in files.items() if p is not None})

    @classmethod
    def from_files(
        cls,
        *,
        token_dictionary: str | Path,
        gene_median_dictionary: str | Path,
        ensembl_mapping_dict: str | Path | None = None,
        gene_name_id_dict: str | Path | None = None,
    ) -> GeneformerDictionaries:
        """Load explicitly named dictionary files."""
        named = {
            "token_dictionary": token_dictionary,
            "gene_median_dictionary": gene_median_dictionary,
            "gene_name_id_dict": gene_name_id_dict,
            "ensembl_mapping_dict": ensembl_mapping_dict,
        }
        files = {kind: Path(p) for kind, p in named.items() if p is not None}
        for kind, path in files.items():
            if not path.is_file():
                raise CheckpointError(
                    f"Geneformer {kind} file {path} does not exist; pass the folder holding "
                    f"the dictionaries with {DICTS_FLAG}."
                )
        loaded = {kind: _load_dictionary(path) for kind, path in files.items()}
        token_dict = {str(k): int(v) for k, v in loaded["token_dictionary"].items()}
        genes = [k for k in token_dict if not k.startswith("<")]
        medians = loaded["gene_median_dictionary"]
        lacking = [g for g in genes if g not in medians]
        if lacking:
            raise CheckpointError(
                f"{files['gene_median_dictionary']} has no median for {len(lacking)} token "
                f"genes (e.g. {lacking[:3]}); token and median dictionaries must come from the "
                f"same corpus ({DICTS_FLAG})."
            )
        if "ensembl_mapping_dict" in loaded:
            mapping = {str(k): str(v) for k, v in loaded["ensembl_mapping_dict"].items()}
        else:
            logger.info("no ensembl_mapping_dict: using the identity over the token dictionary")
            mapping = {g: g for g in genes}
        name_id = loaded.get("gene_name_id_dict")
        return cls(
            token_dict=token_dict,
            gene_median={g: float(medians[g]) for g in genes},
            ensembl_mapping=mapping,
            gene_name_id=None if name_id is None else {str(k): str(v) for k, v in name_id.items()},
            files=files,
            sha256=hash_json({kind: hash_file(p) for kind, p in sorted(files.items())}),
        )

    @cached_property
    def mapping_targets(self) -> dict[str, str]:
        """The ensembl mapping restricted to targets in the token dictionary (as the reference)."""
        return {k: v for k, v in self.ensembl_mapping.items() if v in self.token_dict}

    @property
    def version(self) -> str:
        """``"V2"`` when the vocabulary has ``<cls>`` and ``<eos>``, else ``"V1"``."""
        return "V2" if {"<cls>", "<eos>"} <= self.token_dict.keys() else "V1"


def resolve_version(
    dicts: GeneformerDictionaries,
    *,
    version: str | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[str, int]:
    """Model version and input size from the dictionaries (and model config), or an override.

    Returns:
        ``(version, model_input_size)``: V1 → 2048 tokens, V2 → 4096 tokens, capped at the
        model's ``max_position_embeddings``.
    """
    detected = dicts.version
    if version is None:
        version = detected
    elif version not in INPUT_SIZES:
        raise ConfigError(f"unknown Geneformer version {version!r}; choose V1 or V2.")
    elif version == "V2" and detected == "V1":
        raise CheckpointError(
            f"Geneformer V2 needs <cls> and <eos> tokens but {dicts.files['token_dictionary']} "
            f"has none; pass the gc95M/gc104M dictionaries with {DICTS_FLAG} or use version V1."
        )
    elif version != detected:
        logger.warning(
            "Geneformer version forced to %s; dictionaries look like %s", version, detected
        )
    size = INPUT_SIZES[version]
    if max_position_embeddings is not None and max_position_embeddings < size:
        logger.info(
            "model input size capped at max_position_embeddings=%d", max_position_embeddings
        )
        size = int(max_position_embeddings)
    return version, size


@dataclass(frozen=True)
class GeneMapping:
    """How input genes reach Geneformer tokens (columns of the collapsed count matrix).

    ``columns[i]`` is the collapsed column of input gene ``i`` or -1; column ``j`` has token
    ``tokens[j]`` and median ``medians[j]``. Columns are the genes with a token of their own
    in input order, then the summed groups in order of their first member.
    """

    identifier_type: str
    n_genes: int
    n_symbols: int  # input genes given as symbols (mapped through the gene-name dictionary)
    n_symbols_mapped: int  # of those, found in the gene-name dictionary
    n_direct: int  # Ensembl IDs directly in the token dictionary
    n_mapped: int  # genes that reach a token through the ensembl mapping dictionary
    n_collapsed_tokens: int  # tokens that receive the summed counts of several genes
    columns: np.ndarray = field(repr=False)
    tokens: np.ndarray = field(repr=False)
    medians: np.ndarray = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_single(self) -> int:
        """Columns fed by one input gene; the summed groups are the columns after them."""
        return self.n_tokens - self.n_collapsed_tokens

    def summary(self) -> str:
        text = (
            f"geneformer: {self.n_mapped}/{self.n_genes} genes map onto {self.n_tokens} tokens "
            f"({self.n_direct} directly in the vocabulary, {self.n_collapsed_tokens} tokens sum "
            "several genes)"
        )
        if self.n_symbols:
            text += (
                f"; {self.n_symbols_mapped}/{self.n_symbols} symbols found in the gene-name "
                "dictionary"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "identifier_type": self.identifier_type,
            "n_genes": self.n_genes,
            "n_symbols": self.n_symbols,
            "n_symbols_mapped": self.n_symbols_mapped,
            "n_direct": self.n_direct,
            "n_mapped": self.n_mapped,
            "n_tokens": self.n_tokens,
            "n_collapsed_tokens": self.n_collapsed_tokens,
        }


def map_genes(keys: pd.Index, dicts: GeneformerDictionaries) -> GeneMapping:
    """Map gene identifiers (Ensembl IDs or symbols, per gene) onto Geneformer tokens.

    Ensembl IDs are upper-cased (version suffix removed) and mapped through the ensembl
    mapping dictionary, keeping targets in the token dictionary; symbols first go through
    the gene-name dictionary.
    """
    keys = [str(k) for k in keys]
    is_ensembl = [bool(ENSEMBL_RE.match(k.upper())) for k in keys]
    n_symbols = len(keys) - sum(is_ensembl)
    if n_symbols and dicts.gene_name_id is None:
        examples = [k for k, e in zip(keys, is_ensembl, strict=True) if not e][:3]
        raise CheckpointError(
            f"{n_symbols} genes are symbols (e.g. {examples}) but "
            f"no gene_name_id_dict*.pkl was loaded; add it to {DICTS_FLAG} or pass "
            "--gene-column with a var column of Ensembl IDs."
        )
    name_id = dicts.gene_name_id or {}
    ensembl: list[str | None] = []
    for key, ens in zip(keys, is_ensembl, strict=True):
        gene_id = strip_version(key.upper()) if ens else name_id.get(key)
        ensembl.append(None if gene_id is None else gene_id.upper())
    vocab, targets = dicts.token_dict, dicts.mapping_targets
    mapped = [None if e is None else targets.get(e) for e in ensembl]
    counts = Counter(m for m in mapped if m is not None)
    order = [m for m in dict.fromkeys(mapped) if m is not None and counts[m] == 1]
    order += [m for m in counts if counts[m] > 1]
    column_of = {gene: j for j, gene in enumerate(order)}
    columns = np.fromiter(
        (column_of[m] if m is not None else -1 for m in mapped), dtype=np.int32, count=len(keys)
    )
    return GeneMapping(
        identifier_type=detect_identifier_type(keys),
        n_genes=len(keys),
        n_symbols=n_symbols,
        n_symbols_mapped=sum(1 for e, s in zip(ensembl, is_ensembl, strict=True) if not s and e),
        n_direct=sum(1 for e in ensembl if e is not None and e in vocab),
        n_mapped=int((columns >= 0).sum()),
        n_collapsed_tokens=sum(1 for c in counts.values() if c > 1),
        columns=columns,
        tokens=np.array([vocab[g] for g in order], dtype=np.int64),
        medians=np.array([dicts.gene_median[g] for g in order], dtype=np.float64),
    )


def _segment_positions(counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Targets for items grouped by row (``counts[r]`` of row ``r``) placed from ``starts[r]``."""
    first = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) + np.repeat(starts - first, counts)


@dataclass
class _Entries:
    """Nonzero collapsed entries of a block: one value per (row, column), rows ascending."""

    rows: np.ndarray  # (n,) int64 row of each entry
    columns: np.ndarray  # (n,) int64 collapsed column, ascending within a row
    values: np.ndarray  # (n,) float64 count / n_counts * target_sum / median

    def lookup(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Values at (row, column) pairs that are known to be entries."""
        width = int(self.columns.max(initial=0)) + 1
        key = self.rows * width + self.columns
        return self.values[np.searchsorted(key, rows * width + columns)]


def _block_entries(
    block: sp.csr_matrix, mapping: GeneMapping, *, target_sum: float
) -> tuple[_Entries, np.ndarray, _Entries]:
    """Entries of genes with a token of their own (CSR-ordered, with indptr) and summed groups.

    Returns:
        ``(singles, singles_indptr, groups)``; ``singles.rows`` is left empty (derivable from
        the indptr) to save a pass over the data.
    """
    if not block.has_sorted_indices:
        block = block.sorted_indices()
    if not block.data.all():  # explicit zeros are not expressed genes
        block = block.copy()
        block.eliminate_zeros()
    n_counts = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()  # over all input genes
    columns = mapping.columns[block.indices]
    single = columns.view(np.uint32) < mapping.n_single  # -1 (unmapped) wraps to a huge value
    before = np.zeros(len(single) + 1, dtype=np.int32)
    np.cumsum(single, out=before[1:])
    indptr = before[block.indptr].astype(np.int64)
    s_columns = columns[single]
    s_values = block.data[single].astype(np.float64)
    s_values /= np.repeat(n_counts, np.diff(indptr))
    s_values *= target_sum
    s_values /= mapping.medians[s_columns]
    # genes sharing a token: sum their raw counts per (row, column) before normalizing
    grouped = np.flatnonzero(columns >= mapping.n_single)
    g_rows = np.searchsorted(block.indptr, grouped, side="right") - 1
    keys, where = np.unique(g_rows * mapping.n_tokens + columns[grouped], return_inverse=True)
    sums = np.bincount(where, weights=block.data[grouped].astype(np.float64), minlength=len(keys))
    g_rows, g_columns = np.divmod(keys, mapping.n_tokens)
    g_values = sums / n_counts[g_rows] * target_sum / mapping.medians[g_columns]
    singles = _Entries(np.zeros(0, np.int64), s_columns, s_values)
    return singles, indptr, _Entries(g_rows, g_columns, g_values)


def _rank_block(
    block: sp.csr_matrix, mapping: GeneMapping, *, max_genes: int, target_sum: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ranked gene tokens (flat) and their number per cell for one block of cells.

    One uint64 sort of (row, descending float32 value, collapsed column) keys ranks every
    cell; runs whose float32 values are equal (near-ties) are re-sorted on the exact float64
    values, so the result equals a stable per-cell ``argsort(-value)`` in collapsed order.
    """
    n_rows = block.shape[0]
    singles, indptr, groups = _block_entries(block, mapping, target_sum=target_sum)
    n_single = np.diff(indptr)
    lengths = n_single + np.bincount(groups.rows, minlength=n_rows)
    col_bits = max(int(mapping.n_tokens - 1).bit_length(), 1)
    row_shift = 31 + col_bits
    if max(int(n_rows - 1).bit_length(), 1) + row_shift > 64:
        raise ValueError(f"{n_rows} rows × {mapping.n_tokens} tokens do not fit a 64-bit key")
    key = np.empty(len(singles.values) + len(groups.values), dtype=np.uint64)
    n = len(singles.values)
    row_high = np.arange(n_rows, dtype=np.uint64) << np.uint64(row_shift)
    for part, entries, high in (
        (key[:n], singles, np.repeat(row_high, n_single)),
        (key[n:], groups, row_high[groups.rows]),
    ):
        # positive floats order like their bit patterns; subtract from the max for "descending"
        bits = np.int32(0x7FFFFFFF) - entries.values.astype(np.float32).view(np.int32)
        part[:] = bits.astype(np.uint64) << np.uint64(col_bits)
        part |= entries.columns.astype(np.uint64)
        part |= high
    key.sort()
    column_mask = np.uint64((1 << col_bits) - 1)
    head = key >> np.uint64(col_bits)
    tie = head[1:] == head[:-1]
    if tie.any():
        member = np.zeros(len(key), dtype=bool)
        member[1:] |= tie
        member[:-1] |= tie
        idx = np.flatnonzero(member)
        run = np.cumsum(np.concatenate([[True], ~tie])[idx])  # a run starts after a non-tie
        rows = (key[idx] >> np.uint64(row_shift)).astype(np.int64)
        columns = (key[idx] & column_mask).astype(np.int64)
        exact = np.empty(len(idx))
        in_group = columns >= mapping.n_single
        exact[in_group] = groups.lookup(rows[in_group], columns[in_group])
        exact[~in_group] = _singles_of_rows(singles, indptr, np.unique(rows[~in_group])).lookup(
            rows[~in_group], columns[~in_group]
        )
        key[idx] = key[idx][np.lexsort((columns, -exact, run))]
    tokens = mapping.tokens[(key & column_mask).astype(np.int64)]
    if lengths.max(initial=0) > max_genes:
        starts = np.cumsum(lengths) - lengths
        tokens = tokens[np.arange(len(tokens)) - np.repeat(starts, lengths) < max_genes]
    return tokens, np.minimum(lengths, max_genes)


def _singles_of_rows(singles: _Entries, indptr: np.ndarray, rows: np.ndarray) -> _Entries:
    """The single-gene entries of a few rows, with their rows filled in."""
    counts = indptr[rows + 1] - indptr[rows]
    at = _segment_positions(counts, indptr[rows])
    return _Entries(np.repeat(rows, counts), singles.columns[at], singles.values[at])


def rank_value_tokens(
    counts: sp.csr_matrix,
    mapping: GeneMapping,
    *,
    max_genes: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = TARGET_SUM,
    chunk_cells: int = CHUNK_CELLS,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized rank-value encoding of every cell of a raw count matrix.

    Cells are processed in blocks of at most ``chunk_cells`` (bounded memory), on ``n_jobs``
    threads.

    Args:
        counts: (n_cells, n_genes) raw counts, genes in ``mapping`` order.
        mapping: the gene → token mapping from ``map_genes``.
        max_genes: genes kept per cell (model input size, minus 2 with special tokens).
        cls_id, eos_id: tokens put before and after the genes (V2), or None (V1).

    Returns:
        ``(input_ids, lengths)``: flat int64 tokens of the cells that have any, and the number
        of tokens per input cell (0 for a cell without any in-vocabulary gene).
    """
    if not isinstance(counts, sp.csr_matrix):
        counts = to_csr(counts)
    n_cells = counts.shape[0]
    size = max(1, min(chunk_cells, -(-n_cells // max(n_jobs, 1))))

    def rank(lo: int) -> tuple[np.ndarray, np.ndarray]:
        block = _row_block(counts, lo, min(lo + size, n_cells))
        return _rank_block(block, mapping, max_genes=max_genes, target_sum=target_sum)

    starts = range(0, n_cells, size)
    if n_jobs > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:  # numpy releases the GIL
            blocks = list(pool.map(rank, starts))
    else:
        blocks = [rank(lo) for lo in starts]
    genes = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    n_genes = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int64)
    if cls_id is None:
        return genes.astype(np.int64), n_genes.astype(np.int64)
    lengths = np.where(n_genes > 0, n_genes + 2, 0).astype(np.int64)
    first = np.cumsum(lengths) - lengths
    ids = np.empty(int(lengths.sum()), dtype=np.int64)
    ids[_segment_positions(n_genes, first + 1)] = genes
    nonempty = lengths > 0
    ids[first[nonempty]] = cls_id
    ids[first[nonempty] + lengths[nonempty] - 1] = eos_id
    return ids, lengths


def _row_block(counts: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix:
    """Rows ``lo:hi`` of a CSR matrix without copying its data."""
    if (lo, hi) == (0, counts.shape[0]):
        return counts
    a, b = counts.indptr[lo], counts.indptr[hi]
    block = sp.csr_matrix(
        (counts.data[a:b], counts.indices[a:b], counts.indptr[lo : hi + 1] - a),
        shape=(hi - lo, counts.shape[1]),
    )
    block.has_sorted_indices = counts.has_sorted_indices
    return block


def tokenize_cell_loop(
    gene_indices: np.ndarray,
    counts: np.ndarray,
    mapping: GeneMapping,
    *,
    max_genes: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
    target_sum: float = TARGET_SUM,
) -> np.ndarray:
    """Tokens of one cell from its raw counts, as a plain loop (the reference for tests).

    Args:
        gene_indices, counts: the cell's nonzero input genes and their raw counts.
    """
    n_counts = float(np.sum(counts, dtype=np.float64))
    summed: dict[int, float] = {}
    for gene, count in zip(gene_indices.tolist(), counts.tolist(), strict=True):
        column = int(mapping.columns[gene])
        if column >= 0 and count != 0:
            summed[column] = summed.get(column, 0.0) + float(count)
    if not summed:
        return np.zeros(0, dtype=np.int64)
    columns = np.array(sorted(summed), dtype=np.int64)
    raw = np.array([summed[c] for c in columns], dtype=np.float64)
    values = raw / n_counts * target_sum / mapping.medians[columns]
    ranked = mapping.tokens[columns[np.argsort(-values, kind="stable")]][:max_genes]
    if cls_id is None:
        return ranked
    return np.concatenate([[cls_id], ranked, [eos_id]]).astype(np.int64)


def tokenize_loop(counts: sp.csr_matrix, mapping: GeneMapping, **options: Any) -> list[np.ndarray]:
    """``tokenize_cell_loop`` over every cell of a CSR count matrix (empty arrays included)."""
    counts = to_csr(counts)
    return [
        tokenize_cell_loop(counts.indices[lo:hi], counts.data[lo:hi], mapping, **options)
        for lo, hi in zip(counts.indptr[:-1], counts.indptr[1:], strict=True)
    ]


class GeneformerTokenizer:
    """Tokenize raw counts in an AnnData the way the reference Geneformer tokenizer does.

    Args:
        dicts: the Geneformer dictionaries.
        version: ``"V1"``/``"V2"`` to override detection from the dictionaries.
        max_position_embeddings: the model's position limit (caps the input size).
        gene_column: var column with gene identifiers (e.g. ``"gene_ids"``) or ``"var_names"``;
            default: resolved by content (``scfmbench.data.genes.resolve_gene_identifiers``).
        allow_normalized: tokenize non-integer input with a warning instead of failing.
        target_sum: counts are scaled to this total before dividing by the gene medians.
        n_jobs: threads for the vectorized ranking (default: the CPU count, at most 8).
    """

    def __init__(
        self,
        dicts: GeneformerDictionaries,
        *,
        version: str | None = None,
        max_position_embeddings: int | None = None,
        gene_column: str | None = None,
        allow_normalized: bool = False,
        target_sum: float = TARGET_SUM,
        n_jobs: int | None = None,
    ) -> None:
        self.dicts = dicts
        self.n_jobs = n_jobs if n_jobs is not None else min(os.cpu_count() or 1, 8)
        self.version, self.model_input_size = resolve_version(
            dicts, version=version, max_position_embeddings=max_position_embeddings
        )
        self.gene_column = gene_column
        self.allow_normalized = allow_normalized
        self.target_sum = target_sum
        special = self.version == "V2"
        self.cls_id = dicts.token_dict["<cls>"] if special else None
        self.eos_id = dicts.token_dict["<eos>"] if special else None
        self.max_genes = self.model_input_size - 2 if special else self.model_input_size

    def settings(self) -> dict[str, Any]:
        """Everything that changes the tokens (part of the embedding cache key)."""
        return {
            "tokenizer": "geneformer",
            "revision": TOKENIZER_REVISION,
            "version": self.version,
            "model_input_size": self.model_input_size,
            "special_tokens": self.cls_id is not None,
            "target_sum": self.target_sum,
            "dictionaries": self.dicts.sha256,
            "gene_column": self.gene_column,
            "tie_rule": TIE_RULE,
        }

    def identifiers(self, var: pd.DataFrame) -> GeneIdentifiers:
        """The Ensembl IDs of ``var`` (``gene_column``, a detected column or var_names), or
        symbols to map through the gene-name dictionary (see ``resolve_gene_identifiers``)."""
        return resolve_gene_identifiers(
            var, vocabulary_kind="ensembl", model="geneformer", gene_column=self.gene_column
        )

    def map_genes(self, var: pd.DataFrame) -> GeneMapping:
        """How the genes of ``var`` (identifiers as resolved by ``identifiers``) map onto tokens."""
        return map_genes(self.identifiers(var).keys, self.dicts)

    def rank_options(self) -> dict[str, Any]:
        """Keyword arguments for ``rank_value_tokens`` / ``tokenize_loop``."""
        return {
            "max_genes": self.max_genes,
            "cls_id": self.cls_id,
            "eos_id": self.eos_id,
            "target_sum": self.target_sum,
        }

    def tokenize(self, adata: AnnData) -> TokenizedCells:
        """Tokenize ``adata.X`` (raw counts); every input cell is kept or listed as dropped.

        Cells without any in-vocabulary gene, and cells with ``obs["filter_pass"] != 1`` when
        that column exists (as in the reference), are listed in ``TokenizedCells.dropped``.
        """
        check_finite(adata.X, where="adata.X")
        require_counts(adata.X, model="geneformer", allow_normalized=self.allow_normalized)
        counts = to_csr(adata.X)
        source = self.identifiers(adata.var)
        mapping = map_genes(source.keys, self.dicts)
        match = self.gene_match(adata, mapping, counts, source=source)
        logger.info(mapping.summary())
        if mapping.n_symbols_mapped < mapping.n_symbols:
            logger.warning(
                "geneformer: %d of %d gene symbols are not in the gene-name dictionary; "
                "pass --gene-column with Ensembl IDs to keep them",
                mapping.n_symbols - mapping.n_symbols_mapped,
                mapping.n_symbols,
            )
        ids, lengths = rank_value_tokens(counts, mapping, **self.rank_options(), n_jobs=self.n_jobs)
        kept = lengths > 0
        passing = filter_pass_mask(adata.obs)
        if passing is not None:
            logger.info("geneformer: %d cells fail obs['filter_pass']", int((~passing).sum()))
            ids = ids[np.repeat(passing, lengths)]
            kept &= passing
        dropped = adata.obs_names[~kept]
        if len(dropped):
            logger.warning(
                "geneformer: %d cells not tokenized (no in-vocabulary gene or filter_pass "
                "!= 1), e.g. %s",
                len(dropped),
                list(dropped[:3]),
            )
        offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[kept], out=offsets[1:])
        return TokenizedCells(
            input_ids=ids,
            offsets=offsets,
            obs_names=adata.obs_names[kept],
            settings={**self.settings(), "gene_column": source.column},
            dropped=dropped,
            gene_match=match,
        )

    def gene_match(
        self,
        adata: AnnData,
        mapping: GeneMapping,
        counts: sp.csr_matrix,
        *,
        source: GeneIdentifiers | None = None,
    ) -> GeneMatch:
        """Genes in the vocabulary and fraction of counts covered; raises below 50 %."""
        source = source or self.identifiers(adata.var)
        keys = source.keys
        vocab = {
            str(k): int(mapping.tokens[c])
            for k, c in zip(keys, mapping.columns, strict=True)
            if c >= 0
        }
        return match_genes(
            keys,
            vocab,
            model="geneformer",
            gene_totals=np.asarray(counts.sum(axis=0)).ravel(),
            identifier_type=mapping.identifier_type,
            expected_type="ensembl",
            source=source,
        )
