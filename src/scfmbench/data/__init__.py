"""Reading and checking a labelled dataset.

File formats (:mod:`~scfmbench.data.io`), the expression matrix and count detection
(:mod:`~scfmbench.data.matrix`), labels, validation (:mod:`~scfmbench.data.validate`), gene
identifiers, cells read in chunks (:mod:`~scfmbench.data.cells`), backed (out-of-memory)
reading and the train/validation/test splits.
"""

from scfmbench.data.backed import validate_backed
from scfmbench.data.io import load_dataset
from scfmbench.data.splits import load_or_make_splits, make_splits
from scfmbench.data.validate import ValidatedData, validate

__all__ = [
    "ValidatedData",
    "load_dataset",
    "load_or_make_splits",
    "make_splits",
    "validate",
    "validate_backed",
]
