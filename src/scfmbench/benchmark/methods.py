"""The methods of a run: each baseline representation and each model paired with a probe."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from scfmbench.config import DEFAULT_BASELINES, EMBEDDING_BASELINES, RunConfig
from scfmbench.data.matrix import kind_in_words
from scfmbench.errors import ConfigError
from scfmbench.evaluation.probes import PROBES
from scfmbench.evaluation.representations import REPRESENTATIONS
from scfmbench.registry import did_you_mean
from scfmbench.results import MethodKind

logger = logging.getLogger(__name__)

__all__ = [
    "Method",
    "baseline_methods",
    "check_reference",
    "expand_baselines",
    "model_methods",
    "skipped_baselines",
]


@dataclass(frozen=True)
class Method:
    """A representation paired with a probe, e.g. ``pca+xgboost`` or ``geneformer+logreg``.

    Attributes
    ----------
    name : str
        The method's name in ``metrics.json`` (``<representation>+<probe>``, or
        ``majority``).
    representation : str
        A baseline representation (``hvg``, ``pca``, ``scvi``, ``none``) or a model id.
    probe : str
        A registered probe, or ``finetune`` for an end-to-end fine-tuned model.
    kind : MethodKind
        ``baseline``, ``frozen``, ``control`` or ``finetuned``.
    model : str or None
        The model id of a foundation-model method (None for a baseline).
    """

    name: str
    representation: str
    probe: str
    kind: MethodKind
    model: str | None = None


def baseline_methods(config: RunConfig, matrix_kind: str | None = None) -> list[Method]:
    """Return the baselines of ``config``; a bare ``scvi`` is ``scvi+<probe>`` per probe.

    scVI needs raw counts: on other data it is left out of the default baseline list with a
    warning (recorded by :func:`skipped_baselines`), and an explicit request raises. With
    ``matrix_kind`` None (the settings checked before the data are read) it is kept.

    Parameters
    ----------
    config : RunConfig
        ``baselines`` and ``probes`` are read.
    matrix_kind : str, optional
        Kind of the data's matrix (``counts``, ``lognorm``, …; default None: unknown).

    Returns
    -------
    list of Method
        In the order of ``config.baselines``.

    Raises
    ------
    ConfigError
        An unknown representation or probe, or scvi asked for on data without counts.
    """
    for probe in config.probes:  # used by models and scvi: refuse a typo with or without them
        try:
            PROBES.get(probe)
        except ConfigError as exc:
            raise ConfigError(f"probes: {exc}") from None
    methods = []
    for item in expand_baselines(config, matrix_kind):
        if item == "majority":
            methods.append(Method("majority", "none", "majority", "baseline"))
            continue
        representation, probe = item.split("+", 1)
        try:
            REPRESENTATIONS.get(representation)
            PROBES.get(probe)
        except ConfigError as exc:  # name the baseline, as written in `baselines`
            raise ConfigError(f"baseline {item!r} of baselines: {exc}") from None
        methods.append(Method(item, representation, probe, "baseline"))
    return methods


def expand_baselines(config: RunConfig, matrix_kind: str | None) -> list[str]:
    """``config.baselines`` with ``scvi`` spelled out as ``scvi+<probe>``.

    Parameters
    ----------
    config : RunConfig
        ``baselines`` and ``probes`` are read.
    matrix_kind : str or None
        Kind of the data's matrix; scvi is kept on ``counts`` and on None (unknown yet; see
        :func:`baseline_methods`).

    Returns
    -------
    list of str
        Baseline method names.

    Raises
    ------
    ConfigError
        scvi asked for explicitly on data without counts.
    """
    items = []
    for item in config.baselines:
        if item in EMBEDDING_BASELINES:
            items += [f"{item}+{probe}" for probe in config.probes]
        else:
            items.append(item)
    scvi = [i for i in items if i.split("+", 1)[0] == "scvi"]
    skipped = skipped_baselines(config, matrix_kind)
    if "scvi" in skipped:
        logger.warning("warning: scvi baseline skipped: %s", skipped["scvi"])  # even with -q
        return [i for i in items if i not in scvi]
    if not scvi or matrix_kind in ("counts", None):  # None: decided once the data are read
        return items
    raise ConfigError(
        f"baseline {scvi[0]!r} needs raw integer counts but the data are {matrix_kind}; give "
        "the counts, or remove scvi from `baselines` (--no-scvi)."
    )


def skipped_baselines(config: RunConfig, matrix_kind: str | None) -> dict[str, str]:
    """Return the default baselines a run leaves out, each with the reason.

    Parameters
    ----------
    config : RunConfig
        ``baselines`` is read.
    matrix_kind : str or None
        Kind of the data's matrix (see :func:`baseline_methods`; None: not read yet, nothing
        is left out).

    Returns
    -------
    dict
        Baseline → reason, e.g.
        ``{"scvi": "it needs raw counts (the data hold log-normalized values)"}``;
        empty when every baseline of ``config`` runs.
    """
    if "scvi" not in config.baselines or matrix_kind in ("counts", None):
        return {}
    if config.baselines != DEFAULT_BASELINES:
        return {}  # an explicit scvi on such data raises in expand_baselines
    return {"scvi": f"it needs raw counts (the data hold {kind_in_words(matrix_kind)})"}


def model_methods(models: list[Any], config: RunConfig) -> list[Method]:
    """One method per loaded model and probe of ``config`` (``control`` for random init).

    Parameters
    ----------
    models : list of FoundationModel
        The run's loaded models (``model_id``, ``random_init``).
    config : RunConfig
        ``probes`` is read.

    Returns
    -------
    list of Method
        ``<model_id>+<probe>``, models in order, probes in order within each.

    Raises
    ------
    ConfigError
        An unknown probe.
    """
    methods = []
    for model in models:
        kind: MethodKind = "control" if model.random_init else "frozen"
        for probe in config.probes:
            PROBES.get(probe)
            methods.append(
                Method(f"{model.model_id}+{probe}", model.model_id, probe, kind, model.model_id)
            )
    return methods


def check_reference(config: RunConfig, baselines: list[Method], models: list[str]) -> str:
    """Return the run's reference method, refusing one the run will not have.

    The candidates are the baselines, then ``<model_id>+<probe>`` for every model the run
    loads from ``models`` (a model, then its random-init control ``NAME-random`` with
    ``config.random_controls``), in the order :func:`model_methods` gives them once loaded.

    Parameters
    ----------
    config : RunConfig
        ``reference``, ``probes`` and ``random_controls`` are read.
    baselines : list of Method
        The run's baselines (:func:`baseline_methods`).
    models : list of str
        ``NAME``, ``NAME-random`` or ``NAME=DIR`` of the run's models.

    Returns
    -------
    str
        ``config.reference``, or the first method when it is unset.

    Raises
    ------
    ConfigError
        ``config.reference`` is not one of the run's methods (with a did-you-mean).
    """
    model_ids = []
    for spec in models:
        name = spec.partition("=")[0].strip()
        base = name.removesuffix("-random")
        if name == base:
            model_ids.append(base)
        if name != base or config.random_controls:
            model_ids.append(f"{base}-random")
    names = [m.name for m in baselines]
    names += [f"{model_id}+{probe}" for model_id in model_ids for probe in config.probes]
    reference = config.reference or (names[0] if names else "")
    if reference not in names:
        left_out = reference.partition("+")[0]
        if left_out in EMBEDDING_BASELINES and left_out not in config.baselines:
            raise ConfigError(
                f"reference method {reference!r} is not in this run: the {left_out} baseline "
                f"is left out of it (--no-{left_out}, or baselines without {left_out}); add it "
                f"back, or choose from {names}."
            )
        raise ConfigError(
            f"reference method {reference!r} is not in this run; choose from "
            f"{names}.{did_you_mean(reference, names)}"
        )
    return reference
