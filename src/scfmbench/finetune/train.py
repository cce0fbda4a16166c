"""Fine-tuning engine: one Hugging Face Accelerate training loop for every FoundationModel.

The same code runs on one CPU, one GPU or several processes (``accelerate launch`` /
``torchrun``, DDP). It trains ``model.encode`` + ``model.make_classifier_head`` on the
split's train cells, picks the best epoch on validation macro F1 and reports on test.

Determinism: the data order of an epoch depends only on ``seed`` and the epoch, and every
epoch reseeds torch from (seed, epoch, process), so a run resumed from its last checkpoint
ends with the same result as an uninterrupted one.

Data parallelism: ``batch_size`` is the *global* batch. Every process takes an interleaved
share of each global batch and its loss is the sum over its cells divided by the total
weight of the global batch (times the number of processes, which cancels DDP's gradient
averaging), so the gradient equals the single-process one up to float rounding.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from scfmbench._atomic import atomic_path, write_json
from scfmbench.config import FinetuneConfig
from scfmbench.data.splits import Split
from scfmbench.data.validate import ValidatedData, validate
from scfmbench.embed.engine import collate, length_sorted_batches
from scfmbench.errors import CheckpointError, ConfigError, SplitError
from scfmbench.evaluation.metrics import ClassificationMetrics, classification_metrics
from scfmbench.hashing import hash_json, hash_strings
from scfmbench.models.base import FoundationModel, PaddedBatch, TokenizedCells

logger = logging.getLogger(__name__)

UNASSIGNED = "<unassigned>"
CHECKPOINT_FILE = "checkpoint/last.pt"
BEST_DIR = "best"


@dataclass
class FinetuneResult:
    """What ``finetune`` returns; ``to_dict()`` goes to ``metrics.json["finetune"][model_id]``."""

    model_id: str
    kind: str  # "finetuned", or "control" for a random-init model
    split_seed: int
    classes: list[str]
    epochs: list[dict[str, float]]  # {epoch, train_loss, val_loss, val_macro_f1, val_accuracy}
    best_epoch: int
    stopped_early: bool
    test: ClassificationMetrics
    test_cells: list[str]
    test_pred: list[str]
    n_unassigned: int
    n_trainable_params: int
    n_params: int
    config: FinetuneConfig
    out_dir: Path
    elapsed_s: float
    resumed_from_epoch: int = 0
    n_processes: int = 1
    train_s: float = 0.0  # seconds spent in training steps by this call (not evaluation)
    train_steps: int = 0  # micro-steps (global batches) run by this call
    figures: dict[str, str] = field(default_factory=dict)
    # the fine-tuned copy (best epoch; embeds through ``embed``) and its head, in memory
    model: FoundationModel | None = field(default=None, repr=False)
    head: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def method_name(self) -> str:
        return f"{self.model_id}+finetuned"

    @property
    def best_dir(self) -> Path:
        """``model/`` (the model's own format, LoRA merged), ``head.pt``, ``finetune.json``."""
        return self.out_dir / BEST_DIR

    @property
    def best_val_macro_f1(self) -> float:
        return next(e["val_macro_f1"] for e in self.epochs if e["epoch"] == self.best_epoch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "split_seed": self.split_seed,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_macro_f1": self.best_val_macro_f1,
            "stopped_early": self.stopped_early,
            "test": self.test.to_dict(),
            "n_unassigned": self.n_unassigned,
            "n_trainable_params": self.n_trainable_params,
            "n_params": self.n_params,
            "config": self.config.model_dump(mode="json"),
            "best_dir": str(self.best_dir),
            "figures": self.figures,
            "elapsed_s": round(self.elapsed_s, 3),
            "resumed_from_epoch": self.resumed_from_epoch,
            "n_processes": self.n_processes,
            "train_s": round(self.train_s, 3),
            "train_steps": self.train_steps,
        }

    def prediction_payload(self) -> dict[str, Any]:
        """Test predictions in the shape ``pipeline`` stores per method and split."""
        return {
            "cells": self.test_cells,
            "pred": self.test_pred,
            "params": {"best_epoch": self.best_epoch, **self.config.fingerprint()},
            "val_macro_f1": self.best_val_macro_f1,
            "n_unassigned": self.n_unassigned,
            "features": {"finetuned": True},
        }


class _Classifier(torch.nn.Module):
    """Network + head as one module, so DDP and Accelerate see every trained parameter."""

    def __init__(
        self, model: FoundationModel, head: torch.nn.Module, *, layer: int, pooling: str
    ) -> None:
        super().__init__()
        self.fm = model  # plain attribute: its network is registered below
        self.network = model.network
        self.head = head
        self.layer = layer
        self.pooling = pooling

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = PaddedBatch(input_ids=input_ids, attention_mask=attention_mask, values=values)
        pooled = self.fm.encode(batch, layer=self.layer, pooling=self.pooling)
        return self.head(pooled.to(next(self.head.parameters()).dtype))


@dataclass
class _Cells:
    """Token positions and class codes of one set (train, val or test)."""

    positions: np.ndarray  # rows of the TokenizedCells
    codes: np.ndarray  # class index per row
    names: pd.Index  # cell names, same order
    missing: pd.Index  # cells of the set that the tokenizer dropped


def finetune(
    data: AnnData | ValidatedData,
    model: FoundationModel,
    split: Split,
    *,
    config: FinetuneConfig | None = None,
    out_dir: Path,
    labels: pd.Series | None = None,
    label_key: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` with a classification head on ``split`` and score it on test.

    Args:
        data: ValidatedData; or an AnnData with raw counts in ``X``, validated here with
            ``label_key`` unless its cell-type ``labels`` (indexed by cell) are given, in
            which case it is taken as already validated.
        model: any FoundationModel; a ``random_init`` model is trained the same way and
            labelled as the control. It is not modified: training runs on a copy, returned
            as ``result.model`` with the best epoch's weights and a new checkpoint hash.
        split: the run's saved split; train trains, val picks the best epoch, test scores.
        config: options (defaults: 3 epochs, lr 5e-5, seed 42).
        out_dir: folder for ``checkpoint/last.pt``, ``best/``, ``learning_curve.png`` and
            ``result.json``.
        resume: continue from ``out_dir/checkpoint/last.pt`` when it exists.
        on_epoch_end: called on every process with each epoch's record, after the
            checkpoint is written.

    Returns:
        FinetuneResult with per-epoch losses and val metrics, the best epoch and the test
        metrics of the best epoch's model.

    Raises:
        ConfigError: an option the model does not support (LoRA targets, layers to freeze).
        CheckpointError: ``resume`` with a checkpoint made by a different configuration.
    """
    started = time.perf_counter()
    config = config or FinetuneConfig()
    out_dir = Path(out_dir)
    original = model
    model = _cpu_copy(original, original.network)  # the caller's model stays untouched
    adata, labels = _data_and_labels(data, labels, label_key)
    classes = [str(c) for c in labels.cat.categories]
    tokens = model.tokenize(_split_cells(adata, split), seed=config.seed)
    sets = {
        name: _cells(tokens, labels, getattr(split, name), classes, name)
        for name in ("train", "val", "test")
    }
    layer, pooling = _resolve_layer(model, config)

    accelerator = _accelerator(config)
    _seed_everything(config.seed)
    head = model.make_classifier_head(len(classes))
    tuner = _apply_trainability(model, config)
    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model.network)
    module = _Classifier(model, head, layer=layer, pooling=pooling)
    weights = _class_weights(sets["train"].codes, len(classes), balanced=config.class_weighted)
    train_batches_per_epoch = len(
        length_sorted_batches(
            tokens.lengths[sets["train"].positions],
            batch_size=config.batch_size,
            max_tokens=config.max_tokens,
            max_attention=config.max_attention,
        )
    )
    steps_per_epoch = math.ceil(train_batches_per_epoch / config.gradient_accumulation_steps)
    optimizer = _optimizer(module, config)
    scheduler = _scheduler(optimizer, config, total_steps=steps_per_epoch * config.epochs)
    fingerprint = _fingerprint(config, model, sets, classes, layer, pooling)

    state = _load_checkpoint(out_dir, fingerprint) if resume else None
    if state is not None:
        module.network.load_state_dict(state["network"])
        module.head.load_state_dict(state["head"])
    prepared, optimizer = accelerator.prepare(module, optimizer)
    trainer = _Trainer(
        accelerator=accelerator,
        prepared=prepared,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        tokens=tokens,
        model=model,
        config=config,
        weights=weights,
    )
    loop = _LoopState()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        loop = _LoopState.from_dict(state["loop"])
        logger.info("%s: resuming after epoch %d", model.model_id, loop.epoch)
    resumed_from = loop.epoch
    train_s, train_steps, last_trained = 0.0, 0, None

    trainable, total = _count_parameters(module)
    logger.info(
        "%s: fine-tuning %d of %d parameters on %d cells (%d processes, %s)",
        model.model_id,
        trainable,
        total,
        len(sets["train"].positions),
        accelerator.num_processes,
        accelerator.device,
    )
    bar = tqdm(
        total=train_batches_per_epoch * config.epochs,
        initial=train_batches_per_epoch * loop.epoch,
        desc=f"finetune {model.model_id}",
        unit="step",
        disable=not (progress and accelerator.is_local_main_process),
    )
    for epoch in range(loop.epoch + 1, config.epochs + 1):
        if loop.stopped:
            break
        tick = time.perf_counter()
        train_loss = trainer.train_epoch(sets["train"], epoch=epoch, bar=bar)
        train_s += time.perf_counter() - tick
        train_steps += train_batches_per_epoch
        last_trained = epoch
        val_loss, val_pred = trainer.evaluate(sets["val"])
        scores = classification_metrics(
            np.asarray(classes)[sets["val"].codes], np.asarray(classes)[val_pred], classes=classes
        )
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_macro_f1": scores.macro_f1,
            "val_accuracy": scores.accuracy,
        }
        loop.update(record, patience=config.patience)
        logger.info(
            "%s epoch %d: train loss %.4f, val loss %.4f, val macro F1 %.4f",
            model.model_id,
            epoch,
            train_loss,
            val_loss,
            scores.macro_f1,
        )
        if accelerator.is_main_process:
            if loop.best_epoch == epoch:
                _save_best(out_dir / BEST_DIR, model, module, tuner, classes, record, config)
            _save_checkpoint(out_dir, module, optimizer, scheduler, loop, fingerprint)
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(record)
    bar.close()

    if loop.best_epoch != last_trained:  # else the weights in memory are the best already
        best = torch.load(out_dir / BEST_DIR / "state.pt", map_location="cpu", weights_only=True)
        module.network.load_state_dict(best["network"])
        module.head.load_state_dict(best["head"])
        del best
    # a new checkpoint: embedding caches must not mix it up with the pretrained one
    model.checkpoint_sha256 = hash_json([original.checkpoint_sha256, fingerprint, loop.best_epoch])
    test = sets["test"]
    _, test_codes = trainer.evaluate(test)
    cells = [*test.names, *test.missing]
    pred = [*np.asarray(classes)[test_codes].tolist(), *[UNASSIGNED] * len(test.missing)]
    truth = labels.loc[cells].astype(str).to_numpy()
    result = FinetuneResult(
        model_id=model.model_id,
        kind="control" if model.random_init else "finetuned",
        split_seed=split.seed,
        classes=classes,
        epochs=loop.history,
        best_epoch=loop.best_epoch,
        stopped_early=loop.stopped and loop.epoch < config.epochs,
        test=classification_metrics(truth, np.asarray(pred), classes=classes),
        test_cells=[str(c) for c in cells],
        test_pred=pred,
        n_unassigned=len(test.missing),
        n_trainable_params=trainable,
        n_params=total,
        config=config,
        out_dir=out_dir,
        elapsed_s=time.perf_counter() - started,
        resumed_from_epoch=resumed_from,
        n_processes=accelerator.num_processes,
        train_s=train_s,
        train_steps=train_steps,
        model=model,
        head=module.head,
    )
    if accelerator.is_main_process:
        from scfmbench.report.figures import plot_learning_curve

        curve = out_dir / "learning_curve.png"
        plot_learning_curve(
            loop.history,
            curve,
            best_epoch=loop.best_epoch,
            title=f"{model.model_id} fine-tuning ({split.title})",
        )
        result.figures["learning_curve"] = str(curve)
        write_json(out_dir / "result.json", result.to_dict())
    accelerator.wait_for_everyone()
    return result


def finetune_in_run(
    adata: AnnData,
    labels: pd.Series,
    model: FoundationModel,
    split: Split,
    *,
    config: FinetuneConfig,
    run_dir: Path,
    resume: bool = True,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune inside a run directory (``run --finetune``): ``RUN/finetune/<model>/seed<S>``.

    Takes what ``pipeline.run`` holds: the validated AnnData (raw counts in ``X``), its
    labels, one of the run's splits and a loaded model. With ``resume`` a rerun continues
    from the last checkpoint, so a finished model is only re-scored on test.
    """
    out_dir = Path(run_dir) / "finetune" / model.model_id / f"seed{split.seed}"
    return finetune(
        adata,
        model,
        split,
        labels=labels,
        config=config,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
    )


def metrics_section(results: list[FinetuneResult]) -> dict[str, dict[str, Any]]:
    """``metrics.json["finetune"]``: per model id its kind, method name and per-split results."""
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = out.setdefault(
            result.model_id,
            {"kind": result.kind, "method": result.method_name, "splits": {}},
        )
        entry["splits"][str(result.split_seed)] = result.to_dict()
    return out


def load_head(best_dir: Path, model: FoundationModel) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The fine-tuned head saved beside ``best/model`` and its info (classes, layer, pooling).

    Load the network from ``best_dir / "model"`` with the model's own loader; embed with the
    info's ``layer`` and ``pooling`` and apply the head to get class logits.
    """
    best_dir = Path(best_dir)
    info_path = best_dir / "finetune.json"
    if not info_path.exists():
        raise CheckpointError(
            f"{best_dir} has no finetune.json; point to the best/ folder of a fine-tuning run."
        )
    info = json.loads(info_path.read_text())
    head = model.make_classifier_head(len(info["classes"]))
    head.load_state_dict(torch.load(best_dir / "head.pt", map_location="cpu", weights_only=True))
    return head.eval(), info


# ---- training loop ------------------------------------------------------------------------


@dataclass
class _LoopState:
    """Epoch counter, history and early-stopping state (saved in the checkpoint)."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_f1: float = -1.0
    best_loss: float = float("inf")
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, record: dict[str, float], *, patience: int | None) -> None:
        """Record an epoch; the best epoch has the highest validation macro F1, ties broken by
        the lower validation loss (the test cells are never looked at). Patience counts the
        epochs since validation macro F1 last rose."""
        self.epoch = int(record["epoch"])
        self.history.append(record)
        f1, loss = record["val_macro_f1"], record["val_loss"]
        self.bad_epochs = 0 if f1 > self.best_f1 else self.bad_epochs + 1
        if f1 > self.best_f1 or (f1 == self.best_f1 and loss < self.best_loss):
            self.best_f1, self.best_loss, self.best_epoch = f1, loss, self.epoch
        self.stopped = patience is not None and self.bad_epochs >= patience

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> _LoopState:
        return cls(**values)


@dataclass
class _Trainer:
    """One epoch of training and batched evaluation, on every process."""

    accelerator: Any
    prepared: torch.nn.Module
    module: _Classifier
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

    def train_epoch(self, cells: _Cells, *, epoch: int, bar: tqdm) -> float:
        """Train one epoch; return the (class-weighted) mean training loss."""
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
                bar.set_postfix(epoch=epoch, loss=f"{weighted.item() / max(len(local), 1):.4f}")
        total = acc.reduce(loss_sum, reduction="sum")
        return float(total[0] / total[1])

    @torch.no_grad()
    def evaluate(self, cells: _Cells) -> tuple[float, np.ndarray]:
        """(class-weighted mean loss, predicted class codes) over ``cells``, in their order."""
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
    """
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(lengths))
    batches = length_sorted_batches(
        lengths[shuffled], batch_size=batch_size, max_tokens=max_tokens, max_attention=max_attention
    )
    order = [0, *(1 + rng.permutation(len(batches) - 1))] if batches else []
    return [shuffled[batches[i]] for i in order]


# ---- setup helpers --------------------------------------------------------------------------


def _cells(
    tokens: TokenizedCells, labels: pd.Series, names: pd.Index, classes: list[str], set_name: str
) -> _Cells:
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
    return _Cells(
        positions=where[where >= 0].astype(np.int64),
        codes=codes,
        names=kept,
        missing=names[where < 0],
    )


def _data_and_labels(
    data: AnnData | ValidatedData, labels: pd.Series | None, label_key: str | None
) -> tuple[AnnData, pd.Series]:
    if isinstance(data, ValidatedData):
        return data.model_input, data.labels
    if labels is None:
        validated = validate(data, label_key=label_key)
        return validated.model_input, validated.labels
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype(str).astype("category")
    return data, labels


def _split_cells(adata: AnnData, split: Split) -> AnnData:
    """The cells of the split (all of ``adata`` when the split covers it)."""
    wanted = adata.obs_names.isin(split.train.append([split.val, split.test]))
    return adata if wanted.all() else adata[wanted].copy()


def _resolve_layer(model: FoundationModel, config: FinetuneConfig) -> tuple[int, str]:
    layer = model.n_layers if config.layer is None else config.layer
    if not -model.n_layers - 1 <= layer <= model.n_layers:
        raise ConfigError(
            f"finetune layer {layer} is out of range for {model.model_id} ({model.n_layers} "
            f"layers); choose 0..{model.n_layers} or a negative index."
        )
    pooling = config.pooling or model.default_pooling
    if pooling not in model.poolings:
        raise ConfigError(
            f"pooling {pooling!r} is not available for {model.name}; choose from {model.poolings}."
        )
    return layer, pooling


def _accelerator(config: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if config.device not in ("auto", "cpu"):
        raise ConfigError(
            f"finetune device {config.device!r} is not supported; use auto or cpu "
            "(pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)."
        )
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU.")
    # Accelerate keeps one global state per process; forget the previous call's precision
    # (the process group and device, if any, are kept) so calls may differ in it.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _apply_trainability(model: FoundationModel, config: FinetuneConfig):
    """Freeze embeddings / the first layers, or inject LoRA adapters; return the peft tuner."""
    if config.freeze_embeddings:
        modules = _hook(model, "embedding_modules", "freeze_embeddings")
        for module in modules:
            module.requires_grad_(False)
    if config.freeze_layers:
        layers = _hook(model, "layer_modules", "freeze_layers")
        if config.freeze_layers > len(layers):
            raise ConfigError(
                f"freeze_layers={config.freeze_layers} but {model.model_id} has {len(layers)} "
                f"layers; choose 0..{len(layers)}."
            )
        for module in layers[: config.freeze_layers]:
            module.requires_grad_(False)
    if not config.lora:
        return None
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    targets = _hook(model, "lora_target_modules", "lora")
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    tuner = LoraModel(model.network, lora_config, "default")
    for name, parameter in model.network.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return tuner


def _hook(model: FoundationModel, hook: str, option: str) -> Any:
    try:
        return getattr(model, hook)()
    except NotImplementedError:
        raise ConfigError(
            f"option {option} needs {type(model).__name__}.{hook}(), which {model.name} does "
            f"not implement; turn {option} off or add the hook to the adapter."
        ) from None


def _enable_gradient_checkpointing(network: torch.nn.Module) -> None:
    enable = getattr(network, "gradient_checkpointing_enable", None)
    if enable is None:
        logger.warning(
            "%s has no gradient_checkpointing_enable; training without gradient checkpointing",
            type(network).__name__,
        )
        return
    try:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        enable()


def _class_weights(codes: np.ndarray, n_classes: int, *, balanced: bool) -> torch.Tensor:
    """1 per class, or ``n / (n_classes * n_c)`` (0 for classes absent from train)."""
    if not balanced:
        return torch.ones(n_classes, dtype=torch.float32)
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(codes) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def _optimizer(module: torch.nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = parameter.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        (no_decay if plain else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel (CPU and GPU) is faster and needs no full-size temporaries
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)


def _scheduler(optimizer, config: FinetuneConfig, *, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    warmup = int(round(config.warmup_ratio * total_steps))
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def _count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- checkpoints ----------------------------------------------------------------------------


def _fingerprint(
    config: FinetuneConfig,
    model: FoundationModel,
    sets: dict[str, _Cells],
    classes: list[str],
    layer: int,
    pooling: str,
) -> dict[str, Any]:
    return {
        **config.fingerprint(),
        "model": model.model_id,
        "checkpoint_sha256": model.checkpoint_sha256,
        "classes": hash_strings(classes),
        "train_cells": hash_json([list(map(str, sets["train"].names)), sets["train"].codes]),
        "val_cells": hash_json([list(map(str, sets["val"].names)), sets["val"].codes]),
        "resolved_layer": layer,
        "resolved_pooling": pooling,
    }


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _save_checkpoint(
    out_dir: Path, module: _Classifier, optimizer, scheduler, loop: _LoopState, fingerprint: dict
) -> None:
    """Write ``checkpoint/last.pt`` atomically (loadable with ``weights_only=True``)."""
    _save_torch(
        out_dir / CHECKPOINT_FILE,
        {
            "network": module.network.state_dict(),
            "head": module.head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "loop": loop.to_dict(),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
        },
    )


def _load_checkpoint(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        logger.info("no checkpoint in %s; starting from epoch 1", out_dir)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip error means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over."
        ) from None
    saved = json.loads(state["fingerprint"])
    changed = [
        k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)
    ]
    if changed:
        listed = ", ".join(f"{k}: {saved.get(k)!r} → {fingerprint.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"checkpoint {path} was made with a different configuration ({listed}); resume with "
            "the original settings, or start over without resume / in another folder."
        )
    return state


def _cpu_copy(obj: Any, module: torch.nn.Module) -> Any:
    """Deep copy of ``obj`` in which ``module``'s parameters and buffers are CPU clones.

    Pre-filling deepcopy's memo means no tensor is ever duplicated on the GPU.
    """
    memo: dict[int, Any] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = torch.nn.Parameter(
            parameter.detach().cpu().clone(), requires_grad=parameter.requires_grad
        )
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.detach().cpu().clone()
    return copy.deepcopy(obj, memo)


def _save_best(
    best_dir: Path,
    model: FoundationModel,
    module: _Classifier,
    tuner,
    classes: list[str],
    record: dict[str, float],
    config: FinetuneConfig,
) -> None:
    """Replace ``best/`` with this epoch: the model's own format (LoRA merged) + head."""
    staging = best_dir.with_name(f".{best_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save_torch(
        staging / "state.pt",
        {"network": module.network.state_dict(), "head": module.head.state_dict()},
    )
    _save_torch(staging / "head.pt", module.head.state_dict())
    original = model.network
    try:
        if tuner is not None:
            model.network = _cpu_copy(tuner, tuner).merge_and_unload()
        model.save_pretrained(staging / "model")
    finally:
        model.network = original
    write_json(
        staging / "finetune.json",
        {
            "model_id": model.model_id,
            "classes": classes,
            "layer": module.layer,
            "pooling": module.pooling,
            **record,
            "lora_merged": tuner is not None,
            "config": config.model_dump(mode="json"),
        },
    )
    old = best_dir.with_name(f".{best_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if best_dir.exists():
        os.replace(best_dir, old)
    os.replace(staging, best_dir)
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "epoch_batches",
    "finetune",
    "finetune_in_run",
    "load_head",
    "metrics_section",
]
