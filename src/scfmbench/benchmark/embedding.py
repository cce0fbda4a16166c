"""The run's embeddings.

One pass per model (cached, or streamed to disk), a probe on every layer, and the zero-shot
scores and UMAPs of each embedding and of the HVG-PCA view.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from scfmbench._warnings import LIBRARY_CHURN
from scfmbench.benchmark.methods import Method
from scfmbench.benchmark.predict import fit_and_predict_features, probe_grid
from scfmbench.benchmark.rundata import RunData
from scfmbench.config import RunConfig
from scfmbench.data.backed import BackedData
from scfmbench.data.cells import CellRows
from scfmbench.data.feature_selection import check_feature_selection, matrix_facts, model_name
from scfmbench.data.splits import Split
from scfmbench.data.validate import DataDiagnostics
from scfmbench.evaluation.representations import embedding_features, pca_all_cells
from scfmbench.hashing import hash_json
from scfmbench.stages import StageStore

if TYPE_CHECKING:  # torch and transformers load with the models, only when a model is named
    from scfmbench.models import LoadContext

__all__ = [
    "ModelEmbedding",
    "check_models_read",
    "check_values_read",
    "check_run_feature_selection",
    "embed_cells",
    "embedding_scores",
    "layerwise_probing",
    "load_context",
]

logger = logging.getLogger(__name__)

MAX_SCORED_CELLS = 20_000
"""The zero-shot embedding scores and UMAPs use at most this many cells (a seeded sample)."""


@dataclass
class ModelEmbedding:
    """One model's embedding of the run's cells and its diagnostics.

    Attributes
    ----------
    matrix : numpy.ndarray
        (n_cells, dim), rows in the order of ``labels`` (NaN rows for cells without a
        vocabulary gene).
    info : dict
        The model's ``metrics.json`` diagnostics entry.
    """

    matrix: np.ndarray
    info: dict[str, Any]


def check_run_feature_selection(config: RunConfig, diagnostics: DataDiagnostics) -> str | None:
    """Refuse the run's models on a feature-selected count matrix.

    See :func:`scfmbench.data.feature_selection.check_feature_selection`; with
    ``config.allow_feature_selected`` log and return the warning instead.

    Raises
    ------
    DataError
        geneformer or scgpt (or their controls) would see fewer than 5,000 genes, or only
        genes flagged highly variable, and ``allow_feature_selected`` is not set.
    """
    allowed = check_feature_selection(
        config.models, allow=config.allow_feature_selected, **matrix_facts(diagnostics)
    )
    if allowed is not None:
        logger.warning("warning: %s", allowed)
    return allowed


def load_context(config: RunConfig) -> LoadContext:
    """Return the settings every model loader takes: seed, gene column, allow_normalized."""
    from scfmbench.models import LoadContext

    return LoadContext(
        seed=config.seed, gene_column=config.gene_column, allow_normalized=config.allow_normalized
    )


def check_models_read(config: RunConfig, models: list[str], data: RunData) -> list[str]:
    """Refuse, before anything is loaded or written, data a model's tokenizer would refuse.

    Each model checks its gene column (``gene_column``) against the data's ``var``, the kind
    of the run's expression matrix (``diagnostics.matrix_kind``) and the ``obs`` columns it
    reads, with its options (``config.model_options``) and
    ``config.allow_normalized``; e.g. Geneformer refuses log-normalized values unless
    ``allow_normalized``. The checks' warnings are returned, not given: the tokenizer gives
    them later, once.

    Parameters
    ----------
    config : RunConfig
    models : list of str
        ``NAME``, ``NAME-random`` or ``NAME=DIR`` of the models.
    data : ValidatedData or BackedData
        The validated data: its ``diagnostics`` and ``obs``.

    Returns
    -------
    list of str
        The warnings about the values the models would run with (e.g. log-normalized values
        let through by ``allow_normalized``), each once.

    Raises
    ------
    CountsRequiredError
        A model needs raw counts (or other values) that the data do not hold.
    DataError
        A model reads an ``obs`` column the data lack or whose values it cannot use
        (scFoundation's totals for ``pre_normalized="A"``).
    SchemaError
        A model's ``gene_column`` that is not a ``var`` column (nor ``var_names``).
    """
    diagnostics = data.diagnostics
    return check_values_read(
        config,
        models,
        kind=diagnostics.matrix_kind,
        source=diagnostics.matrix_source,
        obs=data.obs,
        var=data.cells.reader.var
        if isinstance(data, BackedData)
        else cast(pd.DataFrame, data.adata.var),
    )


def check_values_read(
    config: RunConfig,
    models: list[str],
    *,
    kind: str,
    source: str,
    obs: pd.DataFrame,
    var: pd.DataFrame,
) -> list[str]:
    """:func:`check_models_read` on a matrix of ``kind`` in ``adata.<source>``.

    For callers without validated data (``embed``, which reads the matrix as it is given).
    ``var`` is that matrix's ``var``: a model's ``gene_column`` (``--gene-column``, or its
    ``gene_column`` option) must be one of its columns or ``var_names``.
    """
    if not models:
        return []  # a baseline-only run never loads torch or transformers
    from scfmbench.data.genes import check_gene_column
    from scfmbench.models import MODELS

    context = load_context(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in dict.fromkeys(model_name(spec) for spec in models):
            loader, options = MODELS.get(name), config.model_options.get(name)
            gene_column = loader.split_options(options, context)[0].gene_column
            if gene_column is not None:  # the tokenizer's first step, as it words it
                check_gene_column(var, gene_column)
            loader.check_matrix_kind(kind, context, options, where=f"adata.{source}", obs=obs)
    return list(
        dict.fromkeys(str(w.message) for w in caught if not issubclass(w.category, LIBRARY_CHURN))
    )


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
    return ModelEmbedding(matrix=np.asarray(cells.obsm.pop(key)), info=info)


def _embedding_info(result) -> dict[str, Any]:
    """Return the ``metrics.json`` entry of an ``Embeddings`` or ``StreamedEmbeddings``."""
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
            prediction = fit_and_predict_features(
                method, feats, labels, split, code_of, classes, grid=probe_grid("logreg", config)
            )
            scores = prediction.score(labels, classes)
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
    """Pick the rows the zero-shot scores and UMAPs use.

    All cells, or a seeded sample of ``MAX_SCORED_CELLS`` (kNN and UMAP grow faster than
    linearly in the number of cells).
    """
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
    """Score the HVG-PCA view and every embedding zero-shot, and draw their UMAPs.

    Scores are those of :func:`scfmbench.evaluation.embedding_quality.embedding_quality`, on
    the cells of :func:`scored_cells`; each view's are cached as a stage.
    """
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
    """Score one view zero-shot (and draw its UMAPs).

    ``steps`` gets the seconds of each part (``view_s``: the HVG-PCA of the scored cells,
    then the scores' parts, ``umap_s``).
    """
    from scfmbench.evaluation.embedding_quality import embedding_quality
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
            names=labels.index.take(rows),
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
