"""Running a benchmark.

The within-dataset run, the held-out-group and label-efficiency designs, cross-dataset
transfer, and the stage cache that lets an interrupted run resume.
"""

from scfmbench.benchmark.pipeline import RunResult, run

__all__ = ["RunResult", "run"]
