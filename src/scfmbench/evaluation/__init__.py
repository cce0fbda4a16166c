"""Scoring a representation.

Baseline representations (fit on training cells, then transform), probes, classification
metrics, class-stratified bootstrap resampling, paired statistics and zero-shot embedding
quality.
"""

from scfmbench.evaluation import scvi  # noqa: F401  (registers the "scvi" representation)
from scfmbench.evaluation.metrics import classification_metrics, delta
from scfmbench.evaluation.probes import PROBES, FittedProbe, fit_probe

__all__ = ["PROBES", "FittedProbe", "classification_metrics", "delta", "fit_probe"]
