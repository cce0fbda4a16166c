"""The embedding engine: tokenized cells in, pooled embeddings out, for any model.

Every foundation model goes through :func:`embed_tokens` / :func:`embed`; models only
supply ``tokenize`` and ``encode``. Here: the inference loop over length-sorted batches
(with out-of-memory back-off for ``batch_size="auto"``), layer and pooling resolution, the
all-layer pass and chunked, resumable embedding through the cache.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from scfmbench._progress import progress_bar
from scfmbench._warnings import recording_data_warnings
from scfmbench.data.validate import check_unique_cells
from scfmbench.embed.batching import (
    AUTO_BATCH_SIZE,
    AUTO_MAX_TOKENS,
    batch_at,
    collate,
    halve_batch,
    is_out_of_memory,
    longest_first,
    take_tokens,
)
from scfmbench.embed.cache import EmbeddingCache, cache_key
from scfmbench.embed.distributed import resolve_device
from scfmbench.embed.options import (
    EMBED_DEFAULTS,
    BatchSize,
    EmbedOptions,
    check_precision,
    parse_batch_size,
)
from scfmbench.errors import DataError
from scfmbench.models.base import Embeddings, FoundationModel, TokenizedCells
from scfmbench.models.loading import ModelLayout, check_layer_pooling

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# all_layers keeps every layer's (cells, dim) float32 matrix in memory; above this it embeds
# only the requested layer (each other layer then costs its own pass)
ALL_LAYERS_MAX_BYTES = 4 * 2**30


def _autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 / float16 autocast on CUDA; no autocast otherwise (logged once)."""
    check_precision(precision)
    if precision in AUTOCAST_DTYPES and device.type == "cuda":
        return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
    if precision in AUTOCAST_DTYPES:
        _note_float32(precision, device.type)
    return nullcontext()


@functools.cache
def _note_float32(precision: str, device_type: str) -> None:
    logger.warning(
        "warning: precision %s applies on a CUDA GPU only; embedding in float32 on %s",
        precision,
        device_type,
    )


@torch.inference_mode()
def embed_tokens(
    model: FoundationModel,
    tokens: TokenizedCells,
    *,
    layer: int,
    pooling: str,
    batch_size: BatchSize = EMBED_DEFAULTS.batch_size,
    max_tokens: int | None = EMBED_DEFAULTS.max_tokens,
    device: str | None = EMBED_DEFAULTS.device,
    precision: str = EMBED_DEFAULTS.precision,
    out: np.ndarray | None = None,
    progress: bool = True,
    bar: tqdm | None = None,
    layers: Sequence[int] | None = None,
) -> np.ndarray:
    """Embed every tokenized cell; rows come back in input order.

    Cells run in batches of similar length, longest first.

    Parameters
    ----------
    model : FoundationModel
        The model (its network is moved to ``device`` and put in eval mode).
    tokens : TokenizedCells
        The tokenized cells.
    layer : int
        Layer to pool (ignored with ``layers``).
    pooling : str
        One of ``model.poolings``.
    batch_size : int or "auto", default 32
        Cells per batch, or ``"auto"``: start at ``AUTO_BATCH_SIZE`` cells (at most
        ``max_tokens`` or ``AUTO_MAX_TOKENS`` padded tokens) and, when a batch runs out of
        memory, halve the batch size and retry it; only a single cell that does not fit
        raises.
    max_tokens : int or None, default None
        Most padded tokens per batch.
    device : str or None, default "auto"
        See :func:`resolve_device`.
    precision : str, default "float32"
        ``float32``, or ``bfloat16`` / ``float16`` autocast on CUDA.
    out : numpy.ndarray or None, default None
        Optional preallocated (n_cells, dim) array (with ``layers``: (len(layers),
        n_cells, dim)), e.g. an ``np.memmap`` to stream results to disk.
    progress : bool, default True
        Show a progress bar (when ``bar`` is None).
    bar : tqdm or None, default None
        An outer progress bar to advance instead of opening a new one.
    layers : sequence of int or None, default None
        Pool every listed layer from the same single forward pass per batch.

    Returns
    -------
    numpy.ndarray
        float32 of shape (n_cells, dim) for ``layer``, or (len(layers), n_cells, dim).

    Raises
    ------
    ConfigError
        An invalid batch size or precision, or (``"auto"``) one cell alone does not fit.
    """
    batch_size = parse_batch_size(batch_size)
    auto = batch_size == "auto"
    size = AUTO_BATCH_SIZE if batch_size == "auto" else batch_size
    if auto:
        max_tokens = AUTO_MAX_TOKENS if max_tokens is None else max_tokens
    torch_device = resolve_device(device)
    autocast = _autocast(precision, torch_device)
    network = model.network.to(torch_device).eval()
    lengths = tokens.lengths
    order = longest_first(lengths)
    own_bar = bar is None
    if bar is None:
        bar = progress_bar(
            total=tokens.n_cells, desc=f"embed {model.model_id}", unit="cell", progress=progress
        )
    start = 0
    with autocast:
        while start < len(order):
            indices = batch_at(order, lengths, start, batch_size=size, max_tokens=max_tokens)
            try:
                pooled = _encode(model, tokens, indices, layers or [layer], pooling, torch_device)
            except RuntimeError as exc:
                if not (auto and is_out_of_memory(exc)):
                    raise
                size = halve_batch(model, tokens, indices, torch_device)
                continue
            if out is None:
                out = _allocate(pooled, tokens.n_cells, stacked=layers is not None)
            if layers is None:
                out[indices] = pooled[0]
            else:
                out[:, indices] = pooled
            bar.update(len(indices))
            start += len(indices)
    if own_bar:
        bar.close()
    del network
    if out is None:
        out = np.zeros((0, 0) if layers is None else (len(layers), 0, 0), dtype=np.float32)
    return out


def _allocate(pooled: np.ndarray, n_cells: int, *, stacked: bool) -> np.ndarray:
    """Zeros for every cell, shaped like the first batch: (layers, cells, dim) or (cells, dim)."""
    out = np.zeros((len(pooled), n_cells, pooled.shape[2]), dtype=np.float32)
    return out if stacked else out[0]


def _encode(
    model: FoundationModel,
    tokens: TokenizedCells,
    indices: np.ndarray,
    layers: Sequence[int],
    pooling: str,
    device: torch.device,
) -> np.ndarray:
    """Pooled float32 embeddings (len(layers), B, dim) of the cells ``indices`` (one batch)."""
    batch = collate(tokens, indices, pad_token_id=model.pad_token_id, pad_value=model.pad_value).to(
        device
    )
    if len(layers) == 1:
        pooled = model.encode(batch, layer=layers[0], pooling=pooling)[None]
    else:
        pooled = model.encode_layers(batch, layers=layers, pooling=pooling)
    return pooled.float().cpu().numpy()


def embed_layers(
    model: FoundationModel,
    tokens: TokenizedCells,
    options: EmbedOptions,
    layers: Sequence[int],
    *,
    progress: bool,
    bar: tqdm | None = None,
) -> np.ndarray:
    """:func:`embed_tokens` of ``layers`` with ``options`` (its pooling resolved).

    Parameters
    ----------
    model : FoundationModel
        The model.
    tokens : TokenizedCells
        The tokenized cells.
    options : EmbedOptions
        Settings; ``pooling`` must be resolved (see :func:`resolve_layer_pooling`).
    layers : sequence of int
        Layers pooled from one forward pass.
    progress : bool
        Show a progress bar (when ``bar`` is None).
    bar : tqdm or None, default None
        An outer progress bar to advance.

    Returns
    -------
    numpy.ndarray
        float32 of shape (len(layers), n_cells, dim).
    """
    if options.pooling is None:
        raise ValueError("embed_layers needs a resolved pooling")
    return embed_tokens(
        model,
        tokens,
        layer=layers[0],
        layers=layers,
        pooling=options.pooling,
        batch_size=options.batch_size,
        max_tokens=options.max_tokens,
        device=options.device,
        precision=options.precision,
        progress=progress,
        bar=bar,
    )


def _log_reuse(model_id: str, layer: int, pooling: str, n_layers: int | None, key: str) -> None:
    """Say where a cached embedding comes from: this process's pass, or an earlier run."""
    what = f"layer {layer} ({pooling} pooling)"
    if n_layers is None:
        message = f"{what} loaded from cache (computed by an earlier run)"
    else:
        source = "this run's all-layer pass" if n_layers > 1 else "an earlier pass in this process"
        message = f"reusing {what} from {source}"
    logger.info("%s: %s (%s)", model_id, message, key[:12])


def _embed_in_chunks(
    model: FoundationModel,
    tokens: TokenizedCells,
    cache: EmbeddingCache | None,
    key: str,
    *,
    options: EmbedOptions,
    layers: Sequence[int],
    progress: bool,
) -> np.ndarray:
    """Embed chunk by chunk, reusing chunks a previous (interrupted) call already saved.

    Chunks are consecutive cells of the length order (longest first), so the batches are
    those of one pass over all cells: chunks in the cells' own order would each hold short
    and long cells, and pad more (2% more FLOPs on PBMC3k).
    """
    chunk_size = options.chunk_size
    if cache is None or tokens.n_cells <= chunk_size:
        return embed_layers(model, tokens, options, layers, progress=progress)
    bar = progress_bar(
        total=tokens.n_cells, desc=f"embed {model.model_id}", unit="cell", progress=progress
    )
    order = longest_first(tokens.lengths)  # the order embed_tokens batches in
    out: np.ndarray | None = None
    for start in range(0, tokens.n_cells, chunk_size):
        stop = min(start + chunk_size, tokens.n_cells)
        rows = order[start:stop]
        chunk = take_tokens(tokens, rows)
        part_key = f"{key}.part{start:09d}-{stop:09d}.by-length"
        matrix = cache.get(part_key, chunk.obs_names)
        if matrix is not None:
            logger.info(
                "%s: reusing finished chunk of cells %d-%d (longest first)",
                model.model_id,
                start,
                stop,
            )
            bar.update(stop - start)
        else:
            matrix = embed_layers(model, chunk, options, layers, progress=progress, bar=bar)
            cache.put(part_key, matrix, chunk.obs_names, {"part_of": key})
        if out is None:
            out = np.empty((matrix.shape[0], tokens.n_cells, matrix.shape[2]), np.float32)
        out[:, rows] = matrix
    bar.close()
    assert out is not None  # more cells than one chunk
    return out


def resolve_layer_pooling(
    model: FoundationModel, *, layer: int | None, pooling: str | None, what: str = "layer"
) -> tuple[int, str]:
    """Return the layer and pooling to use: the model's defaults for ``None``.

    Parameters
    ----------
    model : FoundationModel
        The model.
    layer : int or None
        0..``n_layers`` or a negative index (-1 = last); None: ``model.default_layer``.
    pooling : str or None
        One of ``model.poolings``; None: ``model.default_pooling``.
    what : str, default "layer"
        How the layer is named in the error message.

    Returns
    -------
    tuple of (int, str)
        The layer (as given, not wrapped) and the pooling.

    Raises
    ------
    ConfigError
        A layer out of range, or a pooling the model lacks.
    """
    layer = model.default_layer if layer is None else layer
    pooling = pooling or model.default_pooling
    layout = ModelLayout(tuple(model.poolings), model.n_layers)
    check_layer_pooling(model.name, model.model_id, layout, layer=layer, pooling=pooling, what=what)
    return layer, pooling


def require_cells(tokens: TokenizedCells, model: FoundationModel, *, n_obs: int) -> None:
    """Refuse tokens in which no cell is left (nothing would be embedded).

    Parameters
    ----------
    tokens : TokenizedCells
        The tokenizer's output.
    model : FoundationModel
        The model (for the message).
    n_obs : int
        Cells given to the tokenizer.

    Raises
    ------
    DataError
        The tokenizer kept no cell of ``n_obs`` > 0.
    """
    if tokens.n_cells == 0 and n_obs > 0:
        raise DataError(
            f"{model.model_id} can embed none of the {n_obs} cells: every cell has no counts "
            "on genes in its vocabulary or fails obs['filter_pass']; check the gene "
            "identifiers (--gene-column) and obs['filter_pass']."
        )


def _all_layers_bytes(model: FoundationModel, n_cells: int) -> int:
    """Bytes of every layer's float32 embedding of ``n_cells`` cells (0 if the width is unknown)."""
    try:
        width = model.hidden_size
    except NotImplementedError:
        return 0
    return (model.n_layers + 1) * n_cells * int(width) * 4


def embed(
    adata: AnnData,
    model: FoundationModel,
    *,
    layer: int | None = EMBED_DEFAULTS.layer,
    pooling: str | None = EMBED_DEFAULTS.pooling,
    batch_size: BatchSize = EMBED_DEFAULTS.batch_size,
    max_tokens: int | None = EMBED_DEFAULTS.max_tokens,
    device: str = EMBED_DEFAULTS.device,
    precision: str = EMBED_DEFAULTS.precision,
    cache_dir: Path | None = None,
    seed: int = EMBED_DEFAULTS.seed,
    key_added: str | None = None,
    progress: bool = True,
    chunk_size: int = EMBED_DEFAULTS.chunk_size,
    tokens: TokenizedCells | None = None,
    all_layers: bool = EMBED_DEFAULTS.all_layers,
) -> Embeddings:
    """Tokenize and embed ``adata`` (raw counts in ``X``) with ``model``.

    With ``all_layers``, the same forward pass pools every layer (0 … ``n_layers``) and,
    with a ``cache_dir``, stores each under the key a single-layer call for that layer
    (and pooling) looks up, so later layers come from the cache without another pass.

    With a ``cache_dir``, cells are embedded in chunks of ``chunk_size`` and every finished
    chunk is saved (checksummed) at once, so an interrupted run resumes from the last
    finished chunk.

    Parameters
    ----------
    adata : AnnData
        Raw counts in ``X``; unique cell names.
    model : FoundationModel
        A loaded foundation model.
    layer, pooling, batch_size, max_tokens, device, precision, seed, chunk_size, all_layers
        Embedding settings; see :class:`EmbedOptions` for their meaning and defaults
        (:data:`EMBED_DEFAULTS`). ``embed(adata, model, **options.as_kwargs())`` embeds
        with an ``EmbedOptions``.
    cache_dir : Path or None, default None
        Embedding cache folder (None: no cache).
    key_added : str or None, default None
        ``obsm`` key to write (None: ``model.obsm_key``, e.g. ``X_geneformer``).
    progress : bool, default True
        Show a progress bar.
    tokens : TokenizedCells or None, default None
        ``model.tokenize(adata, seed=seed)`` when already at hand (skips tokenizing again,
        e.g. when embedding several layers).

    Returns
    -------
    Embeddings
        The (n_kept, dim) float32 embeddings of the cells the tokenizer kept. Also writes
        ``adata.obsm[key_added or model.obsm_key]`` of shape (n_obs, dim); cells the
        tokenizer dropped get NaN rows. Its ``tokenizer`` holds the tokenizer's settings and
        its ``warnings`` those the tokenizer gave about the data (given as usual too; none
        when ``tokens`` is passed).

    Raises
    ------
    ConfigError
        A layer, pooling, batch size, precision or chunk size that is invalid.
    DataError
        Duplicate cell names, or no cell has tokens.
    """
    options = EmbedOptions.pick(locals())  # the settings among the arguments, checked
    layer, pooling = resolve_layer_pooling(model, layer=layer, pooling=pooling)
    check_unique_cells(adata.obs_names, where="the data")
    about_data: list[str] = []
    if tokens is None:
        with recording_data_warnings() as about_data:
            tokens = model.tokenize(adata, seed=seed)
    require_cells(tokens, model, n_obs=adata.n_obs)
    depth = layer % (model.n_layers + 1)
    options = options.replace(layer=depth, pooling=pooling)

    def key_of(**what: Any) -> str:
        return cache_key(model, adata, tokens.settings, pooling=pooling, seed=seed, **what)

    key = key_of(layer=depth)
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    matrix = cache.get(key, tokens.obs_names) if cache else None
    from_cache = matrix is not None
    if matrix is None:
        if all_layers and _all_layers_bytes(model, tokens.n_cells) > ALL_LAYERS_MAX_BYTES:
            logger.info(
                "%s: %d cells × %d layers exceed %d GiB; embedding layer %d only",
                model.model_id,
                tokens.n_cells,
                model.n_layers + 1,
                ALL_LAYERS_MAX_BYTES // 2**30,
                depth,
            )
            all_layers = False
        layers = list(range(model.n_layers + 1)) if all_layers else [depth]
        pass_key = key_of(layers=layers)  # chunks of this pass hold (len(layers), cells, dim)
        stacked = _embed_in_chunks(
            model, tokens, cache, pass_key, options=options, layers=layers, progress=progress
        )
        matrix = stacked[layers.index(depth)]
        if cache:
            for each, rows in zip(layers, stacked, strict=True):
                cache.put(
                    key_of(layer=each),
                    rows,
                    tokens.obs_names,
                    {"model": model.model_id, "layer": each, "pooling": pooling},
                    n_layers=len(layers),
                )
            cache.drop_parts(pass_key)
    elif cache is not None:
        _log_reuse(model.model_id, depth, pooling, cache.written_here(key), key)
    full = np.full((adata.n_obs, matrix.shape[1]), np.nan, dtype=np.float32)
    full[adata.obs_names.get_indexer(tokens.obs_names)] = matrix
    adata.obsm[key_added or model.obsm_key] = full
    return Embeddings(
        matrix=matrix,
        obs_names=tokens.obs_names,
        model_id=model.model_id,
        layer=layer,
        pooling=pooling,
        checkpoint_sha256=model.checkpoint_sha256,
        dropped=tokens.dropped,
        from_cache=from_cache,
        gene_match=tokens.gene_match,
        tokenizer=tokens.settings,
        warnings=about_data,
    )
