"""Feature-selected count matrices (a subset of the genes) and the models that refuse them.

A feature-selected subset is e.g. 2,000 highly variable genes.

A matrix looks feature-selected when it has fewer than ``FEATURE_SELECTED_GENES`` genes, or
when every gene is flagged in ``var["highly_variable"]`` (``sc.pp.highly_variable_genes``
followed by subsetting).

Which models refuse it follows from how each tokenizer uses the gene set:

* **Geneformer** (rank-based) orders each cell's expressed genes by normalized expression
  and feeds the order (rank-value encoding): a gene's token position depends on every other
  gene of the cell, so dropping genes moves every remaining one.
* **scGPT** (bin-based) bins each cell's non-zero values into quantiles of that cell's
  values: the bin edges depend on which genes are present, so dropping genes changes every
  remaining bin.
* **scFoundation** is not refused: it reads each gene's own normalized value at a fixed
  position of its 19,264-gene index (missing genes are zero), not relative to the other
  genes; a subset still lowers its total-count tokens, so its scores carry a warning.

Both Geneformer and scGPT were pretrained on whole transcriptomes: about 12,000 of PBMC3k's
13,714 genes match their vocabularies (Geneformer V1 12,184, scGPT 12,300), against 2,000 in
the study's highly-variable-gene set-up.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from scfmbench.errors import DataError

FEATURE_SELECTED_GENES = 5000
"""A count matrix with fewer genes than this looks feature-selected (e.g. 2,000 HVGs)."""

RANK_BASED_MODELS: dict[str, str] = {
    "geneformer": "geneformer ranks each cell's genes",
    "scgpt": "scgpt bins each cell's values",
}
"""Models whose tokens depend on the other genes of the cell, and what each does."""

FLAG = "--allow-feature-selected"
COUNT_MATRIX = "the count matrix (adata.{source})"
"""How messages name the matrix a model reads; ``source`` as in ``DataDiagnostics``."""


def matrix_facts(diagnostics) -> dict:
    """Return ``n_genes``, ``all_hvg`` and ``where`` of the matrix a run's models read.

    They are read from its :class:`scfmbench.data.validate.DataDiagnostics`, as keyword
    arguments of :func:`check_feature_selection` and :func:`validate_problem`.
    """
    return {
        "n_genes": diagnostics.n_genes,
        "all_hvg": diagnostics.all_highly_variable,
        "where": COUNT_MATRIX.format(source=diagnostics.matrix_source),
    }


def all_highly_variable(var: pd.DataFrame) -> bool:
    """Whether every gene of ``var`` is flagged ``var["highly_variable"]``.

    Parameters
    ----------
    var
        Gene annotations, one row per gene of the count matrix.

    Returns
    -------
    bool
        False when the column is absent or ``var`` is empty; missing values (genes of
        ``adata.raw`` absent from ``adata.var``) count as not flagged.
    """
    if "highly_variable" not in var.columns or len(var) == 0:
        return False
    return all(isinstance(flag, bool | np.bool_) and flag for flag in var["highly_variable"])


def feature_selection(n_genes: int, all_hvg: bool) -> str | None:
    """Why a count matrix looks feature-selected, in words, or None when it does not.

    Parameters
    ----------
    n_genes
        Genes of the count matrix a model sees.
    all_hvg
        Whether every one of them is flagged highly variable (:func:`all_highly_variable`).

    Returns
    -------
    str or None
        ``"only 2000 genes (fewer than 5,000)"`` or ``"6000 genes, all flagged
        var['highly_variable']"``.
    """
    if n_genes < FEATURE_SELECTED_GENES:
        return f"only {n_genes} genes (fewer than {FEATURE_SELECTED_GENES:,})"
    if all_hvg:
        return f"{n_genes} genes, all flagged var['highly_variable']"
    return None


def model_name(spec: str) -> str:
    """Return the registered model a spec, name or model id stands for.

    ``"geneformer=./gf"``, ``"geneformer-random"`` and ``"geneformer"`` all give
    ``"geneformer"``.
    """
    return spec.split("=", 1)[0].strip().removesuffix("-random")


def rank_based(models: Iterable[str]) -> list[str]:
    """Return the rank- or bin-based models (``RANK_BASED_MODELS``) among ``models``.

    ``models`` are specs, names or model ids; each model is listed once, in order.
    """
    found = []
    for spec in models:
        name = model_name(spec)
        if name in RANK_BASED_MODELS and name not in found:
            found.append(name)
    return found


def refusal(where: str, found: str, models: list[str]) -> str:
    """Return the one-line message refusing a feature-selected matrix for rank-based models."""
    doing = " and ".join(RANK_BASED_MODELS[m] for m in models)
    pretrained = "it was" if len(models) == 1 else "they were"
    return (
        f"{where} has {found}, a feature-selected subset, but {doing} relative to the other "
        f"genes present and {pretrained} pretrained on whole transcriptomes (about 12,000 "
        "genes of a PBMC count matrix match the vocabulary); give the full count matrix "
        "(e.g. adata.raw, or the data before sc.pp.highly_variable_genes(subset=True)) or "
        f"pass {FLAG} (allow_feature_selected: true) to run anyway."
    )


def check_feature_selection(
    models: Iterable[str], *, n_genes: int, all_hvg: bool, allow: bool, where: str
) -> str | None:
    """Refuse a feature-selected count matrix for rank- and bin-based models.

    Parameters
    ----------
    models
        The models that will see the matrix (specs ``NAME=DIR``, names or model ids).
    n_genes, all_hvg
        The matrix's gene count and whether every gene is flagged highly variable.
    allow
        ``allow_feature_selected`` (``--allow-feature-selected``): proceed with a warning.
    where
        What holds the matrix, for the message (e.g. ``"the count matrix (adata.X)"``).

    Returns
    -------
    str or None
        The warning when the matrix is feature-selected, a rank-based model will see it
        and ``allow`` is set; None when there is nothing to say.

    Raises
    ------
    DataError
        The matrix is feature-selected, a rank-based model will see it and ``allow`` is
        not set; the message names the gene count, why it matters and both fixes.
    """
    found = feature_selection(n_genes, all_hvg)
    affected = rank_based(models)
    if found is None or not affected:
        return None
    if not allow:
        raise DataError(refusal(where, found, affected))
    return (
        f"{where} has {found}, a feature-selected subset; running {', '.join(affected)} on "
        f"it anyway because {FLAG} is set — scores are not comparable to the published models"
    )


def validate_problem(
    models: list[str], *, n_genes: int, all_hvg: bool, allow: bool, where: str
) -> str | None:
    """Return the line ``scfmbench validate`` lists under problems for a feature-selected matrix.

    It is the warning the named ``models`` would run with under ``allow`` (or that they see
    far fewer genes), or, with no model named, which models refuse it; None when the matrix is
    not feature-selected.

    Raises
    ------
    DataError
        The refusal ``run`` would give the named ``models`` (see
        :func:`check_feature_selection`).
    """
    found = feature_selection(n_genes, all_hvg)
    if found is None:
        return None
    if not models:
        return (
            f"{where} has {found}, a feature-selected subset: "
            f"{' and '.join(RANK_BASED_MODELS)} refuse it unless {FLAG} is given (name a "
            "model with --model to check it)"
        )
    allowed = check_feature_selection(
        models, n_genes=n_genes, all_hvg=all_hvg, allow=allow, where=where
    )
    if allowed is not None:
        return allowed
    named = list(dict.fromkeys(model_name(m) for m in models))
    verb = "sees" if len(named) == 1 else "see"
    return (
        f"{where} has {found}, a feature-selected subset; {', '.join(named)} {verb} far fewer "
        "genes than in pretraining"
    )


def feature_selection_warning(model: str, n_genes: int, all_hvg: bool) -> str | None:
    """Return the warning beside a model's scores on a feature-selected matrix (else None).

    For a rank- or bin-based model it says that ``--allow-feature-selected`` let it run.
    """
    found = feature_selection(n_genes, all_hvg)
    if found is None:
        return None
    name = model_name(model)
    if name in RANK_BASED_MODELS:
        return (
            f"{found}: a feature-selected matrix; {RANK_BASED_MODELS[name]} among far fewer "
            f"genes than in pretraining (allowed by {FLAG})"
        )
    return f"{found}: a feature-selected matrix; the model sees far fewer genes than in pretraining"


__all__ = [
    "FEATURE_SELECTED_GENES",
    "RANK_BASED_MODELS",
    "all_highly_variable",
    "check_feature_selection",
    "feature_selection",
    "feature_selection_warning",
    "matrix_facts",
    "rank_based",
    "validate_problem",
]
