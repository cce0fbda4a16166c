"""The data of a cross-dataset transfer.

Label maps, harmonized labels, the genes both datasets share, the combined matrix (counts
when both datasets are counts, else log-normalized) and the training split.

Labels are harmonized through a mapping (source label → shared label, or null to drop) and
genes are intersected; the models see each dataset's counts restricted to the shared genes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scfmbench._yaml import load_yaml_file
from scfmbench.config import RunConfig
from scfmbench.data.labels import is_missing_label
from scfmbench.data.matrix import lognormalize
from scfmbench.data.splits import Split, stratified_split
from scfmbench.data.validate import ValidatedData
from scfmbench.errors import ConfigError, DataError, SchemaError
from scfmbench.hashing import hash_file

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_LABEL_MAPS",
    "SHARED_CELLS_LIMIT",
    "TransferData",
    "check_distinct_cells",
    "check_transfer_feature_selection",
    "checked_label_map",
    "dataset_names",
    "harmonize",
    "load_label_map",
    "prepare_transfer",
    "shared_labels",
    "training_split",
]


BUILTIN_LABEL_MAPS: dict[str, dict[str, str | None]] = {
    # PBMC3k Seurat-tutorial labels ↔ Kang 2018 (muscat) cell types
    "pbmc3k_kang2018": {
        "Naive CD4 T": "CD4 T",
        "Memory CD4 T": "CD4 T",
        "CD8 T": "CD8 T",
        "B": "B",
        "CD14+ Mono": "CD14+ Mono",
        "FCGR3A+ Mono": "FCGR3A+ Mono",
        "NK": None,
        "DC": None,
        "Platelet": None,
        "CD4 T cells": "CD4 T",
        "CD8 T cells": "CD8 T",
        "B cells": "B",
        "CD14+ Monocytes": "CD14+ Mono",
        "FCGR3A+ Monocytes": "FCGR3A+ Mono",
    }
}


def load_label_map(spec: str | Path) -> dict[str, str | None]:
    """Read a label map: a built-in name or a YAML file of ``source label: shared label``.

    A label mapped to null drops its cells.

    A shared label that is a placeholder (``NaN``, empty, ``nan``, ``None``, ``NA``,
    ``unknown``, ``unassigned``: :data:`scfmbench.data.validate.MISSING_LABELS`) drops its cells
    like null, the rule ``obs`` labels follow.
    """
    if str(spec) in BUILTIN_LABEL_MAPS:
        return dict(BUILTIN_LABEL_MAPS[str(spec)])
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"label map {str(spec)!r} is neither a file nor a built-in map "
            f"({', '.join(BUILTIN_LABEL_MAPS)}); pass a YAML file of 'source label: shared label'."
        )
    mapping = load_yaml_file(path, "label map")
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"label map {str(path)!r} must be a mapping 'source label: shared label'."
        )
    return checked_label_map(mapping, str(path))


def checked_label_map(mapping: dict, where: str | None = None) -> dict[str, str | None]:
    """Return ``mapping`` with string keys and string (or None) shared labels.

    Parameters
    ----------
    mapping : dict
        ``source label → shared label``; a shared label is a string, a number (read as its
        text, e.g. a cluster id) or null.
    where : str, optional
        The map's file, named in the error.

    Raises
    ------
    ConfigError
        A shared label that is a list, a mapping or a YAML boolean (``yes``/``no``/``on``/``off``
        read unquoted), with the source label it belongs to.
    """
    for key, value in mapping.items():
        if isinstance(value, list | dict | set | tuple | bool):
            source = "the label map" if where is None else f"label map {where!r}"
            raise ConfigError(
                f"{source} maps {str(key)!r} to {value!r}, not a label; write one shared label "
                "per source label (quote it, e.g. 'yes', if YAML reads it as a boolean), or null "
                "to drop its cells."
            )
    return {str(k): (None if is_missing_label(v) else str(v)) for k, v in mapping.items()}


def dataset_names(train: object, test: object) -> tuple[str, str]:
    """Name the two sides of a transfer: the file name without suffix, or train/test.

    Two files of the same name in different folders are named ``folder/name``; an AnnData
    is named by its role.

    Parameters
    ----------
    train, test : str, pathlib.Path or AnnData
        The two datasets as given.

    Returns
    -------
    (str, str)
        The name of each side, distinct.

    Raises
    ------
    ConfigError
        Both sides are the same file, built-in dataset or AnnData object.
    """
    files = not isinstance(train, AnnData) and not isinstance(test, AnnData)
    same = _same_data(Path(str(train)), Path(str(test))) if files else None
    if same == "copy":
        raise ConfigError(
            f"--train {str(train)!r} and --test {str(test)!r} hold the same bytes (a copy); "
            "a transfer scores one dataset on another (score a dataset on its own held-out "
            "cells with scfmbench run)."
        )
    if train is test or (files and (str(train) == str(test) or same == "file")):
        shown = "the same AnnData" if isinstance(train, AnnData) else f"both {str(train)!r}"
        raise ConfigError(
            f"--train and --test are {shown}; a transfer scores one dataset on another "
            "(score a dataset on its own held-out cells with scfmbench run)."
        )
    names = [
        role if isinstance(source, AnnData) else Path(str(source)).stem
        for role, source in (("train", train), ("test", test))
    ]
    if names[0] == names[1]:
        folders = [Path(str(source)).resolve().parent.name for source in (train, test)]
        names = (
            [f"{folder}/{name}" for folder, name in zip(folders, names, strict=True)]
            if folders[0] != folders[1]
            else [f"{names[0]} (train)", f"{names[1]} (test)"]
        )
    return names[0], names[1]


def _same_data(a: Path, b: Path) -> str | None:
    """``"file"``: one file under two paths; ``"copy"``: two files of the same bytes; else None.

    Paths that do not exist or cannot be read are neither (loading them says why).
    """
    try:
        if not (a.exists() and b.exists()):
            return None
        if a.samefile(b):
            return "file"
        if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
            return None
        return "copy" if hash_file(a) == hash_file(b) else None
    except OSError:
        return None


SHARED_CELLS_LIMIT = 0.5
"""Largest fraction of the smaller dataset's cells whose names (obs_names) may also occur in
the other dataset; above it a transfer is refused (:func:`check_distinct_cells`).

Unrelated datasets share a few cell names by chance: 10x barcodes come from a whitelist of
about 737,000, so two datasets of 3,000 cells share about 12 barcodes (PBMC3k and Kang 2018
share 1), and such an overlap must pass. More than half of the cells under the same names is
one dataset on both sides (e.g. its counts and its log-normalized values, or a subset of it):
the model would be scored on the cells it was trained on."""


def check_distinct_cells(datasets: list[tuple[str, ValidatedData]]) -> None:
    """Refuse two datasets that hold mostly the same cells (names and expressed genes).

    Parameters
    ----------
    datasets : list of (str, ValidatedData)
        The two sides of the transfer, each with its name.

    Raises
    ------
    DataError
        More than :data:`SHARED_CELLS_LIMIT` of the smaller side's cells are named on the
        other side too, and nine in ten of them (up to :data:`SAME_CELLS_CHECKED` compared)
        express the same genes there; the message names both datasets and counts the
        shared cells.
    """
    (small, small_cells), (_, large_cells) = sorted(
        ((name, data.adata.obs_names) for name, data in datasets), key=lambda side: len(side[1])
    )
    shared = small_cells[small_cells.isin(large_cells)]
    n_shared, n_small = len(shared), len(small_cells)
    if n_shared <= SHARED_CELLS_LIMIT * n_small or not _same_expressed_genes(datasets, shared):
        return
    same_size = n_small == len(large_cells)
    of = f"their {n_small} cells" if same_size else f"the {n_small} cells of {small}"
    (name_a, _), (name_b, _) = datasets
    raise DataError(
        f"{name_a} and {name_b} share {n_shared} of {of} (the same obs_names and expressed "
        "genes); a transfer needs two different datasets (score one dataset on its own "
        "held-out cells with scfmbench run)."
    )


SAME_CELLS_CHECKED = 200
"""Cells of the shared names whose expressed genes :func:`_same_expressed_genes` compares."""


def _same_expressed_genes(datasets: list[tuple[str, ValidatedData]], shared: pd.Index) -> bool:
    """Tell whether most ``shared`` cell names hold the same expressed genes on both sides.

    Names alone are not enough: files whose obs_names are row numbers ("0", "1", …) share
    them all. The same cells express the same genes whatever the normalization.
    """
    (_, a), (_, b) = datasets
    names = shared[:SAME_CELLS_CHECKED]
    genes = a.adata.var_names.intersection(b.adata.var_names)
    if len(genes) == 0:
        return False
    patterns = []
    for data in (a, b):
        rows = data.adata.obs_names.get_indexer(names)
        cols = data.adata.var_names.get_indexer(genes)
        matrix = sp.csr_matrix(cast(Any, data.adata.X))  # validated: CSR already, no copy
        patterns.append(matrix[rows][:, cols] != 0)
    differing = np.asarray((patterns[0] != patterns[1]).sum(axis=1)).ravel()
    return bool((differing == 0).mean() > 0.9)


def harmonize(
    labels: pd.Series,
    mapping: dict[str, str | None],
    *,
    dataset: str,
    map_name: str | None = None,
) -> pd.Series:
    """Map labels to shared labels.

    Cells mapped to null (or to a placeholder such as ``"unknown"``, see
    :func:`load_label_map`) are dropped (index shrinks). ``map_name`` (a built-in map or a
    file) is named in the error.

    Raises
    ------
        SchemaError: listing every label that the mapping does not mention.
    """
    values = labels.astype(str)
    unmapped = sorted(set(values) - set(mapping))
    if unmapped:
        where = "the label map" if map_name is None else f"the label map {map_name!r}"
        raise SchemaError(
            f"labels of {dataset} not in {where}: {unmapped}; add them to a map given with "
            "--labels (map to null to drop those cells)."
        )
    shared = values.map({k: (None if is_missing_label(v) else v) for k, v in mapping.items()})
    return shared.loc[shared.notna()].astype(str)


def shared_labels(
    train: pd.Series,
    test: pd.Series,
    mapping: dict[str, str | None],
    *,
    names: tuple[str, str],
    map_name: str | None = None,
) -> tuple[pd.Series, pd.Series]:
    """Harmonize the labels of one direction (train → test) and check a classifier can learn.

    Parameters
    ----------
    train, test : pandas.Series
        Each side's cell labels, indexed by cell.
    mapping : dict
        ``source label → shared label`` (None drops the cells).
    names : (str, str)
        The training and test datasets' names, used in errors.
    map_name : str, optional
        The built-in map or file, named in errors.

    Returns
    -------
    (pandas.Series, pandas.Series)
        The shared labels of each side's kept cells (see :func:`harmonize`).

    Raises
    ------
    SchemaError
        A label the map lacks, a training side left with fewer than two classes, or no
        class the two sides share.
    """
    train_labels = harmonize(train, mapping, dataset=names[0], map_name=map_name)
    test_labels = harmonize(test, mapping, dataset=names[1], map_name=map_name)
    train_classes = set(train_labels)
    if len(train_classes) < 2:
        raise SchemaError(
            f"{names[0]} keeps {len(train_classes)} class{'' if train_classes else 'es'} after "
            "the label map "
            f"({sorted(train_classes)}); a classifier needs at least two: fix the label map."
        )
    if not train_classes & set(test_labels):
        raise SchemaError(
            f"{names[1]} shares no labels with {names[0]} after harmonization "
            f"(train: {sorted(train_classes)}, test: {sorted(set(test_labels))}); "
            "fix the label map."
        )
    return train_labels, test_labels


def dropped_by_map(labels: pd.Series, shared: pd.Series) -> dict[str, int]:
    """Cells per source label that the label map dropped (``labels`` minus ``shared``)."""
    lost = labels.loc[~labels.index.isin(shared.index)].astype(str)
    return {str(k): int(v) for k, v in lost.value_counts().sort_index().items()}


@dataclass
class TransferData:
    """A train/test pair on shared genes and shared labels, ready for the probes."""

    combined: AnnData  # X over shared genes (of kind ``kind``); obs_names "train:"/"test:"
    labels: pd.Series  # shared labels of all combined cells
    split: Split  # train/val from the training dataset, test = every test-dataset cell
    n_shared_genes: int
    dropped_test_classes: dict[str, int]
    coverage: dict[str, dict[str, int]]
    """What the label map leaves out, cells per class: ``train_classes_without_test``
    (training cells of classes no test cell has), ``test_dropped_by_map`` and
    ``train_dropped_by_map`` (source labels mapped to null) and ``test_classes_not_in_train``."""
    kind: str = "lognorm"
    """``counts`` when both datasets are raw counts (the baselines log-normalize them, and
    scVI can run), else ``lognorm`` (each dataset log-normalized as its kind requires)."""


def _restrict(v: ValidatedData, keep: pd.Index, genes: pd.Index, prefix: str) -> AnnData:
    """Cells ``keep`` × ``genes``, with the file's own gene names (what the models match)."""
    data = v.adata[keep, genes].copy()
    data.obs_names = prefix + data.obs_names.astype(str)
    if v.original_var_names is not None:
        original = pd.Series(v.original_var_names, index=v.adata.var_names)
        data.var_names = pd.Index(original.loc[genes].to_numpy())  # pyright: ignore[reportAttributeAccessIssue]  # anndata types var_names as Sequence[str]
    return data


def prepare_transfer(
    train: ValidatedData,
    test: ValidatedData,
    shared: tuple[pd.Series, pd.Series],
    *,
    names: tuple[str, str],
    seed: int,
    fractions: tuple[float, float, float],
) -> tuple[TransferData, AnnData, AnnData]:
    """Intersect genes and build the combined matrix and split of harmonized labels.

    When both datasets are raw counts the combined matrix holds their counts (kind
    ``counts``); otherwise each is log-normalized as its kind requires (kind ``lognorm``).
    Either way the baselines see the same log-normalized values: the normalization is per
    cell.

    Parameters
    ----------
    train, test : ValidatedData
        The training and test datasets.
    shared : (pandas.Series, pandas.Series)
        Each side's shared labels of its kept cells, from :func:`shared_labels`.
    names : (str, str)
        The datasets' names, used in errors.
    seed : int
        Seed of the training side's train/val split.
    fractions : (float, float, float)
        Train/val/test fractions of that split (the test part goes to training).

    Returns
    -------
    (TransferData, AnnData, AnnData)
        The combined data, plus the count matrices of both datasets (shared genes, prefixed
        cell names) for model embeddings.

    Raises
    ------
    SchemaError
        No shared gene.
    """
    train_labels, test_labels = shared
    train_classes = set(train_labels)
    extra = test_labels.loc[~test_labels.isin(train_classes)]
    dropped = {str(k): int(v) for k, v in extra.value_counts().items()}
    train_sizes = train_labels.value_counts()
    coverage = {
        "train_classes_without_test": {
            str(k): int(train_sizes[k]) for k in sorted(train_classes - set(test_labels))
        },
        "test_dropped_by_map": dropped_by_map(test.labels, test_labels),
        "test_classes_not_in_train": dict(sorted(dropped.items())),
        "train_dropped_by_map": dropped_by_map(train.labels, train_labels),
    }
    test_labels = test_labels.loc[test_labels.isin(train_classes)]
    genes = train.adata.var_names.intersection(test.adata.var_names, sort=False)
    if len(genes) == 0:
        raise SchemaError(
            f"{names[0]} and {names[1]} share no gene names; use the same identifier type in "
            "both var_names (e.g. symbols)."
        )
    a = _restrict(train, train_labels.index, genes, "train:")
    b = _restrict(test, test_labels.index, genes, "test:")
    kinds = (train.diagnostics.matrix_kind, test.diagnostics.matrix_kind)
    kind = "counts" if kinds == ("counts", "counts") else "lognorm"
    if kind == "counts":
        matrix = sp.vstack([a.X, b.X]).tocsr().astype(np.float32)  # pyright: ignore[reportArgumentType, reportCallIssue]  # validated X is CSR
    else:
        matrix = sp.vstack(
            [
                lognormalize(a.X, kind=kinds[0]),  # pyright: ignore[reportArgumentType]  # validated X is CSR
                lognormalize(b.X, kind=kinds[1]),  # pyright: ignore[reportArgumentType]
            ]
        ).tocsr()
    combined = AnnData(
        X=matrix,
        obs=pd.DataFrame(index=pd.Index([*a.obs_names, *b.obs_names])),
        var=pd.DataFrame(index=genes),
    )
    labels = pd.Series(
        pd.Categorical(
            [*train_labels.to_numpy(), *test_labels.to_numpy()], categories=sorted(train_classes)
        ),
        index=combined.obs_names,
    )
    inner = stratified_split(labels.iloc[: a.n_obs], seed=seed, fractions=fractions)
    split = Split(seed=seed, train=inner.train, val=inner.val, test=pd.Index(b.obs_names))
    data = TransferData(
        combined=combined,
        labels=labels,
        split=split,
        n_shared_genes=int(len(genes)),
        dropped_test_classes=dropped,
        coverage=coverage,
        kind=kind,
    )
    return data, a, b


def check_transfer_feature_selection(
    datasets: list[tuple[str, ValidatedData]], cfg: RunConfig
) -> None:
    """Refuse geneformer and scgpt on feature-selected counts in a transfer.

    The counts are both datasets restricted to their shared genes; feature-selected: fewer
    than 5,000 shared genes, or every gene of one dataset flagged highly variable (see
    :mod:`scfmbench.data.feature_selection`). With ``cfg.allow_feature_selected`` the warning
    is logged and added to both datasets' diagnostics instead.

    Raises
    ------
    DataError
        A feature-selected matrix for a rank- or bin-based model, without the flag.
    """
    from scfmbench.data.feature_selection import check_feature_selection

    (name_a, data_a), (name_b, data_b) = datasets
    shared = data_a.adata.var_names.intersection(data_b.adata.var_names)
    allowed = check_feature_selection(
        cfg.models,
        n_genes=len(shared),
        all_hvg=data_a.diagnostics.all_highly_variable or data_b.diagnostics.all_highly_variable,
        allow=cfg.allow_feature_selected,
        where=f"the count matrix of {name_a} and {name_b} restricted to their shared genes",
    )
    if allowed is not None:
        logger.warning("warning: %s", allowed)
        for _, data in datasets:
            data.diagnostics.warnings.append(allowed)


def training_split(prepared: TransferData, *, seed: int, fractions) -> Split:
    """Another stratified train/val split of the training dataset (same target cells)."""
    n_train = len(prepared.labels) - len(prepared.split.test)
    inner = stratified_split(prepared.labels.iloc[:n_train], seed=seed, fractions=fractions)
    return Split(seed=seed, train=inner.train, val=inner.val, test=prepared.split.test)
