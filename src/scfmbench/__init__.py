"""scfmbench: measure how much a single-cell foundation model adds on your data.

The public Python API; the command line (:mod:`scfmbench.cli`) is a thin layer over it::

    import scfmbench

    result = scfmbench.run("pbmc3k.h5ad", label_key="cell_type", n_splits=5)
    result.table

Everything else lives in the packages by noun: :mod:`scfmbench.data`,
:mod:`scfmbench.models`, :mod:`scfmbench.embed` (also reachable here as ``scfmbench.embed``,
e.g. ``scfmbench.embed.embed_h5ad``), :mod:`scfmbench.evaluation`, :mod:`scfmbench.finetune`,
:mod:`scfmbench.benchmark` and :mod:`scfmbench.report`.
"""

from typing import TYPE_CHECKING

from scfmbench._lazy import lazy_attributes
from scfmbench._version import __version__
from scfmbench.errors import (
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

if TYPE_CHECKING:
    from scfmbench import embed
    from scfmbench.benchmark.pipeline import run
    from scfmbench.benchmark.transfer import transfer
    from scfmbench.config import FinetuneConfig, ModelSpec, RunConfig
    from scfmbench.data import load_dataset, validate
    from scfmbench.report.compare import compare_runs
    from scfmbench.report.manifest import write_manifest
    from scfmbench.report.write import write_report

LAZY = {
    "embed": "scfmbench.embed",
    "run": "scfmbench.benchmark.pipeline",
    "transfer": "scfmbench.benchmark.transfer",
    "FinetuneConfig": "scfmbench.config",
    "ModelSpec": "scfmbench.config",
    "RunConfig": "scfmbench.config",
    "load_dataset": "scfmbench.data",
    "validate": "scfmbench.data",
    "compare_runs": "scfmbench.report.compare",
    "write_manifest": "scfmbench.report.manifest",
    "write_report": "scfmbench.report.write",
}
"""The API's names and their modules, imported on first use (PEP 562): ``import scfmbench``
and the worker processes that fit probes stay light (no torch or transformers until a model
is used)."""


__getattr__, __dir__ = lazy_attributes(__name__, LAZY)


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
    "SchemaError",
    "ScfmbenchError",
    "SplitError",
    "__version__",
    "compare_runs",
    "embed",
    "load_dataset",
    "run",
    "transfer",
    "validate",
    "write_manifest",
    "write_report",
]
