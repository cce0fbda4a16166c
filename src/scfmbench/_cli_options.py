"""The command line's options: their typer declarations and the parsing of their values.

Each option or argument is declared once, as an ``Annotated`` alias that the commands of
:mod:`scfmbench.cli` use as a parameter's type (the parameter's default stays in the
command's signature), so commands that share a flag share its declaration. Help texts of
options that set a :class:`~scfmbench.config.RunConfig` (or
:class:`~scfmbench.config.FinetuneConfig`) field read that field's description and default
(:func:`field_help`): a default is written in one place only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel

from scfmbench.config import FinetuneConfig, RunConfig
from scfmbench.defaults import MAX_SEED
from scfmbench.errors import ConfigError


def field_default(field: str, config: type[BaseModel] = RunConfig) -> Any:
    """Return the default of field ``field`` of a configuration model.

    Parameters
    ----------
    field : str
        A field name of ``config``, e.g. ``"chunk_size"``.
    config : type of pydantic BaseModel
        :class:`~scfmbench.config.RunConfig` (default) or
        :class:`~scfmbench.config.FinetuneConfig`.

    Returns
    -------
    Any
        The field's default (a default factory is called).

    Raises
    ------
    KeyError
        ``field`` is not a field of ``config``.
    """
    return config.model_fields[field].get_default(call_default_factory=True)


def field_help(field: str, text: str | None = None, config: type[BaseModel] = RunConfig) -> str:
    """Help text of the flag that sets field ``field`` of a configuration model.

    Parameters
    ----------
    field : str
        A field name of ``config``.
    text : str, optional
        Wording for the command line; default: the field's description.
    config : type of pydantic BaseModel
        :class:`~scfmbench.config.RunConfig` (default) or
        :class:`~scfmbench.config.FinetuneConfig`.

    Returns
    -------
    str
        The text followed by the field's default, ``(default X)``, unless the default is
        ``None`` or a bool (a switch), or the text already says what the default is.

    Raises
    ------
    KeyError
        ``field`` is not a field of ``config``.
    """
    text = text or config.model_fields[field].description or ""
    default = field_default(field, config)
    if default is None or isinstance(default, bool) or "default" in text:
        return text
    text = text.rstrip(".")
    return f"{text}; default {default}." if text.endswith(")") else f"{text} (default {default})."


def parse_options(
    pairs: list[str], error: str = "option {pair!r} must be KEY=VALUE, e.g. max_seq_len=3000."
) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` flags, reading each value as a YAML scalar.

    Parameters
    ----------
    pairs : list of str
        E.g. ``["max_seq_len=3000", "normalize=false"]``.
    error : str
        Message for an item without ``=``; ``{pair!r}`` is replaced by the item.

    Returns
    -------
    dict
        ``{"max_seq_len": 3000, "normalize": False}`` (keys stripped; a later key wins).

    Raises
    ------
    ConfigError
        An item is not ``KEY=VALUE``.
    """
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(error.format(pair=pair))
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def model_options_with(
    options: dict[str, dict[str, Any]], pairs: list[str], geneformer_dicts: Path | None
) -> dict[str, dict[str, Any]]:
    """Merge ``MODEL.KEY=VALUE`` flags and ``--geneformer-dicts`` into per-model options.

    Parameters
    ----------
    options : dict
        ``model_options`` of the run configuration, ``{model: {key: value}}`` (not changed).
    pairs : list of str
        ``--option`` values, e.g. ``["scgpt.max_seq_len=3000"]``; they win over ``options``.
    geneformer_dicts : Path or None
        ``--geneformer-dicts``: set as ``geneformer``'s ``dicts`` option when given.

    Returns
    -------
    dict
        A new ``{model: {key: value}}`` mapping.

    Raises
    ------
    ConfigError
        A pair is not ``KEY=VALUE`` or its key does not name a model (``MODEL.KEY``).
    """
    merged = {name: dict(values) for name, values in options.items()}
    for key, value in parse_options(pairs).items():
        if "." not in key:
            raise ConfigError(
                f"option {key!r} must name its model: MODEL.KEY=VALUE, e.g. scgpt.max_seq_len=3000."
            )
        model_name, option_key = key.split(".", 1)
        merged.setdefault(model_name, {})[option_key] = value
    if geneformer_dicts is not None:
        merged.setdefault("geneformer", {})["dicts"] = str(geneformer_dicts)
    return merged


def without_scvi(config: RunConfig | None) -> list[str]:
    """``baselines`` of ``config`` (or the default list) without the scVI ones (``--no-scvi``)."""
    baselines = config.baselines if config is not None else field_default("baselines")
    return [b for b in baselines if b.split("+", 1)[0] != "scvi"]


def also_finetune(flag: bool, models: list[str] | None, config: RunConfig | None) -> dict:
    """Return the override ``run --finetune`` makes (``{}`` without the flag).

    ``{"finetune": {}}`` (default settings) unless the config has a ``finetune`` section.

    Raises
    ------
    ConfigError
        The flag without a model (``--model`` or the config's ``models``) to fine-tune. A
        config's section alone is not refused: one file may serve ``run`` and ``finetune``.
    """
    if not flag:
        return {}
    if not models and (config is None or not config.models):
        raise ConfigError(
            "--finetune fine-tunes the run's foundation models, but none is named; add one "
            "with --model NAME=DIR (models: in a config) or drop --finetune"
        )
    return {"finetune": {}} if config is None or config.finetune is None else {}


def kept_on_interrupt(args: list[str]) -> str:
    """Say what Ctrl-C kept, for the command line ``args`` (without the program name).

    ``embed`` keeps its finished chunks only in a ``--cache-dir``; the other commands keep
    their finished stages.
    """
    if args[:1] == ["embed"] and not any(a.startswith("--cache-dir") for a in args):
        return "nothing was kept: embed keeps its finished chunks with --cache-dir DIR only"
    return "finished stages are kept and a rerun resumes"


def given(**values: Any) -> dict[str, Any]:
    """Keep the flags that were given: the overrides of the configuration.

    Parameters
    ----------
    **values : Any
        Flag values by configuration key; ``None`` means not given.

    Returns
    -------
    dict
        ``values`` without the ``None`` ones.
    """
    return {key: value for key, value in values.items() if value is not None}


def comma_list(value: str | None) -> list[str] | None:
    """Split a comma-separated flag value.

    Parameters
    ----------
    value : str or None
        E.g. ``"ctrl, stim"``.

    Returns
    -------
    list of str or None
        ``["ctrl", "stim"]`` (items stripped, empty ones dropped); ``None`` for ``None``.
    """
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


DataArgument = Annotated[
    str,
    typer.Argument(
        help="An .h5ad file (raw counts for the models) or a built-in name.", metavar="DATA"
    ),
]
DataToCheck = Annotated[
    str | None,
    typer.Argument(
        help="An .h5ad file or a built-in name (default: `data` of --config, else "
        + f"{field_default('data')}, as for run).",
        show_default=False,
        metavar="DATA",
    ),
]
RunDirArgument = Annotated[
    Path, typer.Argument(help="A run directory written by `scfmbench run`.", metavar="RUN_DIR")
]

Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or info lines: warnings, errors and results."),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(help="Run YAML (RunConfig keys, and a finetune: section); flags override it."),
]
LabelKey = Annotated[str | None, typer.Option(help=field_help("label_key"))]
RunsFolder = Annotated[str | None, typer.Option(help=field_help("out"))]  # "" refused
RunName = Annotated[
    str | None, typer.Option(help=field_help("name", "Run name (default: the data file's stem)."))
]
Seed = Annotated[int | None, typer.Option(min=0, max=MAX_SEED, help=field_help("seed"))]
Models = Annotated[
    list[str] | None,
    typer.Option(
        help="NAME=DIR, repeatable: geneformer=DIR, scgpt=DIR, scfoundation=DIR "
        "(NAME-random=DIR: the random-init control only)."
    ),
]
MinCellsPerClass = Annotated[int | None, typer.Option(help=field_help("min_cells_per_class"))]
MergeSimilarLabels = Annotated[
    bool | None, typer.Option("--merge-similar-labels", help=field_help("merge_similar_labels"))
]
AllowNormalized = Annotated[
    bool | None, typer.Option("--allow-normalized", help=field_help("allow_normalized"))
]
AllowFeatureSelected = Annotated[
    bool | None,
    typer.Option("--allow-feature-selected", help=field_help("allow_feature_selected")),
]
GeneColumn = Annotated[
    str | None,
    typer.Option(
        help=field_help(
            "gene_column", "var column with gene identifiers (default: resolved per model)."
        )
    ),
]
Device = Annotated[str | None, typer.Option(help=field_help("device"), show_default=False)]
BatchSize = Annotated[int | None, typer.Option(help=field_help("batch_size"))]
GeneformerDicts = Annotated[
    Path | None,
    typer.Option(
        help="Folder with the Geneformer token, median, name and mapping dictionaries "
        "(default: found beside the model and chosen by its vocab_size)."
    ),
]
Backed = Annotated[
    bool | None,
    typer.Option(
        "--backed/--no-backed",
        help="Keep DATA on disk and stream it chunk by chunk instead of loading it "
        "(default: for .h5ad files over 1 GiB, and for `embed` under torchrun).",
    ),
]

# ---- run ----------------------------------------------------------------------------------

DataOption = Annotated[str | None, typer.Option(help=field_help("data"))]
Design = Annotated[str | None, typer.Option(help=field_help("design"))]
NSplits = Annotated[int | None, typer.Option(help=field_help("n_splits"))]
NRepeats = Annotated[int | None, typer.Option(help=field_help("n_repeats"))]
HoldoutKey = Annotated[str | None, typer.Option(help=field_help("holdout_key"))]
TrainGroups = Annotated[
    str | None,
    typer.Option(help="Comma-separated values of --holdout-key to train on (directed shift)."),
]
TestGroups = Annotated[
    str | None,
    typer.Option(help="Comma-separated values of --holdout-key to test on (directed shift)."),
]
Reference = Annotated[str | None, typer.Option(help=field_help("reference"))]
AlsoFinetune = Annotated[
    bool,
    typer.Option(
        "--finetune", help="Also fine-tune every model (frozen and fine-tuned side by side)."
    ),
]
ChunkSize = Annotated[int | None, typer.Option(help=field_help("chunk_size"))]
NJobs = Annotated[int | None, typer.Option(help=field_help("n_jobs"))]
NoScvi = Annotated[
    bool,
    typer.Option("--no-scvi", help="Leave the scVI baseline out (its training is the slow part)."),
]
TrainSizes = Annotated[
    str | None,
    typer.Option(
        help="Label efficiency: refit every probe on N labelled training cells per class, "
        "e.g. 1,5,10,25,50,all (nested, same validation and test cells)."
    ),
]
TrainSizeSeeds = Annotated[int | None, typer.Option(help=field_help("train_size_seeds"))]

# ---- validate -----------------------------------------------------------------------------

AsJson = Annotated[bool, typer.Option("--json", help="Print the diagnostics as JSON.")]
ModelsMeantFor = Annotated[
    list[str] | None,
    typer.Option(
        help="A model the data is meant for, NAME or NAME=DIR, repeatable: list what it "
        "would refuse (e.g. a feature-selected count matrix for geneformer)."
    ),
]

# ---- embed (defaults in the command's signature, from the API it calls) --------------------

ModelToEmbed = Annotated[
    str, typer.Option(help="NAME=DIR, e.g. geneformer=./gf or scgpt=./scGPT_human.")
]
EmbeddingsFile = Annotated[Path, typer.Option(help="Output .h5ad (copy of DATA + obsm) or .npy.")]
Layer = Annotated[int | None, typer.Option(help="Layer (default: the model's reference layer).")]
Pooling = Annotated[
    str | None,
    typer.Option(
        help="mean or cls (Geneformer, scGPT), all or max (scFoundation); default: the model's."
    ),
]
EmbedBatchSize = Annotated[
    str, typer.Option(help="Cells per batch, or auto (start at 256, halve on out-of-memory).")
]
EmbedDevice = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Precision = Annotated[str, typer.Option(help="float32, bfloat16 or float16 (GPU).")]
CacheDir = Annotated[
    Path | None,
    typer.Option(help="Embedding cache folder (finished chunks survive an interruption)."),
]
EmbedChunkSize = Annotated[
    int,
    typer.Option(help="Cells per saved chunk when caching; cells read at a time when streaming."),
]
LoaderOptions = Annotated[
    list[str] | None,
    typer.Option(help="Model loader option KEY=VALUE, repeatable (e.g. tgthighres=a5)."),
]
EmbedSeed = Annotated[
    int,
    typer.Option(
        min=0,
        max=MAX_SEED,
        help="Seed of tokenization (scGPT) and of a NAME-random control; the run's default.",
    ),
]

# ---- transfer -----------------------------------------------------------------------------

TrainData = Annotated[str, typer.Option(help="Training dataset (.h5ad or built-in name).")]
TestData = Annotated[str, typer.Option(help="Test dataset (.h5ad or built-in name).")]
LabelMap = Annotated[
    str, typer.Option(help="Label map: YAML 'source label: shared label' or a built-in.")
]
LabelKeyTrain = Annotated[str | None, typer.Option(help="obs label column of the training data.")]
LabelKeyTest = Annotated[str | None, typer.Option(help="obs label column of the test data.")]
OneWay = Annotated[bool, typer.Option("--one-way", help="Only train → test.")]
TrainingSeeds = Annotated[
    int | None,
    typer.Option(
        "--n-splits",
        help="Stratified train/val splits of the training data (seeds SEED..SEED+K-1), each "
        "model scored on every test cell; default 5.",
    ),
]
TransferName = Annotated[
    str | None, typer.Option(help="Run name (default transfer_<train>__<test>).")
]
ModelLoaderOptions = Annotated[
    list[str] | None,
    typer.Option(
        help="Model loader option MODEL.KEY=VALUE, repeatable (e.g. scgpt.max_seq_len=3000)."
    ),
]

# ---- finetune (help from FinetuneConfig's fields) ------------------------------------------

ModelsToFinetune = Annotated[
    list[str],
    typer.Option(
        help="NAME=DIR, repeatable: geneformer=DIR, scgpt=DIR, scfoundation=DIR "
        "(NAME-random=DIR: control)."
    ),
]
Epochs = Annotated[int | None, typer.Option(help=field_help("epochs", config=FinetuneConfig))]
LearningRate = Annotated[
    float | None,
    typer.Option("--lr", help=field_help("learning_rate", config=FinetuneConfig)),
]
FinetuneBatchSize = Annotated[
    int | None, typer.Option(help=field_help("batch_size", config=FinetuneConfig))
]
Lora = Annotated[
    bool | None, typer.Option("--lora/--no-lora", help=field_help("lora", config=FinetuneConfig))
]
FreezeLayers = Annotated[
    int | None, typer.Option(help=field_help("freeze_layers", config=FinetuneConfig))
]
FinetuneSettings = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="KEY=VALUE for any finetune option, repeatable: --set patience=2 "
        "--set mixed_precision=bf16 --set gradient_accumulation_steps=4.",
    ),
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")]

# ---- compare ------------------------------------------------------------------------------

RunDirsArgument = Annotated[
    list[Path], typer.Argument(help="Run directories to compare.", metavar="RUN_DIRS")
]
CompareFolder = Annotated[
    Path | None, typer.Option(help="Output folder (default: compare/ beside the first run).")
]


def api_default(function: Callable[..., Any], parameter: str) -> Any:
    """Return the default of keyword ``parameter`` of ``function``, the API of a command.

    Parameters
    ----------
    function : callable
        The Python API behind a command, e.g. ``embed_dataset``.
    parameter : str
        One of its keyword parameters.

    Returns
    -------
    Any
        The parameter's default, so the flag's default is the API's.

    Raises
    ------
    KeyError
        ``function`` has no parameter ``parameter``.
    ValueError
        The parameter has no default.
    """
    default = inspect.signature(function).parameters[parameter].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{function.__name__}() has no default for {parameter!r}")
    return default
