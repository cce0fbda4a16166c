"""Gene identifier detection and vocabulary matching. Genes are never dropped silently."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scfmbench.errors import GeneMatchError

logger = logging.getLogger(__name__)

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
MIN_OVERLAP = 0.5


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

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_total if self.n_total else 0.0

    def summary(self) -> str:
        return (
            f"{self.model}: {self.n_matched}/{self.n_total} genes ({self.fraction:.1%}) in the "
            f"vocabulary, covering {self.fraction_counts:.1%} of counts"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "identifier_type": self.identifier_type,
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
) -> GeneMatch:
    """Look up every gene key in ``vocab`` and raise GeneMatchError below ``min_overlap``.

    Args:
        gene_keys: one key per data gene, already converted to the vocabulary's identifier type.
        vocab: vocabulary mapping key → token id.
        model: model name for messages.
        gene_totals: summed counts per gene, for the fraction of counts covered.
        identifier_type: identifier type of the user's genes (for the error hint).
        expected_type: identifier type the vocabulary uses (``"ensembl"`` or ``"symbol"``).
        min_overlap: minimum fraction of genes that must match.
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
    )
    if result.fraction < min_overlap:
        hint = ""
        if expected_type and result.identifier_type != expected_type:
            hint = (
                f" The data's genes look like {result.identifier_type} identifiers but the "
                f"{model} vocabulary uses {expected_type} identifiers;"
                f" put {expected_type} identifiers in a var column and pass --gene-column."
            )
        else:
            hint = " Check that var_names (or --gene-column) hold human genes of the right kind."
        raise GeneMatchError(
            f"only {result.fraction:.1%} of genes ({result.n_matched}/{result.n_total}) are in the "
            f"{model} vocabulary (need ≥ {min_overlap:.0%}; e.g. missing "
            f"{list(missing[:3])}).{hint}"
        )
    logger.info(result.summary())
    return result


def gene_keys_from(var: pd.DataFrame, column: str | None) -> pd.Index:
    """The gene identifiers to use: ``var[column]`` when given, else ``var_names``."""
    if column is None:
        return var.index
    if column not in var.columns:
        from scfmbench.errors import SchemaError

        raise SchemaError(
            f"adata.var has no column {column!r}; found {list(var.columns)[:8]}. "
            "Pass --gene-column with one of those, or omit it to use var_names."
        )
    return pd.Index(var[column].astype(str))
