"""Foundation models: the contract, the loaders, and one folder per model.

Each model folder holds its adapter, its network (where ported) and its tokenizer.

Importing this package registers every model in :data:`MODELS`. :func:`load_model` is the one
place a parsed ``NAME[-random]=DIR`` becomes a model; a new model is one folder plus one
import line here (its adapter registers it with :func:`register_model`).
"""

from scfmbench.models import geneformer, scfoundation, scgpt  # noqa: F401  (registers each)
from scfmbench.models.base import (
    Embeddings,
    FoundationModel,
    PaddedBatch,
    TokenizedCells,
    obsm_key_for,
)
from scfmbench.models.loading import (
    MODELS,
    LoadContext,
    ModelLayout,
    ModelLoader,
    ModelOptions,
    ModelSource,
    load_model,
    register_model,
)

__all__ = [
    "MODELS",
    "Embeddings",
    "FoundationModel",
    "LoadContext",
    "ModelLayout",
    "ModelLoader",
    "ModelOptions",
    "ModelSource",
    "PaddedBatch",
    "TokenizedCells",
    "load_model",
    "obsm_key_for",
    "register_model",
]
