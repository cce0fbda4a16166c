"""Running a benchmark.

The within-dataset run, the held-out-group and label-efficiency designs, cross-dataset
transfer (:mod:`scfmbench.benchmark.transfer`), and the APIs behind the ``embed`` and
``finetune`` commands.
"""

from typing import TYPE_CHECKING

from scfmbench._lazy import lazy_attributes

if TYPE_CHECKING:
    from scfmbench.benchmark.commands import embed_dataset, finetune_dataset
    from scfmbench.benchmark.pipeline import RunResult, run

__all__ = ["RunResult", "embed_dataset", "finetune_dataset", "run"]

LAZY = {
    "RunResult": "scfmbench.benchmark.pipeline",
    "run": "scfmbench.benchmark.pipeline",
    "embed_dataset": "scfmbench.benchmark.commands",
    "finetune_dataset": "scfmbench.benchmark.commands",
}
"""Imported on first use: a probe-fitting worker imports only what it needs (PEP 562)."""


__getattr__, __dir__ = lazy_attributes(__name__, LAZY)
