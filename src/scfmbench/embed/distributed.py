"""Devices and ``torchrun``.

The device to embed on, this process's place in a ``torchrun`` job, and the exchange of
chunk results between ranks (rank 0 gathers; an error on any rank is raised on all).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from scfmbench import errors
from scfmbench.embed.launch import env_world_size
from scfmbench.embed.options import check_device
from scfmbench.errors import ConfigError, ScfmbenchError


def resolve_device(device: str | None) -> torch.device:
    """Return the torch device of a ``device`` setting.

    Parameters
    ----------
    device : str or None
        ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or None (both: CUDA when available).

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ConfigError
        Not a device setting, or a GPU this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_device = torch.device(check_device(device))
    if torch_device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (torch_device.index or 0) >= count:
            found = f"{count} CUDA GPU{'s' if count != 1 else ''}"
            raise ConfigError(
                f"device {device!r}: this machine's PyTorch sees {found}; use --device cpu "
                "or auto" + (f", or cuda:0 … cuda:{count - 1}." if count else ".")
            )
    return torch_device


@dataclass(frozen=True)
class DistContext:
    """A process's place in a ``torchrun`` job (rank 0 of 1 when not distributed).

    Attributes
    ----------
    rank : int, default 0
        Global rank.
    world_size : int, default 1
        Number of processes.
    local_rank : int, default 0
        Rank on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (which writes the output)."""
        return self.rank == 0


@contextmanager
def distributed(device: str | None) -> Iterator[tuple[DistContext, str]]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; yield (context, device).

    gloo on CPU, nccl on GPU, where ``LOCAL_RANK`` picks the GPU. A group this call started
    is destroyed on exit.

    Parameters
    ----------
    device : str or None
        The device setting (see :func:`resolve_device`).

    Yields
    ------
    tuple of (DistContext, str)
        This process's context and the device it embeds on (e.g. ``cuda:1``).
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


def exchange(payload: Any, error: ScfmbenchError | None, ctx: DistContext) -> list[Any]:
    """Gather every rank's payload on rank 0; raise any rank's error on all ranks.

    Parameters
    ----------
    payload : Any
        This rank's result (picklable), or None.
    error : ScfmbenchError or None
        This rank's error, if it failed.
    ctx : DistContext
        This process's context.

    Returns
    -------
    list
        Every rank's payload in rank order on rank 0; ``[payload]`` elsewhere.

    Raises
    ------
    ScfmbenchError
        The error of any rank (re-created by class name on the other ranks).
    """
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
