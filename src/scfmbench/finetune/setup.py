"""The set-up of fine-tuning.

A copy of the model, the tokenized split, the head, which parameters train, the optimizer
and schedule, and, when resuming, the last checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anndata import AnnData

from scfmbench._warnings import recording_data_warnings
from scfmbench.config import FinetuneConfig
from scfmbench.data.splits import Split
from scfmbench.data.validate import ValidatedData, validate
from scfmbench.embed import length_sorted_batches, resolve_layer_pooling
from scfmbench.errors import ConfigError
from scfmbench.finetune.checkpoint import fingerprint, load_checkpoint, set_rng_state
from scfmbench.finetune.epochs import CellSet, LoopState, Trainer, cell_set
from scfmbench.finetune.model import (
    Classifier,
    apply_trainability,
    class_weights,
    cpu_copy,
    enable_gradient_checkpointing,
    make_optimizer,
    make_scheduler,
)
from scfmbench.models.base import FoundationModel, TokenizedCells

logger = logging.getLogger(__name__)


@dataclass
class Setup:
    """What the epochs and the scoring share: the model copy, data, module and optimizer.

    Attributes
    ----------
    config : FinetuneConfig
        Fine-tuning options.
    original : FoundationModel
        The caller's model (never modified).
    model : FoundationModel
        The CPU copy being trained.
    labels : pandas.Series
        Categorical cell-type label per cell name.
    classes : list of str
        Class names (the label categories), in head output order.
    tokens : TokenizedCells
        The tokenized cells of the split.
    sets : dict of str to CellSet
        The ``train``, ``val`` and ``test`` cells.
    accelerator : accelerate.Accelerator
        This process's Accelerate handle.
    module : Classifier
        Network + head.
    tuner : peft.tuners.lora.LoraModel or None
        The LoRA tuner, or None without LoRA.
    weights : torch.Tensor
        Loss weight per class, shape (n_classes,).
    batches_per_epoch : int
        Global training batches per epoch.
    optimizer, scheduler
        AdamW and its linear warm-up schedule.
    fingerprint : dict
        What a checkpoint of this training must match.
    input_warnings : list of str
        The caller's warnings about the data, then those the tokenizer gave on the split's
        cells (e.g. normalized values used because ``allow_normalized`` is set), each once;
        libraries' deprecation and future warnings are given but not kept.
    """

    config: FinetuneConfig
    original: FoundationModel
    model: FoundationModel
    labels: pd.Series
    classes: list[str]
    tokens: TokenizedCells
    sets: dict[str, CellSet]
    accelerator: Any
    module: Classifier
    tuner: Any
    weights: torch.Tensor
    batches_per_epoch: int
    optimizer: Any
    scheduler: Any
    fingerprint: dict[str, Any]
    input_warnings: list[str] = field(default_factory=list)


def set_up(
    data: AnnData | ValidatedData,
    model: FoundationModel,
    split: Split,
    config: FinetuneConfig,
    *,
    labels: pd.Series | None,
    label_key: str | None,
    data_warnings: Sequence[str] = (),
) -> Setup:
    """Copy the model, tokenize the split, build head, trainable parameters and optimizer.

    Torch is seeded with ``config.seed`` right before the head is made, so the head's
    initial weights depend only on the seed.

    Parameters
    ----------
    data : AnnData or ValidatedData
        As for :func:`scfmbench.finetune.finetune`.
    model : FoundationModel
        The caller's model; a CPU copy is trained.
    split : Split
        The split to train (train), select (val) and score (test) on.
    config : FinetuneConfig
        Fine-tuning options.
    labels : pandas.Series or None
        Labels of an already validated AnnData.
    label_key : str or None
        ``obs`` column of the labels when ``data`` is validated here.
    data_warnings : sequence of str
        The caller's warnings about the data (default none), kept first in
        ``input_warnings``.

    Returns
    -------
    Setup
        Everything the epochs and the scoring need.

    Raises
    ------
    ConfigError
        A layer, pooling, device, precision or trainability option the model or machine
        does not support.
    SplitError
        The split names cells that are not in the data.
    """
    original = model
    model = cpu_copy(original, original.network)  # the caller's model stays untouched
    adata, labels = _data_and_labels(data, labels, label_key)
    classes = [str(c) for c in labels.cat.categories]
    with recording_data_warnings() as about_data:
        tokens = model.tokenize(_split_cells(adata, split), seed=config.seed)
    input_warnings = list(dict.fromkeys([*data_warnings, *about_data]))
    sets = {
        name: cell_set(tokens, labels, getattr(split, name), classes, name)
        for name in ("train", "val", "test")
    }
    layer, pooling = _resolve_layer(model, config)

    accelerator = _accelerator(config)
    _seed_everything(config.seed)
    head = model.make_classifier_head(len(classes))
    tuner = apply_trainability(model, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model.network)
    module = Classifier(model, head, layer=layer, pooling=pooling)
    weights = class_weights(sets["train"].codes, len(classes), balanced=config.class_weighted)
    batches_per_epoch = len(
        length_sorted_batches(
            tokens.lengths[sets["train"].positions],
            batch_size=config.batch_size,
            max_tokens=config.max_tokens,
            max_attention=config.max_attention,
        )
    )
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config, total_steps=steps_per_epoch * config.epochs)
    return Setup(
        config=config,
        original=original,
        model=model,
        labels=labels,
        classes=classes,
        tokens=tokens,
        sets=sets,
        accelerator=accelerator,
        module=module,
        tuner=tuner,
        weights=weights,
        batches_per_epoch=batches_per_epoch,
        optimizer=optimizer,
        scheduler=scheduler,
        fingerprint=fingerprint(config, model, sets, classes, layer, pooling),
        input_warnings=input_warnings,
    )


def prepare(setup: Setup, out_dir: Path, *, resume: bool) -> tuple[Trainer, LoopState]:
    """Prepare module and optimizer for Accelerate, restoring the last checkpoint if asked.

    Parameters
    ----------
    setup : Setup
        The result of :func:`set_up`.
    out_dir : Path
        The fine-tuning folder (``checkpoint/last.pt``).
    resume : bool
        Restore weights, optimizer, schedule, RNG state and epoch counter from the
        checkpoint when it exists.

    Returns
    -------
    tuple of (Trainer, LoopState)
        The trainer over the prepared module, and the loop state (fresh or restored).

    Raises
    ------
    CheckpointError
        The checkpoint cannot be read or was made with another configuration.
    """
    module = setup.module
    state = load_checkpoint(out_dir, setup.fingerprint) if resume else None
    if state is not None:
        module.network.load_state_dict(state["network"])
        module.head.load_state_dict(state["head"])
    prepared, optimizer = setup.accelerator.prepare(module, setup.optimizer)
    trainer = Trainer(
        accelerator=setup.accelerator,
        prepared=prepared,
        module=module,
        optimizer=optimizer,
        scheduler=setup.scheduler,
        tokens=setup.tokens,
        model=setup.model,
        config=setup.config,
        weights=setup.weights,
    )
    loop = LoopState()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loop = LoopState.from_dict(state["loop"])
        logger.info("%s: resuming after epoch %d", setup.model.model_id, loop.epoch)
    return trainer, loop


def _data_and_labels(
    data: AnnData | ValidatedData, labels: pd.Series | None, label_key: str | None
) -> tuple[AnnData, pd.Series]:
    """Return the model input and categorical labels of ``data`` (validated here if needed)."""
    if isinstance(data, ValidatedData):
        return data.model_input, data.labels
    if labels is None:
        validated = validate(data, label_key=label_key)
        return validated.model_input, validated.labels
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype(str).astype("category")
    return data, labels


def _split_cells(adata: AnnData, split: Split) -> AnnData:
    """Return the cells of the split (all of ``adata`` when the split covers it)."""
    wanted = adata.obs_names.isin(split.train.append([split.val, split.test]))
    return adata if wanted.all() else adata[wanted].copy()


def _resolve_layer(model: FoundationModel, config: FinetuneConfig) -> tuple[int, str]:
    """Return the layer fed to the head (default: the last) and the pooling."""
    layer = model.n_layers if config.layer is None else config.layer
    return resolve_layer_pooling(model, layer=layer, pooling=config.pooling, what="finetune layer")


def check_finetune_device(config: FinetuneConfig) -> bool:
    """Refuse a fine-tuning device or precision this machine cannot train with.

    Parameters
    ----------
    config : FinetuneConfig
        Reads ``device`` and ``mixed_precision``.

    Returns
    -------
    bool
        Whether training runs on the CPU (``device="cpu"``, or no CUDA GPU).

    Raises
    ------
    ConfigError
        A device other than ``auto`` or ``cpu``, or ``fp16`` on the CPU.
    """
    if config.device not in ("auto", "cpu"):
        raise ConfigError(
            f"finetune device {config.device!r} is not supported; use auto or cpu "
            "(pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)."
        )
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU.")
    return cpu


def _accelerator(config: FinetuneConfig) -> Any:
    """Make a fresh ``accelerate.Accelerator`` for ``config``'s device and precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = check_finetune_device(config)
    # Accelerate keeps one global state per process; forget the previous call's precision
    # (the process group and device, if any, are kept) so calls may differ in it.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _seed_everything(seed: int) -> None:
    """Seed torch's CPU generator and every GPU's."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
