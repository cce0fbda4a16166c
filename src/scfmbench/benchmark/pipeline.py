"""The benchmark pipeline: load/validate → splits → embed → probe → evaluate → report.

``run`` is the Python API behind ``scfmbench run``; each stage reuses its saved output
when its inputs are unchanged, so a rerun is near instant.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sklearn
from anndata import AnnData
from tqdm.auto import tqdm

from scfmbench._atomic import write_json, write_npy, write_text, write_with
from scfmbench._version import __version__
from scfmbench.config import ModelSpec, RunConfig
from scfmbench.data.backed import BackedData, validate_backed
from scfmbench.data.cells import CellRows, InMemoryCells
from scfmbench.data.io import BUILTIN_DATASETS, load_dataset
from scfmbench.data.splits import Split, SplitSet, labels_hash, load_or_make_splits
from scfmbench.data.validate import DataDiagnostics, ValidatedData
from scfmbench.data.validate import validate as validate_data
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import ConfigError, ScfmbenchError
from scfmbench.evaluation.metrics import HEADLINE_METRICS, classification_metrics
from scfmbench.evaluation.probes import PROBES, fit_probe
from scfmbench.evaluation.representations import (
    REPRESENTATIONS,
    SplitFeatures,
    embedding_features,
)
from scfmbench.hashing import hash_array, hash_json
from scfmbench.registry import did_you_mean
from scfmbench.stages import StageStore

if TYPE_CHECKING:
    from scfmbench.models import FoundationModel, LoadContext

logger = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = "2.1"
UNASSIGNED = "<unassigned>"
IN_MEMORY = "<in-memory AnnData>"
SKLEARN_WORKING_MEMORY_MB = 256
MAX_SCORED_CELLS = 20_000
"""The zero-shot embedding scores and UMAPs use at most this many cells (a seeded sample)."""

RunData = ValidatedData | BackedData
"""The validated cells of a run: in memory, or an ``.h5ad`` file streamed from disk."""


@dataclass(frozen=True)
class Method:
    """A representation paired with a probe, e.g. ``pca+xgboost`` or ``geneformer+logreg``."""

    name: str
    representation: str
    probe: str
    kind: str  # "baseline", "frozen" or "control"
    model: str | None = None


@dataclass
class RunResult:
    """What ``run`` returns: the run directory, the metrics document and a summary table."""

    run_dir: Path
    metrics: dict[str, Any]
    diagnostics: DataDiagnostics

    @property
    def table(self) -> pd.DataFrame:
        """One row per method: kind, mean accuracy / macro F1 / weighted F1 and gains."""
        rows = []
        for name, entry in self.metrics["methods"].items():
            row = {"method": name, "kind": entry["kind"]}
            for metric in HEADLINE_METRICS:
                row[metric] = entry["summary"][metric]["mean"]
                row[f"{metric}_sd"] = entry["summary"][metric]["sd"]
            for metric in ("accuracy", "macro_f1"):
                gain = entry["delta_vs_reference"][metric]
                row[f"delta_abs_{metric}"] = gain["abs"]
                row[f"delta_rel_{metric}"] = gain["rel"]
            rows.append(row)
        return pd.DataFrame(rows).set_index("method")


def baseline_methods(config: RunConfig, matrix_kind: str | None = None) -> list[Method]:
    """The baselines of ``config``; a bare ``scvi`` becomes ``scvi+<probe>`` for every probe.

    scVI needs raw counts: on other data (``matrix_kind`` not ``"counts"``; ``None`` =
    unknown, e.g. the log-normalized data of a transfer) it is left out of the default
    baseline list with a log line, and an explicit request raises.

    Raises
    ------
    ConfigError
        An unknown representation or probe, or scvi asked for on data without counts.
    """
    for probe in config.probes:  # used by models and scvi: refuse a typo with or without them
        PROBES.get(probe)
    methods = []
    for item in expand_baselines(config, matrix_kind):
        if item == "majority":
            methods.append(Method("majority", "none", "majority", "baseline"))
            continue
        representation, probe = item.split("+", 1)
        REPRESENTATIONS.get(representation)
        PROBES.get(probe)
        methods.append(Method(item, representation, probe, "baseline"))
    return methods


def expand_baselines(config: RunConfig, matrix_kind: str | None) -> list[str]:
    """``config.baselines`` with ``scvi`` spelled out as ``scvi+<probe>`` (see
    :func:`baseline_methods`)."""
    from scfmbench.config import DEFAULT_BASELINES, EMBEDDING_BASELINES

    items = []
    for item in config.baselines:
        if item in EMBEDDING_BASELINES:
            items += [f"{item}+{probe}" for probe in config.probes]
        else:
            items.append(item)
    scvi = [i for i in items if i.split("+", 1)[0] == "scvi"]
    if not scvi or matrix_kind == "counts":
        return items
    if config.baselines == DEFAULT_BASELINES:
        logger.info("scvi baseline skipped: it needs raw counts (the data are %s)", matrix_kind)
        return [i for i in items if i not in scvi]
    raise ConfigError(
        f"baseline {scvi[0]!r} needs raw integer counts but the data are "
        f"{matrix_kind or 'not counts'}; give the counts, or remove scvi from `baselines` "
        "(--no-scvi)."
    )


def load_models(config: RunConfig) -> list[FoundationModel]:
    """Load every requested foundation model (and its random-init control).

    Parameters
    ----------
    config
        The run: ``models`` (each ``NAME[-random]=DIR``), ``model_options``,
        ``random_controls`` and the run-wide settings of :func:`_loader_options`.

    Returns
    -------
    list of FoundationModel
        Per spec, the model (unless ``NAME-random``), then its random-init control (with
        ``random_controls`` or ``NAME-random``).

    Raises
    ------
    ConfigError
        An unknown model or option, or an invalid option value.
    CheckpointError
        A missing, corrupt or inconsistent checkpoint.
    """
    from scfmbench.models import load_model

    context = _loader_options(config)
    models = []
    for spec in config.model_specs:
        options = config.model_options.get(spec.name)
        if not spec.random_only:
            models.append(load_model(spec, context, options, random_init=False))
        if spec.random_only or config.random_controls:
            models.append(load_model(spec, context, options, random_init=True))
    return models


def _loader_options(config: RunConfig) -> LoadContext:
    """Return the settings every model loader takes: seed, gene column, allow_normalized."""
    from scfmbench.models import LoadContext

    return LoadContext(
        seed=config.seed,
        gene_column=config.gene_column,
        allow_normalized=config.allow_normalized,
    )


def model_methods(models: list[Any], config: RunConfig) -> list[Method]:
    methods = []
    for model in models:
        kind = "control" if model.random_init else "frozen"
        for probe in config.probes:
            PROBES.get(probe)
            methods.append(
                Method(f"{model.model_id}+{probe}", model.model_id, probe, kind, model.model_id)
            )
    return methods


def resolve_run(
    data: str | Path | AnnData | None, config: RunConfig | None, overrides: dict[str, Any]
) -> tuple[RunConfig, AnnData]:
    """The run configuration and the loaded dataset."""
    resolved = resolve_config(data, config, overrides)
    return resolved, data if isinstance(data, AnnData) else load_dataset(resolved.data)


def resolve_config(
    data: str | Path | AnnData | None, config: RunConfig | None, overrides: dict[str, Any]
) -> RunConfig:
    """``config`` with ``data`` and ``overrides`` applied, label key and name filled in."""
    values = config.model_dump() if config is not None else {}
    if isinstance(data, AnnData):
        values["data"] = IN_MEMORY
    elif data is not None:
        values["data"] = str(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    resolved = RunConfig.build(values)
    if (
        resolved.label_key is None
        and resolved.data in BUILTIN_DATASETS
        and not isinstance(data, AnnData)
    ):
        resolved.label_key = BUILTIN_DATASETS[resolved.data]
    if resolved.name is None:
        resolved.name = "run" if isinstance(data, AnnData) else Path(resolved.data).stem
    return resolved


def open_run_data(data: str | Path | AnnData | None, config: RunConfig, progress: bool) -> RunData:
    """Validate the run's data: in memory, or streamed from disk when ``config.backed`` (or,
    when unset, for ``.h5ad`` files over 1 GiB)."""
    from scfmbench.embed.stream import env_world_size, should_stream

    if env_world_size() > 1:
        raise ConfigError(
            "`scfmbench run` runs in one process; start it without torchrun (for large files "
            "use --backed and --device cuda), or shard `scfmbench embed` / `finetune` instead."
        )
    source = data if isinstance(data, AnnData) else config.data
    if should_stream(source, backed=config.backed):
        if config.finetune is not None:
            raise ConfigError(
                "fine-tuning holds every cell's tokens in memory and is not available on a "
                "streamed (backed) run; drop --finetune, or run with --no-backed."
            )
        return validate_backed(
            config.data,
            label_key=config.label_key,
            min_cells_per_class=config.min_cells_per_class,
            chunk_size=config.chunk_size,
            progress=progress,
            merge_similar_labels=config.merge_similar_labels,
        )
    return validate_data(
        load_dataset(source),
        label_key=config.label_key,
        min_cells_per_class=config.min_cells_per_class,
        merge_similar_labels=config.merge_similar_labels,
        name="the data" if isinstance(source, AnnData) else Path(str(source)).name,
    )


def run(
    data: str | Path | AnnData | None = None,
    *,
    config: RunConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> RunResult:
    """Benchmark cell-type classification on ``data`` and write the run directory.

    Args:
        data: an ``.h5ad`` path, a built-in name (``"pbmc68k_reduced"``) or an AnnData.
        config: a RunConfig; keyword ``overrides`` (e.g. ``label_key="cell_type"``,
            ``n_splits=5``, ``models=["geneformer=./gf"]``) replace its fields;
            ``backed=True`` (default for ``.h5ad`` files over 1 GiB) keeps the file on disk
            and streams it ``chunk_size`` cells at a time, with the same results.
        progress: show progress bars.

    Returns:
        RunResult with ``run_dir`` (``config.out / config.name``) holding ``config.yaml``,
        ``splits/``, ``metrics.json``, ``results.md`` and ``figures/`` (and, when streamed,
        the embeddings of every cell in ``embeddings/``).
    """
    config = resolve_config(data, config, overrides)
    validated = open_run_data(data, config, progress)
    try:
        return _run_validated(config, validated, progress)
    finally:
        if isinstance(validated, BackedData):
            validated.close()


def _run_validated(config: RunConfig, validated: RunData, progress: bool) -> RunResult:
    from scfmbench.evaluation.embedding_quality import detect_batch_key

    detect_batch_key(validated.obs, config.batch_key)  # a misspelt batch_key fails here
    check_run_feature_selection(config, validated.diagnostics)
    methods = baseline_methods(config, validated.diagnostics.matrix_kind)
    models = load_models(config)
    methods += model_methods(models, config)
    reference = config.reference or methods[0].name
    if reference not in {m.name for m in methods}:
        raise ConfigError(
            f"reference method {reference!r} is not in this run; choose from "
            f"{[m.name for m in methods]}.{did_you_mean(reference, [m.name for m in methods])}"
        )
    run_dir = Path(config.out) / config.name
    check_writable(run_dir)
    created = not run_dir.exists()
    try:
        # distance-based steps (kNN probe, kNN consistency) work in blocks of this many MB
        with sklearn.config_context(working_memory=SKLEARN_WORKING_MEMORY_MB):
            return _execute(config, validated, methods, models, reference, run_dir, progress)
    except ScfmbenchError:
        # bad input found late: leave nothing half-written
        if created and run_dir.exists():
            shutil.rmtree(run_dir)
        raise
    except KeyboardInterrupt:
        # interrupted: keep every finished stage so that a rerun resumes
        if created and not _holds_finished_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_run_feature_selection(config: RunConfig, diagnostics: DataDiagnostics) -> str | None:
    """Refuse the run's models on a feature-selected count matrix (see
    :func:`scfmbench.data.feature_selection.check_feature_selection`); with
    ``config.allow_feature_selected`` log and return the warning instead.

    Raises
    ------
    DataError
        geneformer or scgpt (or their controls) would see fewer than 5,000 genes, or only
        genes flagged highly variable, and ``allow_feature_selected`` is not set.
    """
    from scfmbench.data.feature_selection import check_feature_selection, matrix_facts

    allowed = check_feature_selection(
        config.models, allow=config.allow_feature_selected, **matrix_facts(diagnostics)
    )
    if allowed is not None:
        logger.warning("warning: %s", allowed)
    return allowed


def _holds_finished_work(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any saved output besides ``config.yaml``."""
    return run_dir.exists() and any(
        path.is_file() and path.name != "config.yaml" for path in run_dir.rglob("*")
    )


def _execute(
    config: RunConfig,
    validated: RunData,
    methods: list[Method],
    models: list,
    reference: str,
    run_dir: Path,
    progress: bool,
) -> RunResult:
    started, started_cpu = time.perf_counter(), time.process_time()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config.to_yaml())
    stages = StageStore(run_dir)
    labels = validated.labels
    cells = run_cells(validated)
    data_hash = data_fingerprint(validated)
    kind = validated.diagnostics.matrix_kind

    with stages.timed("splits"):
        split_set = run_splits(run_dir, validated, config)

    embeddings: dict[str, ModelEmbedding] = {}
    for model in models:
        with stages.timed(f"embed:{model.model_id}"):
            embedding = embed_cells(
                validated, model, config=config, run_dir=run_dir, stages=stages, progress=progress
            )
        if not embedding.info["from_cache"]:
            stages.note(f"embed:{model.model_id}", n_cells=len(labels))
        embeddings[model.model_id] = embedding
    matrices = {model_id: e.matrix for model_id, e in embeddings.items()}
    model_info = {model_id: e.info for model_id, e in embeddings.items()}
    matrix_hashes = {model_id: hash_array(m) for model_id, m in matrices.items()}
    inputs = ProbeInputs(config, cells, matrices, matrix_hashes, labels, data_hash, kind)

    from scfmbench.benchmark.label_efficiency import CompactFeatures

    kept_features = CompactFeatures() if config.train_sizes else None
    predictions = _predict_all(
        inputs, split_set, methods, stages, progress, keep_features=kept_features
    )
    finetuned = []
    if models and config.finetune is not None:
        with stages.timed("finetune"):
            finetuned = finetune_models(
                config,
                validated.model_input,
                labels,
                models,
                split_set,
                run_dir,
                predictions,
                methods,
                progress,
            )
    with stages.timed("statistics"):
        metrics, table = build_metrics(
            config, validated, split_set, methods, predictions, reference, model_info
        )
        from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, write_predictions

        write_predictions(table, run_dir / PREDICTIONS_FILE)
    if finetuned:
        metrics["finetune"] = finetune_metrics(finetuned, run_dir)
    if config.train_sizes:
        from scfmbench.benchmark.label_efficiency import label_efficiency

        with stages.timed("label_efficiency"):
            metrics["label_efficiency"] = label_efficiency(
                inputs,
                split_set,
                methods,
                predictions,
                stages,
                features=kept_features,
                run_dir=run_dir,
                progress=progress,
            )
        del kept_features
    if config.holdout_key is not None:
        from scfmbench.benchmark.holdout import random_split_block

        with stages.timed("random_split"):
            metrics["holdout"] = random_split_block(
                inputs,
                validated,
                methods=methods,
                models=models,
                model_info=model_info,
                reference=reference,
                metrics=metrics,
                run_dir=run_dir,
                progress=progress,
            )
    if config.figures:
        with stages.timed("figures"):
            from scfmbench.report.write import write_figures

            write_figures(run_dir, metrics, stages=stages)
    if models and config.layerwise:
        with stages.timed("layerwise"):
            metrics["layers"] = layerwise_probing(
                config, validated, models, split_set.splits[0], run_dir, stages, progress
            )
    metrics["embeddings"] = embedding_scores(
        config, validated, cells, matrices, matrix_hashes, stages, data_hash, run_dir
    )
    stages.timings["total"] = time.perf_counter() - started
    stages.note("total", cpu_seconds=round(time.process_time() - started_cpu, 3))
    metrics["timings"] = stages.summary()
    write_json(run_dir / "metrics.json", metrics)
    from scfmbench.report.write import write_results_markdown

    write_results_markdown(metrics, run_dir / "results.md")
    finish_run_directory(
        run_dir,
        config,
        seeds=split_set.seeds,
        checkpoints={model_id: info["checkpoint_sha256"] for model_id, info in model_info.items()},
    )
    logger.info("wrote %s", run_dir)
    return RunResult(run_dir=run_dir, metrics=metrics, diagnostics=validated.diagnostics)


def run_splits(run_dir: Path, data: RunData, config: RunConfig) -> SplitSet:
    """The run's splits, in ``run_dir/splits``: one fold per held-out group when
    ``config.holdout_key`` (or a group list) is set (:func:`~.holdout.holdout_splits`),
    else the random-split design (:func:`random_splits`).

    Raises
    ------
    ConfigError, SchemaError, SplitError
        Bad holdout options, column or groups, or classes too small to split.
    """
    if config.holdout_key or config.train_groups or config.test_groups:
        from scfmbench.benchmark.holdout import holdout_splits

        return holdout_splits(run_dir / "splits", data, config)[0]
    return random_splits(run_dir / "splits", data.labels, config)


def random_splits(directory: Path, labels: pd.Series, config: RunConfig) -> SplitSet:
    """The splits of ``config``'s design (``design``, ``n_splits``, ``n_repeats``, ``seed``,
    ``fractions``), reused from ``directory`` or made and saved there
    (:func:`scfmbench.data.splits.load_or_make_splits`)."""
    split_set, _ = load_or_make_splits(
        directory,
        labels,
        n_splits=config.n_splits,
        seed=config.seed,
        fractions=config.fractions,
        design=config.design,
        n_repeats=config.n_repeats,
    )
    return split_set


def run_cells(data: RunData) -> CellRows:
    """The expression rows of the run's cells (read chunk by chunk when streamed)."""
    return data.cells if isinstance(data, BackedData) else InMemoryCells.from_adata(data.adata)


def data_fingerprint(data: RunData) -> str:
    """A hash of the run's expression values and labels (keys the cached stages)."""
    if isinstance(data, BackedData):
        return data.content_hash
    return hash_json([hash_array(data.adata.X), labels_hash(data.labels)])


@dataclass
class ModelEmbedding:
    """One model's embedding of the run's cells, rows in the order of ``labels`` (NaN rows
    for cells without a vocabulary gene), and its ``metrics.json`` diagnostics entry."""

    matrix: np.ndarray
    info: dict[str, Any]


def embed_cells(
    data: RunData,
    model,
    *,
    config: RunConfig,
    run_dir: Path,
    stages: StageStore,
    progress: bool,
    layer: int | None = None,
    tokens=None,
) -> ModelEmbedding:
    """Embed the run's cells with ``model`` (cached under ``<run>/cache/embeddings``).

    In memory: :func:`scfmbench.embed.embed` (pass ``tokens`` to skip tokenizing again).
    Streamed: :func:`scfmbench.embed.embed_h5ad` writes every cell of the file to
    ``<run>/embeddings/<model>_L<layer>_<pooling>.npy``, and only the run's rows are loaded.
    """
    from scfmbench.embed import embed

    cache_dir = run_dir / "cache" / "embeddings"
    options = {
        "layer": layer,
        "batch_size": config.batch_size,
        "device": config.device,
        "cache_dir": cache_dir,
        "seed": config.seed,
        "progress": progress,
    }
    if isinstance(data, BackedData):
        return _embed_backed(data, model, config, run_dir, stages, options)
    key = "X_scfmbench_embedding"
    cells = data.model_input  # the file's own gene names
    # with layer-wise probing, the one pass also caches every other layer
    result = embed(
        cells, model, tokens=tokens, key_added=key, all_layers=config.layerwise, **options
    )
    info = {
        **_embedding_info(result),
        "n_dropped_cells": int(len(result.dropped)),
        "from_cache": result.from_cache,
    }
    return ModelEmbedding(matrix=cells.obsm.pop(key), info=info)


def _embedding_info(result) -> dict[str, Any]:
    """The ``metrics.json`` entry of an ``Embeddings`` or ``StreamedEmbeddings`` result."""
    return {
        "checkpoint_sha256": result.checkpoint_sha256,
        "layer": result.layer,
        "pooling": result.pooling,
        **(result.gene_match.to_dict() if result.gene_match is not None else {}),
    }


def _embed_backed(
    data: BackedData,
    model,
    config: RunConfig,
    run_dir: Path,
    stages: StageStore,
    options: dict[str, Any],
) -> ModelEmbedding:
    from scfmbench.embed import embed_h5ad
    from scfmbench.embed.engine import resolve_layer_pooling

    layer, pooling = resolve_layer_pooling(model, layer=options["layer"], pooling=None)
    out = run_dir / "embeddings" / f"{model.model_id}_L{layer}_{pooling}.npy"
    key = hash_json(
        [
            data.content_hash,
            model.model_id,
            model.checkpoint_sha256,
            layer,
            pooling,
            config.seed,
            config.chunk_size,
            config.model_options,
            config.allow_normalized,
            config.gene_column,
        ]
    )
    stage = f"embed_{out.stem}"
    info = stages.load(stage, key)
    if info is None or not out.exists():
        streamed = embed_h5ad(
            data.path,
            model,
            out=out,
            chunk_size=config.chunk_size,
            all_layers=config.layerwise,  # every layer's chunks cached from this one pass
            **{**options, "layer": layer},
        )
        info = {**_embedding_info(streamed), "chunk_size": streamed.chunk_size}
        stages.save(stage, key, info)
        from_cache = False
    else:
        from_cache = True
    matrix = np.asarray(np.load(out, mmap_mode="r")[data.file_rows])
    n_dropped = int(np.isnan(matrix).any(axis=1).sum())
    return ModelEmbedding(
        matrix=matrix, info={**info, "n_dropped_cells": n_dropped, "from_cache": from_cache}
    )


def finetune_models(
    config: RunConfig,
    adata: AnnData,
    labels: pd.Series,
    models: list,
    split_set: SplitSet,
    run_dir: Path,
    predictions: dict,
    methods: list[Method],
    progress: bool,
) -> list:
    """Fine-tune every model (and control) on every split; add their test predictions.

    A finished fine-tuning is reused from its checkpoint on rerun (only re-scored on test).
    """
    from scfmbench.finetune.train import finetune_in_run

    settings = config.finetune_settings()
    results = []
    for model in models:
        for split in split_set.splits:
            result = finetune_in_run(
                adata, labels, model, split, config=settings, run_dir=run_dir, progress=progress
            )
            predictions[(result.method_name, split.seed)] = result.prediction_payload()
            results.append(result)
        methods.append(
            Method(
                results[-1].method_name,
                model.model_id,
                "finetune",
                results[-1].kind,
                model.model_id,
            )
        )
    return results


def finetune_metrics(results: list, run_dir: Path) -> dict[str, dict]:
    """``metrics.json["finetune"]``: per model its curve (first split) and every split."""
    from scfmbench.finetune.train import metrics_section

    section = metrics_section(results)
    for result in results:
        entry = section[result.model_id]
        if "epochs" not in entry:  # the first split's curve is the one shown
            entry["epochs"] = result.epochs
            curve = result.figures.get("learning_curve")
            entry["curve_png"] = str(Path(curve).relative_to(run_dir)) if curve else None
    return section


def layerwise_probing(
    config: RunConfig,
    data: RunData,
    models: list,
    split: Split,
    run_dir: Path,
    stages: StageStore,
    progress: bool,
) -> dict[str, list[dict]]:
    """Macro F1 of a logistic-regression probe on every layer's embedding (first split).

    Embeddings come from the run's embedding cache, which the embedding stage filled with
    every layer from its one forward pass, so probing adds no pass (in memory).
    """
    from scfmbench.report.figures import plot_layer_curve

    labels = data.labels
    classes = list(labels.cat.categories)
    code_of = {c: i for i, c in enumerate(classes)}
    out = {}
    for model in models:
        rows = []
        tokens = (
            None
            if isinstance(data, BackedData)
            else model.tokenize(data.model_input, seed=config.seed)
        )
        for layer in range(model.n_layers + 1):
            embedding = embed_cells(
                data,
                model,
                config=config,
                run_dir=run_dir,
                stages=stages,
                progress=progress,
                layer=layer,
                tokens=tokens,
            )
            feats = embedding_features(embedding.matrix, labels.index, split)
            method = Method(f"{model.model_id}+logreg", model.model_id, "logreg", "frozen")
            payload = _fit_and_predict_features(
                method, feats, labels, split, code_of, classes, grid=probe_grid("logreg", config)
            )
            scores = score_payload(payload, labels, classes)
            rows.append(
                {
                    "layer": layer,
                    "macro_f1": scores.macro_f1,
                    "accuracy": scores.accuracy,
                    "pooling": embedding.info["pooling"],
                }
            )
        out[model.model_id] = rows
        if config.figures:
            plot_layer_curve(
                rows,
                run_dir / "figures" / f"layers_{model.model_id}.png",
                title=f"{model.model_id}: logreg probe by layer ({split.title})",
            )
    return out


def scored_cells(labels: pd.Series, *, seed: int) -> np.ndarray:
    """Rows used for the zero-shot scores and UMAPs: all cells, or a seeded sample of
    ``MAX_SCORED_CELLS`` (kNN and UMAP grow faster than linearly in the number of cells)."""
    if len(labels) <= MAX_SCORED_CELLS:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(labels), MAX_SCORED_CELLS, replace=False))


def embedding_scores(
    config: RunConfig,
    data: RunData,
    cells: CellRows,
    matrices: dict[str, np.ndarray],
    matrix_hashes: dict[str, str],
    stages: StageStore,
    data_hash: str,
    run_dir: Path,
) -> dict:
    """Zero-shot scores (:func:`~.embedding_quality.embedding_quality`) and UMAPs of the
    HVG-PCA view and of every embedding, on the cells of :func:`scored_cells`."""
    from scfmbench.evaluation.embedding_quality import detect_batch_key

    labels = data.labels
    rows = scored_cells(labels, seed=config.seed)
    batch_key = detect_batch_key(data.obs, config.batch_key)
    batches = data.obs[batch_key].astype(str).to_numpy()[rows] if batch_key else None
    out = {}
    for name in ["pca", *matrices]:
        stage_key = hash_json(
            [
                data_hash,
                name,
                config.seed,
                config.figures,
                batch_key,
                matrix_hashes.get(name),
                config.n_hvg,
                config.n_pcs,
                "scib-metrics",
            ]
        )
        payload = stages.load(f"embedding_scores_{name}", stage_key)
        if payload is None:
            steps: dict[str, float] = {}
            with stages.timed(f"embedding_scores:{name}"):
                payload = _score_view(
                    name, config, data, cells, matrices, rows, batches, batch_key, run_dir, steps
                )
            stages.note(f"embedding_scores:{name}", **steps)
            stages.save(f"embedding_scores_{name}", stage_key, payload)
        out[name] = payload
    return out


def _score_view(
    name: str,
    config: RunConfig,
    data: RunData,
    cells: CellRows,
    matrices: dict[str, np.ndarray],
    rows: np.ndarray,
    batches: np.ndarray | None,
    batch_key: str | None,
    run_dir: Path,
    steps: dict[str, float],
) -> dict:
    """Zero-shot scores (and UMAPs) of one view; ``steps`` gets the seconds of each part
    (``view_s``: the HVG-PCA of the scored cells, then the scores' parts, ``umap_s``)."""
    from scfmbench.evaluation.embedding_quality import embedding_quality
    from scfmbench.evaluation.representations import pca_all_cells
    from scfmbench.report.figures import write_embedding_figures

    labels = data.labels
    start = time.perf_counter()
    if name in matrices:
        matrix = matrices[name][rows]
    else:
        matrix = pca_all_cells(
            cells,
            kind=data.diagnostics.matrix_kind,
            n_hvg=config.n_hvg,
            n_pcs=config.n_pcs,
            seed=config.seed,
            names=labels.index[rows],
        )
    steps["view_s"] = round(time.perf_counter() - start, 3)
    payload = embedding_quality(
        matrix, labels.to_numpy()[rows], batches=batches, seed=config.seed, timings=steps
    )
    payload["batch_key"] = batch_key
    if config.figures:
        start = time.perf_counter()
        payload.update(
            write_embedding_figures(
                name,
                matrix,
                labels.to_numpy()[rows],
                run_dir / "figures",
                seed=config.seed,
                batches=batches,
                batch_key=batch_key,
            )
        )
        steps["umap_s"] = round(time.perf_counter() - start, 3)
    return payload


def finish_run_directory(
    run_dir: Path, config: RunConfig, *, seeds: list[int], checkpoints: dict[str, str]
) -> None:
    """Write the run manifest and the HTML/Markdown report (last, so they see everything)."""
    from scfmbench.report.manifest import write_manifest
    from scfmbench.report.write import write_report

    data = None if config.data == IN_MEMORY else config.data
    write_manifest(
        run_dir, config=config, data_path_or_none=data, seeds=seeds, checkpoints=checkpoints
    )
    write_report(run_dir)


def _features(
    method: Method,
    cells: CellRows,
    matrices: dict[str, np.ndarray],
    split: Split,
    config: RunConfig,
    kind: str,
) -> SplitFeatures:
    if method.model is not None:
        return embedding_features(matrices[method.model], cells.obs_names, split)
    builder = REPRESENTATIONS.get(method.representation)
    return builder(
        cells,
        split,
        kind=kind,
        n_hvg=config.n_hvg,
        n_pcs=config.n_pcs,
        seed=split.seed,
        scvi=config.scvi,
    )


@dataclass(frozen=True)
class ProbeInputs:
    """What every probe of a run is fitted on: the same for the run's own splits, the
    random splits of a held-out-group run and the label-efficiency sweep.

    Attributes
    ----------
    config : RunConfig
        Settings every probe and representation reads.
    cells : CellRows
        The run's cells, rows in the order of ``labels``.
    matrices : dict
        Model id → (n_cells, dim) embedding (NaN rows: cells the model could not embed).
    matrix_hashes : dict
        Model id → hash of its matrix (part of every cached prediction's key).
    labels : pd.Series
        Categorical cell types of the run's cells.
    data_hash : str
        Fingerprint of the data (:func:`data_fingerprint`).
    kind : str
        Matrix kind of the data (``counts``, ``lognorm``, …) the baselines start from.
    """

    config: RunConfig
    cells: CellRows
    matrices: dict[str, np.ndarray]
    matrix_hashes: dict[str, str]
    labels: pd.Series
    data_hash: str
    kind: str

    def features(self, method: Method, split: Split) -> SplitFeatures:
        """``method``'s representation of the train, val and test cells of ``split``."""
        return _features(method, self.cells, self.matrices, split, self.config, self.kind)

    def cache_key(self, method: Method, split: Split, **extra: Any) -> str:
        """Key of ``method``'s saved predictions on ``split``: data, split cells, method,
        representation settings, embedding and probe grid (``extra``: what else they
        depend on, e.g. the label-efficiency sizes)."""
        config = self.config
        return hash_json(
            {
                "data": self.data_hash,
                "split": [list(split.train), list(split.val), list(split.test)],
                "method": method.__dict__,
                "n_hvg": config.n_hvg,
                "n_pcs": config.n_pcs,
                "embedding": self.matrix_hashes.get(method.model) if method.model else None,
                "grid": probe_grid(method.probe, config) or PROBES.get(method.probe).grid,
                **_representation_options(method, config),
                **extra,
            }
        )


def _predict_all(
    inputs: ProbeInputs,
    split_set: SplitSet,
    methods: list[Method],
    stages: StageStore,
    progress: bool,
    keep_features: dict | None = None,
) -> dict[tuple[str, int], dict]:
    """Train each method's probe on each split (or reuse the saved predictions).

    A baseline representation is built once per split and kept only until the last method
    of that split that uses it (pca+logreg and pca+xgboost share one PCA); every one built
    is also handed to ``keep_features[(representation, split seed)]`` when given.
    """
    classes = list(inputs.labels.cat.categories)
    code_of = {c: i for i, c in enumerate(classes)}
    out = {}
    jobs = [(m, s) for s in split_set.splits for m in methods]
    uses_left = Counter((m.representation, s.seed) for m, s in jobs if m.model is None)
    built: dict[tuple[str, int], SplitFeatures] = {}
    bar = tqdm(jobs, desc="probes", unit="fit", disable=not progress)
    for method, split in bar:
        bar.set_postfix_str(f"{method.name} seed {split.seed}")
        key = inputs.cache_key(method, split)
        stage = f"predict_{method.name}_seed{split.seed}"
        payload = stages.load(stage, key)
        shared = (method.representation, split.seed) if method.model is None else None
        if payload is None:
            feats = built.get(shared)
            if feats is None:
                with stages.timed(f"features:{method.representation}"):
                    feats = inputs.features(method, split)
            with stages.timed(f"probe:{method.name}"):
                payload = _fit_and_predict_features(
                    method,
                    feats,
                    inputs.labels,
                    split,
                    code_of,
                    classes,
                    grid=probe_grid(method.probe, inputs.config),
                )
            stages.save(stage, key, payload)
            if shared is not None:
                built[shared] = feats
                if keep_features is not None:
                    keep_features[shared] = feats
        out[(method.name, split.seed)] = payload
        if shared is not None:
            uses_left[shared] -= 1
            if uses_left[shared] == 0:
                built.pop(shared, None)
    return out


def _representation_options(method: Method, config: RunConfig) -> dict[str, Any]:
    """Settings that only one representation reads (part of its predictions' cache key)."""
    if method.representation == "scvi":
        return {"scvi": config.scvi.model_dump()}
    return {}


def fit_and_predict(
    method: Method,
    cells: CellRows,
    matrices: dict[str, np.ndarray],
    labels: pd.Series,
    split: Split,
    config: RunConfig,
    kind: str,
    code_of: dict[str, int],
    classes: list[str],
) -> dict:
    """Build the method's features for ``split`` and fit / predict its probe (a payload)."""
    feats = _features(method, cells, matrices, split, config, kind)
    return _fit_and_predict_features(
        method, feats, labels, split, code_of, classes, grid=probe_grid(method.probe, config)
    )


def probe_grid(probe: str, config: RunConfig) -> tuple[dict[str, Any], ...] | None:
    """The grid a probe is tuned over in this run (None: the probe's registered grid):
    logistic regression tries ``config.logreg_c``, or the study's C values in design study."""
    from scfmbench.evaluation.probes import STUDY_LOGREG_C_GRID

    if probe != "logreg":
        return None
    values = config.logreg_c
    if values is None and config.design == "study":
        values = list(STUDY_LOGREG_C_GRID)
    return None if values is None else tuple({"C": float(c)} for c in values)


def _fit_and_predict_features(
    method, feats: SplitFeatures, labels, split, code_of, classes, *, grid=None
) -> dict:
    """Fit the method's probe on train (tuned on val over ``grid``, default the probe's own)
    and predict the test cells."""
    y_train = labels.loc[split.train].map(code_of).to_numpy(dtype=np.int64)
    y_val = labels.loc[split.val].map(code_of).to_numpy(dtype=np.int64)
    keep_train = ~np.isnan(feats.train).any(axis=1)
    keep_val = ~np.isnan(feats.val).any(axis=1)
    keep_test = ~np.isnan(feats.test).any(axis=1)
    trained = np.unique(y_train[keep_train])  # a held-out-group fold may lack some classes
    fitted = fit_probe(
        method.probe,
        feats.train[keep_train],
        np.searchsorted(trained, y_train[keep_train]),
        feats.val[keep_val],
        np.searchsorted(trained, y_val[keep_val]),
        seed=split.seed,
        grid=grid,
    )
    predicted = np.full(len(split.test), UNASSIGNED, dtype=object)
    proba: list | None = None
    if keep_test.any():
        predicted[keep_test] = [classes[trained[i]] for i in fitted.predict(feats.test[keep_test])]
        proba = _probabilities(fitted, feats.test, keep_test, len(classes), trained)
    return {
        "cells": list(split.test),
        "pred": [str(p) for p in predicted],
        "proba": proba,
        "params": fitted.params,
        "val_macro_f1": fitted.val_macro_f1,
        "on_grid_edge": fitted.on_grid_edge,
        "n_unassigned": int((~keep_test).sum()),
        "features": feats.info,
    }


def _probabilities(
    fitted, X: np.ndarray, keep: np.ndarray, n_classes: int, trained: np.ndarray
) -> list | None:
    """Class probabilities of the test cells (None rows for unassigned cells), or None when
    the probe has no ``predict_proba``; columns follow the run's classes (``trained``: the
    run's class code of each class the probe was fitted on, 0 for the others)."""
    estimator = fitted.estimator
    if not hasattr(estimator, "predict_proba"):
        return None
    values = np.zeros((int(keep.sum()), n_classes))
    columns = trained[np.asarray(estimator.classes_, dtype=np.int64)]
    values[:, columns] = estimator.predict_proba(X[keep])
    rows: list = [None] * len(keep)
    for row, value in zip(np.flatnonzero(keep), values, strict=True):
        rows[row] = [round(float(v), 6) for v in value]
    return rows


def build_metrics(
    config: RunConfig,
    validated: ValidatedData,
    split_set: SplitSet,
    methods: list[Method],
    predictions: dict,
    reference: str,
    model_info: dict,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The metrics.json document (schema in README, ``schema_version`` 2.1) and the tidy
    per-cell predictions table every statistic in it is computed from."""
    from scfmbench.evaluation.run_stats import method_statistics, predictions_table
    from scfmbench.evaluation.stats import Design

    labels = validated.labels
    classes = list(labels.cat.categories)
    design = Design.of(split_set)
    doc: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "scfmbench_version": __version__,
        "run": {
            "name": config.name,
            "data": config.data,
            "label_key": validated.diagnostics.label_key,
            "seeds": split_set.seeds,
            # cv and holdout use only the validation share (per class, from training folds)
            **(
                {"val_fraction": split_set.fractions[1]}
                if split_set.design in ("cv", "holdout")
                else {"fractions": list(split_set.fractions)}
            ),
            "design": {
                "name": design.name,
                "n_folds": design.n_folds,
                "n_repeats": split_set.n_repeats,
                "test_train_ratio": design.test_train_ratio,
            },
            "stats_seed": config.seed,
            "reference": reference,
            "classes": classes,
        },
        "diagnostics": {**validated.diagnostics.to_dict(), "models": model_info},
        "methods": {},
    }
    for method in methods:
        per_split = {}
        for split in split_set.splits:
            payload = predictions[(method.name, split.seed)]
            per_split[str(split.seed)] = {
                "params": payload["params"],
                "val_macro_f1": payload["val_macro_f1"],
                "on_grid_edge": payload.get("on_grid_edge", False),
                "n_unassigned": payload["n_unassigned"],
            }
        doc["methods"][method.name] = {
            "kind": method.kind,
            "representation": method.representation,
            "probe": method.probe,
            "model": method.model,
            "splits": per_split,
        }
        edges = [s for s, e in per_split.items() if e["on_grid_edge"]]
        if edges:
            logger.warning(
                "%s: the probe's best validation setting is on the edge of its grid in %d of "
                "%d splits (%s); a wider grid might score better.",
                method.name,
                len(edges),
                len(per_split),
                ", ".join(str(per_split[s]["params"]) for s in edges[:3]),
            )
    for method in methods:
        found = score_warnings(method, config, validated.diagnostics, model_info)
        if found:
            doc["methods"][method.name]["warnings"] = found
    table = predictions_table(predictions, labels, split_set, methods)
    method_statistics(doc, table, seed=config.seed)
    return doc, table


MIN_COUNT_COVERAGE = 0.8
"""Below this share of counts on vocabulary genes a model sees much less than usual."""


def score_warnings(
    method: Method, config: RunConfig, diagnostics: DataDiagnostics, model_info: dict
) -> list[str]:
    """Conditions that change what a foundation-model method's score means (empty for
    baselines): normalized or log-scale input let through by ``allow_normalized``, a
    feature-selected matrix (fewer than 5,000 genes, or every gene highly variable; for
    geneformer and scgpt only with ``allow_feature_selected``, see
    :mod:`scfmbench.data.feature_selection`), vocabulary genes holding < 80% of the counts, and
    cells the model could not embed (scored as wrong for this method only)."""
    from scfmbench.data.feature_selection import feature_selection_warning

    if method.model is None:
        return []
    info = model_info.get(method.model, {})
    found = []
    if config.allow_normalized and diagnostics.matrix_kind in ("normalized", "lognorm"):
        found.append(f"ran on {diagnostics.matrix_kind} input, not raw counts (--allow-normalized)")
    selected = feature_selection_warning(
        method.model, diagnostics.n_genes, diagnostics.all_highly_variable
    )
    if selected is not None:
        found.append(selected)
    coverage = info.get("fraction_counts")
    if coverage is not None and coverage < MIN_COUNT_COVERAGE:
        found.append(
            f"vocabulary genes hold {coverage:.0%} of the counts (< {MIN_COUNT_COVERAGE:.0%})"
        )
    if info.get("n_dropped_cells"):
        found.append(
            f"{info['n_dropped_cells']} cells had no vocabulary gene and count as wrong for this "
            "model only"
        )
    return found


def payload_truth(payload: dict, labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of the test cells of one saved prediction payload."""
    truth = labels.loc[payload["cells"]].astype(str).to_numpy()
    return truth, np.asarray(payload["pred"], dtype=str)


def score_payload(payload: dict, labels: pd.Series, classes: list[str]):
    """ClassificationMetrics of one saved prediction payload."""
    truth, predicted = payload_truth(payload, labels)
    return classification_metrics(truth, predicted, classes=classes)


def embed_dataset(
    data: str | Path | AnnData,
    *,
    model: str,
    out: Path | None = None,
    layer: int | None = None,
    pooling: str | None = None,
    batch_size: int | str = 32,
    device: str = "auto",
    precision: str = "float32",
    cache_dir: Path | None = None,
    allow_normalized: bool = False,
    gene_column: str | None = None,
    progress: bool = True,
    chunk_size: int = 2048,
    model_options: dict[str, Any] | None = None,
    backed: bool | None = None,
    seed: int = DEFAULT_SEED,
    allow_feature_selected: bool = False,
) -> tuple[str, int]:
    """Embed every cell of ``data`` with ``model`` (``NAME=DIR``) and optionally save it.

    The model and its options are checked before the data are read.

    Args:
        seed: seed of tokenization (scGPT's sampling of long cells and tie-breaking) and of a
            ``NAME-random`` control's weights; the same default as ``scfmbench run``, so both
            commands give the same embedding.
        batch_size: cells per batch, or ``"auto"`` (start large, halve on out-of-memory).
        backed: stream the ``.h5ad`` file chunk by chunk (``chunk_size`` cells) instead of
            loading it (see :func:`scfmbench.embed.embed_h5ad`); default: stream files above
            1 GiB and under torchrun (``WORLD_SIZE > 1``, cells sharded by rank, rank 0 writes).
        allow_feature_selected: let geneformer or scgpt embed a feature-selected count matrix
            (fewer than 5,000 genes, or every gene flagged highly variable) with a warning;
            by default it is refused before the model is loaded (DataError).

    Returns:
        (obsm key, number of embedded cells). With ``out`` ending in ``.npy`` the
        (n_obs, dim) matrix is saved (NaN rows for cells without tokens); otherwise a copy
        of the data with ``obsm['X_<model>']`` is written as ``.h5ad``.
    """
    import warnings

    from scfmbench.data.feature_selection import (
        COUNT_MATRIX,
        all_highly_variable,
        check_feature_selection,
    )
    from scfmbench.data.matrix import expression_view
    from scfmbench.data.validate import check_unique_cells
    from scfmbench.embed import embed, embed_h5ad, parse_batch_size
    from scfmbench.embed.stream import should_stream

    batch_size = parse_batch_size(batch_size)
    spec = ModelSpec.parse(model)
    settings = RunConfig.build(
        {
            "models": [model],
            "random_controls": False,
            "seed": seed,
            "allow_normalized": allow_normalized,
            "gene_column": gene_column,
            "model_options": {spec.name: dict(model_options)} if model_options else {},
        }
    )
    if out is not None:
        check_writable(Path(out))
    stream = should_stream(data, backed=backed)
    if stream and out is None:
        raise ConfigError("streaming (backed) embedding writes to a file; pass --out X.npy/.h5ad.")
    if stream:  # refuse the data before loading the model, as in memory
        from scfmbench.data.backed import H5adCells

        reader = H5adCells(Path(data), chunk_size=chunk_size)
        reader.close()
        source, genes = reader.source, reader.var
    if not stream:
        adata = load_dataset(data)
        check_unique_cells(
            adata.obs_names, where="the data" if isinstance(data, AnnData) else Path(data).name
        )
        counts = expression_view(adata)
        source, genes = counts.uns["scfmbench"]["matrix_source"], counts.var
    allowed = check_feature_selection(
        [model],
        n_genes=len(genes),
        all_hvg=all_highly_variable(genes),
        allow=allow_feature_selected,
        where=COUNT_MATRIX.format(source=source),
    )
    if allowed is not None:
        warnings.warn(allowed, stacklevel=2)
    (foundation,) = load_models(settings)
    options = {
        "seed": seed,
        "layer": layer,
        "pooling": pooling,
        "batch_size": batch_size,
        "device": device,
        "precision": precision,
        "cache_dir": cache_dir,
        "progress": progress,
        "chunk_size": chunk_size,
    }
    if stream:
        streamed = embed_h5ad(data, foundation, out=out, **options)
        return streamed.key, streamed.n_embedded
    result = embed(counts, foundation, **options)
    key = foundation.obsm_key
    if out is not None:
        out = Path(out)
        if out.suffix == ".npy":
            write_npy(out, counts.obsm[key])
        else:
            adata.obsm[key] = counts.obsm[key]
            adata.uns[f"{key}_info"] = {
                "model": foundation.model_id,
                "layer": result.layer,
                "pooling": result.pooling,
                "checkpoint_sha256": result.checkpoint_sha256,
                "dropped_cells": list(map(str, result.dropped)),
                **({"warnings": [allowed]} if allowed is not None else {}),
                "genes": {
                    k: v
                    for k, v in (result.gene_match.to_dict() if result.gene_match else {}).items()
                    if v is not None and v != []
                },
            }
            write_with(out, lambda tmp: adata.write_h5ad(tmp))
    return key, len(result.obs_names)


def check_writable(path: Path) -> None:
    """Raise ConfigError when ``path``'s folder cannot be created or written.

    The nearest existing ancestor must be a folder in which a file can be created (tried with
    a temporary folder, removed at once): permission bits alone miss read-only file systems
    and, for root, ``/proc``-like folders.
    """
    import os
    import tempfile

    folder = path.parent if path.suffix else path
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"cannot write to {str(folder)!r}: {str(probe)!r} is a file, not a folder; choose "
            "another output location with --out."
        )
    reason = "permission denied"
    writable = os.access(probe, os.W_OK)
    if writable:
        try:
            with tempfile.TemporaryDirectory(dir=probe, prefix=".scfmbench-check-"):
                pass
        except OSError as exc:
            writable, reason = False, exc.strerror or type(exc).__name__
    if not writable:
        raise ConfigError(
            f"cannot write to {str(folder)!r} ({reason}); choose another "
            "output location with --out."
        )


__all__ = ["Method", "RunResult", "build_metrics", "embed_dataset", "run"]
