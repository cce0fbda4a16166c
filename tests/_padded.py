"""The naive embedding loop, as a reference for the engine's length-sorted batching.

Every batch holds ``batch_size`` consecutive cells (input order) padded to the model's
longest input (its ``max_length`` setting, or the longest cell). The tests check that the
engine's dynamic batching gives the same embeddings; the throughput benchmarks measure how
much faster it is.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scfmbench.embed import collate, resolve_device
from scfmbench.models.base import FoundationModel, PaddedBatch, TokenizedCells

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def pad_width(model: FoundationModel, tokens: TokenizedCells) -> int:
    """Tokens every pad-to-max batch is padded to: the model's input size or the longest cell."""
    width = int(tokens.lengths.max()) if tokens.n_cells else 1
    return max(width, int(model.settings().get("max_length", width)))


def _pad(batch: PaddedBatch, width: int, *, pad_token_id: int, pad_value: float) -> PaddedBatch:
    extra = width - batch.input_ids.shape[1]
    return PaddedBatch(
        input_ids=F.pad(batch.input_ids, (0, extra), value=pad_token_id),
        attention_mask=F.pad(batch.attention_mask, (0, extra), value=False),
        values=None if batch.values is None else F.pad(batch.values, (0, extra), value=pad_value),
    )


@torch.inference_mode()
def embed_padded_to_max(
    model: FoundationModel,
    tokens: TokenizedCells,
    *,
    layer: int,
    pooling: str,
    batch_size: int,
    device: str | None = "cpu",
    precision: str = "float32",
    **_: Any,
) -> np.ndarray:
    """(n_cells, dim) float32 embeddings, batches of consecutive cells padded to the max.

    Other keyword arguments of ``embed_tokens`` (``progress``, ``max_tokens``) are accepted
    and ignored, so both loops can be called with the same options.
    """
    torch_device = resolve_device(device)
    model.network.to(torch_device).eval()
    width = pad_width(model, tokens)
    autocast: AbstractContextManager[Any] = nullcontext()
    if precision in AUTOCAST and torch_device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=AUTOCAST[precision])
    parts = []
    with autocast:
        for start in range(0, tokens.n_cells, batch_size):
            indices = np.arange(start, min(start + batch_size, tokens.n_cells))
            batch = collate(
                tokens, indices, pad_token_id=model.pad_token_id, pad_value=model.pad_value
            )
            batch = _pad(batch, width, pad_token_id=model.pad_token_id, pad_value=model.pad_value)
            pooled = model.encode(batch.to(torch_device), layer=layer, pooling=pooling)
            parts.append(pooled.float().cpu().numpy())
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts)
