"""Statistics over test cells: bootstrap CIs, exact McNemar, paired bootstrap, Holm.

All resampling uses ``numpy.random.default_rng(seed)`` so results repeat exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

N_BOOTSTRAP = 1000


def _codes(y_true, preds: list, classes: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer codes; predictions outside ``classes`` (e.g. unassigned) get code K."""
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    true = np.array([index[str(c)] for c in y_true], dtype=np.int64)
    coded = [np.array([index.get(str(p), k) for p in pred], dtype=np.int64) for pred in preds]
    return true, coded


def _scores(true: np.ndarray, pred: np.ndarray, k: int, samples: np.ndarray) -> dict:
    """Accuracy and macro F1 for each bootstrap sample (rows of ``samples`` index cells).

    Macro F1 averages over the classes present in each resample's truth, like
    ``sklearn.metrics.f1_score(labels=present, average="macro")``.
    """
    t = true[samples]  # (B, n)
    p = pred[samples]
    n_boot = samples.shape[0]
    offsets = (np.arange(n_boot) * (k + 1))[:, None]
    width = n_boot * (k + 1)
    tp = np.bincount((t + offsets)[t == p], minlength=width).reshape(n_boot, k + 1)[:, :k]
    support = np.bincount((t + offsets).ravel(), minlength=width).reshape(n_boot, k + 1)[:, :k]
    predicted = np.bincount((p + offsets).ravel(), minlength=width).reshape(n_boot, k + 1)[:, :k]
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0)
    present = support > 0
    macro = (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    return {"accuracy": (t == p).mean(axis=1), "macro_f1": macro}


def bootstrap_samples(n: int, *, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(
    y_true,
    y_pred,
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap CIs (resampling test cells) for accuracy and macro F1."""
    true, (pred,) = _codes(y_true, [y_pred], classes)
    scores = _scores(
        true, pred, len(classes), bootstrap_samples(len(true), n_boot=n_boot, seed=seed)
    )
    alpha = (1 - level) / 2
    return {
        m: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
        for m, v in scores.items()
    }


def mean_bootstrap_ci(
    splits: list[tuple[np.ndarray, np.ndarray]],
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """CI of the mean over splits: each replicate resamples every split's test cells."""
    per_split = []
    for i, (y_true, y_pred) in enumerate(splits):
        true, (pred,) = _codes(y_true, [y_pred], classes)
        samples = bootstrap_samples(len(true), n_boot=n_boot, seed=seed + i)
        per_split.append(_scores(true, pred, len(classes), samples))
    alpha = (1 - level) / 2
    out = {}
    for metric in ("accuracy", "macro_f1"):
        mean = np.mean([s[metric] for s in per_split], axis=0)
        out[metric] = [float(np.quantile(mean, alpha)), float(np.quantile(mean, 1 - alpha))]
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
    p = 1.0 if b + c == 0 else float(mcnemar(table, exact=True).pvalue)
    return {"p": p, "b": b, "c": c}


@dataclass(frozen=True)
class PairedComparison:
    """Method A vs B on the same test cells of one or more splits."""

    f1_diff: float
    f1_diff_ci95: tuple[float, float]
    bootstrap_p: float
    accuracy_diff: float
    mcnemar_p: float
    mcnemar_p_per_split: dict[str, float]
    discordant: tuple[int, int]


def paired_comparison(
    splits: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    *,
    classes: list[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> PairedComparison:
    """Compare A with B over splits given as (seed, y_true, pred_a, pred_b).

    The macro-F1 difference (A − B, mean over splits) gets a paired bootstrap CI and a
    two-sided p-value (twice the smaller tail of the bootstrap distribution around 0).
    McNemar is exact per split; the overall value pools the discordant counts of all splits.
    """
    diffs_boot, diffs, acc_diffs, per_split = [], [], [], {}
    b_total = c_total = 0
    for i, (name, y_true, pred_a, pred_b) in enumerate(splits):
        true, (a, b) = _codes(y_true, [pred_a, pred_b], classes)
        k = len(classes)
        full = np.arange(len(true))[None, :]
        sa, sb = _scores(true, a, k, full), _scores(true, b, k, full)
        diffs.append(float(sa["macro_f1"][0] - sb["macro_f1"][0]))
        acc_diffs.append(float(sa["accuracy"][0] - sb["accuracy"][0]))
        samples = bootstrap_samples(len(true), n_boot=n_boot, seed=seed + i)
        diffs_boot.append(
            _scores(true, a, k, samples)["macro_f1"] - _scores(true, b, k, samples)["macro_f1"]
        )
        test = mcnemar_exact(a == true, b == true)
        per_split[name] = test["p"]
        b_total += test["b"]
        c_total += test["c"]
    boot = np.mean(diffs_boot, axis=0)
    tail = min(np.mean(boot <= 0), np.mean(boot >= 0))
    pooled = mcnemar_exact(
        np.r_[np.ones(b_total, bool), np.zeros(c_total, bool)],
        np.r_[np.zeros(b_total, bool), np.ones(c_total, bool)],
    )
    return PairedComparison(
        f1_diff=float(np.mean(diffs)),
        f1_diff_ci95=(float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))),
        bootstrap_p=float(min(1.0, 2 * tail)),
        accuracy_diff=float(np.mean(acc_diffs)),
        mcnemar_p=pooled["p"],
        mcnemar_p_per_split=per_split,
        discordant=(b_total, c_total),
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (statsmodels)."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(p_values, method="holm")[1]]
