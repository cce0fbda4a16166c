"""End-to-end fine-tuning of a foundation model with a classification head.

Full, with frozen layers, or LoRA; atomic per-epoch checkpoints let an interrupted run resume.
"""

from scfmbench.finetune.train import FinetuneResult, finetune, finetune_dataset, load_head

__all__ = ["FinetuneResult", "finetune", "finetune_dataset", "load_head"]
