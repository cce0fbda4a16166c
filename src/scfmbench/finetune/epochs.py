"""The epochs of fine-tuning.

The cells of each set, the data order of an epoch, one epoch of (data-parallel) training,
batched evaluation and the early-stopping state.

Data parallelism: ``batch_size`` is the *global* batch. Every process takes an interleaved
share of each global batch and its loss is the sum over its cells divided by the total
weight of the global batch (times the number of processes, which cancels DDP's gradient
averaging), so the gradient equals the single-process one up to float rounding.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from scfmbench.config import FinetuneConfig
from scfmbench.embed import collate, length_sorted_batches
from scfmbench.errors import SplitError
from scfmbench.finetune.model import Classifier
from scfmbench.models.base import FoundationModel, TokenizedCells


@dataclass
class CellSet:
    """Token positions and class codes of one set (train, val or test).

    Attributes
    ----------
    positions : numpy.ndarray
        Rows of the TokenizedCells, shape (n,).
    codes : numpy.ndarray
        Class index per row, shape (n,).
    names : pandas.Index
        Cell names, same order.
    missing : pandas.Index
        Cells of the set that the tokenizer dropped.
    """

    positions: np.ndarray
    codes: np.ndarray
    names: pd.Index
    missing: pd.Index


def cell_set(
    tokens: TokenizedCells, labels: pd.Series, names: pd.Index, classes: list[str], set_name: str
) -> CellSet:
    """Find the tokenized cells of one set of a split and their class codes.

    Parameters
    ----------
    tokens : TokenizedCells
        The tokenized cells of the split.
    labels : pandas.Series
        Cell-type label per cell name.
    names : pandas.Index
        The set's cell names.
    classes : list of str
        Class names; a cell's code is its label's position here.
    set_name : str
        ``train``, ``val`` or ``test`` (for the error message).

    Returns
    -------
    CellSet
        The set's kept cells (in ``names`` order) and the cells the tokenizer dropped.

    Raises
    ------
    SplitError
        A cell of the set is not in the data (the split belongs to other data).
    """
    unknown = names.difference(labels.index)
    if len(unknown):
        raise SplitError(
            f"{len(unknown)} {set_name} cells of the split (e.g. {unknown[0]!r}) are not in the "
            "data; the split belongs to other data — remake the splits for this dataset."
        )
    where = tokens.obs_names.get_indexer(names)
    kept = names[where >= 0]
    code_of = {c: i for i, c in enumerate(classes)}
    codes = labels.loc[kept].astype(str).map(code_of).to_numpy(dtype=np.int64)
    return CellSet(
        positions=where[where >= 0].astype(np.int64),
        codes=codes,
        names=kept,
        missing=names[where < 0],
    )


def epoch_batches(
    lengths: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    max_tokens: int | None = None,
    max_attention: int | None = None,
) -> list[np.ndarray]:
    """Training batches of one epoch: cells shuffled, grouped by similar length, batches shuffled.

    A batch holds at most ``batch_size`` cells and, if given, ``max_tokens`` padded tokens
    (cells × its longest cell) and ``max_attention`` attention scores per head (cells ×
    longest²), so a batch of long cells is smaller and memory per step is bounded by the
    budgets, not by the longest cells. The batch with the longest cells comes
    first (out-of-memory shows at once, and the allocator's high-water mark is set by the
    first step). Depends only on ``seed`` and ``epoch``, so a resumed run sees the same data
    order.

    Parameters
    ----------
    lengths, batch_size, max_tokens, max_attention
        As for :func:`scfmbench.embed.length_sorted_batches`.
    seed : int
        Seed of the shuffles.
    epoch : int
        Epoch number (1-based); each epoch has its own order.

    Returns
    -------
    list of numpy.ndarray
        Cell indices of each batch, in training order.
    """
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(lengths))
    batches = length_sorted_batches(
        lengths[shuffled], batch_size=batch_size, max_tokens=max_tokens, max_attention=max_attention
    )
    order = [0, *(1 + rng.permutation(len(batches) - 1))] if batches else []
    return [shuffled[batches[i]] for i in order]


@dataclass
class LoopState:
    """Epoch counter, history and early-stopping state (saved in the checkpoint).

    Attributes
    ----------
    epoch : int
        Last finished epoch (0 before the first).
    history : list of dict
        One record per epoch: epoch, train_loss, val_loss, val_macro_f1, val_accuracy.
    best_epoch : int
        The epoch with the highest validation macro F1 (ties: lower validation loss).
    best_f1, best_loss : float
        Validation macro F1 and loss of the best epoch.
    bad_epochs : int
        Epochs since validation macro F1 last rose.
    stopped : bool
        Whether early stopping ended training.
    """

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_f1: float = -1.0
    best_loss: float = float("inf")
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, record: dict[str, float], *, patience: int | None) -> None:
        """Record an epoch and update the best epoch and early stopping.

        The best epoch has the highest validation macro F1, ties broken by the lower
        validation loss (the test cells are never looked at). Patience counts the epochs
        since validation macro F1 last rose.

        Parameters
        ----------
        record : dict
            The epoch's record (``epoch``, ``val_macro_f1``, ``val_loss``, ...).
        patience : int or None
            Stop after this many epochs without a rise; None never stops early.
        """
        self.epoch = int(record["epoch"])
        self.history.append(record)
        f1, loss = record["val_macro_f1"], record["val_loss"]
        self.bad_epochs = 0 if f1 > self.best_f1 else self.bad_epochs + 1
        if f1 > self.best_f1 or (f1 == self.best_f1 and loss < self.best_loss):
            self.best_f1, self.best_loss, self.best_epoch = f1, loss, self.epoch
        self.stopped = patience is not None and self.bad_epochs >= patience

    def to_dict(self) -> dict[str, Any]:
        """Return the state as a plain dict (for the checkpoint).

        Returns
        -------
        dict
            Every field by name.
        """
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        """Restore the state saved by ``to_dict`` (missing fields take their defaults).

        Parameters
        ----------
        values : dict
            A ``to_dict`` result.

        Returns
        -------
        LoopState
            The restored state.
        """
        return cls(**values)


@dataclass
class Trainer:
    """One epoch of training and batched evaluation, on every process.

    Attributes
    ----------
    accelerator : accelerate.Accelerator
        The process's Accelerate handle.
    prepared : torch.nn.Module
        ``module`` as prepared by Accelerate (DDP-wrapped when distributed).
    module : Classifier
        The unwrapped network + head.
    optimizer, scheduler
        The prepared optimizer and its learning-rate schedule.
    tokens : TokenizedCells
        The tokenized cells of the split.
    model : FoundationModel
        The model being trained (pad token and value).
    config : FinetuneConfig
        Fine-tuning options.
    weights : torch.Tensor
        Loss weight per class, shape (n_classes,).
    """

    accelerator: Any
    prepared: torch.nn.Module
    module: Classifier
    optimizer: Any
    scheduler: Any
    tokens: TokenizedCells
    model: FoundationModel
    config: FinetuneConfig
    weights: torch.Tensor

    def _inputs(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        batch = collate(
            self.tokens,
            positions,
            pad_token_id=self.model.pad_token_id,
            pad_value=self.model.pad_value,
        ).to(self.accelerator.device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.values is not None:
            inputs["values"] = batch.values
        return inputs

    def train_epoch(self, cells: CellSet, *, epoch: int, bar: tqdm) -> float:
        """Train one epoch.

        Parameters
        ----------
        cells : CellSet
            The training cells.
        epoch : int
            Epoch number (1-based): seeds the data order and torch's generator.
        bar : tqdm
            Progress bar advanced by one per global batch.

        Returns
        -------
        float
            The (class-weighted) mean training loss over every process's cells.
        """
        acc, config = self.accelerator, self.config
        rank, world = acc.process_index, acc.num_processes
        torch.manual_seed(config.seed * 100_003 + epoch * 1_009 + rank)
        batches = epoch_batches(
            self.tokens.lengths[cells.positions],
            batch_size=config.batch_size,
            seed=config.seed,
            epoch=epoch,
            max_tokens=config.max_tokens,
            max_attention=config.max_attention,
        )
        weights = self.weights.to(acc.device)
        codes = torch.as_tensor(cells.codes, device=acc.device)
        batch_weight = [float(self.weights[cells.codes[b]].sum()) for b in batches]
        accum = config.gradient_accumulation_steps
        self.prepared.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for step, rows in enumerate(batches):
            group = slice(step - step % accum, min(step - step % accum + accum, len(batches)))
            denominator = sum(batch_weight[group])
            local = rows[rank::world]
            scale = 1.0
            if len(local) == 0:  # every process must join DDP's all-reduce
                local, scale = rows[:1], 0.0
            sync = step % accum == accum - 1 or step == len(batches) - 1
            with nullcontext() if sync else acc.no_sync(self.prepared):
                logits = self.prepared(**self._inputs(cells.positions[local])).float()
                y = codes[local]
                per_cell = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                weighted = (per_cell * weights[y]).sum()
                acc.backward(weighted * (scale * world / denominator))
            loss_sum += torch.stack([weighted.detach(), weights[y].sum()]).double() * scale
            if sync:
                if config.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.module.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % 10 == 0:  # .item() waits for the GPU; do it rarely
                bar.set_postfix(
                    epoch=epoch, loss=f"{weighted.item() / max(len(local), 1):.4f}", refresh=False
                )
        total = acc.reduce(loss_sum, reduction="sum")
        return float(total[0] / total[1])

    @torch.no_grad()
    def evaluate(self, cells: CellSet) -> tuple[float, np.ndarray]:
        """Score ``cells`` in batches of ``eval_batch_size``.

        Parameters
        ----------
        cells : CellSet
            The cells to score.

        Returns
        -------
        tuple of (float, numpy.ndarray)
            The class-weighted mean loss (NaN for no weight) and the predicted class code
            of every cell, shape (n,), in the order of ``cells``.
        """
        self.module.eval()
        acc = self.accelerator
        pred = np.zeros(len(cells.positions), dtype=np.int64)
        loss, weight = 0.0, 0.0
        batches = length_sorted_batches(
            self.tokens.lengths[cells.positions],
            batch_size=self.config.eval_batch_size,
            max_tokens=self.config.max_tokens,
            max_attention=self.config.max_attention,
        )
        with acc.autocast():
            for rows in batches:
                logits = self.module(**self._inputs(cells.positions[rows])).float()
                y = torch.as_tensor(cells.codes[rows], device=acc.device)
                w = self.weights.to(acc.device)[y]
                per_cell = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                loss += float((per_cell * w).sum())
                weight += float(w.sum())
                pred[rows] = logits.argmax(1).cpu().numpy()
        return (loss / weight if weight else float("nan")), pred
