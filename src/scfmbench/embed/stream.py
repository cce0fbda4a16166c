"""Out-of-core and distributed embedding of an ``.h5ad`` file, chunk by chunk.

``embed_h5ad`` reads ``chunk_size`` cells at a time straight from the file (h5py), checks
them, tokenizes and embeds them, and writes their rows into the output on disk (``.npy`` or a
copy of the input ``.h5ad`` with ``obsm['X_<model>']``), so neither the expression matrix nor
the embedding is ever held in memory whole. Finished chunks go to the embedding cache, so a
killed run resumes. Under ``torchrun`` (``WORLD_SIZE > 1``) chunk ``i`` is embedded by rank
``i % world_size``; rank 0 gathers the rows in cell order and alone writes the output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from scfmbench._atomic import atomic_path
from scfmbench._progress import progress_bar
from scfmbench._warnings import recording_data_warnings
from scfmbench.data.backed import H5adCells
from scfmbench.data.genes import GeneMatch
from scfmbench.embed.cache import EmbeddingCache, cache_key
from scfmbench.embed.distributed import DistContext, distributed, exchange
from scfmbench.embed.engine import embed_layers, resolve_layer_pooling
from scfmbench.embed.options import EMBED_DEFAULTS, BatchSize, EmbedOptions
from scfmbench.embed.output import Output, check_output_file, remove_leftovers
from scfmbench.errors import DataError, ScfmbenchError
from scfmbench.models.base import Embeddings, FoundationModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamedEmbeddings:
    """What ``embed_h5ad`` wrote: the output file and a summary (no matrix in memory).

    Attributes
    ----------
    out : Path
        The output file.
    key : str
        The ``obsm`` key (of an ``.h5ad`` output).
    n_obs : int
        Cells in the file.
    n_embedded : int
        Cells with tokens (the others have NaN rows).
    dim : int
        Embedding width.
    model_id : str
        The model's id.
    layer : int
        The layer pooled (as resolved, not wrapped).
    pooling : str
        The pooling.
    checkpoint_sha256 : str
        The model checkpoint's hash.
    chunk_size : int
        Cells per chunk.
    dropped : pandas.Index
        Cells without tokens.
    gene_match : GeneMatch or None
        The vocabulary match of the first chunk's genes.
    world_size : int
        Processes that embedded.
    tokenizer : dict
        The tokenizer's settings (of the first chunk with tokens).
    warnings : list of str
        The caller's warnings about the data, then those the tokenizer gave (rank 0's
        chunks), each once.
    """

    out: Path
    key: str
    n_obs: int
    n_embedded: int
    dim: int
    model_id: str
    layer: int
    pooling: str
    checkpoint_sha256: str
    chunk_size: int
    dropped: pd.Index = field(default_factory=lambda: pd.Index([]))
    gene_match: GeneMatch | None = None
    world_size: int = 1
    tokenizer: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """Return the ``uns['<key>_info']`` entry (as the in-memory ``embed`` writes it).

        Returns
        -------
        dict
            :func:`embedding_info` of this embedding, with its
            chunk size.
        """
        return embedding_info(self, warnings=self.warnings, chunk_size=self.chunk_size)


def embedding_info(
    embedding: Embeddings | StreamedEmbeddings,
    *,
    warnings: Sequence[str] = (),
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Return the ``uns['<key>_info']`` entry of an embedding written into an ``.h5ad``.

    One builder for the in-memory and the streamed ``embed``, so both files record the same.

    Parameters
    ----------
    embedding : Embeddings or StreamedEmbeddings
        Its model id, layer, pooling, checkpoint hash, dropped cells (NaN rows), tokenizer
        settings (``TokenizedCells.settings``: e.g. scFoundation's ``pre_normalized`` mode,
        scGPT's bins and input length) and gene match are recorded. None values are left
        out, since ``.h5ad`` cannot store them.
    warnings : sequence of str, default ()
        Warnings about the data (feature-selected or normalized input let through); the
        key is left out when there are none.
    chunk_size : int or None, default None
        Cells per chunk of a streamed embedding (left out when None).

    Returns
    -------
    dict
        model, layer, pooling, checkpoint_sha256, dropped_cells, tokenizer, genes, and
        warnings and chunk_size when given.
    """
    match = embedding.gene_match
    genes = match.to_dict() if match is not None else {}
    return {
        "model": embedding.model_id,
        "layer": embedding.layer,
        "pooling": embedding.pooling,
        "checkpoint_sha256": embedding.checkpoint_sha256,
        "dropped_cells": [str(cell) for cell in embedding.dropped],
        "tokenizer": {k: v for k, v in embedding.tokenizer.items() if v is not None},
        **({"warnings": list(warnings)} if warnings else {}),
        "genes": {k: v for k, v in genes.items() if v is not None and v != []},
        **({"chunk_size": chunk_size} if chunk_size is not None else {}),
    }


@contextmanager
def _quiet_repeats() -> Iterator[None]:
    """Hide the tokenizer's per-chunk log lines after the first chunk.

    The gene match and its warnings repeat the first chunk's, and cells without tokens are
    summed up at the end.
    """
    quiet = logging.getLogger("scfmbench")
    level = quiet.level
    if quiet.getEffectiveLevel() < logging.ERROR:
        quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def _embed_chunk(
    cells: H5adCells,
    model: FoundationModel,
    start: int,
    stop: int,
    cache: EmbeddingCache | None,
    *,
    options: EmbedOptions,
    bar: tqdm | None,
) -> tuple[np.ndarray | None, pd.Index, GeneMatch | None, dict[str, Any]]:
    """Embed the cells ``start:stop`` of the file.

    Returns their rows (NaN for cells without tokens; None when no cell has tokens), the
    dropped cells, the gene match and the tokenizer's settings.

    Tokenizers that draw random numbers (scGPT) seed them per cell (``seed`` and the cell's
    name), so rows do not depend on the chunk grid, the rank or the other cells.
    """
    chunk = cells.chunk(start, stop)
    with nullcontext() if start == 0 else _quiet_repeats():
        tokens = model.tokenize(chunk, seed=options.seed)
    if tokens.n_cells == 0:
        if bar is not None:
            bar.update(stop - start)
        return None, tokens.dropped, tokens.gene_match, tokens.settings
    depth = (options.layer or 0) % (model.n_layers + 1)

    def key_of(layer: int) -> str:
        return cache_key(
            model,
            chunk,
            tokens.settings,
            seed=options.seed,
            layer=layer,
            pooling=options.pooling,
        )

    matrix = cache.get(key_of(depth), tokens.obs_names) if cache is not None else None
    if matrix is not None:
        logger.info("%s: reusing finished chunk of cells %d-%d", model.model_id, start, stop)
        if bar is not None:
            bar.update(stop - start)
    else:
        layers = list(range(model.n_layers + 1)) if options.all_layers else [depth]
        stacked = embed_layers(model, tokens, options, layers, progress=False, bar=bar)
        matrix = stacked[layers.index(depth)]
        if bar is not None:
            bar.update(len(tokens.dropped))  # embed_tokens counted the embedded cells
        if cache is not None:
            for layer, rows in zip(layers, stacked, strict=True):
                cache.put(key_of(layer), rows, tokens.obs_names, {"chunk": [start, stop]})
    rows = np.full((stop - start, matrix.shape[1]), np.nan, dtype=np.float32)
    rows[chunk.obs_names.get_indexer(tokens.obs_names)] = matrix
    return rows, tokens.dropped, tokens.gene_match, tokens.settings


def embed_h5ad(
    path: str | Path,
    model: FoundationModel,
    *,
    out: str | Path,
    layer: int | None = EMBED_DEFAULTS.layer,
    pooling: str | None = EMBED_DEFAULTS.pooling,
    batch_size: BatchSize = EMBED_DEFAULTS.batch_size,
    max_tokens: int | None = EMBED_DEFAULTS.max_tokens,
    device: str = EMBED_DEFAULTS.device,
    precision: str = EMBED_DEFAULTS.precision,
    cache_dir: Path | None = None,
    chunk_size: int = EMBED_DEFAULTS.chunk_size,
    seed: int = EMBED_DEFAULTS.seed,
    key_added: str | None = None,
    progress: bool = True,
    all_layers: bool = EMBED_DEFAULTS.all_layers,
    data_warnings: Sequence[str] = (),
) -> StreamedEmbeddings:
    """Embed every cell of the ``.h5ad`` file ``path`` without loading it, chunk by chunk.

    Memory stays flat in the number of cells: one chunk of ``chunk_size`` cells (per rank)
    is in memory at a time. Under torchrun (``WORLD_SIZE > 1``) every rank embeds its share of
    the chunks and rank 0 writes ``out``. Results equal the in-memory ``embed`` with the same
    ``seed`` for any ``chunk_size`` and number of processes (up to float rounding from
    different batch padding).

    Parameters
    ----------
    path : str or Path
        An ``.h5ad`` file with raw counts (CSR or dense) in ``layers['counts']``, ``X`` or
        ``raw.X``.
    model : FoundationModel
        A loaded foundation model.
    out : str or Path
        ``.npy`` (the (n_obs, dim) matrix) or ``.h5ad`` (a copy of ``path`` plus
        ``obsm[key_added or model.obsm_key]`` and ``uns['<key>_info']``); written
        atomically, NaN rows for cells without tokens.
    layer, pooling, batch_size, max_tokens, device, precision, seed
        Embedding settings; see :class:`EmbedOptions` for their meaning and defaults
        (:data:`EMBED_DEFAULTS`).
    cache_dir : Path or None, default None
        Embedding cache; every finished chunk is saved there, so a killed run resumes from
        the last finished chunk.
    chunk_size : int, default 2048
        Cells read, tokenized and embedded at a time (also the unit of resume and of
        sharding between ranks).
    key_added : str or None, default None
        ``obsm`` key of an ``.h5ad`` output (None: ``model.obsm_key``).
    progress : bool, default True
        Show a progress bar (rank 0).
    all_layers : bool, default False
        With a ``cache_dir``, pool every layer in the same forward pass and cache each chunk
        of each layer, so a later call for another layer (same pooling) reads its chunks
        from the cache without running the model.
    data_warnings : sequence of str, default ()
        The caller's warnings about the data (e.g. a feature-selected matrix let through),
        kept in ``uns['<key>_info']['warnings']`` before those the tokenizer gives.

    Returns
    -------
    StreamedEmbeddings
        What was written (rank 0's view; other ranks get the same summary without writing).

    Raises
    ------
    ConfigError
        An invalid setting, or ``out`` not ending in ``.npy`` / ``.h5ad``.
    DataError
        The file is unreadable or no cell has an expressed vocabulary gene.
    """
    options = EmbedOptions.pick(locals())  # the settings among the arguments, checked
    options = options.replace(all_layers=all_layers and cache_dir is not None)
    layer, pooling = resolve_layer_pooling(model, layer=layer, pooling=pooling)
    out = check_output_file(out)
    key = key_added or model.obsm_key
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    with distributed(device) as (ctx, device_name):
        cells = H5adCells(Path(path), chunk_size=chunk_size)
        try:
            return _stream(
                cells,
                model,
                ctx,
                out=out,
                key=key,
                cache=cache,
                progress=progress and ctx.is_main,
                options=options.replace(layer=layer, pooling=pooling, device=device_name),
                data_warnings=data_warnings,
            )
        finally:
            cells.close()


def _stream(
    cells: H5adCells,
    model: FoundationModel,
    ctx: DistContext,
    *,
    out: Path,
    key: str,
    cache: EmbeddingCache | None,
    progress: bool,
    options: EmbedOptions,
    data_warnings: Sequence[str],
) -> StreamedEmbeddings:
    chunk_size = options.chunk_size
    starts = list(range(0, cells.n_obs, chunk_size))
    logger.info(
        "%s: streaming %d cells of %s (adata.%s, %s) in %d chunks of %d over %d process(es)",
        model.model_id,
        cells.n_obs,
        cells.path.name,
        cells.source,
        cells.kind,
        len(starts),
        chunk_size,
        ctx.world_size,
    )
    bar = progress_bar(
        total=cells.n_obs, desc=f"embed {model.model_id}", unit="cell", progress=progress
    )
    chunk_bar = bar if ctx.world_size == 1 else None  # else rank 0 counts the gathered chunks
    dropped: list[pd.Index] = []
    gene_match, dim, tokenizer = None, 0, {}
    about_data: list[str] = list(data_warnings)
    given: set[str] = set()  # each chunk's tokenizer repeats the first chunk's warnings
    if ctx.is_main:
        remove_leftovers(out)
    with atomic_path(out) if ctx.is_main else nullcontext() as tmp:
        output = Output(tmp, cells, out=out, key=key) if tmp is not None else None
        try:
            for first in range(0, len(starts), ctx.world_size):
                payload, error = None, None
                if first + ctx.rank < len(starts):
                    start = starts[first + ctx.rank]
                    stop = min(start + chunk_size, cells.n_obs)
                    try:
                        with recording_data_warnings(given=given) as caught:
                            rows, lost, match, settings = _embed_chunk(
                                cells, model, start, stop, cache, options=options, bar=chunk_bar
                            )
                        about_data.extend(caught)
                        payload = (start, stop, rows, lost, match, settings)
                    except ScfmbenchError as exc:
                        error = exc
                for part in exchange(payload, error, ctx):
                    if part is None:
                        continue
                    start, stop, rows, lost, match, settings = part
                    gene_match = gene_match or match
                    tokenizer = tokenizer or settings
                    dim = dim if rows is None else rows.shape[1]
                    dropped.append(lost)
                    if output is not None:
                        output.write(start, stop, rows)
                    if chunk_bar is None:
                        bar.update(stop - start)
            bar.close()
            if output is not None and output.writer is None:
                raise DataError(
                    f"no cell of {cells.path.name} has an expressed gene in the "
                    f"{model.model_id} vocabulary; check the genes (var_names or --gene-column)."
                )
            result = StreamedEmbeddings(
                out=out,
                key=key,
                n_obs=cells.n_obs,
                n_embedded=cells.n_obs - sum(len(d) for d in dropped),
                dim=dim,
                model_id=model.model_id,
                layer=options.layer or 0,
                pooling=options.pooling or "",
                checkpoint_sha256=model.checkpoint_sha256,
                chunk_size=chunk_size,
                dropped=pd.Index([name for d in dropped for name in d]),
                gene_match=gene_match,
                world_size=ctx.world_size,
                tokenizer=tokenizer,
                warnings=list(dict.fromkeys(about_data)),
            )
        except BaseException:
            if output is not None:
                output.close(None)
            raise
        if output is not None:
            output.close(result.info())
    if ctx.is_main:
        if len(result.dropped):
            logger.warning(
                "%s: %d of %d cells have no expressed vocabulary gene (NaN rows), e.g. %s",
                model.model_id,
                len(result.dropped),
                cells.n_obs,
                list(result.dropped[:3]),
            )
        logger.info("wrote %s (%d × %d)", out, cells.n_obs, dim)
    return result


__all__ = ["StreamedEmbeddings", "embed_h5ad", "embedding_info"]
