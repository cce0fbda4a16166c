"""End-to-end fine-tuning of a foundation model with a classification head (full, frozen
layers, or LoRA), with atomic per-epoch checkpoints so an interrupted run resumes."""

from scfmbench.finetune.train import FinetuneResult, finetune, load_head

__all__ = ["FinetuneResult", "finetune", "load_head"]
