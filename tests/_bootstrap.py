"""A single test set's bootstrap interval, built from the statistics module's own pieces.

The tests check the class-stratified resampling with it.
"""

from __future__ import annotations

import numpy as np

from scfmbench.evaluation.bootstrap import draw_counts, resample_scores
from scfmbench.evaluation.stats import LEVEL, N_BOOTSTRAP, _codes


def bootstrap_ci(
    y_true,
    y_pred,
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, list[float]]:
    """Return percentile CIs of one test set's accuracy, macro F1 and balanced accuracy.

    The bootstrap is class-stratified over the test set's cells (cell sampling only).
    """
    true, (pred,) = _codes(y_true, [y_pred], classes)
    scores = resample_scores(true, pred, len(classes), draw_counts(true, n_boot=n_boot, seed=seed))
    alpha = (1 - level) / 2
    return {
        m: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
        for m, v in scores.items()
    }
