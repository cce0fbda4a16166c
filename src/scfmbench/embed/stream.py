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
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from scfmbench import errors
from scfmbench._atomic import atomic_path
from scfmbench.data.backed import H5adCells
from scfmbench.data.genes import GeneMatch
from scfmbench.data.io import (
    BUILTIN_DATASETS,
    check_h5ad_file,
    data_format,
)
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.embed.engine import (
    BatchSize,
    EmbeddingCache,
    cache_key,
    embed_tokens,
    resolve_device,
    resolve_layer_pooling,
)
from scfmbench.errors import ConfigError, DataError, ScfmbenchError
from scfmbench.models.base import FoundationModel

logger = logging.getLogger(__name__)

BACKED_THRESHOLD_BYTES = 1 << 30
"""``backed=None`` streams files larger than this (1 GiB)."""

# --------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun / accelerate (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as set by torchrun / accelerate (0 when unset)."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def distributed(device: str | None) -> Iterator[tuple[DistContext, str]]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; yield (context, device).

    gloo on CPU, nccl on GPU, where ``LOCAL_RANK`` picks the GPU. A group this call started
    is destroyed on exit.
    """
    world = env_world_size()
    if world <= 1:
        yield DistContext(), str(resolve_device(device))
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), local_rank), str(torch_device)
    finally:
        if started:
            dist.destroy_process_group()


def _exchange(payload: Any, error: ScfmbenchError | None, ctx: DistContext) -> list[Any]:
    """Every rank's payload in rank order on rank 0 (its own elsewhere); any rank's error
    is raised on all ranks."""
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return [payload]
    import torch.distributed as dist

    reports: list[Any] = [None] * ctx.world_size
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(reports, mine)
    for report in reports:
        if report is not None:
            raise getattr(errors, report[0], ScfmbenchError)(report[1])
    gathered: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered if gathered is not None else [payload]


# --------------------------------------------------------------------------------------
# Writing rows to disk
# --------------------------------------------------------------------------------------


class _NpyRows:
    """An (n_obs, dim) float32 ``.npy`` file filled chunk by chunk via small memmaps."""

    def __init__(self, path: Path, *, n_obs: int, dim: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_obs, dim))
        self.path, self.dim, self.offset = path, dim, header.offset
        del header

    def write(self, start: int, rows: np.ndarray) -> None:
        view = np.memmap(
            self.path,
            mode="r+",
            dtype=np.float32,
            offset=self.offset + start * self.dim * 4,
            shape=rows.shape,
        )
        view[:] = rows
        view.flush()
        del view

    def close(self, info: dict[str, Any] | None) -> None:
        """Nothing to add: ``.npy`` holds only the matrix."""


class _H5adRows:
    """A copy of the input ``.h5ad`` with ``obsm[key]`` written chunk by chunk (h5py)."""

    def __init__(self, path: Path, *, source: Path, n_obs: int, dim: int, key: str) -> None:
        shutil.copyfile(source, path)
        self.file = h5py.File(path, "r+")
        obsm = self.file.require_group("obsm")
        if "encoding-type" not in obsm.attrs:
            obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        if key in obsm:
            del obsm[key]
        self.key, self.dim = key, dim
        self.rows = obsm.create_dataset(
            key, shape=(n_obs, dim), dtype=np.float32, chunks=(min(max(n_obs, 1), 4096), dim)
        )
        self.rows.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def write(self, start: int, rows: np.ndarray) -> None:
        self.rows[start : start + len(rows)] = rows

    def close(self, info: dict[str, Any] | None) -> None:
        """Write ``uns['<key>_info']`` (unless ``info`` is None, after a failure) and close."""
        if info is None:
            self.file.close()
            return
        uns = self.file.require_group("uns")
        if "encoding-type" not in uns.attrs:
            uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        if f"{self.key}_info" in uns:
            del uns[f"{self.key}_info"]
        anndata.io.write_elem(uns, f"{self.key}_info", info)
        self.file.close()


# --------------------------------------------------------------------------------------
# The streaming loop
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamedEmbeddings:
    """What ``embed_h5ad`` wrote: the output file and a summary (no matrix in memory)."""

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

    def info(self) -> dict[str, Any]:
        """The ``uns['<key>_info']`` entry (as the in-memory ``embed`` writes it)."""
        return {
            "model": self.model_id,
            "layer": self.layer,
            "pooling": self.pooling,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dropped_cells": list(map(str, self.dropped)),
            "chunk_size": self.chunk_size,
        }


@contextmanager
def _quiet_repeats() -> Iterator[None]:
    """Hide the tokenizer's per-chunk log lines after the first chunk: the gene match and its
    warnings repeat the first chunk's, and cells without tokens are summed up at the end."""
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
    seed: int,
    bar: tqdm | None,
    all_layers: bool = False,
    **options: Any,
) -> tuple[np.ndarray | None, pd.Index, GeneMatch | None]:
    """Rows ``start:stop`` (NaN for cells without tokens; None when no cell has tokens),
    the dropped cells and the gene match.

    Tokenizers that draw random numbers (scGPT) seed them per cell (``seed`` and the cell's
    name), so rows do not depend on the chunk grid, the rank or the other cells.
    """
    chunk = cells.chunk(start, stop)
    with nullcontext() if start == 0 else _quiet_repeats():
        tokens = model.tokenize(chunk, seed=seed)
    if tokens.n_cells == 0:
        if bar is not None:
            bar.update(stop - start)
        return None, tokens.dropped, tokens.gene_match
    depth = options["layer"] % (model.n_layers + 1)

    def key_of(layer: int) -> str:
        return cache_key(
            model, chunk, tokens.settings, seed=seed, layer=layer, pooling=options["pooling"]
        )

    matrix = cache.get(key_of(depth), tokens.obs_names) if cache is not None else None
    if matrix is not None:
        logger.info("%s: reusing finished chunk of cells %d-%d", model.model_id, start, stop)
        if bar is not None:
            bar.update(stop - start)
    else:
        layers = list(range(model.n_layers + 1)) if all_layers else [depth]
        stacked = embed_tokens(model, tokens, bar=bar, progress=False, layers=layers, **options)
        matrix = stacked[layers.index(depth)]
        if bar is not None:
            bar.update(len(tokens.dropped))  # embed_tokens counted the embedded cells
        if cache is not None:
            for layer, rows in zip(layers, stacked, strict=True):
                cache.put(key_of(layer), rows, tokens.obs_names, {"chunk": [start, stop]})
    rows = np.full((stop - start, matrix.shape[1]), np.nan, dtype=np.float32)
    rows[chunk.obs_names.get_indexer(tokens.obs_names)] = matrix
    return rows, tokens.dropped, tokens.gene_match


def embed_h5ad(
    path: str | Path,
    model: FoundationModel,
    *,
    out: str | Path,
    layer: int | None = None,
    pooling: str | None = None,
    batch_size: BatchSize = 32,
    max_tokens: int | None = None,
    device: str | None = "cpu",
    precision: str = "float32",
    cache_dir: Path | None = None,
    chunk_size: int = 2048,
    seed: int = DEFAULT_SEED,
    key_added: str | None = None,
    progress: bool = True,
    all_layers: bool = False,
) -> StreamedEmbeddings:
    """Embed every cell of the ``.h5ad`` file ``path`` without loading it, chunk by chunk.

    Memory stays flat in the number of cells: one chunk of ``chunk_size`` cells (per rank)
    is in memory at a time. Under torchrun (``WORLD_SIZE > 1``) every rank embeds its share of
    the chunks and rank 0 writes ``out``. Results equal the in-memory ``embed`` with the same
    ``seed`` for any ``chunk_size`` and number of processes (up to float rounding from
    different batch padding).

    Args:
        path: an ``.h5ad`` file with raw counts (CSR or dense) in ``layers['counts']``, ``X`` or
            ``raw.X``.
        model: a loaded foundation model.
        out: ``.npy`` (the (n_obs, dim) matrix) or ``.h5ad`` (a copy of ``path`` plus
            ``obsm[key_added or model.obsm_key]`` and ``uns['<key>_info']``); written
            atomically, NaN rows for cells without tokens.
        cache_dir: embedding cache; every finished chunk is saved there, so a killed run
            resumes from the last finished chunk.
        chunk_size: cells read, tokenized and embedded at a time (also the unit of resume and
            of sharding between ranks).
        batch_size: cells per batch or ``"auto"`` (see :func:`embed_tokens`).
        all_layers: with a ``cache_dir``, pool every layer in the same forward pass and
            cache each chunk of each layer, so a later call for another layer (same
            pooling) reads its chunks from the cache without running the model.

    Returns:
        StreamedEmbeddings describing what was written (rank 0's view; other ranks get the
        same summary without writing).
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be ≥ 1, got {chunk_size}; e.g. --chunk-size 2048.")
    layer, pooling = resolve_layer_pooling(model, layer=layer, pooling=pooling)
    out = Path(out)
    if out.suffix not in (".npy", ".h5ad"):
        raise ConfigError(f"output {str(out)!r} must end in .npy or .h5ad; e.g. --out emb.npy.")
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
                seed=seed,
                chunk_size=chunk_size,
                progress=progress and ctx.is_main,
                options={
                    "layer": layer,
                    "pooling": pooling,
                    "batch_size": batch_size,
                    "max_tokens": max_tokens,
                    "device": device_name,
                    "precision": precision,
                    "all_layers": all_layers and cache is not None,
                },
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
    seed: int,
    chunk_size: int,
    progress: bool,
    options: dict[str, Any],
) -> StreamedEmbeddings:
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
    bar = tqdm(total=cells.n_obs, desc=f"embed {model.model_id}", unit="cell", disable=not progress)
    chunk_bar = bar if ctx.world_size == 1 else None  # else rank 0 counts the gathered chunks
    dropped: list[pd.Index] = []
    gene_match, dim = None, 0
    result: StreamedEmbeddings | None = None
    if ctx.is_main:
        _remove_leftovers(out)
    with atomic_path(out) if ctx.is_main else nullcontext() as tmp:
        output = _Output(tmp, cells, out=out, key=key) if tmp is not None else None
        try:
            for first in range(0, len(starts), ctx.world_size):
                payload, error = None, None
                if first + ctx.rank < len(starts):
                    start = starts[first + ctx.rank]
                    stop = min(start + chunk_size, cells.n_obs)
                    try:
                        rows, lost, match = _embed_chunk(
                            cells, model, start, stop, cache, seed=seed, bar=chunk_bar, **options
                        )
                        payload = (start, stop, rows, lost, match)
                    except ScfmbenchError as exc:
                        error = exc
                for part in _exchange(payload, error, ctx):
                    if part is None:
                        continue
                    start, stop, rows, lost, match = part
                    gene_match = gene_match or match
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
                layer=options["layer"],
                pooling=options["pooling"],
                checkpoint_sha256=model.checkpoint_sha256,
                chunk_size=chunk_size,
                dropped=pd.Index([name for d in dropped for name in d]),
                gene_match=gene_match,
                world_size=ctx.world_size,
            )
        finally:
            if output is not None:
                output.close(None if result is None else result.info())
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


def _remove_leftovers(out: Path) -> None:
    """Delete temporary outputs (``.<name>.*.tmp``) that a killed run left beside ``out``."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        logger.info("removing %s, left by an interrupted run", stale.name)
        stale.unlink(missing_ok=True)


class _Output:
    """Rank 0's output file, opened at the first chunk with embeddings (its width sets dim);
    chunks where no cell has tokens become NaN rows."""

    def __init__(self, tmp: Path, cells: H5adCells, *, out: Path, key: str) -> None:
        self.tmp, self.cells, self.out, self.key = tmp, cells, out, key
        self.writer: _NpyRows | _H5adRows | None = None
        self.pending: list[tuple[int, int]] = []  # token-less chunks before the writer exists

    def write(self, start: int, stop: int, rows: np.ndarray | None) -> None:
        if rows is None and self.writer is None:
            self.pending.append((start, stop))
            return
        if self.writer is None:
            n_obs, dim = self.cells.n_obs, rows.shape[1]
            if self.out.suffix == ".npy":
                self.writer = _NpyRows(self.tmp, n_obs=n_obs, dim=dim)
            else:
                self.writer = _H5adRows(
                    self.tmp, source=self.cells.path, n_obs=n_obs, dim=dim, key=self.key
                )
            for lo, hi in self.pending:
                self.writer.write(lo, np.full((hi - lo, dim), np.nan, dtype=np.float32))
        if rows is None:
            rows = np.full((stop - start, self.writer.dim), np.nan, dtype=np.float32)
        self.writer.write(start, rows)

    def close(self, info: dict[str, Any] | None) -> None:
        if self.writer is not None:
            self.writer.close(info)


def should_stream(data: Any, *, backed: bool | None) -> bool:
    """Whether ``embed_dataset`` and ``run`` stream ``data``: ``backed`` when given, else
    under torchrun or for ``.h5ad`` files larger than ``BACKED_THRESHOLD_BYTES``.

    Raises:
        ConfigError: streaming asked (or torchrun) for an in-memory AnnData or a built-in
            dataset, or ``backed=False`` under torchrun.
        DataError: the file is missing, a directory or not HDF5.
    """
    distributed_run = env_world_size() > 1
    if isinstance(data, AnnData) or str(data) in BUILTIN_DATASETS:
        if backed or distributed_run:
            raise ConfigError(
                "streaming (--backed) and torchrun read an .h5ad file chunk by chunk, got "
                f"{'an in-memory AnnData' if isinstance(data, AnnData) else repr(str(data))}; "
                "write it with adata.write_h5ad and pass the path, or drop --backed/torchrun."
            )
        return False
    path = Path(data)
    if data_format(path) == "zarr" and not backed and not distributed_run:
        return False  # zarr stores are read in memory
    path = check_h5ad_file(path)
    if backed is None:
        return distributed_run or path.stat().st_size > BACKED_THRESHOLD_BYTES
    if not backed and distributed_run:
        raise ConfigError(
            "distributed embedding (WORLD_SIZE > 1) streams the file chunk by chunk; "
            "drop --no-backed."
        )
    return backed
