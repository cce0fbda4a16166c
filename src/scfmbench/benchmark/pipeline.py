"""The benchmark pipeline: load/validate → splits → embed → probe → evaluate → report.

``run`` is the Python API behind ``scfmbench run``; each stage reuses its saved output
when its inputs are unchanged, so a rerun is near instant.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import sklearn
from anndata import AnnData

from scfmbench._atomic import write_text
from scfmbench.benchmark.checks import check_run_data, check_settings
from scfmbench.benchmark.document import build_metrics
from scfmbench.benchmark.embedding import (
    ModelEmbedding,
    check_models_read,
    check_run_feature_selection,
    embed_cells,
    embedding_scores,
    layerwise_probing,
    load_context,
)
from scfmbench.benchmark.finetuning import finetune_metrics, finetune_models
from scfmbench.benchmark.fitting import predict_all
from scfmbench.benchmark.holdout import holdout_splits, random_split_block
from scfmbench.benchmark.label_efficiency import CompactFeatures, label_efficiency
from scfmbench.benchmark.methods import Method, model_methods
from scfmbench.benchmark.output import (
    check_folder_kind,
    check_same_data,
    check_writable,
    finish_run_directory,
    holds_finished_work,
    run_directory,
)
from scfmbench.benchmark.predict import ProbeInputs
from scfmbench.benchmark.rundata import (
    IN_MEMORY,
    RunData,
    data_fingerprint,
    random_splits,
    run_cells,
)
from scfmbench.config import RunConfig
from scfmbench.data.backed import BackedData, validate_backed
from scfmbench.data.io import BUILTIN_DATASETS, load_dataset
from scfmbench.data.splits import SplitSet
from scfmbench.data.validate import DataDiagnostics, ValidatedData
from scfmbench.data.validate import validate as validate_data
from scfmbench.errors import ConfigError, ScfmbenchError
from scfmbench.evaluation.metrics import HEADLINE_METRICS
from scfmbench.evaluation.run_stats import PREDICTIONS_FILE, write_predictions
from scfmbench.evaluation.section_stats import RANDOM_SPLIT_DIR
from scfmbench.hashing import hash_array
from scfmbench.results import write_metrics
from scfmbench.stages import StageStore, deferred_interrupt

if TYPE_CHECKING:
    from scfmbench.models import FoundationModel

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "load_models", "resolve_config", "run", "run_splits"]

SKLEARN_WORKING_MEMORY_MB = 256


@dataclass
class RunResult:
    """What ``run`` returns: the run directory, the metrics document and a summary table.

    Attributes
    ----------
    run_dir : pathlib.Path
        The run folder.
    metrics : dict
        The ``metrics.json`` document (see :class:`scfmbench.results.MetricsDocument`).
    diagnostics : DataDiagnostics
        What validation found in the data.
    """

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


def load_models(config: RunConfig) -> list[FoundationModel]:
    """Load every requested foundation model (and its random-init control).

    Parameters
    ----------
    config
        The run: ``models`` (each ``NAME[-random]=DIR``), ``model_options``,
        ``random_controls`` and the run-wide settings of :func:`load_context`.

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
    if not config.model_specs:
        return []  # a baseline-only run never loads torch or transformers
    from scfmbench.models import load_model

    context = load_context(config)
    models = []
    for spec in config.model_specs:
        options = config.model_options.get(spec.name)
        if not spec.random_only:
            models.append(load_model(spec, context, options, random_init=False))
        if spec.random_only or config.random_controls:
            models.append(load_model(spec, context, options, random_init=True))
    return models


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
        stem = "" if isinstance(data, AnnData) else Path(resolved.data).stem
        # `--data .` or `..` has no usable stem: the data check then names the problem
        resolved.name = stem if stem not in ("", ".", "..") and "\\" not in stem else "run"
    return resolved


def open_run_data(data: str | Path | AnnData | None, config: RunConfig, progress: bool) -> RunData:
    """Validate the run's data.

    In memory, or streamed from disk when ``config.backed`` (or, when unset, for ``.h5ad``
    files over 1 GiB).
    """
    from scfmbench.embed.launch import env_world_size, should_stream

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

    Parameters
    ----------
    data : str, pathlib.Path, AnnData or None
        An ``.h5ad`` path, a built-in name (``"pbmc68k_reduced"``) or an AnnData (default:
        ``config.data``).
    config : RunConfig, optional
        The run's settings (default: every field's default).
    progress : bool
        Show progress bars (default True).
    **overrides
        RunConfig fields that replace those of ``config`` (e.g. ``label_key="cell_type"``,
        ``n_splits=5``, ``models=["geneformer=./gf"]``); ``backed=True`` (default for
        ``.h5ad`` files over 1 GiB) keeps the file on disk and streams it ``chunk_size``
        cells at a time, with the same results.

    Returns
    -------
    RunResult
        With ``run_dir`` (``config.out / config.name``) holding ``config.yaml``,
        ``splits/``, ``metrics.json``, ``results.md`` and ``figures/`` (and, when streamed,
        the embeddings of every cell in ``embeddings/``).

    Raises
    ------
    ConfigError
        Bad settings, an unknown model, probe or reference, or an unwritable output folder.
    SchemaError, DataError, SplitError
        Data without the label column, data a model refuses, or classes too small to split.
    """
    config = resolve_config(data, config, overrides)
    check_settings(config, list(config.models))
    run_dir = run_directory(config)  # an output folder it cannot use, before the data are read
    check_writable(run_dir)
    check_folder_kind(run_dir, "run")
    validated = open_run_data(data, config, progress)
    try:
        return _run_validated(config, validated, run_dir, progress)
    finally:
        if isinstance(validated, BackedData):
            validated.close()


def _run_validated(
    config: RunConfig, validated: RunData, run_dir: Path, progress: bool
) -> RunResult:
    check_run_feature_selection(config, validated.diagnostics)
    check_models_read(config, list(config.models), validated)
    methods, reference = check_run_data(config, validated, list(config.models))
    check_same_data(run_dir, validated.labels)
    models = load_models(config)
    methods += model_methods(models, config)
    created = not run_dir.exists()
    saved_config = run_dir / "config.yaml"
    previous_config = None if created or not saved_config.is_file() else saved_config.read_text()
    try:
        # distance-based steps (kNN probe, kNN consistency) work in blocks of this many MB
        with sklearn.config_context(working_memory=SKLEARN_WORKING_MEMORY_MB):
            return _execute(config, validated, methods, models, reference, run_dir, progress)
    except ScfmbenchError:
        # bad input found late: leave nothing half-written, and a finished run as it was
        if created and run_dir.exists():
            shutil.rmtree(run_dir)
        elif previous_config is not None:
            write_text(saved_config, previous_config)
        raise
    except KeyboardInterrupt:
        # interrupted: keep every finished stage so that a rerun resumes
        if created and not holds_finished_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


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
    saved = config.model_copy(update={"label_key": validated.diagnostics.label_key})
    write_text(run_dir / "config.yaml", saved.to_yaml())  # with the label key it detected
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

    kept_features = CompactFeatures() if config.train_sizes else None
    scores: dict[str, Any] = {}

    layers: dict[str, list[dict]] = {}

    def beside_the_fits() -> None:  # independent of the probes, done while workers fit
        with deferred_interrupt():  # numba and XLA compile here: Ctrl-C waits for the end
            scores.update(
                embedding_scores(
                    config, validated, cells, matrices, matrix_hashes, stages, data_hash, run_dir
                )
            )
        if models and config.layerwise:  # every layer is in the embedding cache by now
            with stages.timed("layerwise"):
                layers.update(
                    layerwise_probing(
                        config, validated, models, split_set.splits[0], run_dir, stages, progress
                    )
                )

    predictions = predict_all(
        inputs,
        split_set,
        methods,
        stages,
        progress,
        keep_features=kept_features,
        meanwhile=beside_the_fits,
    )
    finetuned = []
    # a streamed run cannot be fine-tuned: open_run_data refuses it
    if models and config.finetune is not None and isinstance(validated, ValidatedData):
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
        write_predictions(table, run_dir / PREDICTIONS_FILE)
    if finetuned:
        metrics["finetune"] = finetune_metrics(finetuned, run_dir)
    if config.train_sizes:
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
    else:  # an earlier held-out run's random splits in the folder are not this run's
        shutil.rmtree(run_dir / RANDOM_SPLIT_DIR, ignore_errors=True)
    if layers:
        metrics["layers"] = layers
    metrics["embeddings"] = scores  # before the figures: it names the UMAPs to keep
    if config.figures:
        with stages.timed("figures"):
            from scfmbench.report.write import write_figures

            write_figures(run_dir, metrics, stages=stages)
    else:  # an earlier run's figures in the folder are not this run's
        from scfmbench.report.write import remove_stale_figures

        remove_stale_figures(run_dir, None)
    stages.timings["total"] = time.perf_counter() - started
    cpu_seconds = time.process_time() - started_cpu + stages.worker_cpu_seconds
    stages.note("total", cpu_seconds=round(cpu_seconds, 3))
    metrics["timings"] = stages.summary()
    write_metrics(run_dir, metrics)
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
    """Return the run's splits, saved in ``run_dir/splits``.

    One fold per held-out group when ``config.holdout_key`` (or a group list) is set
    (:func:`~.holdout.holdout_splits`), else the random-split design
    (:func:`~.rundata.random_splits`).

    Raises
    ------
    ConfigError, SchemaError, SplitError
        Bad holdout options, column or groups, or classes too small to split.
    """
    if config.holdout_key or config.train_groups or config.test_groups:
        return holdout_splits(run_dir / "splits", data, config)[0]
    return random_splits(run_dir / "splits", data.labels, config)
