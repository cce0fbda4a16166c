"""scfmbench: how much does a single-cell foundation model add on your data?

Python API (the CLI is a thin layer over it)::

    import scfmbench
    result = scfmbench.run("pbmc3k.h5ad", label_key="cell_type", n_splits=5)
    result.table
"""

__version__ = "0.1.0"

from scfmbench.config import RunConfig  # noqa: E402
from scfmbench.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    CountsRequiredError,
    DataError,
    GeneMatchError,
    ScfmbenchError,
    SchemaError,
    SplitError,
)
from scfmbench.metrics import classification_metrics, delta  # noqa: E402
from scfmbench.pipeline import RunResult, run  # noqa: E402
from scfmbench.splits import load_or_make_splits, make_splits  # noqa: E402
from scfmbench.validate import ValidatedData, load_dataset, validate  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CountsRequiredError",
    "DataError",
    "GeneMatchError",
    "RunConfig",
    "RunResult",
    "SchemaError",
    "ScfmbenchError",
    "SplitError",
    "ValidatedData",
    "__version__",
    "classification_metrics",
    "delta",
    "load_dataset",
    "load_or_make_splits",
    "make_splits",
    "run",
    "validate",
]
