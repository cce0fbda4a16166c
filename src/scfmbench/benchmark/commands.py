"""The APIs behind the ``scfmbench validate``, ``embed`` and ``finetune`` commands."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scfmbench._atomic import write_npy, write_with
from scfmbench._yaml import read_yaml
from scfmbench.benchmark.checks import check_model_layouts, check_run_data, check_settings
from scfmbench.benchmark.embedding import (
    check_models_read,
    check_run_feature_selection,
    check_values_read,
)
from scfmbench.benchmark.output import check_writable, run_directory
from scfmbench.benchmark.pipeline import (
    load_models,
    open_run_data,
    resolve_config,
    run_splits,
)
from scfmbench.config import FinetuneConfig, ModelSpec, RunConfig, finetune_section
from scfmbench.data.backed import BackedData
from scfmbench.data.feature_selection import matrix_facts, validate_problem
from scfmbench.data.io import load_dataset
from scfmbench.data.splits import load_splits
from scfmbench.data.validate import DataDiagnostics, validate
from scfmbench.embed.options import EMBED_DEFAULTS, EmbedOptions
from scfmbench.errors import ConfigError, DataError

if TYPE_CHECKING:
    from scfmbench.finetune.train import FinetuneResult

__all__ = ["check_dataset", "embed_dataset", "finetune_dataset"]

logger = logging.getLogger(__name__)


def check_dataset(
    data: str | Path | None,
    config: RunConfig | None = None,
    *,
    models: list[str] | None = None,
    **settings: Any,
) -> DataDiagnostics:
    """Make every check ``run`` makes before its first stage; the API behind ``validate``.

    Parameters
    ----------
    data : str, pathlib.Path or None
        An ``.h5ad`` path or a built-in dataset name; None: ``config.data`` (the default
        dataset without a configuration), as for a run.
    config : RunConfig, optional
        A loaded configuration (``--config``); ``settings`` win over it.
    models : list of str, optional
        ``NAME`` or ``NAME=DIR`` of the models the data are meant for (default: the
        configuration's ``models``).
    **settings
        RunConfig fields, e.g. ``label_key``, ``min_cells_per_class``, ``backed``.

    Returns
    -------
    DataDiagnostics
        What validation found; without named models, ``warnings`` also says which models
        would refuse a feature-selected count matrix.

    Raises
    ------
    ScfmbenchError
        Whatever ``run`` would refuse with the same settings (an unknown model, method,
        reference or column, a held-out column or group value the data lack, a class too
        small to stratify, unreadable data, a feature-selected or non-count matrix a named
        model refuses), with its one-line message: both call
        :func:`~scfmbench.benchmark.checks.check_settings` and
        :func:`~scfmbench.benchmark.checks.check_run_data`.
    """
    resolved = resolve_config(data, config, settings)
    named = list(models or resolved.models)  # NAME or NAME=DIR
    check_settings(resolved, named)
    checked = open_run_data(data, resolved, progress=False)
    if isinstance(checked, BackedData):
        checked.close()
    # the batch and held-out columns, groups, reference and classes, as run refuses them
    check_run_data(resolved, checked, named)
    diag = checked.diagnostics
    # raises run's refusal of the named models on a feature-selected matrix
    problem = validate_problem(named, allow=resolved.allow_feature_selected, **matrix_facts(diag))
    # and on values they do not read; else what they would run with (allow_normalized)
    about_values = check_models_read(resolved, named, checked)
    if problem is not None:
        diag.warnings.append(problem)
    if not named and diag.matrix_kind not in ("counts", "corrected"):
        about_values = [
            f"count-based models run on {diag.matrix_kind} values with a warning, since "
            "allow_normalized is set; their scores are not comparable to the published models "
            "(name a model with --model to check it)"
            if resolved.allow_normalized
            else f"count-based models refuse {diag.matrix_kind} values unless "
            "--allow-normalized is given (name a model with --model to check it)"
        ]
    diag.warnings.extend(about_values)
    return diag


def embed_dataset(
    data: str | Path | AnnData,
    *,
    model: str,
    out: Path | None = None,
    layer: int | None = None,
    pooling: str | None = None,
    batch_size: int | str = EMBED_DEFAULTS.batch_size,
    device: str = EMBED_DEFAULTS.device,
    precision: str = EMBED_DEFAULTS.precision,
    cache_dir: Path | None = None,
    allow_normalized: bool = False,
    gene_column: str | None = None,
    progress: bool = True,
    chunk_size: int = EMBED_DEFAULTS.chunk_size,
    model_options: dict[str, Any] | None = None,
    backed: bool | None = None,
    seed: int = EMBED_DEFAULTS.seed,
    allow_feature_selected: bool = False,
) -> tuple[str, int]:
    """Embed every cell of ``data`` with ``model`` (``NAME=DIR``) and optionally save it.

    The model and its options are checked before the data are read.

    Parameters
    ----------
    data : str, pathlib.Path or AnnData
        An ``.h5ad`` path, a built-in name or an AnnData (raw counts).
    model : str
        ``NAME=DIR`` (``NAME-random=DIR`` for the random-init control).
    out : pathlib.Path, optional
        ``.npy`` (the (n_obs, dim) matrix, NaN rows for cells without tokens) or ``.h5ad``
        (a copy of the data with ``obsm['X_<model>']``); default None: nothing is written.
    layer, pooling : optional
        Layer (0 = the token embeddings) and pooling; default: the model's own.
    batch_size : int or "auto"
        Cells per batch (default 32), or ``"auto"`` (start large, halve on out-of-memory).
    device, precision : str
        ``auto``/``cpu``/``cuda[:i]`` and ``float32``/``bfloat16``/``float16``.
    cache_dir : pathlib.Path, optional
        Embedding cache folder.
    allow_normalized : bool
        Let the model embed normalized input (default False: refused).
    gene_column : str, optional
        ``var`` column with the gene identifiers (default: detected).
    progress : bool
        Show progress bars (default True).
    chunk_size : int
        Cells read per chunk when streamed (default 2048).
    model_options : dict, optional
        Options of the model's loader.
    backed : bool, optional
        Stream the ``.h5ad`` file chunk by chunk (``chunk_size`` cells) instead of loading it
        (see :func:`scfmbench.embed.embed_h5ad`); default: stream files above 1 GiB and under
        torchrun (``WORLD_SIZE > 1``, cells sharded by rank, rank 0 writes).
    seed : int
        Seed of tokenization (scGPT's sampling of long cells and tie-breaking) and of a
        ``NAME-random`` control's weights; the same default as ``scfmbench run``, so both
        commands give the same embedding.
    allow_feature_selected : bool
        Let geneformer or scgpt embed a feature-selected count matrix (fewer than 5,000
        genes, or every gene flagged highly variable) with a warning (default False: refused
        before the model is loaded).

    Returns
    -------
    (str, int)
        The obsm key and the number of embedded cells.

    Raises
    ------
    ConfigError
        A bad model spec or option, a device this machine does not have, a layer or pooling
        the model lacks (checked before the data are read), an ``out`` that is not
        ``.npy`` / ``.h5ad`` or not writable, or streaming without ``out``.
    DataError
        Feature-selected counts for geneformer or scgpt without ``allow_feature_selected``,
        or data the model refuses (checked before the model is loaded).
    SchemaError
        A gene column (``gene_column``, or the model's option) the data lack (checked
        before the model is loaded).
    """
    from scfmbench.data.matrix import expression_view
    from scfmbench.data.validate import check_unique_cells
    from scfmbench.embed import embed, embed_h5ad, parse_batch_size
    from scfmbench.embed.launch import should_stream

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
    from scfmbench.embed.distributed import resolve_device
    from scfmbench.embed.output import check_output_file
    from scfmbench.embed.stream import embedding_info

    options: dict[str, Any] = {
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
    EmbedOptions.pick(options)  # a bad precision or chunk size fails before the data are read
    resolve_device(device)  # a device this machine does not have, before the data are read
    # a layer or pooling the model lacks, from its settings files, before its weights load
    check_model_layouts(settings, [model], layer=layer, pooling=pooling)
    if out is not None:
        check_writable(check_output_file(out))
    stream = should_stream(data, backed=backed)
    if stream and out is None:
        raise ConfigError("streaming (backed) embedding writes to a file; pass --out X.npy/.h5ad.")
    if stream and out is not None and not isinstance(data, AnnData):  # never an AnnData
        from scfmbench.data.backed import H5adCells

        # refuse the data before loading the model, as in memory
        reader = H5adCells(Path(data), chunk_size=chunk_size)
        reader.close()
        genes = reader.var  # read whole from the file: a DataFrame
        allowed = _check_feature_selection(model, reader.source, genes, allow_feature_selected)  # pyright: ignore[reportArgumentType]
        about_data = [allowed] if allowed is not None else []
        check_values_read(
            settings,
            [model],
            kind=reader.kind,
            source=reader.source,
            obs=reader.obs,
            var=genes,  # pyright: ignore[reportArgumentType]
        )
        (foundation,) = load_models(settings)
        streamed = embed_h5ad(data, foundation, out=out, data_warnings=about_data, **options)
        return streamed.key, streamed.n_embedded
    adata = load_dataset(data)
    where = "the data" if isinstance(data, AnnData) else Path(data).name
    if adata.n_obs == 0:  # as streamed (H5adCells) and as run refuses it
        raise DataError(f"{where} has no cells; pass a file with at least one cell.")
    check_unique_cells(adata.obs_names, where=where)
    counts = expression_view(adata)
    source = counts.uns["scfmbench"]["matrix_source"]
    allowed = _check_feature_selection(model, source, counts.var, allow_feature_selected)  # pyright: ignore[reportArgumentType]  # anndata types var widely
    about_data = [allowed] if allowed is not None else []
    kind = counts.uns["scfmbench"]["matrix_kind"]
    check_values_read(settings, [model], kind=kind, source=source, obs=adata.obs, var=counts.var)  # pyright: ignore[reportArgumentType]
    (foundation,) = load_models(settings)
    result = embed(counts, foundation, **options)
    key = foundation.obsm_key
    if out is not None:
        out = Path(out)
        if out.suffix == ".npy":
            write_npy(out, np.asarray(counts.obsm[key]))
        else:
            adata.obsm[key] = counts.obsm[key]
            adata.uns[f"{key}_info"] = embedding_info(
                result, warnings=[*about_data, *result.warnings]
            )
            write_with(out, lambda tmp: adata.write_h5ad(tmp))
    return key, len(result.obs_names)


def _check_feature_selection(
    model: str, source: str, genes: pd.DataFrame, allow: bool
) -> str | None:
    """Refuse (or, with ``allow``, warn about) ``model`` on a feature-selected count matrix.

    Returns the warning when allowed (see
    :func:`scfmbench.data.feature_selection.check_feature_selection`).
    """
    from scfmbench.data.feature_selection import (
        COUNT_MATRIX,
        all_highly_variable,
        check_feature_selection,
    )

    allowed = check_feature_selection(
        [model],
        n_genes=len(genes),
        all_hvg=all_highly_variable(genes),
        allow=allow,
        where=COUNT_MATRIX.format(source=source),
    )
    if allowed is not None:
        warnings.warn(allowed, stacklevel=3)  # the caller of embed_dataset
    return allowed


def finetune_dataset(
    data: str | Path | AnnData,
    *,
    models: list[str],
    config_file: Path | None = None,
    run_overrides: dict[str, Any] | None = None,
    finetune_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Path, list[FinetuneResult]]:
    """Fine-tune models on a dataset: the API behind ``scfmbench finetune``.

    Validates the data, reuses the splits saved in the run folder (those of a finished
    ``run``, whatever the split settings given now) or makes and saves them, then fine-tunes
    every model on every split.

    Parameters
    ----------
    data : str, pathlib.Path or AnnData
        An ``.h5ad`` path, a built-in name or an AnnData.
    models : list of str
        ``NAME=DIR`` specs (``NAME-random=DIR`` for the random-init control).
    config_file : pathlib.Path, optional
        Run YAML; top-level keys are RunConfig fields (label_key, out, name, seed, fractions,
        n_splits, …), the ``finetune:`` section holds FinetuneConfig.
    run_overrides, finetune_overrides : dict, optional
        Values that win over the YAML.
    resume : bool
        Continue an interrupted fine-tuning from its last saved epoch (default False).
    progress : bool
        Show progress bars (default True).

    Returns
    -------
    (pathlib.Path, list of FinetuneResult)
        The run directory and one result per model and split; each result lives in
        ``RUN/finetune/<model_id>/seed<S>/``.

    Raises
    ------
    ConfigError, SchemaError, SplitError
        Bad settings, labels or splits (found before any model is trained); a layer,
        pooling, frozen-layer count, device or precision a model or the machine lacks, or a
        gene column the data lack (found before any checkpoint's weights are read).
    DataError, CountsRequiredError, CheckpointError
        A feature-selected matrix without ``allow_feature_selected``, values a model refuses,
        or a checkpoint that cannot be read (found before the splits are written).
    """
    from scfmbench.finetune.train import finetune_in_run

    loaded = read_yaml(config_file) if config_file is not None else {}
    loaded["finetune"] = {
        **finetune_section(loaded, config_file),
        **(finetune_overrides or {}),
    }
    overrides = {"models": list(models), "random_controls": False, **(run_overrides or {})}
    run_config = resolve_config(data, RunConfig.build(loaded), overrides)
    check_model_layouts(run_config, models)  # the section's layer, pooling, device, precision
    adata = data if isinstance(data, AnnData) else load_dataset(run_config.data)
    config = run_config.finetune_settings()
    if config is None:  # not reached: the section is set above
        config = FinetuneConfig.model_validate({})
    validated = validate(
        adata,
        label_key=run_config.label_key,
        min_cells_per_class=run_config.min_cells_per_class,
        merge_similar_labels=run_config.merge_similar_labels,
    )
    allowed = check_run_feature_selection(run_config, validated.diagnostics)
    check_models_read(run_config, models, validated)
    networks = load_models(run_config)  # a checkpoint it cannot read: before splits are written
    run_dir = run_directory(run_config)
    saved = run_dir / "splits"
    if (saved / "splits.json").is_file():  # a run's folder: fine-tune on the run's own splits
        split_set = load_splits(saved, validated.labels)
        logger.info("fine-tuning on the %d splits saved in %s", len(split_set.splits), saved)
    else:
        split_set = run_splits(run_dir, validated, run_config)  # held-out folds: holdout_key
    results = [
        finetune_in_run(
            validated.model_input,  # the file's own gene names
            validated.labels,
            model,
            split,
            config=config,
            run_dir=run_dir,
            resume=resume,
            progress=progress,
            data_warnings=[allowed] if allowed is not None else [],
        )
        for model in networks
        for split in split_set.splits
    ]
    return run_dir, results
