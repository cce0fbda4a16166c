"""Cross-dataset transfer: train every method on dataset A, score it on dataset B.

Labels are harmonized through a mapping (source label → shared label, or null to drop),
genes are intersected, baselines are fitted on A's training cells only, and model
embeddings are computed on each dataset restricted to the shared genes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import yaml
from anndata import AnnData

from scfmbench._atomic import write_text
from scfmbench.benchmark.document import MatrixFacts, score_warnings
from scfmbench.benchmark.embedding import check_models_read
from scfmbench.benchmark.fitting import predict_all
from scfmbench.benchmark.methods import Method, baseline_methods, model_methods
from scfmbench.benchmark.output import check_folder_kind, check_writable
from scfmbench.benchmark.pipeline import load_models
from scfmbench.benchmark.predict import Prediction, ProbeInputs, payloads
from scfmbench.benchmark.transfer_data import (
    BUILTIN_LABEL_MAPS,
    TransferData,
    check_distinct_cells,
    check_transfer_feature_selection,
    checked_label_map,
    dataset_names,
    harmonize,
    load_label_map,
    prepare_transfer,
    shared_labels,
    training_split,
)
from scfmbench.benchmark.transfer_settings import (
    TRANSFER_IGNORED,
    transfer_settings,
    transfer_warnings,
)
from scfmbench.config import DEFAULT_BASELINES, RunConfig
from scfmbench.data.cells import InMemoryCells
from scfmbench.data.io import load_dataset
from scfmbench.data.matrix import kind_in_words
from scfmbench.data.splits import Split, SplitSet, labels_hash
from scfmbench.data.validate import ValidatedData, validate
from scfmbench.errors import ConfigError, ScfmbenchError, SchemaError
from scfmbench.evaluation.run_stats import (
    PREDICTIONS_FILE,
    method_statistics,
    predictions_table,
    write_predictions,
)
from scfmbench.evaluation.stats import Design
from scfmbench.hashing import hash_array, hash_json
from scfmbench.report.coverage import coverage_lines
from scfmbench.report.manifest import write_manifest
from scfmbench.report.transfer import transfer_markdown
from scfmbench.results import document_header, write_metrics
from scfmbench.stages import StageStore, safe_name

logger = logging.getLogger(__name__)

DIRECTIONS_DIR = "directions"
"""Folder of a transfer run holding each direction's saved fits (``<train>_to_<test>/stages``)."""


def transfer_baselines(
    cfg: RunConfig, kinds: dict[str, str]
) -> tuple[list[Method], dict[str, str]]:
    """Return the baselines a transfer fits, and those it leaves out with the reason.

    scVI is trained on the raw counts of the genes both datasets share: it runs when both
    datasets are counts, and the default ``scvi`` is left out otherwise.

    Parameters
    ----------
    cfg : RunConfig
        ``baselines`` and ``probes`` are read.
    kinds : dict of str to str
        Each dataset's matrix kind (``counts``, ``lognorm``, …), by dataset name.

    Raises
    ------
    ConfigError
        ``scvi`` asked for in a ``baselines`` list other than the default, on data that are
        not counts.
    """
    other = {name: kind for name, kind in kinds.items() if kind != "counts"}
    if not other:
        return baseline_methods(cfg, "counts"), {}
    if "scvi" not in cfg.baselines:
        return baseline_methods(cfg, "lognorm"), {}
    held = ", ".join(f"{name} holds {kind_in_words(kind)}" for name, kind in other.items())
    reason = f"it needs raw counts ({held})"
    if cfg.baselines != DEFAULT_BASELINES:
        raise ConfigError(
            f"the scvi baseline cannot run in this transfer: {reason}; remove "
            "scvi from `baselines`."
        )
    logger.warning("warning: scvi baseline skipped: %s", reason)
    kept = cfg.model_copy(update={"baselines": [b for b in cfg.baselines if b != "scvi"]})
    return baseline_methods(kept, "lognorm"), {"scvi": reason}


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

    Parameters
    ----------
    train, test : str, pathlib.Path or AnnData
        The two datasets (``.h5ad`` paths, built-in names or AnnData objects).
    label_map : str, pathlib.Path or dict
        A built-in map name, a YAML file or a mapping ``source label → shared label`` (None
        drops the label's cells); default ``"pbmc3k_kang2018"``.
    label_key_train, label_key_test : str, optional
        The label column of each dataset (default: ``cell_type``).
    both_directions : bool
        Also train on ``test`` and score on ``train`` (default True).
    config : RunConfig, optional
        The run's settings; ``overrides`` replace its fields.
    progress : bool
        Show progress bars (default True).
    **overrides
        RunConfig fields (``out``, ``name``, ``models``, ``n_splits``, ``seed``, …).

    Returns
    -------
    dict
        The document written to ``<out>/<name>/metrics.json``, whose ``transfer.matrix``
        is ``{train: {test: {method: {accuracy, macro_f1, weighted_f1, n_test, ...}}}}``.

    Raises
    ------
    ConfigError
        Bad settings or label map, or an unwritable output folder.
    SchemaError
        A side without its label column, labels the map lacks, or no shared labels or genes.
    CountsRequiredError, DataError
        Values or an ``obs`` column a model refuses, on the side the message names.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    cfg = transfer_settings(config, overrides)
    mapping = (
        checked_label_map(label_map) if isinstance(label_map, dict) else load_label_map(label_map)
    )
    directions = [(0, 1), (1, 0)] if both_directions else [(0, 1)]
    names = dataset_names(train, test)
    run_dir = Path(cfg.out) / (cfg.name or safe_name(f"transfer_{names[0]}__{names[1]}"))
    # either direction of these two datasets may be saved (a two-way run, then --one-way)
    direction_dirs = [direction_folder(names[i], names[j]) for i, j in ((0, 1), (1, 0))]
    check_writable(run_dir)
    check_folder_kind(run_dir, "transfer", direction_dirs=direction_dirs)
    keys = (label_key_train or cfg.label_key, label_key_test or cfg.label_key)
    clock = StageStore(run_dir)  # the run's own stages; each direction keeps its fits apart
    with clock.timed("read"):
        datasets = _read_sides((train, test), names, keys, cfg)
    map_name = None if isinstance(label_map, dict) else str(label_map)
    shared = {  # before any model loads: a map that misses labels or classes
        (i, j): shared_labels(
            datasets[i][1].labels,
            datasets[j][1].labels,
            mapping,
            names=(datasets[i][0], datasets[j][0]),
            map_name=map_name,
        )
        for i, j in directions
    }
    for line in transfer_warnings(cfg):  # once the data and the label map are checked
        logger.warning("warning: %s", line)
    kinds = {name: checked.diagnostics.matrix_kind for name, checked in datasets}
    methods, skipped = transfer_baselines(cfg, kinds)
    with clock.timed("load_models"):
        models = load_models(cfg)
    methods += model_methods(models, cfg)
    matrix: dict[str, dict[str, dict]] = {}
    details = {}
    tables = []
    model_genes: dict[str, dict] = {}
    for i, j in directions:
        (name_a, data_a), (name_b, data_b) = datasets[i], datasets[j]
        direction = f"{name_a}->{name_b}"
        # each direction keeps its fits apart, so an interrupted transfer resumes
        stages = StageStore(run_dir / DIRECTIONS_DIR / direction_folder(name_a, name_b))
        with stages.timed("prepare"):
            prepared, counts_a, counts_b = prepare_transfer(
                data_a,
                data_b,
                shared[(i, j)],
                names=(name_a, name_b),
                seed=cfg.seed,
                fractions=cfg.fractions,
            )
        embedded = _embed_models(models, prepared, counts_a, counts_b, cfg, progress, stages)
        for model_id, per_dataset in embedded.items():
            for dataset, info in zip((name_a, name_b), per_dataset, strict=True):
                model_genes.setdefault(f"{model_id} ({dataset})", info)
        classes = list(prepared.labels.cat.categories)
        cells = InMemoryCells.from_adata(prepared.combined)
        matrices = {m.model_id: np.asarray(prepared.combined.obsm[m.obsm_key]) for m in models}
        seeds = range(cfg.seed, cfg.seed + cfg.n_splits)
        splits = [prepared.split] + [
            training_split(prepared, seed=s, fractions=cfg.fractions) for s in seeds[1:]
        ]
        data_hash = hash_json([hash_array(cells.matrix), labels_hash(prepared.labels)])
        inputs = ProbeInputs(
            cfg,
            cells,
            matrices,
            {model_id: hash_array(matrix) for model_id, matrix in matrices.items()},
            prepared.labels,
            data_hash,
            prepared.kind,
        )
        split_set = SplitSet(tuple(splits), data_hash, cfg.fractions)
        predictions = predict_all(inputs, split_set, methods, stages, progress)
        with stages.timed("statistics"):
            results, comparisons, table = transfer_statistics(
                methods, predictions, prepared.labels, splits, seed=cfg.seed
            )
        add_score_warnings(
            results, methods, cfg, (datasets[i], datasets[j]), prepared.n_shared_genes, embedded
        )
        tables.append(table.assign(direction=direction))
        matrix.setdefault(name_a, {})[name_b] = results
        details[direction] = {
            "n_shared_genes": prepared.n_shared_genes,
            "n_train_cells": int(len(prepared.split.train)),
            "n_test_cells": int(len(prepared.split.test)),
            "classes": classes,
            "dropped_test_classes": prepared.dropped_test_classes,
            "training_seeds": list(seeds),
            "comparisons": comparisons,
            "coverage": prepared.coverage,
        }
        for line in coverage_lines(direction, prepared.coverage):
            logger.warning("warning: %s", line)
        clock.absorb(stages, prefix=f"{direction} ")  # e.g. "pbmc3k->kang probe:pca+logreg"
    clock.timings["total"] = time.perf_counter() - started
    cpu_seconds = time.process_time() - started_cpu + clock.worker_cpu_seconds
    clock.note("total", cpu_seconds=round(cpu_seconds, 3))
    doc = {
        **document_header(),
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
        "skipped": skipped,
        "methods": {},  # per-dataset runs hold the within-dataset methods
        "transfer": {"matrix": matrix, "directions": details},
        "timings": clock.summary(),
    }
    # the two datasets are --train and --test (manifest.json hashes both): no `data` key,
    # nor the settings a transfer ignored; the label key when both sides used the same
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRANSFER_IGNORED}
    used = {checked.diagnostics.label_key for _, checked in datasets}
    settings["label_key"] = used.pop() if len(used) == 1 else None
    write_text(run_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=False))
    write_metrics(run_dir, doc)
    write_predictions(pd.concat(tables, ignore_index=True), run_dir / PREDICTIONS_FILE)
    write_text(run_dir / "transfer.md", transfer_markdown(doc))
    write_manifest(
        run_dir,
        config=settings,
        data_path_or_none=None,
        datasets={
            name: None if isinstance(source, AnnData) else str(source)
            for name, source in zip(names, (train, test), strict=True)
        },
        seeds=list(range(cfg.seed, cfg.seed + cfg.n_splits)),
        checkpoints={m.model_id: m.checkpoint_sha256 for m in models},
    )
    from scfmbench.report.write import write_report

    write_report(run_dir)
    return doc


def direction_folder(train_name: str, test_name: str) -> str:
    """Return the folder, under ``RUN/directions/``, of one direction's saved fits."""
    return safe_name(f"{train_name}_to_{test_name}")


def _read_sides(
    sources: tuple[Any, Any], names: tuple[str, str], keys: tuple[Any, Any], cfg: RunConfig
) -> list[tuple[str, ValidatedData]]:
    """Read and validate both datasets; refuse what the run's models refuse about them.

    Every error names its side (``train data …``, ``test data …``) and, for a label column,
    the transfer option that picks it (``--label-key-train``/``--label-key-test``); then two
    sides that hold mostly the same cells are refused (:func:`check_distinct_cells`).
    """
    datasets = []
    for role, source, name, key in zip(("train", "test"), sources, names, keys, strict=True):
        try:
            adata = load_dataset(source)
        except ScfmbenchError as exc:  # a missing or unreadable file: say which side
            raise type(exc)(f"{role} data: {exc}") from None
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
    for role, (name, checked) in zip(("train", "test"), datasets, strict=True):
        try:  # values a model refuses, before any model loads
            check_models_read(cfg, list(cfg.models), checked)
        except ScfmbenchError as exc:
            raise type(exc)(f"{role} data {name}: {exc}") from None
    check_distinct_cells(datasets)  # the pair, once each side has passed its own checks
    return datasets


def transfer_statistics(
    methods: list[Method],
    predictions: dict[tuple[str, int], Prediction],
    labels: pd.Series,
    splits: list[Split],
    *,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], pd.DataFrame]:
    """Score every method of one transfer direction.

    Per method: mean scores over training seeds with 95% intervals (design ``transfer``),
    the per-seed scores, and the paired comparisons on the target cells.

    Returns
    -------
    (results, comparisons, predictions table)
        ``results[method]`` holds ``accuracy``, ``macro_f1``, ``weighted_f1``,
        ``balanced_accuracy`` (means over seeds), ``n_test``, ``kind``, ``summary`` (with
        ``ci95``) and ``seeds`` (each seed's scores).
    """
    table = predictions_table(
        payloads(predictions), labels, SimpleNamespace(splits=splits), methods
    )
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
                    str(s.seed): {"val_macro_f1": predictions[(m.name, s.seed)].val_macro_f1}
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
    results: dict[str, dict[str, Any]],
    methods: list[Method],
    cfg: RunConfig,
    pair: tuple[tuple[str, ValidatedData], tuple[str, ValidatedData]],
    n_shared_genes: int,
    embedded: dict[str, list[dict]],
) -> None:
    """Put each model method's score warnings in ``results[method]["warnings"]``.

    The warnings are those of a run (:func:`~.document.score_warnings`), judged for
    each dataset of the ``pair`` on the shared genes the model saw, each prefixed by the
    dataset(s) it concerns (``"pbmc3k, kang: only 1267 genes …"``).
    """
    for method in methods:
        if method.model is None:
            continue
        found: dict[str, list[str]] = {}
        for (name, data), info in zip(pair, embedded[method.model], strict=True):
            facts = MatrixFacts(
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
    stages: StageStore,
) -> dict[str, list[dict]]:
    """Embed both datasets (shared genes, raw counts) and place rows in the combined obsm.

    Each model's time is stage ``embed:<model id>`` of ``stages``, with its cells.

    Returns
    -------
    dict
        Per model id, the embedding record of each dataset (layer, pooling, gene match).
    """
    records: dict[str, list[dict]] = {}
    if not models:  # a baseline-only transfer does not import torch
        return records
    from scfmbench.embed import embed

    for model in models:
        parts = []
        for counts in (counts_a, counts_b):
            with stages.timed(f"embed:{model.model_id}"):
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
        stages.note(f"embed:{model.model_id}", n_cells=sum(len(part) for part in parts))
    return records


__all__ = [
    "BUILTIN_LABEL_MAPS",
    "TransferData",
    "harmonize",
    "load_label_map",
    "prepare_transfer",
    "transfer",
]
