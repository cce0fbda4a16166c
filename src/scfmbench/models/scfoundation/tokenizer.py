"""scFoundation preprocessing: gene alignment, normalization and the T/S count tokens.

Follows the reference ``get_embedding.py`` for ``--input_type singlecell --output_type
cell``:

* genes (gene symbols: ``gene_column``, else a ``var`` column holding symbols by content —
  ``gene_name``, which the script reads, among the well-known names — else ``var_names``;
  see ``scfmbench.data.genes.resolve_gene_identifiers``) are aligned to the 19,264-gene index,
  missing genes are zero;
* ``pre_normalized='F'`` (raw counts): ``log1p(x / total * 1e4)``; ``'T'``: values are already
  normalize_total + log1p and are used as is; ``'A'``: like ``'T'`` with the total count taken
  from ``obs[total_counts_key]`` (the script's appended column). ``total`` is the sum over the
  aligned genes (``'F'``, ``'T'``);
* two count tokens are appended at positions 19264 (T, target resolution) and 19265
  (S = log10(total)); ``tgthighres`` sets T: ``t<x>`` → T = x, ``f<x>`` → T = log10(total·x),
  ``a<x>`` → T = log10(total) + x;
* only tokens with a value > 0 (the non-zero genes) go through the encoder, in gene order,
  then T and S;
* pooling ``all`` = concat(S, T, max over genes, mean over genes) → 4 × hidden, the order of
  the script (``geneemb[:, -1]`` = S first, then ``geneemb[:, -2]`` = T); ``max`` = max over
  all tokens (script ``--pool_type max``).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from pydantic import field_validator

from scfmbench.data.genes import GeneIdentifiers, match_genes, resolve_gene_identifiers
from scfmbench.data.matrix import (
    check_finite,
    classify_matrix,
    corrected_counts_warning,
    to_csr,
)
from scfmbench.errors import CheckpointError, ConfigError, CountsRequiredError, DataError
from scfmbench.hashing import hash_json
from scfmbench.models.base import TokenizedCells
from scfmbench.models.loading import ModelOptions
from scfmbench.models.scfoundation.network import VERSION_KEYS

logger = logging.getLogger(__name__)

GENE_INDEX_FILE = "OS_scRNA_gene_index.19264.tsv"
TARGET_SUM = 1e4
TGTHIGHRES_RE = re.compile(r"^([tfa])(\d+(?:\.\d+)?)$")

PreNormalized = Literal["F", "T", "A"]


class ScFoundationOptions(ModelOptions):
    """Options of the scFoundation loader: the reference script's flags.

    Attributes
    ----------
    version : {"ce", "rde", "gene"}
        Checkpoint entry: ``"ce"`` (default; ``'cell'``, the reference default for cell
        embeddings), ``"rde"`` (read-depth enhancement) or ``"gene"``.
    gene_index : Path or None
        ``OS_scRNA_gene_index.19264.tsv``; default (``None``): beside the checkpoint or one
        folder up (where the release keeps it).
    pre_normalized : {"F", "T", "A"} or None
        ``"F"`` raw counts, ``"T"`` normalize_total + log1p input, ``"A"`` as ``"T"`` with
        totals in ``obs[total_counts_key]``; default (``None``): ``"F"`` for counts.
    tgthighres : str
        The T token: ``t<x>`` (default ``"t4"``), ``f<x>`` or ``a<x>`` (the README uses ``a5``).
    total_counts_key : str
        ``obs`` column with the total counts for ``pre_normalized="A"`` (default
        ``"total_counts"``).
    """

    version: str = "ce"
    gene_index: Path | None = None
    pre_normalized: PreNormalized | None = None
    tgthighres: str = "t4"
    total_counts_key: str = "total_counts"

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value not in VERSION_KEYS:
            raise ConfigError(
                f"scfoundation version {value!r} is unknown; choose from {sorted(VERSION_KEYS)}."
            )
        return value

    @field_validator("pre_normalized", mode="before")
    @classmethod
    def _known_mode(cls, value: Any) -> Any:
        if value not in (None, "F", "T", "A"):
            raise ConfigError(
                f"pre_normalized {value!r} is not valid; choose 'F' (raw counts), "
                "'T' (normalize_total + log1p already applied) or 'A' (as 'T', total count in "
                "obs[total_counts_key])."
            )
        return value

    @field_validator("tgthighres", mode="before")
    @classmethod
    def _valid_tgthighres(cls, value: Any) -> Any:
        parse_tgthighres(value)
        return value


def parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """``"t4"`` → ("t", 4.0); raise ConfigError for anything else."""
    found = TGTHIGHRES_RE.match(str(tgthighres))
    if not found or (found.group(1) == "f" and float(found.group(2)) <= 0):
        raise ConfigError(
            f"tgthighres {tgthighres!r} is not valid; write t<x> (T = x), f<x> with x > 0 "
            "(T = log10(total·x)) or a<x> (T = log10(total) + x), e.g. 't4' or 'a5'."
        )
    return found.group(1), float(found.group(2))


def count_token_values(totals: np.ndarray, *, tgthighres: str) -> tuple[np.ndarray, np.ndarray]:
    """T and S values per cell from the total counts, as the reference script computes them."""
    mode, x = parse_tgthighres(tgthighres)
    with np.errstate(divide="ignore"):
        source = np.log10(totals.astype(np.float64))
        if mode == "t":
            target = np.full_like(source, x)
        elif mode == "f":
            target = np.log10(totals.astype(np.float64) * x)
        else:
            target = source + x
    return target.astype(np.float32), source.astype(np.float32)


def read_gene_index(path: Path) -> dict[str, int]:
    """Read the gene order of the model input (``gene_name`` → ``index``)."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise CheckpointError(
            f"cannot read the scFoundation gene index {path} ({type(exc).__name__}); pass the "
            f"release's {GENE_INDEX_FILE}."
        ) from None
    if list(table.columns[:2]) != ["gene_name", "index"]:
        raise CheckpointError(
            f"{path} has columns {list(table.columns)[:4]}, expected 'gene_name' and 'index'; "
            f"pass the release's {GENE_INDEX_FILE}."
        )
    index = pd.Series(pd.to_numeric(table["index"], errors="coerce"))
    if index.isna().any() or sorted(index.astype(int)) != list(range(len(table))):
        raise CheckpointError(
            f"{path}: the 'index' column is not 0..{len(table) - 1}; the file is damaged."
        )
    return dict(zip(table["gene_name"], index.astype(int), strict=True))


def resolve_mode(
    kind: str, mode: PreNormalized | None, *, allow_normalized: bool, where: str
) -> PreNormalized:
    """Choose the pre_normalized mode for a matrix of ``kind``; refuse scaled or mismatched data."""
    if kind == "scaled":
        raise CountsRequiredError(
            f"scfoundation needs raw counts or normalize_total + log1p values but {where} holds "
            "scaled values (negative numbers); pass the raw counts (X, layers['counts'] or .raw)."
        )
    if kind == "corrected" and mode in (None, "F"):
        warnings.warn(corrected_counts_warning("scfoundation", where), stacklevel=3)
        return "F"
    if kind == "normalized" and mode != "F":  # no pre_normalized mode reads them as they are
        raise CountsRequiredError(
            f"scfoundation reads raw counts or normalize_total + log1p values but {where} holds "
            "depth-normalized values without log1p; apply sc.pp.log1p to them, or pass the raw "
            "counts with pre_normalized='F'."
        )
    if mode is None:
        if kind == "counts":
            return "F"
        if not allow_normalized:
            raise CountsRequiredError(
                f"scfoundation with pre_normalized='F' needs raw integer counts but {where} holds "
                f"{kind} values; pass the raw counts, or set pre_normalized='T' if the values are "
                "normalize_total + log1p (or --allow-normalized to use them as such)."
            )
        warnings.warn(
            f"scfoundation: {where} holds {kind} values; using them as normalize_total + log1p "
            "input (pre_normalized='T').",
            stacklevel=3,
        )
        return "T"
    if mode == "F" and kind != "counts":
        raise CountsRequiredError(
            f"scfoundation with pre_normalized='F' needs raw integer counts but {where} holds "
            f"{kind} values; pass the raw counts or set pre_normalized='T'."
        )
    if mode in ("T", "A") and kind == "counts":  # log1p would be skipped on raw counts
        raise CountsRequiredError(
            f"scfoundation with pre_normalized={mode!r} reads normalize_total + log1p values but "
            f"{where} holds raw integer counts; set pre_normalized='F' (or leave it unset)."
        )
    return mode


def check_totals_column(mode: PreNormalized, obs: pd.DataFrame, key: str) -> None:
    """Refuse ``pre_normalized='A'`` unless ``obs[key]`` holds every cell's total counts.

    Parameters
    ----------
    mode : {"F", "T", "A"}
        The resolved mode; only ``"A"`` reads ``obs``.
    obs : pandas.DataFrame
        The cells' ``obs``.
    key : str
        The column of total counts (``ScFoundationOptions.total_counts_key``).

    Raises
    ------
    DataError
        ``mode`` is ``"A"`` and the column is missing, not numeric, or holds a value that is
        not a finite positive number.
    """
    if mode != "A":
        return
    if key not in obs.columns:
        raise DataError(
            f"pre_normalized='A' reads total counts from adata.obs[{key!r}], which is missing "
            f"(obs columns {list(obs.columns)[:8]}); set total_counts_key or use "
            "pre_normalized='T'."
        )
    column = obs[key]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise DataError(
            f"pre_normalized='A' reads total counts from adata.obs[{key!r}], which holds "
            f"{column.dtype} values, not numbers; set total_counts_key to the column of each "
            "cell's total raw counts."
        )
    totals = np.asarray(column, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(totals) & (totals > 0)))
    if len(bad):
        raise DataError(
            f"pre_normalized='A' reads total counts from adata.obs[{key!r}], but {len(bad)} "
            f"cell(s) have no finite positive total (e.g. {obs.index[bad[0]]}: "
            f"{totals[bad[0]]:g}); fill in each cell's total raw counts there."
        )


def _gene_keys(adata: AnnData, gene_column: str | None) -> GeneIdentifiers:
    """``gene_column``, else a var column of symbols (by content), else var_names."""
    return resolve_gene_identifiers(
        cast(pd.DataFrame, adata.var),  # in-memory AnnData
        vocabulary_kind="symbol",
        model="scfoundation",
        gene_column=gene_column,
    )


def align_to_index(matrix: sp.csr_matrix, positions: np.ndarray, *, n_genes: int) -> sp.csr_matrix:
    """(cells × data genes) → (cells × ``n_genes``); unmatched genes dropped, missing are 0.

    Data genes that map to the same index gene are summed.
    """
    matched = np.flatnonzero(positions >= 0)
    projection = sp.csr_matrix(
        (np.ones(len(matched), dtype=np.float64), (matched, positions[matched])),
        shape=(len(positions), n_genes),
    )
    aligned = sp.csr_matrix(matrix.astype(np.float64) @ projection)
    aligned.sort_indices()
    aligned.eliminate_zeros()
    return aligned


def append_count_tokens(
    genes: sp.csr_matrix, target: np.ndarray, source: np.ndarray, *, n_genes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat ``(input_ids, values, offsets)``: each row's stored genes in order, then T and S."""
    lengths = np.diff(genes.indptr) + 2
    offsets = np.zeros(len(genes.indptr), dtype=np.int64)  # n_cells + 1
    offsets[1:] = np.cumsum(lengths)
    t_slots, s_slots = offsets[1:] - 2, offsets[1:] - 1
    is_gene = np.ones(offsets[-1], dtype=bool)
    is_gene[t_slots] = is_gene[s_slots] = False
    ids = np.empty(offsets[-1], dtype=np.int64)
    values = np.empty(offsets[-1], dtype=np.float32)
    ids[is_gene], values[is_gene] = genes.indices, genes.data
    ids[t_slots], values[t_slots] = n_genes, target
    ids[s_slots], values[s_slots] = n_genes + 1, source
    return ids, values, offsets


def tokenize_scfoundation(
    adata: AnnData,
    *,
    gene_index: dict[str, int],
    options: ScFoundationOptions | None = None,
    gene_column: str | None = None,
    allow_normalized: bool = False,
) -> TokenizedCells:
    """Tokens per cell: non-zero index genes (position, value), then T and S.

    Parameters
    ----------
    adata
        Cells × genes; ``X`` holds raw counts (``pre_normalized="F"``) or normalize_total +
        log1p values (``"T"``, ``"A"``).
    gene_index
        Gene symbol → position in the model input (:func:`read_gene_index`).
    options
        Preprocessing flags (``pre_normalized``, ``tgthighres``, ``total_counts_key``);
        default ``ScFoundationOptions()``.
    gene_column
        ``adata.var`` column with gene symbols; default: resolved by content.
    allow_normalized
        Use non-count values as ``pre_normalized="T"`` (with a warning) when
        ``pre_normalized`` is not set (default ``False``: refuse them).

    Returns
    -------
    TokenizedCells
        ``input_ids`` are positions in the gene index (T = ``n_genes``, S = ``n_genes + 1``)
        and ``values`` the expression values (float32; see the module docstring). Cells with
        no counts on the index genes are dropped (listed in ``dropped``).

    Raises
    ------
    CountsRequiredError
        Scaled values, or values that do not fit ``pre_normalized``.
    DataError
        Non-finite values, or ``pre_normalized="A"`` without ``obs[total_counts_key]``.
    GeneMatchError
        Too few genes in the gene index.
    """
    options = options or ScFoundationOptions()
    n_genes = len(gene_index)
    matrix = to_csr(adata.X, np.float64)
    check_finite(matrix, where="adata.X")
    mode = resolve_mode(
        classify_matrix(matrix),
        options.pre_normalized,
        allow_normalized=allow_normalized,
        where="adata.X",
    )
    identifiers = _gene_keys(adata, gene_column)
    match = match_genes(
        identifiers.keys,
        gene_index,
        model="scfoundation",
        gene_totals=np.asarray(matrix.sum(axis=0)).ravel(),
        expected_type="symbol",
        source=identifiers,
    )
    duplicated = pd.Series(match.positions[match.positions >= 0]).duplicated().sum()
    if duplicated:
        logger.warning("scfoundation: %d data genes share an index gene; summing them", duplicated)
    logger.info(
        "scfoundation: %d of %d index genes are not in the data and are filled with zeros",
        n_genes - len(np.unique(match.positions[match.positions >= 0])),
        n_genes,
    )
    aligned = align_to_index(matrix, match.positions, n_genes=n_genes)
    if mode == "A":
        check_totals_column(mode, cast(pd.DataFrame, adata.obs), options.total_counts_key)
        totals = np.asarray(adata.obs[options.total_counts_key], dtype=np.float64)
    else:
        totals = np.asarray(aligned.sum(axis=1)).ravel()
    if mode == "F":
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        aligned = sp.csr_matrix(sp.diags(scale) @ aligned)
        aligned.data = np.log1p(aligned.data)
        aligned.sort_indices()
    aligned.data[aligned.data <= 0] = 0  # only values > 0 are tokens, as in the script
    aligned.eliminate_zeros()
    kept_index = np.flatnonzero((totals > 0) & (np.diff(aligned.indptr) > 0))
    target, source = count_token_values(totals[kept_index], tgthighres=options.tgthighres)
    ids, values, offsets = append_count_tokens(aligned[kept_index], target, source, n_genes=n_genes)
    dropped = adata.obs_names.delete(kept_index)
    if len(dropped):
        warnings.warn(
            f"scfoundation: dropped {len(dropped)} cells with no counts on the index genes "
            f"(e.g. {list(dropped[:3])})",
            stacklevel=2,
        )
    low = int(np.sum((source <= 0) | (target <= 0)))
    if low:
        logger.warning(
            "scfoundation: %d cells have a T or S value ≤ 0 (total ≤ 1); the reference script "
            "would drop that token, here it is kept",
            low,
        )
    settings = {
        "tokenizer": "scfoundation",
        "pre_normalized": mode,
        "tgthighres": options.tgthighres,
        "gene_column": identifiers.column,
        "total_counts_key": options.total_counts_key,
        "allow_normalized": allow_normalized,
        "gene_index": hash_json(sorted(gene_index.items(), key=lambda kv: kv[1])),
    }
    return TokenizedCells(
        input_ids=ids,
        offsets=offsets,
        obs_names=adata.obs_names[kept_index],
        settings=settings,
        values=values,
        dropped=dropped,
        gene_match=match,
    )
