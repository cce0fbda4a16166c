"""Gene identifier detection and vocabulary matching. Genes are never dropped silently."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pandas as pd

from scfmbench.errors import GeneMatchError

logger = logging.getLogger(__name__)

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
MIN_OVERLAP = 0.5
DETECT_FRACTION = 0.9
VAR_NAMES = "var_names"
# Column names the field uses, tried before any other column (10x/scanpy, CELLxGENE, the
# reference Geneformer tokenizer, Seurat conversions).
KNOWN_COLUMNS = {
    "ensembl": ("ensembl_id", "gene_ids", "gene_id", "feature_id"),
    "symbol": ("feature_name", "gene_symbol", "gene_symbols", "gene_name", "symbol"),
}


def detect_identifier_type(names: Iterable[str]) -> str:
    """Classify gene identifiers as ``"ensembl"``, ``"symbol"`` or ``"mixed"``."""
    names = [str(n) for n in names]
    if not names:
        return "symbol"
    n_ensembl = sum(bool(ENSEMBL_RE.match(n.upper())) for n in names)
    fraction = n_ensembl / len(names)
    if fraction >= 0.9:
        return "ensembl"
    if fraction <= 0.1:
        return "symbol"
    return "mixed"


def content_kind(values: Iterable[object]) -> str | None:
    """``"ensembl"`` or ``"symbol"`` when at least 90% of ``values`` hold that kind, else None.

    Ensembl: matches ``ENS…G`` + digits (optional version). Symbol: a non-empty text that is
    not an Ensembl ID and not a number, with at least 90% of the values distinct (so category
    columns such as ``feature_biotype`` are not taken for gene names).
    """
    series = pd.Series(list(values), dtype=object)
    if series.empty:
        return None
    text = series.astype(str).str.strip()
    usable = series.notna() & ~text.str.lower().isin({"", "nan", "none"})
    n = len(series)
    if text[usable].str.upper().str.match(ENSEMBL_RE).sum() >= DETECT_FRACTION * n:
        return "ensembl"
    numeric = cast(pd.Series, pd.to_numeric(text, errors="coerce")).notna()
    is_text = series.map(lambda v: isinstance(v, str)) & usable & ~numeric
    is_text &= ~text.str.upper().str.match(ENSEMBL_RE)
    if is_text.sum() >= DETECT_FRACTION * n and text[is_text].nunique() >= DETECT_FRACTION * n:
        return "symbol"
    return None


@dataclass(frozen=True)
class GeneIdentifiers:
    """The gene identifiers one model uses, and how they were chosen.

    ``keys[i]`` is the identifier of data gene ``i`` (Ensembl IDs without version suffix).
    ``column`` is a ``var`` column or ``"var_names"``; ``kind`` is what ``keys`` hold
    (``"ensembl"``, ``"symbol"`` or ``"mixed"``); ``reason`` says why this source was taken;
    ``looked_at`` lists every source that was considered, in order.
    """

    keys: pd.Index = field(repr=False)
    column: str
    kind: str
    reason: str
    looked_at: tuple[str, ...] = ()

    def describe(self) -> str:
        """Return the source and why it was chosen, in words (``var['gene_ids'] (ensembl, …)``)."""
        where = VAR_NAMES if self.column == VAR_NAMES else f"var[{self.column!r}]"
        return f"{where} ({self.kind}, {self.reason})"


def _keys_of(var: pd.DataFrame, column: str) -> pd.Index:
    raw = var.index if column == VAR_NAMES else var[column]
    keys = pd.Index([strip_version(str(k)) for k in raw], dtype=object)
    return keys


def check_gene_column(var: pd.DataFrame, gene_column: str) -> None:
    """Refuse a ``gene_column`` that is neither ``"var_names"`` nor a column of ``var``.

    Parameters
    ----------
    var
        The ``var`` of the matrix a model reads.
    gene_column
        The column asked for (``--gene-column``).

    Raises
    ------
    SchemaError
        No such column (naming the columns there, with a did-you-mean).
    """
    from scfmbench.errors import SchemaError
    from scfmbench.registry import did_you_mean

    if gene_column != VAR_NAMES and gene_column not in var.columns:
        columns = [str(c) for c in var.columns]
        raise SchemaError(
            f"adata.var has no column {gene_column!r} (columns: {columns[:10]}); pass "
            f"--gene-column with one of those or 'var_names' for the index."
            + did_you_mean(gene_column, [*columns, VAR_NAMES])
        )


def resolve_gene_identifiers(
    var: pd.DataFrame,
    *,
    vocabulary_kind: str,
    model: str,
    gene_column: str | None = None,
) -> GeneIdentifiers:
    """Pick the gene identifiers for a model whose vocabulary holds ``vocabulary_kind``.

    Order: ``gene_column`` when given (``"var_names"`` selects the index); else a ``var``
    column whose values are at least 90% of that kind (the well-known names first, see
    ``KNOWN_COLUMNS``, then the other columns in order); else ``var_names`` when they are of
    that kind; else ``var_names`` (or, for an Ensembl vocabulary, the first symbol column)
    as they are, to be mapped through the model's own dictionaries. Ensembl version suffixes
    (``ENSG00000141510.17``) are removed; symbols are kept as written (each reference matches
    them case-sensitively).

    Parameters
    ----------
    var
        The data's ``adata.var`` (index = var_names).
    vocabulary_kind
        ``"ensembl"`` or ``"symbol"``.
    model
        Model name for messages.
    gene_column
        An explicit choice (``--gene-column``).

    Returns
    -------
    GeneIdentifiers
        With one key per row of ``var``.

    Raises
    ------
    SchemaError
        ``gene_column`` is neither ``"var_names"`` nor a column of ``var``.
    """
    columns = [str(c) for c in var.columns]
    if gene_column is not None:
        check_gene_column(var, gene_column)
        keys = _keys_of(var, gene_column)
        return GeneIdentifiers(
            keys, gene_column, detect_identifier_type(keys), "--gene-column", (gene_column,)
        )
    known = [c for c in KNOWN_COLUMNS[vocabulary_kind] if c in var.columns]
    ordered = known + [c for c in columns if c not in known]
    looked_at: list[str] = []
    for column in ordered:
        looked_at.append(column)
        if content_kind(var[column]) == vocabulary_kind:
            reason = f"≥{DETECT_FRACTION:.0%} of values are {vocabulary_kind} identifiers"
            return GeneIdentifiers(
                _keys_of(var, column), column, vocabulary_kind, reason, tuple(looked_at)
            )
    looked_at.append(VAR_NAMES)
    names_kind = content_kind(var.index)
    if names_kind == vocabulary_kind:
        return GeneIdentifiers(
            _keys_of(var, VAR_NAMES),
            VAR_NAMES,
            vocabulary_kind,
            f"no var column holds {vocabulary_kind} identifiers",
            tuple(looked_at),
        )
    fallback = VAR_NAMES
    reason = f"no {vocabulary_kind} identifiers found"
    if vocabulary_kind == "ensembl":  # Geneformer maps symbols through its gene-name dictionary
        if names_kind != "symbol":
            fallback = next((c for c in ordered if content_kind(var[c]) == "symbol"), VAR_NAMES)
        reason += f"; mapped through the {model} dictionaries"
    keys = _keys_of(var, fallback)
    return GeneIdentifiers(keys, fallback, detect_identifier_type(keys), reason, tuple(looked_at))


def identifier_sources(var: pd.DataFrame) -> dict[str, str | None]:
    """Return where a model of each vocabulary kind finds its identifiers by default.

    Returns
    -------
    dict
        ``{"ensembl": column or None, "symbol": column or None}`` (``"var_names"`` for the
        index).
    """
    found: dict[str, str | None] = {}
    for kind in KNOWN_COLUMNS:
        source = resolve_gene_identifiers(var, vocabulary_kind=kind, model="")
        found[kind] = source.column if source.kind == kind else None
    return found


def strip_version(gene_id: str) -> str:
    """``ENSG00000123.4`` → ``ENSG00000123``; symbols are returned unchanged."""
    return gene_id.split(".")[0] if ENSEMBL_RE.match(gene_id.upper()) else gene_id


@dataclass(frozen=True)
class GeneMatch:
    """How the data's genes map onto a model vocabulary.

    ``positions[i]`` is the column of data gene ``i`` in the vocabulary, or -1.
    """

    model: str
    identifier_type: str
    n_total: int
    n_matched: int
    fraction_counts: float
    positions: np.ndarray = field(repr=False)
    missing_examples: tuple[str, ...] = ()
    gene_column: str | None = None  # the var column used, or "var_names"
    gene_column_reason: str | None = None

    @property
    def fraction(self) -> float:
        """Fraction of the data's genes found in the vocabulary (0 without genes)."""
        return self.n_matched / self.n_total if self.n_total else 0.0

    def summary(self) -> str:
        """Return one line: matched genes, their source and the fraction of counts covered."""
        source = ""
        if self.gene_column is not None:
            where = VAR_NAMES if self.gene_column == VAR_NAMES else f"var[{self.gene_column!r}]"
            source = f" from {where} ({self.gene_column_reason})"
        return (
            f"{self.model}: {self.n_matched}/{self.n_total} genes{source} ({self.fraction:.1%}) "
            f"in the vocabulary, covering {self.fraction_counts:.1%} of counts"
        )

    def to_dict(self) -> dict:
        """Return the match as metrics.json records it (without ``positions``)."""
        return {
            "model": self.model,
            "identifier_type": self.identifier_type,
            "gene_column": self.gene_column,
            "gene_column_reason": self.gene_column_reason,
            "n_genes": self.n_total,
            "n_matched": self.n_matched,
            "fraction_genes": round(self.fraction, 6),
            "fraction_counts": round(self.fraction_counts, 6),
            "missing_examples": list(self.missing_examples),
        }


def match_genes(
    gene_keys: Iterable[str],
    vocab: Mapping[str, int],
    *,
    model: str,
    gene_totals: np.ndarray | None = None,
    identifier_type: str | None = None,
    expected_type: str | None = None,
    min_overlap: float = MIN_OVERLAP,
    source: GeneIdentifiers | None = None,
) -> GeneMatch:
    """Look up every gene key in ``vocab`` and raise GeneMatchError below ``min_overlap``.

    Parameters
    ----------
    gene_keys
        One key per data gene, already converted to the vocabulary's identifier type.
    vocab
        Vocabulary mapping key → token id.
    model
        Model name for messages.
    gene_totals
        Summed counts per gene, of shape (n_genes,), for the fraction of counts covered
        (default: the fraction of genes).
    identifier_type
        Identifier type of the user's genes (for the error hint; default: detected).
    expected_type
        Identifier type the vocabulary uses (``"ensembl"`` or ``"symbol"``).
    min_overlap
        Minimum fraction of genes that must match (default ``MIN_OVERLAP``, 0.5).
    source
        Where ``gene_keys`` came from (reported, and named in the error).

    Returns
    -------
    GeneMatch
        ``positions`` holds the token id of every data gene, or -1.

    Raises
    ------
    GeneMatchError
        Fewer than ``min_overlap`` of the genes are in the vocabulary.
    """
    keys = [str(k) for k in gene_keys]
    positions = np.fromiter((vocab.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    matched = positions >= 0
    if gene_totals is not None and float(np.sum(gene_totals)) > 0:
        fraction_counts = float(np.sum(gene_totals[matched]) / np.sum(gene_totals))
    else:
        fraction_counts = float(matched.mean()) if len(keys) else 0.0
    missing = tuple(k for k, m in zip(keys, matched, strict=True) if not m)[:5]
    result = GeneMatch(
        model=model,
        identifier_type=identifier_type or detect_identifier_type(keys),
        n_total=len(keys),
        n_matched=int(matched.sum()),
        fraction_counts=fraction_counts,
        positions=positions,
        missing_examples=missing,
        gene_column=None if source is None else source.column,
        gene_column_reason=None if source is None else source.reason,
    )
    if result.fraction < min_overlap:
        hint = ""
        if expected_type and result.identifier_type != expected_type:
            hint = (
                f" The data's genes look like {result.identifier_type} identifiers but the "
                f"{model} vocabulary uses {expected_type} identifiers;"
            )
        if source is not None:
            hint += (
                f" genes were taken from {source.describe()} after looking at "
                f"{list(source.looked_at)}; pass --gene-column with a var column of "
                f"{expected_type or 'matching'} identifiers (or 'var_names')."
            )
        elif hint:
            hint += f" put {expected_type} identifiers in a var column and pass --gene-column."
        else:
            hint = " Check that var_names (or --gene-column) hold human genes of the right kind."
        raise GeneMatchError(
            f"only {result.fraction:.1%} of genes ({result.n_matched}/{result.n_total}) are in the "
            f"{model} vocabulary (need ≥ {min_overlap:.0%}; e.g. missing "
            f"{list(missing[:3])}).{hint}"
        )
    logger.info(result.summary())
    return result
