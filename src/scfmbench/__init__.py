"""scfmbench: how much does a single-cell foundation model add on your data?

Python API (the CLI is a thin layer over it)::

    import scfmbench
    result = scfmbench.run("pbmc3k.h5ad", label_key="cell_type", n_splits=5)
    result.table
"""

from scfmbench._version import __version__
from scfmbench.benchmark.pipeline import RunResult, run  # noqa: E402
from scfmbench.benchmark.transfer import transfer  # noqa: E402
from scfmbench.config import FinetuneConfig, ModelSpec, RunConfig  # noqa: E402
from scfmbench.data import ValidatedData, load_dataset, validate  # noqa: E402
from scfmbench.data.splits import load_or_make_splits, make_splits  # noqa: E402
from scfmbench.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    CountsRequiredError,
    DataError,
    GeneMatchError,
    RunDirError,
    ScfmbenchError,
    SchemaError,
    SplitError,
)
from scfmbench.evaluation.metrics import classification_metrics, delta  # noqa: E402
from scfmbench.report.compare import compare_runs  # noqa: E402
from scfmbench.report.manifest import write_manifest  # noqa: E402
from scfmbench.report.write import write_report  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CountsRequiredError",
    "DataError",
    "FinetuneConfig",
    "GeneMatchError",
    "ModelSpec",
    "RunConfig",
    "RunDirError",
    "RunResult",
    "SchemaError",
    "ScfmbenchError",
    "SplitError",
    "ValidatedData",
    "__version__",
    "classification_metrics",
    "compare_runs",
    "delta",
    "load_dataset",
    "load_or_make_splits",
    "make_splits",
    "run",
    "transfer",
    "validate",
    "write_manifest",
    "write_report",
]
