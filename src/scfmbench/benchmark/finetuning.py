"""End-to-end fine-tuning inside a run: every model on every split, and its report section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pandas as pd
from anndata import AnnData

from scfmbench.benchmark.methods import Method
from scfmbench.benchmark.predict import Prediction, Predictions
from scfmbench.config import RunConfig
from scfmbench.data.splits import SplitSet
from scfmbench.results import MethodKind

__all__ = ["finetune_metrics", "finetune_models"]


def finetune_models(
    config: RunConfig,
    adata: AnnData,
    labels: pd.Series,
    models: list[Any],
    split_set: SplitSet,
    run_dir: Path,
    predictions: Predictions,
    methods: list[Method],
    progress: bool,
) -> list[Any]:
    """Fine-tune every model (and control) on every split; add their test predictions.

    A finished fine-tuning is reused from its checkpoint on rerun (only re-scored on test).

    Parameters
    ----------
    config : RunConfig
        The run's settings (its ``finetune`` section).
    adata : AnnData
        The validated cells, the file's own gene names (raw counts in ``X``).
    labels : pandas.Series
        Categorical cell types of the run's cells.
    models : list of FoundationModel
        The run's loaded models.
    split_set : SplitSet
        The splits to fine-tune on.
    run_dir : pathlib.Path
        Where ``finetune/<model_id>/seed<S>/`` goes.
    predictions : dict
        Receives ``{(method name, split seed): Prediction}`` of every fine-tuning.
    methods : list of Method
        Receives one method per model.
    progress : bool
        Show progress bars.

    Returns
    -------
    list of FinetuneResult
        One per model and split.
    """
    from scfmbench.finetune.train import finetune_in_run

    settings = config.finetune_settings()
    if settings is None:  # no finetune section: nothing to fine-tune
        return []
    results = []
    for model in models:
        for split in split_set.splits:
            result = finetune_in_run(
                adata, labels, model, split, config=settings, run_dir=run_dir, progress=progress
            )
            predictions[(result.method_name, split.seed)] = Prediction.from_payload(
                result.prediction_payload()
            )
            results.append(result)
        methods.append(
            Method(
                results[-1].method_name,
                model.model_id,
                "finetune",
                cast(MethodKind, results[-1].kind),  # "finetuned", or "control"
                model.model_id,
            )
        )
    return results


def finetune_metrics(results: list[Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """``metrics.json["finetune"]``: per model its curve (first split) and every split.

    Parameters
    ----------
    results : list of FinetuneResult
        Those of :func:`finetune_models`.
    run_dir : pathlib.Path
        The run folder (figure paths are given relative to it).

    Returns
    -------
    dict
        Model id → ``kind``, ``method``, ``splits``, ``epochs`` and ``curve_png``.
    """
    from scfmbench.finetune.train import metrics_section

    section = metrics_section(results)
    for result in results:
        entry = section[result.model_id]
        if "epochs" not in entry:  # the first split's curve is the one shown
            entry["epochs"] = result.epochs
            curve = result.figures.get("learning_curve")
            entry["curve_png"] = str(Path(curve).relative_to(run_dir)) if curve else None
    return section
