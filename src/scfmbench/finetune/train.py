"""Fine-tuning engine: one Hugging Face Accelerate training loop for every FoundationModel.

The same code runs on one CPU, one GPU or several processes (``accelerate launch`` /
``torchrun``, DDP). It trains ``model.encode`` + ``model.make_classifier_head`` on the
split's train cells, picks the best epoch on validation macro F1 and reports on test.
:func:`finetune` runs in three steps: set-up (tokens, head, trainable parameters,
optimizer), the epochs (with a checkpoint after each) and scoring on test.

Determinism: the data order of an epoch depends only on ``seed`` and the epoch, and every
epoch reseeds torch from (seed, epoch, process), so a run resumed from its last checkpoint
ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from scfmbench._atomic import write_json
from scfmbench._progress import progress_bar
from scfmbench.config import FinetuneConfig
from scfmbench.data.splits import Split
from scfmbench.data.validate import ValidatedData
from scfmbench.evaluation.metrics import classification_metrics
from scfmbench.finetune.checkpoint import (
    BEST_DIR,
    load_best_weights,
    load_head,
    save_best,
    save_checkpoint,
)
from scfmbench.finetune.epochs import LoopState, Trainer, epoch_batches
from scfmbench.finetune.model import count_parameters
from scfmbench.finetune.result import FinetuneResult, metrics_section
from scfmbench.finetune.setup import Setup, prepare, set_up
from scfmbench.hashing import hash_json
from scfmbench.models.base import FoundationModel

logger = logging.getLogger(__name__)

UNASSIGNED = "<unassigned>"


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
    data_warnings: Sequence[str] = (),
) -> FinetuneResult:
    """Fine-tune ``model`` with a classification head on ``split`` and score it on test.

    Parameters
    ----------
    data : AnnData or ValidatedData
        ValidatedData; or an AnnData with raw counts in ``X``, validated here with
        ``label_key`` unless its cell-type ``labels`` (indexed by cell) are given, in which
        case it is taken as already validated.
    model : FoundationModel
        Any FoundationModel; a ``random_init`` model is trained the same way and labelled as
        the control. It is not modified: training runs on a copy, returned as
        ``result.model`` with the best epoch's weights and a new checkpoint hash.
    split : Split
        The run's saved split; train trains, val picks the best epoch, test scores.
    config : FinetuneConfig or None, default None
        Options (None: ``FinetuneConfig()``, i.e. 3 epochs, lr 5e-5, seed 42).
    out_dir : Path
        Folder for ``checkpoint/last.pt``, ``best/``, ``learning_curve.png`` and
        ``result.json``.
    labels : pandas.Series or None, default None
        Cell-type label per cell name, for an already validated AnnData.
    label_key : str or None, default None
        ``obs`` column of the labels when ``data`` is validated here.
    resume : bool, default False
        Continue from ``out_dir/checkpoint/last.pt`` when it exists.
    progress : bool, default True
        Show a progress bar (main process only).
    on_epoch_end : callable or None, default None
        Called on every process with each epoch's record, after the checkpoint is written.
    data_warnings : sequence of str, default ()
        Warnings the caller gave about the data (e.g. a feature-selected matrix allowed);
        ``result.warnings`` holds them before the tokenizer's.

    Returns
    -------
    FinetuneResult
        Per-epoch losses and val metrics, the best epoch and the test metrics of the best
        epoch's model.

    Raises
    ------
    ConfigError
        An option the model does not support (LoRA targets, layers to freeze), a layer or
        pooling it lacks, or an unsupported device or precision.
    CheckpointError
        ``resume`` with a checkpoint made by a different configuration.
    SplitError
        The split names cells that are not in the data.
    """
    started = time.perf_counter()
    config = config or FinetuneConfig.model_validate({})  # every option at its default
    out_dir = Path(out_dir)
    setup = set_up(
        data, model, split, config, labels=labels, label_key=label_key, data_warnings=data_warnings
    )
    trainer, loop = prepare(setup, out_dir, resume=resume)
    trained = _train_epochs(
        setup, trainer, loop, out_dir, progress=progress, on_epoch_end=on_epoch_end
    )
    return _score(setup, trainer, loop, trained, split, out_dir, started=started)


@dataclass
class _Trained:
    """What the epochs of this call did."""

    resumed_from: int
    n_trainable: int
    n_params: int
    train_s: float = 0.0
    train_steps: int = 0
    last_trained: int | None = None


def _train_epochs(
    setup: Setup,
    trainer: Trainer,
    loop: LoopState,
    out_dir: Path,
    *,
    progress: bool,
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> _Trained:
    """Train the remaining epochs; after each, save ``best/`` (if best) and the checkpoint."""
    config, model, accelerator = setup.config, setup.model, setup.accelerator
    classes = np.asarray(setup.classes)
    trainable, total = count_parameters(setup.module)
    trained = _Trained(resumed_from=loop.epoch, n_trainable=trainable, n_params=total)
    logger.info(
        "%s: fine-tuning %d of %d parameters on %d cells (%d processes, %s)",
        model.model_id,
        trainable,
        total,
        len(setup.sets["train"].positions),
        accelerator.num_processes,
        accelerator.device,
    )
    bar = progress_bar(
        total=setup.batches_per_epoch * config.epochs,
        initial=setup.batches_per_epoch * loop.epoch,
        desc=f"finetune {model.model_id}",
        unit="step",
        progress=progress and accelerator.is_local_main_process,
    )
    for epoch in range(loop.epoch + 1, config.epochs + 1):
        if loop.stopped:
            break
        tick = time.perf_counter()
        train_loss = trainer.train_epoch(setup.sets["train"], epoch=epoch, bar=bar)
        trained.train_s += time.perf_counter() - tick
        trained.train_steps += setup.batches_per_epoch
        trained.last_trained = epoch
        val_loss, val_pred = trainer.evaluate(setup.sets["val"])
        scores = classification_metrics(
            classes[setup.sets["val"].codes], classes[val_pred], classes=setup.classes
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
                save_best(
                    out_dir / BEST_DIR,
                    model,
                    setup.module,
                    setup.tuner,
                    setup.classes,
                    record,
                    config,
                )
            save_checkpoint(
                out_dir, setup.module, trainer.optimizer, setup.scheduler, loop, setup.fingerprint
            )
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(record)
    bar.close()
    return trained


def _score(
    setup: Setup,
    trainer: Trainer,
    loop: LoopState,
    trained: _Trained,
    split: Split,
    out_dir: Path,
    *,
    started: float,
) -> FinetuneResult:
    """Score the best epoch's weights on test; main process writes the curve and result."""
    model, module, config, accelerator = setup.model, setup.module, setup.config, setup.accelerator
    if loop.best_epoch != trained.last_trained:  # else the weights in memory are the best
        load_best_weights(out_dir / BEST_DIR, module)
    # a new checkpoint: embedding caches must not mix it up with the pretrained one
    model.checkpoint_sha256 = hash_json(
        [setup.original.checkpoint_sha256, setup.fingerprint, loop.best_epoch]
    )
    test = setup.sets["test"]
    _, test_codes = trainer.evaluate(test)
    classes = setup.classes
    cells = [*test.names, *test.missing]
    pred = [*np.asarray(classes)[test_codes].tolist(), *[UNASSIGNED] * len(test.missing)]
    truth = setup.labels.loc[cells].astype(str).to_numpy()
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
        n_trainable_params=trained.n_trainable,
        n_params=trained.n_params,
        config=config,
        out_dir=out_dir,
        elapsed_s=time.perf_counter() - started,
        resumed_from_epoch=trained.resumed_from,
        n_processes=accelerator.num_processes,
        train_s=trained.train_s,
        train_steps=trained.train_steps,
        warnings=setup.input_warnings,
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
    data_warnings: Sequence[str] = (),
) -> FinetuneResult:
    """Fine-tune inside a run directory (``run --finetune``): ``RUN/finetune/<model>/seed<S>``.

    Takes what ``pipeline.run`` holds: the validated AnnData (raw counts in ``X``), its
    labels, one of the run's splits and a loaded model. With ``resume`` a rerun continues
    from the last checkpoint, so a finished model is only re-scored on test.
    ``data_warnings`` are recorded as in :func:`finetune`.
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
        data_warnings=data_warnings,
    )


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "epoch_batches",
    "finetune",
    "finetune_in_run",
    "load_head",
    "metrics_section",
]
