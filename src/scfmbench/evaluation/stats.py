"""Statistics over test cells: design-aware intervals, paired tests, exact McNemar, Holm.

The formulas and their references are in ``docs/statistics.md``. In short, for a score
(accuracy, macro F1, or the difference of two methods' scores) measured on J test sets:

- ``cv`` (K disjoint folds, one repeat): the mean over folds with variance
  ``max(s², v̄)/J``, where ``v̄`` is the mean within-fold variance of a class-stratified
  bootstrap over test cells (cell sampling) and ``s²`` the variance between folds (cell
  sampling plus retraining); Student t with J − 1 df whichever term is larger (``v̄`` only
  enlarges the variance of the J fold scores; it adds no degrees of freedom).
- ``repeated-cv`` (R > 1 repeats of K folds): the corrected resampled variance of Nadeau &
  Bengio (2003), ``(1/J + n_test/n_train)·s²`` with J − 1 degrees of freedom (Bouckaert &
  Frank 2004), never below the cell-sampling variance of one repeat.
- ``holdout`` (one test set per held-out group, disjoint like CV folds): the ``cv`` formula
  with K = the number of groups; macro F1 averages the classes present in each test set. A
  directed shift has one test set: the percentile interval of its bootstrap, as ``study``.
- ``study`` (overlapping random splits): a percentile bootstrap of the mean over splits,
  each split's cells resampled within class; it holds within those splits only.
- ``transfer`` (J training seeds, all scored on the same target cells): the target cells are
  resampled once per replicate for every seed; variance ``v + s²/J`` with ``v`` the bootstrap
  variance of the seed mean (cell sampling) and ``s²`` the variance between seeds
  (retraining); Welch–Satterthwaite degrees of freedom.

Every bootstrap is stratified by class (each class keeps its number of test cells), so a rare
class is never resampled away. All resampling uses ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from scfmbench.evaluation.bootstrap import score_sets

N_BOOTSTRAP = 1000
DISJOINT_DESIGNS = ("cv", "holdout")
"""Designs whose test sets are disjoint (each cell tested once): the cv variance formula
and a pooled McNemar test apply."""
LEVEL = 0.95
MIN_TEST_CELLS = 5
"""Classes with fewer test cells than this in any split are flagged (and left out of the
``macro_f1_excl_small`` headline)."""

INTERVAL_METHODS = {
    "cv": "K-fold CV: max(between-fold variance, class-stratified bootstrap variance within "
    "folds) / K, t with K−1 df",
    "repeated-cv": "repeated K-fold CV: corrected resampled variance (Nadeau & Bengio 2003, "
    "t with J−1 df)",
    "transfer": "target cells: class-stratified bootstrap of the mean over training seeds + "
    "seed-to-seed variance (Welch–Satterthwaite t)",
    "holdout": "held-out groups (disjoint test sets, one per group): max(between-group "
    "variance, class-stratified bootstrap variance within groups) / K, t with K−1 df",
    "single": "one test set: 2.5% and 97.5% percentiles of a class-stratified bootstrap of "
    "its cells (cell sampling only; retraining variation is not covered)",
    "study": "within-split only: class-stratified bootstrap of the mean over the study's "
    "overlapping random splits (ignores retraining and overlap)",
}


def _codes(y_true, preds: list, classes: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer codes; predictions outside ``classes`` (e.g. unassigned) get code K."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    true = np.array([index[str(c)] for c in y_true], dtype=np.int64)
    coded = [np.array([index.get(str(p), k) for p in pred], dtype=np.int64) for pred in preds]
    return true, coded


@dataclass(frozen=True)
class Design:
    """How the test sets of a run relate: drives the variance formula.

    ``name`` is ``cv`` (one repeat of K disjoint folds), ``repeated-cv``, ``holdout`` (one
    disjoint test set per held-out group), ``study`` or ``transfer`` (every test set holds
    the same cells);
    ``test_train_ratio`` is the mean n_test / n_train (Nadeau–Bengio correction).
    """

    name: str
    n_folds: int = 1
    test_train_ratio: float = 0.125

    @property
    def present_only(self) -> bool:
        """Whether macro F1 averages only the classes present in a test set.

        True for ``holdout`` (a held-out group need not hold every training class) and
        ``transfer`` (the target dataset need not either): a training class without test
        cells is left out of the average instead of counting as an F1 of 0.
        """
        return self.name in ("holdout", "transfer")

    @classmethod
    def of(cls, split_set) -> Design:
        """Return the design of a :class:`scfmbench.data.splits.SplitSet`."""
        ratio = float(np.mean([len(s.test) / max(len(s.train), 1) for s in split_set.splits]))
        if split_set.design == "cv":
            name = "cv" if split_set.n_repeats == 1 else "repeated-cv"
            return cls(name, n_folds=split_set.n_folds, test_train_ratio=ratio)
        if split_set.design == "holdout":
            return cls("holdout", n_folds=len(split_set.splits), test_train_ratio=ratio)
        return cls("study", n_folds=len(split_set.splits), test_train_ratio=ratio)


def interval_method(design: Design) -> str:
    """Say in words how the 95% intervals of ``design`` are computed.

    ``INTERVAL_METHODS[design.name]``, except that a ``cv`` or ``holdout`` design with one
    test set (a directed held-out shift) gets the percentile interval
    (``INTERVAL_METHODS["single"]``), as :func:`design_estimate` computes it.
    """
    if design.name in DISJOINT_DESIGNS and design.n_folds == 1:
        return INTERVAL_METHODS["single"]
    return INTERVAL_METHODS[design.name]


@dataclass(frozen=True)
class Estimate:
    """A score over the design's test sets: mean, 95% interval, standard error, df."""

    mean: float
    ci95: tuple[float, float]
    se: float
    df: float | None
    replicates: np.ndarray = field(repr=False)  # (B,) bootstrap replicates of the mean

    def p_value(self, n_boot: int) -> float:
        """Two-sided p of "true value 0", never below ``1 / (B + 1)``.

        ``study``: bootstrap ``min(1, 2·(k + 1)/(B + 1))`` with k the smaller tail count;
        otherwise from Student t (normal for infinite df) on ``mean / se``.
        """
        floor = 1.0 / (n_boot + 1)
        if self.df is None:
            return bootstrap_p(self.replicates)
        if self.se == 0:
            return 1.0 if self.mean == 0 else floor
        stat = abs(self.mean) / self.se
        tail = scipy_stats.norm.sf(stat) if np.isinf(self.df) else scipy_stats.t.sf(stat, self.df)
        return float(min(1.0, max(floor, 2 * tail)))


def bootstrap_p(replicates: np.ndarray) -> float:
    """Return the two-sided bootstrap p of "true value 0" (Davison & Hinkley 1997).

    ``min(1, 2·(k + 1)/(B + 1))`` where k counts the replicates on the smaller side of 0;
    never exactly 0.
    """
    n_boot = len(replicates)
    k = min(int(np.sum(replicates <= 0)), int(np.sum(replicates >= 0)))
    return float(min(1.0, 2 * (k + 1) / (n_boot + 1)))


def design_estimate(
    values: np.ndarray,
    replicates: np.ndarray,
    design: Design,
    *,
    level: float = LEVEL,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Estimate:
    """Mean over test sets and its interval under ``design`` (formulas in the module doc).

    Parameters
    ----------
    values : numpy.ndarray
        Score on each test set, shape (J,).
    replicates : numpy.ndarray
        Class-stratified bootstrap replicates of each test set's score, shape (J, B), drawn
        independently per test set.
    design : Design
        The resampling design.
    level : float
        Interval level (default 0.95).
    bounds : (float, float) or None
        Clip the interval to these bounds (scores: [0, 1]; differences of two scores:
        [-1, 1]).

    Returns
    -------
    Estimate
    """
    values = np.asarray(values, dtype=float)
    replicates = np.asarray(replicates, dtype=float)
    n = len(values)
    mean = float(values.mean())
    boot_mean = replicates.mean(axis=0)
    within = float(np.mean(replicates.var(axis=1, ddof=1))) if replicates.shape[1] > 1 else 0.0
    between = float(values.var(ddof=1)) if n > 1 else 0.0
    alpha = (1 - level) / 2
    if design.name == "transfer":
        sampling = float(boot_mean.var(ddof=1)) if len(boot_mean) > 1 else 0.0
        training = between / n
        se = float(np.sqrt(sampling + training))
        df = np.inf if training == 0 else (sampling + training) ** 2 / (training**2 / (n - 1))
        quantile = (
            scipy_stats.norm.ppf(1 - alpha) if np.isinf(df) else scipy_stats.t.ppf(1 - alpha, df)
        )
        lo, hi, df = mean - quantile * se, mean + quantile * se, float(df)
    elif design.name == "study" or n == 1:
        lo, hi = np.quantile(boot_mean, alpha), np.quantile(boot_mean, 1 - alpha)
        se, df = float(boot_mean.std(ddof=1)) if len(boot_mean) > 1 else 0.0, None
        lo, hi = float(lo), float(hi)
    else:
        if design.name in DISJOINT_DESIGNS:
            var = max(between, within) / n
        else:  # repeated-cv: Nadeau & Bengio's corrected resampled variance
            var = max((1 / n + design.test_train_ratio) * between, within / design.n_folds)
        # the bootstrap floor only enlarges the variance: the mean still rests on n test sets
        df = float(n - 1)
        se = float(np.sqrt(var))
        quantile = scipy_stats.t.ppf(1 - alpha, df)
        lo, hi = mean - quantile * se, mean + quantile * se
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return Estimate(mean=mean, ci95=(float(lo), float(hi)), se=se, df=df, replicates=boot_mean)


def method_intervals(
    sets: list[tuple[np.ndarray, np.ndarray]],
    design: Design,
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    small: Sequence[str] = (),
) -> dict[str, Estimate]:
    """Return 95% intervals of one method's scores over the design's test sets.

    The scores are accuracy, macro F1 and balanced accuracy (and macro F1 without the
    ``small`` classes).

    Parameters
    ----------
    sets : list of (y_true (n_j,), y_pred (n_j,))
        Labels (strings) of each test set.
    """
    keep = np.array([c not in set(small) for c in classes])
    coded = []
    for y_true, y_pred in sets:
        true, (pred,) = _codes(y_true, [y_pred], classes)
        coded.append((true, [pred]))
    scored = score_sets(
        coded,
        len(classes),
        n_boot=n_boot,
        seed=seed,
        keep=keep,
        same_cells=design.name == "transfer",
        present_only=design.present_only,
    )
    out = {}
    for metric in scored[0][0][0]:
        values = np.array([points[0][metric] for points, _ in scored])
        reps = np.stack([boots[0][metric] for _, boots in scored])
        if np.isnan(values).any():
            continue
        out[metric] = design_estimate(values, reps, design)
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact (binomial) McNemar test on paired correctness of two classifiers.

    Returns the p-value and the discordant counts ``b`` (only A right) and ``c`` (only B right).
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    table = np.array(
        [
            [np.sum(correct_a & correct_b), np.sum(correct_a & ~correct_b)],
            [np.sum(~correct_a & correct_b), np.sum(~correct_a & ~correct_b)],
        ]
    )
    b, c = int(table[0, 1]), int(table[1, 0])
    p = (
        1.0
        if b + c == 0
        else float(
            mcnemar(table, exact=True).pvalue  # pyright: ignore[reportAttributeAccessIssue]
        )
    )
    return {"p": p, "b": b, "c": c}


@dataclass(frozen=True)
class PairedComparison:
    """Method A vs B on the same test cells of one or more test sets.

    ``p`` is the design-aware two-sided test of "equal mean macro F1" (the one Holm
    corrects); ``bootstrap_p`` reflects cell sampling only; ``mcnemar_p`` pools the
    discordant counts only where each cell is tested once (one repeat of K-fold CV, or a
    single split) and is None otherwise.
    """

    f1_diff: float
    f1_diff_ci95: tuple[float, float]
    p: float
    bootstrap_p: float
    accuracy_diff: float
    accuracy_diff_ci95: tuple[float, float]
    mcnemar_p: float | None
    mcnemar_p_per_split: dict[str, float]
    discordant: tuple[int, int]
    f1_diff_per_split: dict[str, float]


def paired_comparison(
    splits: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    design: Design | None = None,
) -> PairedComparison:
    """Compare A with B over test sets given as (name, y_true, pred_a, pred_b).

    The macro-F1 difference (A − B, mean over test sets) gets an interval and p-value from
    :func:`design_estimate` on per-set differences and a paired class-stratified bootstrap
    (both methods scored on the same resampled cells). McNemar is exact per set; it is pooled
    only when the sets are disjoint (``cv``) or single. ``design`` defaults to ``study``.
    """
    design = design or Design("study", n_folds=len(splits))
    k = len(classes)
    coded, per_split = [], {}
    b_total = c_total = 0
    for name, y_true, pred_a, pred_b in splits:
        true, (a, b) = _codes(y_true, [pred_a, pred_b], classes)
        coded.append((true, [a, b]))
        test = mcnemar_exact(a == true, b == true)
        per_split[name] = test["p"]
        b_total += int(test["b"])
        c_total += int(test["c"])
    scored = score_sets(
        coded,
        k,
        n_boot=n_boot,
        seed=seed,
        same_cells=design.name == "transfer",
        present_only=design.present_only,
    )
    estimates = {}
    for metric in ("macro_f1", "accuracy"):
        values = np.array([points[0][metric] - points[1][metric] for points, _ in scored])
        reps = np.stack([boots[0][metric] - boots[1][metric] for _, boots in scored])
        estimates[metric] = design_estimate(values, reps, design, bounds=(-1.0, 1.0))
    f1 = estimates["macro_f1"]
    pooled = None
    if design.name in DISJOINT_DESIGNS or len(splits) == 1:
        pooled = mcnemar_exact(
            np.r_[np.ones(b_total, bool), np.zeros(c_total, bool)],
            np.r_[np.zeros(b_total, bool), np.ones(c_total, bool)],
        )["p"]
    return PairedComparison(
        f1_diff=f1.mean,
        f1_diff_ci95=f1.ci95,
        p=f1.p_value(n_boot),
        bootstrap_p=bootstrap_p(f1.replicates),
        accuracy_diff=estimates["accuracy"].mean,
        accuracy_diff_ci95=estimates["accuracy"].ci95,
        mcnemar_p=pooled,
        mcnemar_p_per_split=per_split,
        discordant=(b_total, c_total),
        f1_diff_per_split={
            name: points[0]["macro_f1"] - points[1]["macro_f1"]
            for (name, *_), (points, _) in zip(splits, scored, strict=True)
        },
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (statsmodels)."""
    if not p_values:
        return []
    adjusted = multipletests(p_values, method="holm")[1]
    return [float(p) for p in adjusted]  # pyright: ignore[reportOptionalIterable]
