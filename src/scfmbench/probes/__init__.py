"""Classifiers ("probes") that take any feature matrix; one registry, sklearn contract."""

from scfmbench.probes._probes import PROBES, FittedProbe, fit_probe

__all__ = ["PROBES", "FittedProbe", "fit_probe"]
