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
from typing import Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench.data.genes import GeneIdentifiers, GeneMatch, match_genes, resolve_gene_identifiers
from scfmbench.data.matrix import check_finite, require_counts, to_csr
from scfmbench.data.validate import filter_pass_mask
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.models.base import TokenizedCells
from scfmbench.models.geneformer.dictionaries import DICTS_FLAG, GeneformerDictionaries
from scfmbench.models.geneformer.ranking import (
    TARGET_SUM,
    GeneMapping,
    map_genes,
    rank_value_tokens,
)

logger = logging.getLogger(__name__)

INPUT_SIZES = {"V1": 2048, "V2": 4096}
TIE_RULE = "stable-by-collapsed-gene-order"
TOKENIZER_REVISION = 1


def check_version(version: str) -> str:
    """Return ``version`` if it is ``"V1"`` or ``"V2"``.

    Raises
    ------
    ConfigError
        Any other value.
    """
    if version not in INPUT_SIZES:
        raise ConfigError(f"unknown Geneformer version {version!r}; choose V1 or V2.")
    return version


def resolve_version(
    dicts: GeneformerDictionaries,
    *,
    version: str | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[str, int]:
    """Model version and input size from the dictionaries (and model config), or an override.

    Returns
    -------
    tuple of (str, int)
        ``(version, model_input_size)``: V1 → 2048 tokens, V2 → 4096 tokens, capped at the
        model's ``max_position_embeddings``.
    """
    detected = dicts.version
    if version is None:
        version = detected
    elif check_version(version) == "V2" and detected == "V1":
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


class GeneformerTokenizer:
    """Tokenize raw counts in an AnnData the way the reference Geneformer tokenizer does.

    Parameters
    ----------
    dicts
        The Geneformer dictionaries.
    version
        ``"V1"``/``"V2"`` to override detection from the dictionaries.
    max_position_embeddings
        The model's position limit (caps the input size).
    gene_column
        Var column with gene identifiers (e.g. ``"gene_ids"``) or ``"var_names"``;
        default: resolved by content (``scfmbench.data.genes.resolve_gene_identifiers``).
    allow_normalized
        Tokenize non-integer input with a warning instead of failing.
    target_sum
        Counts are scaled to this total before dividing by the gene medians.
    n_jobs
        Threads for the vectorized ranking (default: the CPU count, at most 8).
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
        """Resolve the gene identifiers of ``var``.

        Ensembl IDs (``gene_column``, a detected column or var_names), or symbols to map
        through the gene-name dictionary (see ``resolve_gene_identifiers``).
        """
        return resolve_gene_identifiers(
            var, vocabulary_kind="ensembl", model="geneformer", gene_column=self.gene_column
        )

    def map_genes(self, var: pd.DataFrame) -> GeneMapping:
        """Map the genes of ``var`` (identifiers as resolved by ``identifiers``) onto tokens."""
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
        source = self.identifiers(cast(pd.DataFrame, adata.var))  # in-memory AnnData
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
        passing = filter_pass_mask(cast(pd.DataFrame, adata.obs))
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
        source = source or self.identifiers(cast(pd.DataFrame, adata.var))
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
