"""What fine-tuning returns.

:class:`FinetuneResult` and the ``metrics.json["finetune"]`` section built from such results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scfmbench.config import FinetuneConfig
from scfmbench.evaluation.metrics import ClassificationMetrics
from scfmbench.finetune.checkpoint import BEST_DIR
from scfmbench.models.base import FoundationModel


@dataclass
class FinetuneResult:
    """What ``finetune`` returns; ``to_dict()`` goes to ``metrics.json["finetune"][model_id]``.

    Attributes
    ----------
    model_id : str
        The model's id.
    kind : str
        ``"finetuned"``, or ``"control"`` for a random-init model.
    split_seed : int
        Seed of the split trained on.
    classes : list of str
        Class names, in head output order.
    epochs : list of dict
        Per epoch: epoch, train_loss, val_loss, val_macro_f1, val_accuracy.
    best_epoch : int
        The epoch whose weights are scored on test.
    stopped_early : bool
        Whether early stopping ended training before ``config.epochs``.
    test : ClassificationMetrics
        Test metrics of the best epoch (cells the tokenizer dropped count as wrong).
    test_cells, test_pred : list of str
        Test cell names and their predicted labels (``<unassigned>`` for dropped cells).
    n_unassigned : int
        Test cells the tokenizer dropped.
    n_trainable_params, n_params : int
        Trained and total parameters (network + head).
    config : FinetuneConfig
        The options used.
    out_dir : Path
        The fine-tuning folder.
    elapsed_s : float
        Wall seconds of the call.
    resumed_from_epoch : int
        Epochs already done by an earlier call (0 without resume).
    n_processes : int
        Data-parallel processes.
    train_s : float
        Seconds spent in training steps by this call (not evaluation).
    train_steps : int
        Micro-steps (global batches) run by this call.
    figures : dict of str to str
        Figure name → path (``learning_curve``).
    warnings : list of str
        What the tokenizer warned about the input, e.g. normalized values used because
        ``allow_normalized`` is set (the scores are then not those of the published model).
    model : FoundationModel or None
        The fine-tuned copy (best epoch; embeds through ``embed``), in memory.
    head : torch.nn.Module or None
        Its classification head, in memory.
    """

    model_id: str
    kind: str
    split_seed: int
    classes: list[str]
    epochs: list[dict[str, float]]
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
    train_s: float = 0.0
    train_steps: int = 0
    figures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model: FoundationModel | None = field(default=None, repr=False)
    head: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def method_name(self) -> str:
        """The method's name in the run's tables: ``<model_id>+finetuned``."""
        return f"{self.model_id}+finetuned"

    @property
    def best_dir(self) -> Path:
        """``model/`` (the model's own format, LoRA merged), ``head.pt``, ``finetune.json``."""
        return self.out_dir / BEST_DIR

    @property
    def best_val_macro_f1(self) -> float:
        """Validation macro F1 of the best epoch."""
        return next(e["val_macro_f1"] for e in self.epochs if e["epoch"] == self.best_epoch)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON values (``result.json`` and ``metrics.json``).

        Returns
        -------
        dict
            Everything but the test predictions and the in-memory model.
        """
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
            "warnings": self.warnings,
        }

    def prediction_payload(self) -> dict[str, Any]:
        """Test predictions in the shape ``pipeline`` stores per method and split.

        Returns
        -------
        dict
            cells, pred, params (best epoch and the config fingerprint), val_macro_f1,
            n_unassigned and features.
        """
        return {
            "cells": self.test_cells,
            "pred": self.test_pred,
            "params": {"best_epoch": self.best_epoch, **self.config.fingerprint()},
            "val_macro_f1": self.best_val_macro_f1,
            "n_unassigned": self.n_unassigned,
            "features": {"finetuned": True},
        }


def metrics_section(results: list[FinetuneResult]) -> dict[str, dict[str, Any]]:
    """``metrics.json["finetune"]``: per model id its kind, method name and per-split results.

    Parameters
    ----------
    results : list of FinetuneResult
        One result per model and split.

    Returns
    -------
    dict
        model id → ``{"kind", "method", "splits": {split seed: result.to_dict()}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = out.setdefault(
            result.model_id,
            {"kind": result.kind, "method": result.method_name, "splits": {}},
        )
        entry["splits"][str(result.split_seed)] = result.to_dict()
    return out
