"""Cross-dataset transfer: train every method on dataset A, score it on dataset B.

Labels are harmonized through a mapping (source label → shared label, or null to drop),
genes are intersected, baselines are fitted on A's training cells only, and model
embeddings are computed on each dataset restricted to the shared genes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from anndata import AnnData

from scfmbench._atomic import write_json, write_text
from scfmbench._version import __version__
from scfmbench.config import RunConfig
from scfmbench.data.cells import InMemoryCells
from scfmbench.data.io import load_dataset
from scfmbench.data.labels import is_missing_label
from scfmbench.data.matrix import lognormalize
from scfmbench.data.splits import Split, stratified_split
from scfmbench.data.validate import ValidatedData, validate
from scfmbench.errors import ConfigError, SchemaError
from scfmbench.report.coverage import coverage_lines

logger = logging.getLogger(__name__)

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
    """A built-in map name or a YAML file of ``source label: shared label`` (null drops).

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
    mapping = yaml.safe_load(path.read_text())
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"label map {str(path)!r} must be a mapping 'source label: shared label'."
        )
    return {str(k): (None if is_missing_label(v) else str(v)) for k, v in mapping.items()}


def harmonize(labels: pd.Series, mapping: dict[str, str | None], *, dataset: str) -> pd.Series:
    """Map labels to shared labels; cells mapped to null (or to a placeholder such as
    ``"unknown"``, see :func:`load_label_map`) are dropped (index shrinks).

    Raises:
        SchemaError: listing every label that the mapping does not mention.
    """
    values = labels.astype(str)
    unmapped = sorted(set(values) - set(mapping))
    if unmapped:
        raise SchemaError(
            f"labels of {dataset} not in the label map: {unmapped}; add them to the map "
            "(map to null to drop those cells)."
        )
    shared = values.map({k: (None if is_missing_label(v) else v) for k, v in mapping.items()})
    return shared[shared.notna()].astype(str)


def dropped_by_map(labels: pd.Series, shared: pd.Series) -> dict[str, int]:
    """Cells per source label that the label map dropped (``labels`` minus ``shared``)."""
    lost = labels[~labels.index.isin(shared.index)].astype(str)
    return {str(k): int(v) for k, v in lost.value_counts().sort_index().items()}


@dataclass
class TransferData:
    """A train/test pair on shared genes and shared labels, ready for the probes."""

    combined: AnnData  # lognorm X over shared genes; obs_names prefixed "train:"/"test:"
    labels: pd.Series  # shared labels of all combined cells
    split: Split  # train/val from the training dataset, test = every test-dataset cell
    n_shared_genes: int
    dropped_test_classes: dict[str, int]
    coverage: dict[str, dict[str, int]]
    """What the label map leaves out, cells per class: ``train_classes_without_test``
    (training cells of classes no test cell has), ``test_dropped_by_map`` and
    ``train_dropped_by_map`` (source labels mapped to null) and ``test_classes_not_in_train``."""


def _restrict(v: ValidatedData, keep: pd.Index, genes: pd.Index, prefix: str) -> AnnData:
    """Cells ``keep`` × ``genes``, with the file's own gene names (what the models match)."""
    data = v.adata[keep, genes].copy()
    data.obs_names = prefix + data.obs_names.astype(str)
    if v.original_var_names is not None:
        original = pd.Series(v.original_var_names, index=v.adata.var_names)
        data.var_names = pd.Index(original[genes].to_numpy())
    return data


def prepare_transfer(
    train: ValidatedData,
    test: ValidatedData,
    mapping: dict[str, str | None],
    *,
    names: tuple[str, str],
    seed: int,
    fractions: tuple[float, float, float],
) -> tuple[TransferData, AnnData, AnnData]:
    """Harmonize labels, intersect genes and build the combined matrix and split.

    Returns the TransferData plus the count matrices of both datasets (shared genes,
    prefixed cell names) for model embeddings.
    """
    train_labels = harmonize(train.labels, mapping, dataset=names[0])
    test_labels = harmonize(test.labels, mapping, dataset=names[1])
    train_classes = set(train_labels)
    shared = train_classes & set(test_labels)
    if not shared:
        raise SchemaError(
            f"{names[1]} shares no labels with {names[0]} after harmonization "
            f"(train: {sorted(train_classes)}, test: {sorted(set(test_labels))}); "
            "fix the label map."
        )
    extra = test_labels[~test_labels.isin(train_classes)]
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
    test_labels = test_labels[test_labels.isin(train_classes)]
    genes = train.adata.var_names.intersection(test.adata.var_names, sort=False)
    if len(genes) == 0:
        raise SchemaError(
            f"{names[0]} and {names[1]} share no gene names; use the same identifier type in "
            "both var_names (e.g. symbols)."
        )
    a = _restrict(train, train_labels.index, genes, "train:")
    b = _restrict(test, test_labels.index, genes, "test:")
    lognorm = sp.vstack(
        [
            lognormalize(a.X, kind=train.diagnostics.matrix_kind),
            lognormalize(b.X, kind=test.diagnostics.matrix_kind),
        ]
    ).tocsr()
    combined = AnnData(
        X=lognorm,
        obs=pd.DataFrame(index=[*a.obs_names, *b.obs_names]),
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
    )
    return data, a, b


def check_transfer_feature_selection(
    datasets: list[tuple[str, ValidatedData]], cfg: RunConfig
) -> None:
    """Refuse geneformer and scgpt on the counts the models see in a transfer (both datasets
    restricted to their shared genes) when they are feature-selected: fewer than 5,000
    shared genes, or every gene of one dataset flagged highly variable (see
    :mod:`scfmbench.data.feature_selection`). With ``cfg.allow_feature_selected`` the warning is
    logged and added to both datasets' diagnostics instead.

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


def transfer(
    train: str | Path | AnnData,
    test: str | Path | AnnData,
    *,
    label_map: str | Path | dict[str, str | None] = "pbmc3k_kang2018",
    label_key_train: str | None = None,
    label_key_test: str | None = None,
    both_directions: bool = True,
    config: RunConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on one dataset, score on the other (and back); write ``transfer.json``/``.md``.

    The training side is split ``n_splits`` times (seeds ``seed .. seed + n_splits − 1``,
    train/val per class); every seed's model is scored on all target cells. Scores are means
    over seeds with 95% intervals over target cells and seeds, and paired tests (vs the best
    baseline by validation macro F1, vs each random-init control; Holm within a direction)
    are in ``transfer.directions[...]["comparisons"]``; per-cell predictions of every seed
    in ``predictions.tsv.gz`` (with a ``direction`` column).

    Returns:
        The document written to ``<out>/<name>/metrics.json`` whose ``transfer.matrix``
        is ``{train: {test: {method: {accuracy, macro_f1, weighted_f1, n_test, ...}}}}``.
    """
    from scfmbench.benchmark.pipeline import (
        baseline_methods,
        check_writable,
        fit_and_predict,
        load_models,
        model_methods,
    )

    values = config.model_dump() if config is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig.build(values)
    mapping = label_map if isinstance(label_map, dict) else load_label_map(label_map)
    datasets = []
    for role, source, key in (("train", train, label_key_train), ("test", test, label_key_test)):
        name = role if isinstance(source, AnnData) else Path(str(source)).stem
        adata = load_dataset(source)
        try:
            checked = validate(
                adata,
                label_key=key,
                min_cells_per_class=cfg.min_cells_per_class,
                merge_similar_labels=cfg.merge_similar_labels,
                name=name if isinstance(source, AnnData) else Path(str(source)).name,
            )
        except SchemaError as exc:  # name the transfer option that picks this side's labels
            raise SchemaError(
                f"{role} data {name}: " + str(exc).replace("--label-key", f"--label-key-{role}")
            ) from None
        datasets.append((name, checked))
    check_transfer_feature_selection(datasets, cfg)
    methods = baseline_methods(cfg)
    models = load_models(cfg)
    methods += model_methods(models, cfg)
    run_dir = Path(cfg.out) / (cfg.name or f"transfer_{datasets[0][0]}__{datasets[1][0]}")
    check_writable(run_dir)
    directions = [(0, 1), (1, 0)] if both_directions else [(0, 1)]
    matrix: dict[str, dict[str, dict]] = {}
    details = {}
    tables = []
    model_genes: dict[str, dict] = {}
    started = time.perf_counter()
    for i, j in directions:
        (name_a, data_a), (name_b, data_b) = datasets[i], datasets[j]
        prepared, counts_a, counts_b = prepare_transfer(
            data_a, data_b, mapping, names=(name_a, name_b), seed=cfg.seed, fractions=cfg.fractions
        )
        embedded = _embed_models(models, prepared, counts_a, counts_b, cfg, progress)
        for model_id, per_dataset in embedded.items():
            for dataset, info in zip((name_a, name_b), per_dataset, strict=True):
                model_genes.setdefault(f"{model_id} ({dataset})", info)
        classes = list(prepared.labels.cat.categories)
        code_of = {c: k for k, c in enumerate(classes)}
        cells = InMemoryCells.from_adata(prepared.combined)
        matrices = {m.model_id: prepared.combined.obsm[m.obsm_key] for m in models}
        seeds = range(cfg.seed, cfg.seed + cfg.n_splits)
        splits = [prepared.split] + [
            training_split(prepared, seed=s, fractions=cfg.fractions) for s in seeds[1:]
        ]
        predictions = {
            (method.name, split.seed): fit_and_predict(
                method,
                cells,
                matrices,
                prepared.labels,
                split,
                cfg,
                "lognorm",
                code_of,
                classes,
            )
            for split in splits
            for method in methods
        }
        results, comparisons, table = transfer_statistics(
            methods, predictions, prepared.labels, splits, seed=cfg.seed
        )
        add_score_warnings(
            results, methods, cfg, (datasets[i], datasets[j]), prepared.n_shared_genes, embedded
        )
        tables.append(table.assign(direction=f"{name_a}->{name_b}"))
        matrix.setdefault(name_a, {})[name_b] = results
        details[f"{name_a}->{name_b}"] = {
            "n_shared_genes": prepared.n_shared_genes,
            "n_train_cells": int(len(prepared.split.train)),
            "n_test_cells": int(len(prepared.split.test)),
            "classes": classes,
            "dropped_test_classes": prepared.dropped_test_classes,
            "training_seeds": list(seeds),
            "comparisons": comparisons,
            "coverage": prepared.coverage,
        }
        for line in coverage_lines(f"{name_a}->{name_b}", prepared.coverage):
            logger.warning("warning: %s", line)
    doc = {
        "schema_version": "2.0",
        "scfmbench_version": __version__,
        "run": {
            "name": run_dir.name,
            "kind": "transfer",
            "datasets": [d[0] for d in datasets],
            "seed": cfg.seed,
            "label_map": mapping,
        },
        "diagnostics": {
            **{name: v.diagnostics.to_dict() for name, v in datasets},
            "models": model_genes,  # per model and dataset: the genes it matched, and from where
        },
        "methods": {},  # per-dataset runs hold the within-dataset methods
        "transfer": {"matrix": matrix, "directions": details},
        "timings": {"total": round(time.perf_counter() - started, 3)},
    }
    write_json(run_dir / "metrics.json", doc)
    from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, write_predictions

    write_predictions(pd.concat(tables, ignore_index=True), run_dir / PREDICTIONS_FILE)
    write_text(run_dir / "transfer.md", transfer_markdown(doc))
    from scfmbench.report.write import write_report

    write_report(run_dir)
    return doc


def training_split(prepared: TransferData, *, seed: int, fractions) -> Split:
    """Another stratified train/val split of the training dataset (same target cells)."""
    n_train = len(prepared.labels) - len(prepared.split.test)
    inner = stratified_split(prepared.labels.iloc[:n_train], seed=seed, fractions=fractions)
    return Split(seed=seed, train=inner.train, val=inner.val, test=prepared.split.test)


def transfer_statistics(
    methods: list, predictions: dict, labels: pd.Series, splits: list[Split], *, seed: int
) -> tuple[dict[str, dict], list[dict], pd.DataFrame]:
    """Per method: mean scores over training seeds with 95% intervals (design ``transfer``),
    the per-seed scores, and the paired comparisons on the target cells.

    Returns
    -------
    (results, comparisons, predictions table)
        ``results[method]`` holds ``accuracy``, ``macro_f1``, ``weighted_f1``,
        ``balanced_accuracy`` (means over seeds), ``n_test``, ``kind``, ``summary`` (with
        ``ci95``) and ``seeds`` (each seed's scores).
    """
    from types import SimpleNamespace

    from scfmbench.evaluation.run_stats import method_statistics, predictions_table
    from scfmbench.evaluation.stats import Design

    table = predictions_table(predictions, labels, SimpleNamespace(splits=splits), methods)
    doc = {
        "run": {
            "classes": list(labels.cat.categories),
            "reference": methods[0].name,
            "design": {
                "name": "transfer",
                "n_folds": len(splits),
                "test_train_ratio": Design("transfer").test_train_ratio,
            },
        },
        "methods": {
            m.name: {
                "kind": m.kind,
                "probe": m.probe,
                "model": m.model,
                "splits": {
                    str(s.seed): {"val_macro_f1": predictions[(m.name, s.seed)]["val_macro_f1"]}
                    for s in splits
                },
            }
            for m in methods
        },
    }
    method_statistics(doc, table, seed=seed)
    results = {}
    for name, entry in doc["methods"].items():
        summary = entry["summary"]
        results[name] = {
            **{metric: value["mean"] for metric, value in summary.items()},
            "n_test": int(len(splits[0].test)),
            "kind": entry["kind"],
            "summary": summary,
            "seeds": entry["splits"],
        }
    return results, doc["comparisons"], table


def add_score_warnings(
    results: dict[str, dict],
    methods: list,
    cfg: RunConfig,
    pair: tuple[tuple[str, ValidatedData], tuple[str, ValidatedData]],
    n_shared_genes: int,
    embedded: dict[str, list[dict]],
) -> None:
    """Put each model method's score warnings in ``results[method]["warnings"]``.

    The warnings are those of a run (:func:`~.pipeline.score_warnings`), judged for
    each dataset of the ``pair`` on the shared genes the model saw, each prefixed by the
    dataset(s) it concerns (``"pbmc3k, kang: only 1267 genes …"``).
    """
    from types import SimpleNamespace

    from scfmbench.benchmark.pipeline import score_warnings

    for method in methods:
        if method.model is None:
            continue
        found: dict[str, list[str]] = {}
        for (name, data), info in zip(pair, embedded[method.model], strict=True):
            facts = SimpleNamespace(
                matrix_kind=data.diagnostics.matrix_kind,
                n_genes=n_shared_genes,
                all_highly_variable=data.diagnostics.all_highly_variable,
            )
            for warning in score_warnings(method, cfg, facts, {method.model: info}):
                found.setdefault(warning, []).append(name)
        if found:
            results[method.name]["warnings"] = [
                f"{', '.join(names)}: {warning}" for warning, names in found.items()
            ]


def _embed_models(
    models,
    prepared: TransferData,
    counts_a: AnnData,
    counts_b: AnnData,
    cfg: RunConfig,
    progress: bool,
) -> dict[str, list[dict]]:
    """Embed both datasets (shared genes, raw counts) and place rows in the combined obsm.

    Returns:
        Per model id, the embedding record of each dataset (layer, pooling, gene match).
    """
    from scfmbench.embed import embed

    records: dict[str, list[dict]] = {}
    for model in models:
        parts = []
        for counts in (counts_a, counts_b):
            result = embed(
                counts,
                model,
                batch_size=cfg.batch_size,
                device=cfg.device,
                seed=cfg.seed,
                progress=progress,
            )
            parts.append(counts.obsm[model.obsm_key])
            records.setdefault(model.model_id, []).append(
                {
                    "layer": result.layer,
                    "pooling": result.pooling,
                    "n_dropped_cells": int(len(result.dropped)),
                    **(result.gene_match.to_dict() if result.gene_match else {}),
                }
            )
        prepared.combined.obsm[model.obsm_key] = np.vstack(parts)
    return records


def transfer_markdown(doc: dict) -> str:
    lines = ["# scfmbench cross-dataset transfer", ""]
    gaps = [
        line
        for direction, info in doc["transfer"]["directions"].items()
        for line in coverage_lines(direction, info.get("coverage") or {})
    ]
    if gaps:
        lines += ["## Label coverage", "", *[f"- {line}" for line in gaps], ""]
    for train_name, row in doc["transfer"]["matrix"].items():
        for test_name, results in row.items():
            info = doc["transfer"]["directions"][f"{train_name}->{test_name}"]
            warned = any(r.get("warnings") for r in results.values())
            lines += [
                f"## train {train_name} → test {test_name}",
                "",
                f"{info['n_shared_genes']} shared genes; {info['n_train_cells']} training "
                f"cells; {info['n_test_cells']} test cells; classes {info['classes']}; "
                f"test classes not in train (dropped): {info['dropped_test_classes'] or 'none'}",
                "",
                "| method | kind | accuracy | macro F1 | macro F1 95% CI |"
                + (" warnings |" if warned else ""),
                "| --- | --- | --- | --- | --- |" + (" --- |" if warned else ""),
            ]
            lines += [
                f"| {m} | {r['kind']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                + _interval_text(r.get("summary", {}).get("macro_f1", {}).get("ci95"))
                + " |"
                + (f" {'; '.join(r.get('warnings') or []) or '—'} |" if warned else "")
                for m, r in results.items()
            ]
            lines.append("")
            comparisons = info.get("comparisons") or []
            if comparisons:
                lines += [
                    "| method | vs | comparison | ΔF1 | ΔF1 95% CI | p (Holm) |",
                    "| --- | --- | --- | --- | --- | --- |",
                ]
                lines += [
                    f"| {c['method']} | {c['against']} | {c['kind']} | {c['f1_diff']:.3f} | "
                    f"{_interval_text(c['f1_diff_ci95'])} | {c['p_holm']:.3g}"
                    + (" *" if c["significant"] else "")
                    + " |"
                    for c in comparisons
                ]
                lines.append("")
    return "\n".join(lines)


def _interval_text(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"


__all__ = ["BUILTIN_LABEL_MAPS", "harmonize", "load_label_map", "prepare_transfer", "transfer"]
