"""How a model is named, configured and loaded: the run context, declared options, ``MODELS``.

Every model registers one :class:`ModelLoader` under its name with :func:`register_model`: the
function that builds the model and the pydantic model of the options it takes. A loader never
sees a keyword it did not declare; run-wide settings reach it through one :class:`LoadContext`.
:func:`load_model` is the one place a parsed ``NAME[-random]=DIR`` becomes a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import ConfigError
from scfmbench.models.base import FoundationModel
from scfmbench.registry import Registry, did_you_mean


@dataclass(frozen=True)
class LoadContext:
    """Run-wide settings that every loader takes.

    Attributes
    ----------
    seed : int
        Seed of a random-init control's weights (default ``DEFAULT_SEED``, 42). Tokenizers
        that sample take their seed at tokenization instead.
    gene_column : str or None
        ``adata.var`` column with the gene identifiers, or ``"var_names"``; ``None`` (default):
        resolved by content (``scfmbench.data.genes.resolve_gene_identifiers``).
    allow_normalized : bool
        Tokenize non-count input with a warning instead of refusing it (default ``False``).
    """

    seed: int = DEFAULT_SEED
    gene_column: str | None = None
    allow_normalized: bool = False


CONTEXT_FIELDS = tuple(f.name for f in dataclasses.fields(LoadContext))
"""Names of the :class:`LoadContext` fields; ``model_options`` may set them for one model."""


class ModelOptions(BaseModel):
    """Base of every model's declared options: frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class ModelSource(Protocol):
    """What :func:`load_model` reads of a parsed model spec (``config.ModelSpec``)."""

    @property
    def name(self) -> str:
        """Registered model name, e.g. ``"geneformer"``."""
        ...

    @property
    def path(self) -> Path:
        """Checkpoint folder or file."""
        ...

    @property
    def random_only(self) -> bool:
        """Whether only the random-init control was asked for."""
        ...


OptionsT = TypeVar("OptionsT", bound=ModelOptions)
ModelT = TypeVar("ModelT", bound=FoundationModel, covariant=True)
_OptionsIn = TypeVar("_OptionsIn", bound=ModelOptions, contravariant=True)


class Build(Protocol[_OptionsIn, ModelT]):
    """The function a model registers: checkpoint path, context and options to a model."""

    def __call__(
        self, path: Path, *, context: LoadContext, options: _OptionsIn, random_init: bool
    ) -> ModelT:
        """Build the model (or its random-init control) from ``path``."""
        ...


class CheckKind(Protocol[_OptionsIn]):
    """A model's refusal of a kind of expression matrix, made before any checkpoint is read.

    It raises what the model's tokenizer would raise on a matrix of that kind.
    """

    def __call__(
        self,
        kind: str,
        *,
        context: LoadContext,
        options: _OptionsIn,
        where: str,
        obs: pd.DataFrame,
    ) -> None:
        """Raise the tokenizer's error for a matrix of ``kind`` (nothing when it reads it).

        ``obs`` is the cells' ``obs``, for a model that reads a column of it.
        """
        ...


@dataclass(frozen=True)
class ModelLayout:
    """What a checkpoint offers to embed with, read without its weights.

    Attributes
    ----------
    poolings : tuple of str
        The poolings the model takes (``FoundationModel.poolings``).
    n_layers : int or None
        Its number of encoder layers; ``None`` when only the weights tell.
    """

    poolings: tuple[str, ...]
    n_layers: int | None = None


class Describe(Protocol[_OptionsIn]):
    """A model's :class:`ModelLayout`, read from its checkpoint's settings files, not weights."""

    def __call__(self, path: Path, *, context: LoadContext, options: _OptionsIn) -> ModelLayout:
        """Return the layout of the checkpoint at ``path``."""
        ...


def check_layer_pooling(
    model: str,
    model_id: str,
    layout: ModelLayout,
    *,
    layer: int | None,
    pooling: str | None,
    what: str = "layer",
) -> None:
    """Refuse a layer out of range or a pooling the model does not take.

    Parameters
    ----------
    model
        The model's name (``FoundationModel.name``), for the pooling message.
    model_id
        Its id (``-random`` for the control), for the layer message.
    layout
        Its poolings and number of layers (an unknown number: any layer passes).
    layer, pooling
        As asked for; ``None``: the model's default, which it always takes.
    what
        How the layer is named in the message (default ``"layer"``).

    Raises
    ------
    ConfigError
        A layer out of range, or a pooling the model lacks.
    """
    n_layers = layout.n_layers
    if layer is not None and n_layers is not None and not -n_layers - 1 <= layer <= n_layers:
        raise ConfigError(
            f"{what} {layer} is out of range for {model_id} ({n_layers} layers); "
            f"choose 0..{n_layers}, or -{n_layers + 1}..-1 from the last."
        )
    if pooling is not None and pooling not in layout.poolings:
        raise ConfigError(
            f"pooling {pooling!r} is not available for {model}; choose from {layout.poolings}."
        )


def check_freeze_layers(model_id: str, n_layers: int, freeze_layers: int) -> None:
    """Refuse freezing more encoder layers than the model has.

    Raises
    ------
    ConfigError
        ``freeze_layers`` above ``n_layers``.
    """
    if freeze_layers > n_layers:
        raise ConfigError(
            f"freeze_layers={freeze_layers} but {model_id} has {n_layers} layers; "
            f"choose 0..{n_layers}."
        )


class ModelLoader(Generic[OptionsT, ModelT]):
    """A registered model: its name, its declared options and the function that builds it.

    Parameters
    ----------
    name
        Registered name (``MODELS.get(name)`` returns this loader).
    options
        The model's options: a :class:`ModelOptions` subclass.
    build
        Called as ``build(path, context=..., options=..., random_init=...)``.
    check_kind
        Called as ``check_kind(kind, context=..., options=..., where=...)`` by
        :meth:`check_matrix_kind`; None (default): the model reads every kind validation lets
        through.
    describe
        Called as ``describe(path, context=..., options=...)`` by :meth:`check_embedding`;
        None (default): no layer or pooling is checked before the model is loaded.

    Examples
    --------
    In Python, the loader is also called directly with context fields and options as keywords:
    ``load_scgpt(folder, random_init=True, seed=3, max_seq_len=600)``.
    """

    def __init__(
        self,
        name: str,
        options: type[OptionsT],
        build: Build[OptionsT, ModelT],
        check_kind: CheckKind[OptionsT] | None = None,
        describe: Describe[OptionsT] | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.build = build
        self.check_kind = check_kind
        self.describe = describe
        self.__doc__ = build.__doc__
        self.__wrapped__ = build

    def __repr__(self) -> str:
        """``ModelLoader('geneformer', GeneformerOptions)``."""
        return f"ModelLoader({self.name!r}, {self.options.__name__})"

    @property
    def option_names(self) -> list[str]:
        """The declared options, then the context fields ``model_options`` may override."""
        return [*self.options.model_fields, *CONTEXT_FIELDS]

    def split_options(
        self, values: Mapping[str, Any] | None, context: LoadContext | None = None
    ) -> tuple[LoadContext, OptionsT]:
        """Check ``values`` (``model_options[name]``) and split them into context and options.

        Parameters
        ----------
        values
            Option name → value; keys that are :class:`LoadContext` fields override the run's
            setting for this model only. ``None``: no options.
        context
            The run's context (default: ``LoadContext()``).

        Returns
        -------
        tuple of (LoadContext, options)
            The context for this model and the validated declared options.

        Raises
        ------
        ConfigError
            An option the model does not declare (with a did-you-mean), or an invalid value.
        """
        values = dict(values or {})
        valid = self.option_names
        for key in values:
            if key not in valid:
                raise ConfigError(
                    f"unknown option {key!r} for model {self.name!r}; choose from {valid}."
                    + did_you_mean(key, valid)
                )
        overrides = {k: values.pop(k) for k in CONTEXT_FIELDS if k in values}
        context = dataclasses.replace(context or LoadContext(), **overrides)
        try:
            return context, self.options.model_validate(values)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise ConfigError(
                f"option {where!r} of model {self.name!r}: {problem['msg']} "
                f"(got {problem.get('input')!r})."
            ) from None

    def load(
        self,
        path: str | Path,
        context: LoadContext | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        random_init: bool = False,
    ) -> ModelT:
        """Build the model from ``path`` with the run's ``context`` and this model's options.

        Parameters
        ----------
        path
            Checkpoint folder (or file, where the model takes one).
        context
            Run-wide settings (default: ``LoadContext()``).
        options
            ``model_options[name]``: declared options and per-model context overrides.
        random_init
            Build the random-init control (seeded by ``context.seed``) instead.

        Returns
        -------
        FoundationModel
            The loaded model, in eval mode on the CPU.

        Raises
        ------
        ConfigError
            An unknown option or an invalid value.
        CheckpointError
            A missing, corrupt or inconsistent checkpoint (raised by the model's builder).
        """
        context, declared = self.split_options(options, context)
        return self.build(Path(path), context=context, options=declared, random_init=random_init)

    def check_matrix_kind(
        self,
        kind: str,
        context: LoadContext | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        where: str,
        obs: pd.DataFrame | None = None,
    ) -> None:
        """Refuse a matrix of ``kind`` as the model's tokenizer would, without loading it.

        Parameters
        ----------
        kind
            The matrix kind (``scfmbench.data.matrix.classify_matrix``): ``counts``,
            ``corrected``, ``normalized``, ``lognorm`` or ``scaled``.
        context, options
            As for :meth:`load`: ``allow_normalized`` and the model's options decide.
        where
            What holds the matrix, for the message (e.g. ``"adata.X"``).
        obs
            The cells' ``obs`` (default: no columns), e.g. for scFoundation's total counts
            with ``pre_normalized="A"``.

        Raises
        ------
        CountsRequiredError
            The model needs raw counts (or other values) that the matrix does not hold.
        DataError
            A column the model reads from ``obs`` is missing or holds unusable values.
        ConfigError
            An unknown option or an invalid value.
        """
        if self.check_kind is None:
            return
        context, declared = self.split_options(options, context)
        self.check_kind(
            kind,
            context=context,
            options=declared,
            where=where,
            obs=obs if obs is not None else pd.DataFrame(),
        )

    def check_embedding(
        self,
        path: str | Path,
        context: LoadContext | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        layer: int | None = None,
        pooling: str | None = None,
        freeze_layers: int = 0,
        random_init: bool = False,
        what: str = "layer",
    ) -> None:
        """Refuse a layer, pooling or frozen-layer count the model lacks, without its weights.

        Reads the checkpoint's settings files only (``describe``), and only when something
        is asked for; the messages are those given once the model is loaded.

        Parameters
        ----------
        path
            Checkpoint folder (or file), as for :meth:`load`.
        context, options
            As for :meth:`load`.
        layer, pooling
            The layer and pooling asked for; ``None``: the model's default.
        freeze_layers
            Encoder layers fine-tuning freezes (default 0).
        random_init
            Whether the random-init control is meant (its id names it in the message).
        what
            How the layer is named in the message (e.g. ``"finetune layer"``).

        Raises
        ------
        ConfigError
            A layer out of range, a pooling the model lacks, more frozen layers than it has,
            or an unknown option.
        CheckpointError
            The settings files are missing or unreadable (as loading would find).
        """
        if self.describe is None or (layer is None and pooling is None and not freeze_layers):
            return
        context, declared = self.split_options(options, context)
        layout = self.describe(Path(path), context=context, options=declared)
        model_id = f"{self.name}-random" if random_init else self.name
        check_layer_pooling(self.name, model_id, layout, layer=layer, pooling=pooling, what=what)
        if layout.n_layers is not None:
            check_freeze_layers(model_id, layout.n_layers, freeze_layers)

    def __call__(self, path: str | Path, *, random_init: bool = False, **values: Any) -> ModelT:
        """Load with keywords: :class:`LoadContext` fields and the model's declared options.

        Same as ``load(path, options=values, random_init=random_init)``.
        """
        return self.load(path, options=values, random_init=random_init)


MODELS: Registry[ModelLoader[Any, FoundationModel]] = Registry("model")
"""Registered models: ``MODELS.get("scgpt")`` is the :class:`ModelLoader` of scGPT."""


def register_model(
    name: str,
    options: type[OptionsT],
    *,
    check_kind: CheckKind[OptionsT] | None = None,
    describe: Describe[OptionsT] | None = None,
) -> Callable[[Build[OptionsT, ModelT]], ModelLoader[OptionsT, ModelT]]:
    """Register ``build`` in :data:`MODELS` with its declared ``options`` (a decorator).

    Parameters
    ----------
    name
        The model's name on the command line (``NAME=DIR``).
    options
        The :class:`ModelOptions` subclass of the options the model takes.
    check_kind
        The model's refusal of a matrix kind (see :class:`ModelLoader`), if it has one.
    describe
        The model's :class:`ModelLayout` read without its weights (see :class:`ModelLoader`).

    Returns
    -------
    callable
        A decorator that returns the registered :class:`ModelLoader` in place of ``build``.
    """

    def decorator(build: Build[OptionsT, ModelT]) -> ModelLoader[OptionsT, ModelT]:
        loader = ModelLoader(name, options, build, check_kind, describe)
        MODELS.register(name)(loader)
        return loader

    return decorator


def load_model(
    spec: ModelSource,
    context: LoadContext,
    options: Mapping[str, Any] | None = None,
    *,
    random_init: bool | None = None,
) -> FoundationModel:
    """Load the model that ``spec`` names: the only place a model spec becomes a model.

    Parameters
    ----------
    spec
        A parsed ``NAME[-random]=DIR`` (``config.ModelSpec``): ``name``, ``path``,
        ``random_only``.
    context
        Run-wide settings: seed, gene column, allow-normalized.
    options
        ``model_options[spec.name]`` (default: none).
    random_init
        Load the random-init control; default: ``spec.random_only``.

    Returns
    -------
    FoundationModel
        The model, or its random-init control (``model_id`` ends in ``-random``).

    Raises
    ------
    ConfigError
        Unknown model name or option (with a did-you-mean), or an invalid option value.
    CheckpointError
        The checkpoint is missing, corrupt or inconsistent.
    """
    loader = MODELS.get(spec.name)
    if random_init is None:
        random_init = spec.random_only
    return loader.load(spec.path, context, options, random_init=random_init)
