"""What is trained, and how.

The network with its classification head as one module, which of its parameters train
(frozen embeddings or layers, LoRA adapters), gradient checkpointing, the class weights of
the loss, the optimizer and the learning-rate schedule.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch

from scfmbench.config import FinetuneConfig
from scfmbench.errors import ConfigError
from scfmbench.models.base import FoundationModel, PaddedBatch
from scfmbench.models.loading import check_freeze_layers

logger = logging.getLogger(__name__)


class Classifier(torch.nn.Module):
    """Network + head as one module, so DDP and Accelerate see every trained parameter.

    Parameters
    ----------
    model : FoundationModel
        The model whose ``encode`` feeds the head; its ``network`` is registered as a
        submodule.
    head : torch.nn.Module
        Maps pooled embeddings of shape (batch, hidden) to class logits (batch, n_classes).
    layer : int
        Encoder layer pooled for the head.
    pooling : str
        Pooling of that layer (one of ``model.poolings``).
    """

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
        """Class logits of one padded batch.

        Parameters
        ----------
        input_ids : torch.Tensor
            Token ids of shape (batch, length).
        attention_mask : torch.Tensor
            True where a token is real, shape (batch, length).
        values : torch.Tensor or None
            Per-token values (batch, length) for models that read them, else None.

        Returns
        -------
        torch.Tensor
            Logits of shape (batch, n_classes), in the head's dtype.
        """
        batch = PaddedBatch(input_ids=input_ids, attention_mask=attention_mask, values=values)
        pooled = self.fm.encode(batch, layer=self.layer, pooling=self.pooling)
        return self.head(pooled.to(next(self.head.parameters()).dtype))


def apply_trainability(model: FoundationModel, config: FinetuneConfig) -> Any:
    """Freeze embeddings / the first layers, or inject LoRA adapters into ``model.network``.

    Parameters
    ----------
    model : FoundationModel
        Modified in place: parameters are frozen, or LoRA layers are injected and every
        other parameter is frozen.
    config : FinetuneConfig
        Reads ``freeze_embeddings``, ``freeze_layers``, ``lora``, ``lora_r``,
        ``lora_alpha`` and ``lora_dropout``.

    Returns
    -------
    peft.tuners.lora.LoraModel or None
        The LoRA tuner (to merge the adapters when saving), or None without LoRA.

    Raises
    ------
    ConfigError
        An option needs a hook the model's adapter does not implement, or
        ``freeze_layers`` exceeds the number of layers.
    """
    if config.freeze_embeddings:
        modules = _hook(model, "embedding_modules", "freeze_embeddings")
        for module in modules:
            module.requires_grad_(False)
    if config.freeze_layers:
        layers = _hook(model, "layer_modules", "freeze_layers")
        check_freeze_layers(model.model_id, len(layers), config.freeze_layers)
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


def enable_gradient_checkpointing(network: torch.nn.Module) -> None:
    """Turn on the network's gradient checkpointing (non-reentrant when it takes kwargs).

    Parameters
    ----------
    network : torch.nn.Module
        A network with ``gradient_checkpointing_enable`` (Hugging Face style); without one,
        a warning is logged and training goes on without checkpointing.
    """
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


def class_weights(codes: np.ndarray, n_classes: int, *, balanced: bool) -> torch.Tensor:
    """Loss weight per class: 1, or ``n / (n_classes * n_c)`` (0 for classes absent from train).

    Parameters
    ----------
    codes : numpy.ndarray
        Class index of every training cell, shape (n,).
    n_classes : int
        Number of classes.
    balanced : bool
        Weigh classes inversely to their frequency.

    Returns
    -------
    torch.Tensor
        float32 weights of shape (n_classes,).
    """
    if not balanced:
        return torch.ones(n_classes, dtype=torch.float32)
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(codes) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


def make_optimizer(module: torch.nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms and 1-d parameters get no decay.

    Parameters
    ----------
    module : torch.nn.Module
        The module to train.
    config : FinetuneConfig
        Reads ``learning_rate`` and ``weight_decay``.

    Returns
    -------
    torch.optim.AdamW
        The fused AdamW optimizer with a decayed and an undecayed parameter group.
    """
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, *, total_steps: int):
    """Linear warm-up over ``warmup_ratio`` of ``total_steps`` optimizer steps, then linear decay.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer whose learning rate is scheduled.
    config : FinetuneConfig
        Reads ``warmup_ratio``.
    total_steps : int
        Optimizer steps of the whole training.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        The schedule (``transformers.get_linear_schedule_with_warmup``).
    """
    from transformers import get_linear_schedule_with_warmup

    warmup = int(round(config.warmup_ratio * total_steps))
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        The module to count.

    Returns
    -------
    tuple of int
        Trainable and total parameter counts.
    """
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def cpu_copy(obj: Any, module: torch.nn.Module) -> Any:
    """Deep copy of ``obj`` in which ``module``'s parameters and buffers are CPU clones.

    Pre-filling deepcopy's memo means no tensor is ever duplicated on the GPU.

    Parameters
    ----------
    obj : Any
        The object to copy (a model, or a module itself).
    module : torch.nn.Module
        The module inside ``obj`` whose tensors are cloned to the CPU.

    Returns
    -------
    Any
        The copy.
    """
    # kept alive until the copy is made: the memo is keyed by id(), and an id freed by a
    # tensor made on access (peft's LoRA around nn.MultiheadAttention, after a forward) would
    # be reused by another object, which the copy would then replace by the wrong clone
    originals = [*module.parameters(), *module.buffers()]
    memo: dict[int, Any] = {}
    for tensor in originals:
        clone = tensor.detach().cpu().clone()
        if isinstance(tensor, torch.nn.Parameter):
            clone = torch.nn.Parameter(clone, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = clone
    return copy.deepcopy(obj, memo)  # `originals` lives until this returns
