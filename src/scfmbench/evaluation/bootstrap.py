"""Class-stratified bootstrap resamples of test cells, and the scores of every resample.

A resample keeps each class's number of test cells (the cells of a class are drawn among
themselves, so a rare class is never resampled away). It is held as the number of times each
cell is drawn, and a method's per-class counts on all resamples are one matrix product of
those draw counts with per-cell indicators. The interval formulas that use these replicates
are in :mod:`scfmbench.evaluation.stats`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def resample_scores(
    true: np.ndarray,
    pred: np.ndarray,
    k: int,
    draws: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    present_only: bool = False,
) -> dict[str, np.ndarray]:
    """Accuracy, macro F1 and balanced accuracy for each row of ``draws`` (cell weights).

    Macro F1 averages the F1 of all ``k`` classes (a class never predicted and absent scores
    0), like ``sklearn.metrics.f1_score(labels=classes, average="macro", zero_division=0)``;
    with ``keep`` (a boolean mask over classes) it averages those classes only, and with
    ``present_only`` (designs ``holdout`` and ``transfer``) only the classes present in the
    truth. Balanced accuracy is the mean recall over the classes present in the truth.

    A resample's counts (true positives, support and predictions per class, correct cells)
    are its draw counts times per-cell indicators: one matrix product for all resamples.
    The counts are integers below 2**24, so float32 sums them exactly and the scores equal
    those of the resampled cells scored one by one.

    Parameters
    ----------
    true, pred : numpy.ndarray
        Integer codes, shape (n,); predictions may use code ``k`` for "unassigned".
    draws : numpy.ndarray
        Shape (B, n): how many times each cell is drawn in each resample (:func:`draw_counts`;
        a row of ones scores the cells as they are).

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``balanced_accuracy`` (and ``macro_f1_excl_small`` with
        ``keep``): arrays of shape (B,).
    """
    n = len(true)
    exact = np.float32 if n < 2**24 else np.float64
    cells = np.arange(n)
    correct = (true == pred).astype(exact)
    indicators = np.zeros((n, 3 * k + 1), dtype=exact)
    indicators[cells, true] = correct  # true positives
    indicators[cells, k + true] = 1  # support
    called = pred < k
    indicators[cells[called], 2 * k + pred[called]] = 1  # predicted
    indicators[:, 3 * k] = correct
    counts = (draws.astype(exact, copy=False) @ indicators).astype(np.float64)
    tp, support, predicted = counts[:, :k], counts[:, k : 2 * k], counts[:, 2 * k : 3 * k]
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    recall = np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0)
    present = support > 0
    n_present = np.maximum(present.sum(axis=1), 1)
    out = {
        "accuracy": counts[:, 3 * k] / max(n, 1),
        "macro_f1": (f1 * present).sum(axis=1) / n_present if present_only else f1.mean(axis=1),
        "balanced_accuracy": recall.sum(axis=1) / n_present,
    }
    if keep is not None:
        out["macro_f1_excl_small"] = (
            f1[:, keep].mean(axis=1) if keep.any() else np.full(len(counts), np.nan)
        )
    return out


def stratified_samples(true: np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    """Class-stratified bootstrap: each class's cells are resampled among themselves.

    Parameters
    ----------
    true : numpy.ndarray
        Class codes of the test cells, shape (n,).
    n_boot : int
        Number of resamples B.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    numpy.ndarray
        Shape (B, n); every row holds as many cells of each class as ``true``.
    """
    rng = np.random.default_rng(seed)
    columns = []
    for cls in np.unique(true):
        members = np.flatnonzero(true == cls)
        columns.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    if not columns:
        return np.zeros((n_boot, 0), dtype=np.int64)
    return np.concatenate(columns, axis=1)


_DRAWS: OrderedDict[tuple[bytes, int, int], np.ndarray] = OrderedDict()
DRAWS_KEPT = 64
"""Draw-count matrices :func:`draw_counts` keeps (the most recently used): every method and
paired test of a run resamples the same test sets."""


def draw_counts(true: np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    """How many times each cell is drawn in each resample of :func:`stratified_samples`.

    Every method and comparison of a run resamples the same test sets with the same seeds,
    so the last ``DRAWS_KEPT`` results are kept (as the smallest unsigned integer type that
    holds them).

    Returns
    -------
    numpy.ndarray
        Shape (B, n), unsigned integers; row b sums to n.
    """
    key = (np.asarray(true, dtype=np.int64).tobytes(), n_boot, seed)
    found = _DRAWS.get(key)
    if found is None:
        samples = stratified_samples(true, n_boot=n_boot, seed=seed)
        n = samples.shape[1]
        flat = (samples + (np.arange(n_boot) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)
        found = counts.astype(np.min_scalar_type(int(counts.max(initial=0))))
        found.flags.writeable = False
        _DRAWS[key] = found
        while len(_DRAWS) > DRAWS_KEPT:
            _DRAWS.popitem(last=False)
    _DRAWS.move_to_end(key)
    return found


def score_sets(
    sets: list[tuple[np.ndarray, list[np.ndarray]]],
    k: int,
    *,
    n_boot: int,
    seed: int,
    keep: np.ndarray | None = None,
    same_cells: bool = False,
    present_only: bool = False,
) -> list[tuple[dict, list[dict]]]:
    """Score every prediction of each test set on the full set and on shared resamples.

    Parameters
    ----------
    sets : list of (true codes (n_j,), [pred codes (n_j,), ...])
        One entry per test set; predictions of several methods on the same cells.
    k : int
        Number of classes.
    same_cells : bool
        The test sets hold the same cells in the same order (transfer): every set uses the
        same resamples, so replicates can be averaged across sets.
    present_only : bool
        Macro F1 over the classes present in each test set (design ``holdout``).

    Returns
    -------
    list of (point scores per prediction, bootstrap scores per prediction)
        Point scores: ``{metric: float}``; bootstrap: ``{metric: (B,) array}``. All methods
        of a test set share the same resampled cells (a paired bootstrap).
    """
    out = []
    for j, (true, preds) in enumerate(sets):
        draws = draw_counts(true, n_boot=n_boot, seed=seed if same_cells else seed + j)
        full = np.ones((1, len(true)), dtype=np.uint8)
        points = [
            {
                m: float(v[0])
                for m, v in resample_scores(
                    true, p, k, full, keep=keep, present_only=present_only
                ).items()
            }
            for p in preds
        ]
        boots = [
            resample_scores(true, p, k, draws, keep=keep, present_only=present_only) for p in preds
        ]
        out.append((points, boots))
    return out
