"""Running a benchmark.

The within-dataset run, the held-out-group and label-efficiency designs, cross-dataset
transfer (:mod:`scfmbench.benchmark.transfer`), and the APIs behind the ``embed`` and
``finetune`` commands.
"""

from scfmbench.benchmark.commands import embed_dataset, finetune_dataset
from scfmbench.benchmark.pipeline import RunResult, run

__all__ = ["RunResult", "embed_dataset", "finetune_dataset", "run"]
