"""Shared embedding engine: length-sorted dynamic batching, inference, caching, progress.

Every foundation model goes through ``embed_tokens`` / ``embed``; models only supply
``tokenize`` and ``encode``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from scfmbench._atomic import write_json, write_npy
from scfmbench.data.validate import check_unique_cells
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import ConfigError, DataError
from scfmbench.hashing import hash_array, hash_bytes, hash_file, hash_json, hash_strings
from scfmbench.models.base import Embeddings, FoundationModel, PaddedBatch, TokenizedCells

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# batch_size="auto" starts with AUTO_BATCH_SIZE cells and at most AUTO_MAX_TOKENS padded
# tokens per batch (or max_tokens when given), and halves on out-of-memory
AUTO_BATCH_SIZE = 256
AUTO_MAX_TOKENS = 65_536

BatchSize = int | Literal["auto"]
# all_layers keeps every layer's (cells, dim) float32 matrix in memory; above this it embeds
# only the requested layer (each other layer then costs its own pass)
ALL_LAYERS_MAX_BYTES = 4 * 2**30


def parse_batch_size(value: int | str) -> BatchSize:
    """``"auto"``, a positive int, or its string form (``"64"``) → ``"auto"`` or the int."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ConfigError(
            f"batch size must be a positive integer or 'auto', got {value!r}; "
            "e.g. --batch-size 32 or --batch-size auto."
        )
    return size


def _batch_at(
    order: np.ndarray,
    lengths: np.ndarray,
    start: int,
    *,
    batch_size: int,
    max_tokens: int | None,
    max_attention: int | None = None,
) -> np.ndarray:
    """The batch that starts at ``order[start]``: ≤ batch_size cells, ≤ max_tokens padded
    tokens, ≤ max_attention attention scores per head (cells × longest²)."""
    longest = max(int(lengths[order[start]]), 1)
    size = batch_size
    if max_tokens is not None:
        size = max(1, min(size, max_tokens // longest))
    if max_attention is not None:
        size = max(1, min(size, max_attention // longest**2))
    return order[start : start + size]


def length_sorted_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    max_tokens: int | None = None,
    max_attention: int | None = None,
) -> list[np.ndarray]:
    """Group cell indices into batches of similar length, longest first.

    A batch holds at most ``batch_size`` cells and, if given, at most ``max_tokens``
    padded tokens (``len(batch) * longest``) and ``max_attention`` attention scores per
    head (``len(batch) * longest²``, what attention memory grows with). Sorting is stable,
    so equal lengths keep input order and the batching is deterministic.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}.")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        batch = _batch_at(
            order,
            lengths,
            start,
            batch_size=batch_size,
            max_tokens=max_tokens,
            max_attention=max_attention,
        )
        batches.append(batch)
        start += len(batch)
    return batches


def collate(
    tokens: TokenizedCells,
    indices: np.ndarray,
    *,
    pad_token_id: int,
    pad_value: float = 0.0,
    pad_to: int | None = None,
) -> PaddedBatch:
    """Pad the cells ``indices`` to their longest sequence (or to ``pad_to``)."""
    lengths = tokens.lengths[indices]
    width = int(pad_to if pad_to is not None else max(int(lengths.max()), 1))
    ids = np.full((len(indices), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=bool)
    values = None
    if tokens.values is not None:
        values = np.full((len(indices), width), pad_value, dtype=np.float32)
    for row, cell in enumerate(indices):
        lo, hi = tokens.offsets[cell], tokens.offsets[cell + 1]
        n = hi - lo
        ids[row, :n] = tokens.input_ids[lo:hi]
        mask[row, :n] = True
        if values is not None:
            values[row, :n] = tokens.values[lo:hi]
    return PaddedBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        values=None if values is None else torch.from_numpy(values),
    )


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for RuntimeErrors saying "out of memory"."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@torch.inference_mode()
def embed_tokens(
    model: FoundationModel,
    tokens: TokenizedCells,
    *,
    layer: int,
    pooling: str,
    batch_size: BatchSize = 32,
    max_tokens: int | None = None,
    device: str | None = "cpu",
    precision: str = "float32",
    pad_to_max: bool = False,
    out: np.ndarray | None = None,
    progress: bool = True,
    bar: tqdm | None = None,
    layers: Sequence[int] | None = None,
) -> np.ndarray:
    """Embed every tokenized cell; rows come back in input order.

    Returns (n_cells, dim) float32 for ``layer``, or, with ``layers``, (len(layers),
    n_cells, dim): every listed layer pooled from the same single forward pass per batch
    (``layer`` is then ignored).

    Args:
        batch_size: cells per batch, or ``"auto"``: start at ``AUTO_BATCH_SIZE`` cells (at
            most ``max_tokens`` or ``AUTO_MAX_TOKENS`` padded tokens) and, when a batch runs
            out of memory, halve the batch size and retry it; only a single cell that does
            not fit raises.
        pad_to_max: pad every batch to the model's longest input, in input order (the naive
            strategy, kept for benchmarks).
        out: optional preallocated (n_cells, dim) array (with ``layers``: (len(layers),
            n_cells, dim)), e.g. an ``np.memmap`` to stream results to disk.
        bar: an outer progress bar to advance instead of opening a new one.
    """
    batch_size = parse_batch_size(batch_size)
    auto = batch_size == "auto"
    if auto:
        batch_size = AUTO_BATCH_SIZE
        max_tokens = AUTO_MAX_TOKENS if max_tokens is None else max_tokens
    torch_device = resolve_device(device)
    network = model.network.to(torch_device).eval()
    lengths = tokens.lengths
    if pad_to_max:
        order = np.arange(tokens.n_cells)
        pad_to = int(lengths.max()) if tokens.n_cells else 1
        pad_to = max(pad_to, int(model.settings().get("max_length", pad_to)))
    else:
        order = np.argsort(-lengths, kind="stable")
        pad_to = None
    autocast = nullcontext()
    if precision in AUTOCAST_DTYPES and torch_device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
    elif precision not in ("float32", *AUTOCAST_DTYPES):
        raise ConfigError(f"unknown precision {precision!r}; choose float32, bfloat16 or float16.")
    own_bar = bar is None
    if own_bar:
        bar = tqdm(
            total=tokens.n_cells, desc=f"embed {model.model_id}", unit="cell", disable=not progress
        )
    start = 0
    with autocast:
        while start < len(order):
            if pad_to_max:
                indices = order[start : start + batch_size]
            else:
                indices = _batch_at(
                    order, lengths, start, batch_size=batch_size, max_tokens=max_tokens
                )
            try:
                pooled = _encode(
                    model, tokens, indices, layers or [layer], pooling, pad_to, torch_device
                )
            except RuntimeError as exc:
                if not (auto and is_out_of_memory(exc)):
                    raise
                batch_size = _halve_batch(model, tokens, indices, torch_device)
                continue
            if out is None:
                out = np.zeros((len(pooled), tokens.n_cells, pooled.shape[2]), dtype=np.float32)
                out = out if layers is not None else out[0]
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


def _encode(
    model: FoundationModel,
    tokens: TokenizedCells,
    indices: np.ndarray,
    layers: Sequence[int],
    pooling: str,
    pad_to: int | None,
    device: torch.device,
) -> np.ndarray:
    """Pooled float32 embeddings (len(layers), B, dim) of the cells ``indices`` (one batch)."""
    batch = collate(
        tokens, indices, pad_token_id=model.pad_token_id, pad_value=model.pad_value, pad_to=pad_to
    ).to(device)
    if len(layers) == 1:
        pooled = model.encode(batch, layer=layers[0], pooling=pooling)[None]
    else:
        pooled = model.encode_layers(batch, layers=layers, pooling=pooling)
    return pooled.float().cpu().numpy()


def _halve_batch(
    model: FoundationModel, tokens: TokenizedCells, indices: np.ndarray, device: torch.device
) -> int:
    """After an out-of-memory batch: free the cache and return the next (halved) batch size."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if len(indices) == 1:
        n_tokens = int(tokens.lengths[indices[0]])
        raise ConfigError(
            f"{model.model_id}: one cell ({tokens.obs_names[indices[0]]!r}, {n_tokens} tokens) "
            f"alone runs out of memory on {device}; use a device with more memory, "
            "--precision bfloat16, or a shorter max_seq_len (--option max_seq_len=…)."
        )
    size = len(indices) // 2
    logger.warning(
        "%s: out of memory with %d cells per batch on %s; retrying with %d",
        model.model_id,
        len(indices),
        device,
        size,
    )
    return size


_WRITTEN_HERE: dict[Path, int] = {}
"""Cache entries written by this process: entry path → number of layers in the pass that
wrote it (so a reuse can say whether it comes from this run or from an earlier one)."""


class EmbeddingCache:
    """Embeddings on disk under a content key; entries carry a checksum and are verified."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def written_here(self, key: str) -> int | None:
        """Layers of the pass in this process that wrote ``key`` (None: an earlier process)."""
        return _WRITTEN_HERE.get(self._paths(key)[0].resolve())

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def get(self, key: str, obs_names: pd.Index) -> np.ndarray | None:
        array_path, meta_path = self._paths(key)
        if not (array_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != hash_file(array_path):
                raise ValueError("checksum mismatch")
            if meta.get("obs_hash") != hash_strings(obs_names):
                raise ValueError("cells differ")
            return np.load(array_path, allow_pickle=False)
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            logger.warning("embedding cache entry %s is unusable (%s); recomputing", key[:12], exc)
            return None

    def drop_parts(self, key: str) -> None:
        """Remove the chunk files of ``key`` once the whole entry is saved."""
        for path in self.root.glob(f"{key}.part*"):
            path.unlink(missing_ok=True)

    def put(
        self, key: str, matrix: np.ndarray, obs_names: pd.Index, info: dict, *, n_layers: int = 1
    ) -> None:
        """Save ``matrix`` under ``key``; ``n_layers``: layers of the pass that computed it."""
        array_path, meta_path = self._paths(key)
        write_npy(array_path, matrix)
        meta = {"sha256": hash_file(array_path), "obs_hash": hash_strings(obs_names), **info}
        write_json(meta_path, meta)
        _WRITTEN_HERE[array_path.resolve()] = n_layers


def _log_reuse(model_id: str, layer: int, pooling: str, n_layers: int | None, key: str) -> None:
    """Say where a cached embedding comes from: this process's pass, or an earlier run."""
    what = f"layer {layer} ({pooling} pooling)"
    if n_layers is None:
        message = f"{what} loaded from cache (computed by an earlier run)"
    else:
        source = "this run's all-layer pass" if n_layers > 1 else "an earlier pass in this process"
        message = f"reusing {what} from {source}"
    logger.info("%s: %s (%s)", model_id, message, key[:12])


def slice_tokens(tokens: TokenizedCells, start: int, stop: int) -> TokenizedCells:
    """Cells ``start:stop`` of a TokenizedCells, offsets rebased to 0."""
    lo, hi = int(tokens.offsets[start]), int(tokens.offsets[stop])
    return TokenizedCells(
        input_ids=tokens.input_ids[lo:hi],
        offsets=tokens.offsets[start : stop + 1] - lo,
        obs_names=tokens.obs_names[start:stop],
        settings=tokens.settings,
        values=None if tokens.values is None else tokens.values[lo:hi],
    )


def _embed_in_chunks(
    model,
    tokens: TokenizedCells,
    cache: EmbeddingCache | None,
    key: str,
    *,
    chunk_size: int,
    progress: bool,
    **options,
) -> np.ndarray:
    """Embed chunk by chunk, reusing chunks a previous (interrupted) call already saved."""
    if cache is None or tokens.n_cells <= chunk_size:
        return embed_tokens(model, tokens, progress=progress, **options)
    axis = 0 if options.get("layers") is None else 1
    bar = tqdm(
        total=tokens.n_cells, desc=f"embed {model.model_id}", unit="cell", disable=not progress
    )
    parts = []
    for start in range(0, tokens.n_cells, chunk_size):
        stop = min(start + chunk_size, tokens.n_cells)
        chunk = slice_tokens(tokens, start, stop)
        part_key = f"{key}.part{start:09d}-{stop:09d}"
        matrix = cache.get(part_key, chunk.obs_names)
        if matrix is not None:
            logger.info("%s: reusing finished chunk of cells %d-%d", model.model_id, start, stop)
        if matrix is None:
            matrix = embed_tokens(model, chunk, bar=bar, **options)
            cache.put(part_key, matrix, chunk.obs_names, {"part_of": key})
        else:
            bar.update(stop - start)
        parts.append(matrix)
    bar.close()
    return np.concatenate(parts, axis=axis)


def cache_key(model: FoundationModel, adata: AnnData, tokens_settings: dict, **options) -> str:
    """Key = model (checkpoint hash) + data hash + tokenizer settings + layer/pooling/…"""
    data_hash = hash_bytes(
        hash_array(adata.X).encode(),
        hash_strings(adata.obs_names).encode(),
        hash_strings(adata.var_names).encode(),
    )
    return hash_json(
        {"model": model.settings(), "data": data_hash, "tokenizer": tokens_settings, **options}
    )


def resolve_layer_pooling(
    model: FoundationModel, *, layer: int | None, pooling: str | None
) -> tuple[int, str]:
    """The model's defaults for ``None``; ConfigError for a layer or pooling it lacks."""
    layer = model.default_layer if layer is None else layer
    pooling = pooling or model.default_pooling
    if not 0 <= layer <= model.n_layers and not -model.n_layers - 1 <= layer < 0:
        raise ConfigError(
            f"layer {layer} is out of range for {model.model_id} ({model.n_layers} layers); "
            f"choose 0..{model.n_layers} or a negative index."
        )
    if pooling not in model.poolings:
        raise ConfigError(
            f"pooling {pooling!r} is not available for {model.name}; choose from {model.poolings}."
        )
    return layer, pooling


def require_cells(tokens: TokenizedCells, model: FoundationModel, *, n_obs: int) -> None:
    """DataError when the tokenizer kept no cell (nothing would be embedded)."""
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
    layer: int | None = None,
    pooling: str | None = None,
    batch_size: BatchSize = 32,
    max_tokens: int | None = None,
    device: str | None = "cpu",
    precision: str = "float32",
    cache_dir: Path | None = None,
    seed: int = DEFAULT_SEED,
    key_added: str | None = None,
    progress: bool = True,
    chunk_size: int = 2048,
    tokens: TokenizedCells | None = None,
    all_layers: bool = False,
) -> Embeddings:
    """Tokenize and embed ``adata`` (raw counts in ``X``) with ``model``.

    With ``all_layers``, the same forward pass pools every layer (0 … ``n_layers``) and,
    with a ``cache_dir``, stores each under the key a single-layer call for that layer
    (and pooling) looks up, so later layers come from the cache without another pass.

    With a ``cache_dir``, cells are embedded in chunks of ``chunk_size`` and every finished
    chunk is saved (checksummed) at once, so an interrupted run resumes from the last
    finished chunk. Pass ``tokens`` (from ``model.tokenize(adata, seed=seed)``) to skip
    tokenizing again, e.g. when embedding several layers.

    Returns:
        Embeddings for the kept cells. Also writes ``adata.obsm[key_added or model.obsm_key]``
        of shape (n_obs, dim); cells the tokenizer dropped get NaN rows.
    """
    layer, pooling = resolve_layer_pooling(model, layer=layer, pooling=pooling)
    check_unique_cells(adata.obs_names, where="the data")
    if tokens is None:
        tokens = model.tokenize(adata, seed=seed)
    require_cells(tokens, model, n_obs=adata.n_obs)
    depth = layer % (model.n_layers + 1)

    def key_of(**what) -> str:
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
            model,
            tokens,
            cache,
            pass_key,
            chunk_size=chunk_size,
            layer=depth,
            layers=layers,
            pooling=pooling,
            batch_size=batch_size,
            max_tokens=max_tokens,
            device=device,
            precision=precision,
            progress=progress,
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
    else:
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
    )
