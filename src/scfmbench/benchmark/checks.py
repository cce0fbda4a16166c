"""What a run refuses before its first fit, shared by ``run`` and ``validate``.

:func:`check_settings` refuses settings before the data are read; :func:`check_run_data`
refuses settings that do not fit the data once they are read (a column, a group value, a
reference method, a class too small to split), so ``scfmbench validate`` stops with the same
line as ``scfmbench run`` for anything the run would refuse with the same settings.
"""

from __future__ import annotations

import warnings
from typing import Any

from scfmbench.benchmark.holdout import check_holdout_data, check_holdout_options
from scfmbench.benchmark.methods import Method, baseline_methods, check_reference
from scfmbench.benchmark.rundata import RunData
from scfmbench.config import ModelSpec, RunConfig
from scfmbench.data.feature_selection import model_name
from scfmbench.data.splits import check_design, check_fractions, check_stratifiable
from scfmbench.embed.options import check_device
from scfmbench.errors import ConfigError, setting

__all__ = ["check_model_layouts", "check_run_data", "check_settings"]


def check_settings(config: RunConfig, models: list[str]) -> None:
    """Refuse settings a run cannot use before the data are read.

    Checks the split design, fractions and held-out group options, the device, every
    baseline's representation and probe, the models named (``NAME`` or ``NAME=DIR``) and,
    with a ``finetune`` section, what it asks of each ``NAME=DIR`` model
    (:func:`check_model_layouts`).

    Parameters
    ----------
    config : RunConfig
        The resolved run settings.
    models : list of str
        ``NAME``, ``NAME-random`` or ``NAME=DIR`` of the models the run is meant for.

    Raises
    ------
    SplitError
        A design, fold count or fractions the splits cannot use.
    ConfigError
        Group options that do not fit together, ``train_size_seeds`` without
        ``train_sizes``, an unknown representation, probe, model or device, a missing model
        folder, (with models) a GPU the machine does not have, or a fine-tuning layer,
        pooling, frozen-layer count, device or precision a model or the machine lacks.
    """
    check_design(config.design, config.n_splits, config.n_repeats)
    check_fractions(config.fractions)
    check_holdout_options(config.holdout_key, config.train_groups, config.test_groups)
    check_device(config.device)  # the form; a GPU the machine lacks only matters with models
    seeds_default = RunConfig.model_fields["train_size_seeds"].default
    if config.train_sizes is None and config.train_size_seeds != seeds_default:
        raise ConfigError(
            f"{setting('train_size_seeds')} is {config.train_size_seeds} but "
            f"{setting('train_sizes')} is not set: the draws are of labelled cells per class "
            "for the label-efficiency curve; set train_sizes (e.g. --train-sizes 1,5,10,all) "
            "or drop train_size_seeds"
        )
    baseline_methods(config)
    if models:
        from scfmbench.embed.distributed import resolve_device
        from scfmbench.models import MODELS  # torch and transformers: only when a model is named

        resolve_device(config.device)  # a GPU this machine does not have
    for spec in models:
        if "=" in spec:
            ModelSpec.parse(spec)
        else:
            MODELS.get(model_name(spec))
    check_model_layouts(config, models)


def check_model_layouts(
    config: RunConfig, models: list[str], *, layer: int | None = None, pooling: str | None = None
) -> None:
    """Refuse a layer, pooling or fine-tuning setting a model lacks, before its weights load.

    Each ``NAME=DIR`` model reads the settings files of its checkpoint (not the weights; see
    :meth:`~scfmbench.models.ModelLoader.check_embedding`) when something is asked of it:
    ``layer`` and ``pooling`` (``scfmbench embed``), and the ``finetune`` section's layer,
    pooling and ``freeze_layers``, whose device and precision are checked against the
    machine too. The messages are those given once the model is loaded.

    Parameters
    ----------
    config : RunConfig
        The resolved settings: ``model_options``, the load context and ``finetune``.
    models : list of str
        ``NAME``, ``NAME-random`` or ``NAME=DIR`` (a bare ``NAME`` names no checkpoint and
        is skipped).
    layer, pooling : optional
        The embedding layer and pooling asked for (default: the models' own).

    Raises
    ------
    ConfigError
        A layer out of range, a pooling a model lacks, more frozen layers than a model has,
        or a fine-tuning device or precision this machine cannot train with.
    CheckpointError
        A checkpoint's settings files are missing or unreadable.
    """
    specs = [ModelSpec.parse(spec) for spec in models if "=" in spec]
    tune = config.finetune_settings()
    if not specs or (layer is None and pooling is None and tune is None):
        return
    from scfmbench.benchmark.embedding import load_context
    from scfmbench.models import MODELS

    context = load_context(config)

    def check_each(**asked: Any) -> None:
        for spec in specs:
            MODELS.get(spec.name).check_embedding(
                spec.path,
                context,
                config.model_options.get(spec.name),
                random_init=spec.random_only,
                **asked,
            )

    check_each(layer=layer, pooling=pooling)  # in the order the loaded model refuses them
    if tune is None:
        return
    check_each(layer=tune.layer, pooling=tune.pooling, what="finetune layer")
    from scfmbench.finetune.setup import check_finetune_device

    check_finetune_device(tune)
    check_each(freeze_layers=tune.freeze_layers)


def check_run_data(config: RunConfig, data: RunData, models: list[str]) -> tuple[list[Method], str]:
    """Refuse settings that do not fit the validated data, before any model is loaded.

    Checks the batch column, the baselines on the data's matrix kind, the reference method,
    the held-out groups (column, values, one fold per group; see
    :func:`~scfmbench.benchmark.holdout.check_holdout_data`) and that every class can be
    split by the random-split design (which a held-out run scores too).

    Parameters
    ----------
    config : RunConfig
        The resolved run settings.
    data : ValidatedData or BackedData
        The validated data: ``obs``, ``labels`` and ``diagnostics``.
    models : list of str
        ``NAME``, ``NAME-random`` or ``NAME=DIR`` of the run's models (their methods are
        candidates for ``reference``).

    Returns
    -------
    (list of Method, str)
        The baselines the run fits on these data and the reference method's name.

    Raises
    ------
    SchemaError
        A ``batch_key`` or ``holdout_key`` that is not an obs column, or a held-out column
        with missing values or without groups (a measurement, or about one group per cell).
    ConfigError
        An explicit scvi baseline on data without counts, or a reference method the run
        does not have.
    SplitError
        An unknown group value, one group only, or a class too small to split.

    Warns
    -----
    UserWarning
        ``n_hvg`` or ``n_pcs`` larger than the data allow (recorded in the diagnostics).
    """
    from scfmbench.evaluation.embedding_quality import detect_batch_key

    detect_batch_key(data.obs, config.batch_key)  # a misspelt batch_key
    baselines = baseline_methods(config, data.diagnostics.matrix_kind)
    reference = check_reference(config, baselines, models)
    if config.holdout_key is not None:
        check_holdout_data(data, config)
    check_stratifiable(
        data.labels, n_folds=config.n_splits if config.design == "cv" else None
    )  # the random-split design
    for message in _capped_sizes(config, baselines, data.diagnostics.n_genes, len(data.labels)):
        data.diagnostics.warnings.append(message)
        warnings.warn(message, stacklevel=2)
    return baselines, reference


def _capped_sizes(
    config: RunConfig, baselines: list[Method], n_genes: int, n_cells: int
) -> list[str]:
    """Say when a ``n_hvg`` or ``n_pcs`` that was set asks for more than the data hold.

    Each is capped; the defaults are capped without a word (Kang 2018 has 1,267 genes).
    """
    used = {method.representation for method in baselines}
    found = []
    if used & {"hvg", "pca"} and config.n_hvg > n_genes and _was_set(config, "n_hvg"):
        found.append(
            f"n_hvg is {config.n_hvg:,} but the data have {n_genes:,} genes: the "
            "hvg and pca baselines use all of them"
        )
    most = min(config.n_hvg, n_genes, n_cells - 1)
    if "pca" in used and config.n_pcs > most and _was_set(config, "n_pcs"):
        found.append(
            f"n_pcs is {config.n_pcs:,} but the PCA has at most {most:,} "
            "components (the genes it reads, and fewer than each split's training cells): "
            "each split keeps all it has"
        )
    return found


def _was_set(config: RunConfig, key: str) -> bool:
    return getattr(config, key) != RunConfig.model_fields[key].default
