"""End-to-end fine-tuning of a foundation model with a classification head.

Full, with frozen layers, or LoRA; atomic per-epoch checkpoints let an interrupted run resume.
"""

from scfmbench.finetune.checkpoint import load_head
from scfmbench.finetune.result import FinetuneResult, metrics_section
from scfmbench.finetune.train import finetune, finetune_in_run

__all__ = [
    "FinetuneResult",
    "finetune",
    "finetune_in_run",
    "load_head",
    "metrics_section",
]
