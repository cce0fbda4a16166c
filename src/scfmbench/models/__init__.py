"""Foundation models: the contract every model meets, and one folder per model holding its
adapter, its network (where ported) and its tokenizer.

Importing this package registers every model in :data:`MODELS`.
"""

from scfmbench.models import geneformer, scfoundation, scgpt  # noqa: F401  (registers each)
from scfmbench.models.base import MODELS, Embeddings, FoundationModel, PaddedBatch, TokenizedCells

__all__ = ["MODELS", "Embeddings", "FoundationModel", "PaddedBatch", "TokenizedCells"]
