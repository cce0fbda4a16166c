"""What fine-tuning writes to disk.

The per-epoch checkpoint (written atomically, with the RNG state, so a resumed run ends as
an uninterrupted one), the fingerprint that refuses a checkpoint of another configuration,
and ``best/`` (the best epoch in the model's own format, its head and its info).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from scfmbench._atomic import atomic_path, write_json
from scfmbench.config import FinetuneConfig
from scfmbench.errors import CheckpointError
from scfmbench.finetune.epochs import CellSet, LoopState
from scfmbench.finetune.model import Classifier, cpu_copy
from scfmbench.hashing import hash_json, hash_strings
from scfmbench.models.base import FoundationModel

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint/last.pt"
BEST_DIR = "best"


def fingerprint(
    config: FinetuneConfig,
    model: FoundationModel,
    sets: dict[str, CellSet],
    classes: list[str],
    layer: int,
    pooling: str,
) -> dict[str, Any]:
    """Everything a checkpoint's training depends on; resuming requires the same values.

    Parameters
    ----------
    config : FinetuneConfig
        Fine-tuning options (those in ``config.fingerprint()``).
    model : FoundationModel
        The model (its id and checkpoint hash).
    sets : dict of str to CellSet
        The ``train`` and ``val`` cells and their codes.
    classes : list of str
        Class names.
    layer : int
        The resolved encoder layer.
    pooling : str
        The resolved pooling.

    Returns
    -------
    dict
        JSON-serialisable fingerprint.
    """
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


def rng_state() -> dict[str, Any]:
    """Torch's CPU generator state and, with CUDA, every GPU's.

    Returns
    -------
    dict
        ``torch`` (and ``cuda``) generator states.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states saved by :func:`rng_state`.

    Parameters
    ----------
    state : dict
        A :func:`rng_state` result (its ``cuda`` entry is skipped without CUDA).
    """
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(
    out_dir: Path,
    module: Classifier,
    optimizer: Any,
    scheduler: Any,
    loop: LoopState,
    fingerprint: dict[str, Any],
) -> None:
    """Write ``out_dir/checkpoint/last.pt`` atomically (loadable with ``weights_only=True``).

    Parameters
    ----------
    out_dir : Path
        The fine-tuning folder.
    module : Classifier
        Network and head, whose state dicts are saved.
    optimizer, scheduler
        Their state dicts are saved.
    loop : LoopState
        The epoch counter, history and early-stopping state.
    fingerprint : dict
        The :func:`fingerprint` of this training.
    """
    _save_torch(
        out_dir / CHECKPOINT_FILE,
        {
            "network": module.network.state_dict(),
            "head": module.head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "loop": loop.to_dict(),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
        },
    )


def load_checkpoint(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Read the state saved by :func:`save_checkpoint` in ``out_dir`` (None: there is none).

    Parameters
    ----------
    out_dir : Path
        The fine-tuning folder.
    fingerprint : dict
        This training's :func:`fingerprint`; the checkpoint's must equal it.

    Returns
    -------
    dict or None
        network, head, optimizer, scheduler, rng, loop and fingerprint entries.

    Raises
    ------
    CheckpointError
        The file cannot be read, or it was made with a different configuration.
    """
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


def save_best(
    best_dir: Path,
    model: FoundationModel,
    module: Classifier,
    tuner: Any,
    classes: list[str],
    record: dict[str, float],
    config: FinetuneConfig,
) -> None:
    """Replace ``best_dir`` with this epoch: the model's own format (LoRA merged) + head.

    Parameters
    ----------
    best_dir : Path
        The ``best/`` folder; written beside it first, then swapped in.
    model : FoundationModel
        The model being trained (saved with ``save_pretrained`` into ``model/``).
    module : Classifier
        Network and head (``state.pt``, ``head.pt``).
    tuner : peft.tuners.lora.LoraModel or None
        The LoRA tuner, whose adapters are merged into a CPU copy for ``model/``.
    classes : list of str
        Class names, in head output order.
    record : dict
        The epoch's record, copied into ``finetune.json``.
    config : FinetuneConfig
        Fine-tuning options, copied into ``finetune.json``.
    """
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
            model.network = cpu_copy(tuner, tuner).merge_and_unload()
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
    logger.info(
        "%s: epoch %s is the best so far; saved to %s",
        model.model_id,
        record.get("epoch"),
        best_dir,
    )


def load_best_weights(best_dir: Path, module: Classifier) -> None:
    """Load the network and head weights of ``best_dir/state.pt`` into ``module``.

    Parameters
    ----------
    best_dir : Path
        A ``best/`` folder written by :func:`save_best`.
    module : Classifier
        Receives the weights.
    """
    best = torch.load(best_dir / "state.pt", map_location="cpu", weights_only=True)
    module.network.load_state_dict(best["network"])
    module.head.load_state_dict(best["head"])
    del best


def load_head(best_dir: Path, model: FoundationModel) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the fine-tuned head saved beside ``best/model`` and its info.

    Load the network from ``best_dir / "model"`` with the model's own loader; embed with the
    info's ``layer`` and ``pooling`` and apply the head to get class logits.

    Parameters
    ----------
    best_dir : Path
        The ``best/`` folder of a fine-tuning run.
    model : FoundationModel
        A model of the same kind (its ``make_classifier_head`` builds the head).

    Returns
    -------
    tuple of (torch.nn.Module, dict)
        The head in eval mode, and ``finetune.json`` (classes, layer, pooling, the best
        epoch's record, config).

    Raises
    ------
    CheckpointError
        ``best_dir`` has no ``finetune.json``.
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
