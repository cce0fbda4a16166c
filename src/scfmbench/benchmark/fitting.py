"""Fitting every method's probe on every split, in this process or in worker processes.

The fits of a run fall into independent groups: one per split and baseline representation
(the methods that share it, e.g. pca+logreg and pca+xgboost, share its features) and one per
split and model probe. Each group runs on one thread (BLAS, OpenMP and torch), so ``n_jobs``
worker processes (joblib's loky backend, as scikit-learn's ``n_jobs``) fit several groups at
once with results identical to a run in one process.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import joblib
from threadpoolctl import threadpool_limits

from scfmbench._progress import progress_bar
from scfmbench.benchmark.methods import Method
from scfmbench.benchmark.predict import (
    Prediction,
    Predictions,
    ProbeInputs,
    fit_and_predict_features,
    probe_grid,
)
from scfmbench.data.backed import BackedCells
from scfmbench.data.splits import Split, SplitSet
from scfmbench.evaluation.representations import SplitFeatures
from scfmbench.stages import StageStore, peak_rss_mb

__all__ = ["KeptFeatures", "fit_workers", "predict_all"]

HEAVY_FIRST = ("scvi", "model+xgboost", "hvg")
"""Order in which groups are handed to the workers: these first, in this order (a baseline
representation, or ``model+<probe>`` for a probe of any model's embedding), then the other
model probes, then the other baselines. The costliest go first, so that no worker is left
with a long fit at the end."""


class KeptFeatures(dict[tuple[str, int], SplitFeatures]):
    """Baseline features a run keeps for a later stage, at (representation, split seed).

    Only representations of at most ``max_width`` columns (None: any width) are kept. The
    width is tested where the features are built, so that a worker sends back only those kept.
    """

    def __init__(self, max_width: int | None = None) -> None:
        super().__init__()
        self.max_width = max_width


@dataclass(frozen=True)
class FitGroup:
    """The methods of one split that share one representation (their fits run together).

    Attributes
    ----------
    split : Split
        The split fitted on.
    methods : list of Method
        Methods whose predictions are not cached yet, in the run's order.
    keys : list of str
        Each method's prediction-cache key.
    """

    split: Split
    methods: list[Method]
    keys: list[str]

    @property
    def rank(self) -> int:
        """Position in the hand-out order (see :data:`HEAVY_FIRST`)."""
        method = self.methods[0]
        kind = method.representation if method.model is None else f"model+{method.probe}"
        if kind in HEAVY_FIRST:
            return HEAVY_FIRST.index(kind)
        return len(HEAVY_FIRST) + (method.model is None)


@dataclass
class GroupResult:
    """What fitting one :class:`FitGroup` returns to the parent process."""

    group: FitGroup
    predictions: list[Prediction]
    timings: dict[str, tuple[float, float]]
    features: SplitFeatures | None
    peak_rss_mb: float = 0.0
    """The worker's peak resident memory so far (0 when fitted in the run's process)."""


IDLE_WORKER_TIMEOUT_S = 1
"""Seconds an idle worker waits for more fits before it exits (joblib's default: 300)."""
# with so short a timeout a worker may exit just as a fit is queued: loky then starts a new
# worker for it and warns of a "memory leak"; the fits are not affected, so the warning goes
warnings.filterwarnings(
    "ignore", message="A worker stopped while some jobs were given to the executor"
)
MEMORY_SHARE = 0.5
"""Share of the machine's available memory the workers' features may take when ``n_jobs``
is negative (every core): fewer workers than cores when one group's features are large."""


def fit_workers(n_jobs: int, n_groups: int, bytes_per_group: float = 0.0) -> int:
    """Return how many processes fit ``n_groups`` groups with ``n_jobs`` (1: this process).

    Parameters
    ----------
    n_jobs : int
        As scikit-learn's: a positive count, or -1 for every usable CPU core
        (:func:`joblib.cpu_count`: affinity, cgroup quota and ``LOKY_MAX_CPU_COUNT``
        respected), -2 for all but one, and so on.
    n_groups : int
        Independent groups left to fit.
    bytes_per_group : float, default 0
        Memory one group's features may take (:func:`group_bytes`). With a negative
        ``n_jobs`` the workers' total stays under :data:`MEMORY_SHARE` of the available
        memory (:func:`psutil.virtual_memory`); a positive ``n_jobs`` is used as given.

    Returns
    -------
    int
        At least 1, at most ``n_groups``.
    """
    if n_jobs > 0:
        wanted = n_jobs
    else:
        wanted = max(joblib.cpu_count() + 1 + n_jobs, 1)
        if bytes_per_group > 0:
            import psutil

            room = MEMORY_SHARE * psutil.virtual_memory().available
            wanted = min(wanted, int(room // bytes_per_group))
    return max(1, min(wanted, n_groups))


def group_bytes(inputs: ProbeInputs, groups: list[FitGroup]) -> float:
    """Return a bound on the memory of the largest group's features, in bytes.

    The widest representation (``n_hvg`` genes for hvg, pca and scvi, which hold the HVG
    values of every cell before reducing them; an embedding's width) × the run's cells ×
    8 bytes × 3 (the float64 copies a probe makes).
    """
    widths = [1]
    for group in groups:
        method = group.methods[0]
        if method.model is not None:
            widths.append(inputs.matrices[method.model].shape[1])
        elif method.representation != "none":
            widths.append(inputs.config.n_hvg)
    return float(max(widths) * len(inputs.labels) * 8 * 3)


def _fit_group(
    inputs: ProbeInputs,
    group: FitGroup,
    classes: list[str],
    keep_width: float,
    run_dir: Path,
    stages: StageStore | None = None,
) -> GroupResult:
    """Build the group's representation once and fit / predict each of its methods.

    Each prediction is saved to ``run_dir``'s stages as soon as it is made, here as in a
    worker, so that a run interrupted while it does other work keeps every finished fit.
    Times go to ``stages`` (this process), or, in a worker, back with the result. BLAS and
    OpenMP run on one thread, here as in a worker, so that the sums inside (e.g. of
    scikit-learn's logistic loss) are added in the same order and the results do not
    depend on ``n_jobs`` or on the machine's cores. A baseline representation of at most
    ``keep_width`` columns comes back with the predictions (0: none).
    """
    with threadpool_limits(limits=1):
        return _fit_group_on_one_thread(inputs, group, classes, keep_width, run_dir, stages)


def _fit_group_on_one_thread(
    inputs: ProbeInputs,
    group: FitGroup,
    classes: list[str],
    keep_width: float,
    run_dir: Path,
    stages: StageStore | None,
) -> GroupResult:
    store = StageStore(run_dir) if stages is None else stages
    code_of = {c: i for i, c in enumerate(classes)}
    first = group.methods[0]
    with store.timed(f"features:{first.representation}"):
        feats = inputs.features(first, group.split)
    predictions = []
    for method, key in zip(group.methods, group.keys, strict=True):
        with store.timed(f"probe:{method.name}"):
            prediction = fit_and_predict_features(
                method,
                feats,
                inputs.labels,
                group.split,
                code_of,
                classes,
                grid=probe_grid(method.probe, inputs.config),
            )
        store.save(prediction_stage(method, group.split), key, prediction.to_payload())
        predictions.append(prediction)
    kept = feats if first.model is None and feats.train.shape[1] <= keep_width else None
    if stages is not None:  # timed on the run's own store
        return GroupResult(group, predictions, {}, kept)
    timings = {
        name: (seconds, store.details[name]["cpu_seconds"])
        for name, seconds in store.timings.items()
    }
    return GroupResult(group, predictions, timings, kept, peak_rss_mb())


def prediction_stage(method: Method, split: Split) -> str:
    """Name of the stage that keeps ``method``'s predictions on ``split``."""
    return f"predict_{method.name}_seed{split.seed}"


def _groups(
    inputs: ProbeInputs,
    split_set: SplitSet,
    methods: list[Method],
    stages: StageStore,
    out: Predictions,
) -> list[FitGroup]:
    """Fill ``out`` with the cached predictions; return the groups left to fit."""
    pending: dict[tuple[str, int], FitGroup] = {}
    for split in split_set.splits:
        for method in methods:
            key = inputs.cache_key(method, split)
            payload = stages.load(prediction_stage(method, split), key)
            if payload is not None:
                out[(method.name, split.seed)] = Prediction.from_payload(payload)
                continue
            # a baseline representation is built once for its methods; a model's probes
            # share nothing costly (its embedding is only sliced), so each fits alone
            shared = method.name if method.model else f"baseline:{method.representation}"
            group = pending.setdefault((shared, split.seed), FitGroup(split, [], []))
            group.methods.append(method)
            group.keys.append(key)
    return sorted(pending.values(), key=lambda g: g.rank)


UNUSED_RESULTS_WARNING = r"\d+ tasks (have been successfully executed|which were still being)"
"""joblib's warning when its generator of results is closed early (on Ctrl-C): the fits it
calls unused are saved by the workers, and a rerun reuses them."""


@contextmanager
def _results(
    inputs: ProbeInputs,
    groups: list[FitGroup],
    classes: list[str],
    keep_width: float,
    workers: int,
    stages: StageStore,
) -> Iterator[Iterator[GroupResult]]:
    """Yield an iterator over the groups' results, each as it is done.

    With ``workers`` > 1 the worker processes start on the groups now and go on while this
    process does other work; in this process each group is fitted as the iterator is read.
    On leaving the block early (Ctrl-C) the workers are stopped.
    """
    if workers == 1:
        yield (_fit_group(inputs, g, classes, keep_width, stages.run_dir, stages) for g in groups)
        return
    if isinstance(inputs.cells, BackedCells):  # no progress bars from the workers
        inputs = dataclasses.replace(
            inputs, cells=dataclasses.replace(inputs.cells, progress=False)
        )
    # idle workers leave after a second, so that their exit overlaps the run's remaining work
    with joblib.parallel_config(backend="loky", idle_worker_timeout=IDLE_WORKER_TIMEOUT_S):
        parallel = joblib.Parallel(n_jobs=workers, return_as="generator_unordered")
        done = parallel(
            joblib.delayed(_fit_group)(inputs, g, classes, keep_width, stages.run_dir)
            for g in groups
        )
    try:
        yield (cast(GroupResult, result) for result in done)
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=UNUSED_RESULTS_WARNING)
            cast(Generator, done).close()  # a no-op once every result was read


def predict_all(
    inputs: ProbeInputs,
    split_set: SplitSet,
    methods: list[Method],
    stages: StageStore,
    progress: bool,
    keep_features: KeptFeatures | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> Predictions:
    """Train each method's probe on each split (or reuse the saved predictions).

    A baseline representation is built once per split for every method that uses it
    (pca+logreg and pca+xgboost share one PCA). With ``inputs.config.n_jobs`` other than 1
    the groups run in that many worker processes; the predictions are the same for every
    ``n_jobs``. Each prediction is saved as soon as it is made, where it is made (an
    interrupted run keeps them, and a rerun reuses them).
    The ``features:``/``probe:`` timings then hold the workers' seconds, summed, and stage
    ``probes`` the wall time from the workers' start to the last fit (``meanwhile``
    included).

    Parameters
    ----------
    inputs : ProbeInputs
        The run's cells, embeddings, labels and settings (``config.n_jobs``).
    split_set : SplitSet
        The splits to fit on.
    methods : list of Method
        The methods (fine-tuned ones excluded: they are not probes).
    stages : StageStore
        The cache (``predict_<method>_seed<S>``) and timings (``features:<representation>``
        and ``probe:<method>``, worker time included).
    progress : bool
        Show a progress bar.
    keep_features : KeptFeatures, optional
        Receives the baseline representations built of at most its ``max_width`` columns.
    meanwhile : callable, optional
        Other work of the run, independent of the fits, done in this process while the
        workers fit (before the fits when they run here). Fits the workers finish in the
        meantime are saved as they finish, so Ctrl-C during it keeps them.

    Returns
    -------
    dict
        ``{(method name, split seed): Prediction}``, splits in order, methods in order.
    """
    classes = list(inputs.labels.cat.categories)
    stages.remove_unfinished()  # of workers an earlier, interrupted run stopped mid-write
    done: Predictions = {}
    groups = _groups(inputs, split_set, methods, stages, done)
    n_fits = sum(len(group.methods) for group in groups)
    workers = fit_workers(inputs.config.n_jobs, len(groups), group_bytes(inputs, groups))
    started, cpu = time.perf_counter(), time.process_time()
    keep_width: float = 0.0  # none kept
    if keep_features is not None:
        keep_width = math.inf if keep_features.max_width is None else keep_features.max_width
    workers_peak = 0.0
    reused = len(done)  # saved by an earlier, interrupted run: the bar starts there
    bar = progress_bar(
        total=reused + n_fits,
        initial=reused,
        desc="probes",
        unit="fit",
        postfix=f"{reused} saved" if reused else None,
        progress=progress,
    )
    # opened before the other work, so that its clock counts the fits the workers make then
    with bar, _results(inputs, groups, classes, keep_width, workers, stages) as results:
        if meanwhile is not None:
            saved = f"{reused} saved, " if reused else ""
            bar.set_postfix_str(f"{saved}scoring the embeddings meanwhile")
            before = time.process_time()
            meanwhile()
            cpu += time.process_time() - before  # not the fits' time: its own stages time it
        for result in results:  # each prediction is saved already, where it was made
            group = result.group
            workers_peak = max(workers_peak, result.peak_rss_mb)
            for method, prediction in zip(group.methods, result.predictions, strict=True):
                done[(method.name, group.split.seed)] = prediction
            for name, (seconds, cpu_seconds) in result.timings.items():
                stages.add(name, seconds, cpu_seconds)
            if keep_features is not None and result.features is not None:
                keep_features[(group.methods[0].representation, group.split.seed)] = result.features
            last = f"{group.methods[-1].name} seed {group.split.seed}"
            bar.set_postfix_str(last, refresh=False)  # drawn by update, at its interval
            bar.update(len(group.methods))
    if workers > 1:
        elapsed = time.perf_counter() - started
        stages.add("probes", elapsed, time.process_time() - cpu, worker=False)
        stages.note("probes", workers=workers, workers_peak_rss_mb=workers_peak)
    return {(m.name, s.seed): done[(m.name, s.seed)] for s in split_set.splits for m in methods}
