"""The metrics document of a run.

Per method and split what its probe chose, the statistics computed from the per-cell
predictions table, and the warnings on what a score means.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd

from scfmbench.benchmark.methods import Method, skipped_baselines
from scfmbench.benchmark.predict import Predictions, payloads
from scfmbench.benchmark.rundata import RunData
from scfmbench.config import RunConfig
from scfmbench.data.splits import SplitSet
from scfmbench.data.validate import DataDiagnostics
from scfmbench.evaluation.run_stats import method_statistics, predictions_table
from scfmbench.evaluation.stats import Design
from scfmbench.results import document_header

logger = logging.getLogger(__name__)

__all__ = ["MIN_COUNT_COVERAGE", "MatrixFacts", "build_metrics", "score_warnings"]

MIN_COUNT_COVERAGE = 0.8
"""Below this share of counts on vocabulary genes a model sees much less than usual."""


@dataclass(frozen=True)
class MatrixFacts:
    """What :func:`score_warnings` reads of a dataset.

    The matrix kind, the genes a model saw and whether every gene is flagged highly variable
    (in a transfer: the shared genes).
    """

    matrix_kind: str | None
    n_genes: int
    all_highly_variable: bool


def build_metrics(
    config: RunConfig,
    validated: RunData,
    split_set: SplitSet,
    methods: list[Method],
    predictions: Predictions,
    reference: str,
    model_info: dict[str, dict[str, Any]],
    *,
    context: str = "",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Build the metrics.json document and the per-cell predictions table it comes from.

    Parameters
    ----------
    config : RunConfig
        The run's settings (name, data, seed).
    validated : ValidatedData or BackedData
        The run's cells: ``labels`` and ``diagnostics``.
    split_set : SplitSet
        The run's splits.
    methods : list of Method
        Every method, in run order.
    predictions : dict
        ``{(method name, split seed): Prediction}`` of every method and split.
    reference : str
        The method every gain is measured against.
    model_info : dict
        Model id → its embedding diagnostics.
    context : str, default ""
        Put before the warnings given about these splits, to tell them from the run's own
        (``"random-split comparison: "`` beside held-out folds).

    Returns
    -------
    (document, table)
        The document (schema in the README, :data:`scfmbench.results.SCHEMA_VERSION`) without
        the later sections, and one row per method, split and test cell.
    """
    labels = validated.labels
    classes = list(labels.cat.categories)
    design = Design.of(split_set)
    doc: dict[str, Any] = {
        **document_header(),
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
        "skipped": skipped_baselines(config, validated.diagnostics.matrix_kind),
        "methods": {},
    }
    for method in methods:
        per_split = {}
        for split in split_set.splits:
            prediction = predictions[(method.name, split.seed)]
            per_split[str(split.seed)] = {
                "params": prediction.params,
                "val_macro_f1": prediction.val_macro_f1,
                "on_grid_edge": prediction.on_grid_edge,
                "n_unassigned": prediction.n_unassigned,
                "features": prediction.features,  # e.g. n_pcs used; scVI's epochs, transductive
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
                "warning: %s%s: the probe's best validation setting is on the edge of its "
                "grid in %d of %d splits (%s); a wider grid might score better.",
                context,
                method.name,
                len(edges),
                len(per_split),
                _settings_counted([per_split[s]["params"] for s in edges]),
            )
    for method in methods:
        found = score_warnings(method, config, validated.diagnostics, model_info)
        if found:
            doc["methods"][method.name]["warnings"] = found
    table = predictions_table(payloads(predictions), labels, split_set, methods)
    method_statistics(doc, table, seed=config.seed, context=context)
    return doc, table


def score_warnings(
    method: Method,
    config: RunConfig,
    diagnostics: DataDiagnostics | MatrixFacts,
    model_info: dict[str, dict[str, Any]],
) -> list[str]:
    """Conditions that change what a foundation-model method's score means.

    Normalized or log-scale input let through by ``allow_normalized``, a feature-selected
    matrix (fewer than 5,000 genes, or every gene highly variable; for geneformer and scgpt
    only with ``allow_feature_selected``, see :mod:`scfmbench.data.feature_selection`),
    vocabulary genes holding < 80% of the counts, and cells the model could not embed
    (scored as wrong for this method only).

    Parameters
    ----------
    method : Method
        The method (a baseline gets no warnings).
    config : RunConfig
        ``allow_normalized`` is read, and the model's own in ``model_options``.
    diagnostics : DataDiagnostics or MatrixFacts
        ``matrix_kind``, ``n_genes`` and ``all_highly_variable`` of the data.
    model_info : dict
        Model id → its embedding diagnostics (``fraction_counts``, ``n_dropped_cells``).

    Returns
    -------
    list of str
        The warnings (empty for baselines).
    """
    from scfmbench.data.feature_selection import feature_selection_warning, model_name

    if method.model is None:
        return []
    info = model_info.get(method.model, {})
    found = []
    options = config.model_options.get(model_name(method.model)) or {}
    allowed = options.get("allow_normalized", config.allow_normalized)  # per model, or the run's
    if allowed and diagnostics.matrix_kind in ("normalized", "lognorm"):
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


def _settings_counted(settings: list[dict[str, Any]]) -> str:
    """``C=1000.0 in 2, C=0.0001 in 1``: each distinct setting with its number of splits."""
    counts = Counter(", ".join(f"{k}={v}" for k, v in params.items()) for params in settings)
    return ", ".join(f"{text} in {n}" for text, n in counts.most_common())
