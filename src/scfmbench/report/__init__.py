"""Writing what a run found.

The HTML report, results.md, the verdict, figures, run comparison and the reproducibility
manifest.
"""

from scfmbench.report.compare import compare_runs
from scfmbench.report.manifest import write_manifest
from scfmbench.report.write import write_report

__all__ = ["compare_runs", "write_manifest", "write_report"]
