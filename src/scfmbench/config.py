"""The run configuration: one typed object, loaded from YAML; CLI flags only override it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from scfmbench._yaml import read_yaml
from scfmbench.data.splits import normalize_train_sizes
from scfmbench.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DEVICE,
    DEFAULT_SEED,
    MAX_SEED,
)
from scfmbench.errors import CheckpointError, ConfigError
from scfmbench.evaluation.scvi import ScviOptions
from scfmbench.registry import did_you_mean

DEFAULT_BASELINES = ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority", "scvi"]
EMBEDDING_BASELINES = ("scvi",)
"""Baseline representations probed like a model embedding: a bare name in ``baselines``
means that representation with every probe of ``probes``."""


# Fields that do not change the result; a resumed run may change them.
NOT_IN_FINGERPRINT = ("device", "eval_batch_size")


class FinetuneConfig(BaseModel):
    """Fine-tuning options (YAML section ``finetune:``); defaults follow the study."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(3, ge=1, description="Training epochs.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    seed: int = Field(
        DEFAULT_SEED,
        ge=0,
        le=MAX_SEED,
        description="Seed of the head, adapters, data order and dropout (in a run: the run's "
        "seed unless set here).",
    )
    batch_size: int = Field(
        16, ge=1, description="Cells per micro-step, summed over all processes (global batch)."
    )
    eval_batch_size: int = Field(64, ge=1, description="Cells per validation/test batch.")
    max_tokens: int | None = Field(
        16_384,
        ge=1,
        description="Most padded tokens per batch, training and evaluation (batches hold cells "
        "of similar length, so long cells go in smaller batches; null: no limit).",
    )
    max_attention: int | None = Field(
        2**24,
        ge=1,
        description="Most attention scores per head per batch (cells × longest², what "
        "attention memory grows with): 16 cells of ≤ 1,024 tokens, 2 of 2,400 (null: no limit).",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on bias/norm).")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="Fraction of optimizer steps with linear warmup."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this (null: no clipping)."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision: no, bf16 (GPU, or CPU) or fp16 (GPU only)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (network must support it)."
    )
    patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better val macro F1."
    )
    class_weighted: bool = Field(
        False, description="Weight the loss by inverse class frequency on train."
    )
    freeze_embeddings: bool = Field(False, description="Freeze the embedding modules.")
    freeze_layers: int = Field(0, ge=0, description="Freeze the first N encoder layers.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) and the head only.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    layer: int | None = Field(
        None, description="Encoder layer fed to the head (default: the last layer)."
    )
    pooling: str | None = Field(None, description="Pooling (default: the model's).")
    device: str = Field("auto", description="auto (GPU when present) or cpu.")

    @classmethod
    def build(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Validate ``values``; unknown keys and bad values become one-line ConfigErrors."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, cls, "finetune option")) from None

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> FinetuneConfig:
        """Read the ``finetune:`` section of a run YAML; ``overrides`` win."""
        return cls.build({**finetune_section(read_yaml(path), path), **overrides})

    def fingerprint(self) -> dict[str, Any]:
        """Return the options that change the result (compared on resume)."""
        return self.model_dump(mode="json", exclude=set(NOT_IN_FINGERPRINT))


def finetune_section(loaded: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Pop and return the ``finetune:`` mapping of a loaded run YAML (empty when absent)."""
    section = loaded.pop("finetune", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(
            f"the finetune: section of {str(path)!r} must be a mapping of option: value, "
            f"got {section!r}."
        )
    return section


@dataclass(frozen=True)
class ModelSpec:
    """One foundation model of a run, parsed once from ``NAME=DIR``.

    ``NAME-random=DIR`` asks for the random-init control only. Parsing checks the syntax, that
    ``NAME`` is a registered model and that ``DIR`` exists, so a bad ``--model`` fails before
    any data is read.

    Attributes
    ----------
    name : str
        Registered model name (``geneformer``, ``scgpt``, ``scfoundation``).
    path : Path
        Checkpoint folder as given.
    random_only : bool
        Only the random-init control (the ``-random`` suffix).
    """

    name: str
    path: Path
    random_only: bool = False

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse ``"geneformer=./gf"`` or ``"scgpt-random=./scgpt"``.

        Raises
        ------
        ConfigError
            Not ``NAME=DIR``, or ``NAME`` is not a registered model (with a did-you-mean).
        CheckpointError
            ``DIR`` does not exist.
        """
        from scfmbench.models import MODELS

        name, sep, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not (sep and name and path):
            raise ConfigError(
                f"model {spec!r} must be written NAME=DIR, e.g. geneformer=./Geneformer-V1-10M."
            )
        base = name.removesuffix("-random")
        MODELS.get(base)
        if not Path(path).exists():
            raise CheckpointError(
                f"model {name!r}: checkpoint folder {path!r} does not exist; check the path."
            )
        return cls(base, Path(path), random_only=name != base)

    def __str__(self) -> str:
        """Return the spec as written: ``NAME[-random]=DIR``."""
        return f"{self.name}{'-random' if self.random_only else ''}={self.path}"


def check_model_options(name: str, loader: Any, options: dict[str, Any]) -> None:
    """Check ``model_options[name]`` against the options model ``name`` declares.

    Parameters
    ----------
    name
        Registered model name.
    loader
        Its :class:`~scfmbench.models.ModelLoader` (``MODELS.get(name)``).
    options
        Option name → value: the model's declared options, or a run-wide setting (``seed``,
        ``gene_column``, ``allow_normalized``) for this model only.

    Raises
    ------
    ConfigError
        An option the model does not declare (naming the valid ones, with a did-you-mean), or
        an invalid value.
    """
    loader.split_options(options)


class RunConfig(BaseModel):
    """Everything that determines a run's results (the resolved copy is saved as config.yaml)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field("pbmc68k_reduced", description="An .h5ad path or a built-in dataset name.")
    label_key: str | None = Field(
        None, description="obs column with cell types (default: cell_type, or the built-in's)."
    )
    name: str | None = Field(None, description="Run name; the run directory is OUT/NAME.")
    out: Path = Field(Path("runs"), description="Folder that holds run directories.")
    seed: int = Field(
        DEFAULT_SEED,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first split and of every model.",
    )
    design: Literal["cv", "study"] = Field(
        "cv",
        description="cv: stratified K-fold cross-validation (disjoint test folds, validation "
        "carved from the training folds); study: the study's repeated random splits.",
    )
    n_splits: int = Field(
        5, ge=1, description="Folds K (cv) or repeated random splits (study, seeds seed..+K-1)."
    )
    n_repeats: int = Field(
        1, ge=1, description="Repeats of K-fold cross-validation (design cv; > 1 = repeated CV)."
    )
    fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1),
        description="Train/val/test fractions per class (cv: only the validation share is used).",
    )
    holdout_key: str | None = Field(
        None,
        description="obs column (donor, sample, condition, batch): test on each group in turn, "
        "trained on the others (or on `train_groups`, tested on `test_groups`); a random-split "
        "cv design is scored beside it.",
    )
    train_groups: list[str] | None = Field(
        None, description="Values of `holdout_key` to train on (directed shift; with test_groups)."
    )
    test_groups: list[str] | None = Field(
        None, description="Values of `holdout_key` to test on (directed shift; with train_groups)."
    )
    min_cells_per_class: int = Field(10, ge=1, description="Smaller classes are dropped.")
    merge_similar_labels: bool = Field(
        False,
        description="Merge labels that differ only by case or whitespace ('B', 'B ', 'b') into "
        "their most common spelling (default: keep them apart, with a warning).",
    )
    logreg_c: list[float] | None = Field(
        None,
        description="C values tried (on validation) by logistic-regression probes (default: "
        "1e-4, 1e-3, …, 1e3; design study: the study's 0.01, 0.1, 1).",
    )
    n_hvg: int = Field(2000, ge=1, description="Highly variable genes for the baselines.")
    n_pcs: int = Field(50, ge=1, description="Principal components for the PCA baselines.")
    baselines: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BASELINES),
        description="Baselines as representation+probe (hvg, pca, none, scvi; logreg, xgboost, "
        "knn), 'majority', or 'scvi' alone (scVI latent space with every probe of `probes`; "
        "runs only on raw counts).",
    )
    scvi: ScviOptions = Field(
        default_factory=ScviOptions, description="scVI baseline settings (see ScviOptions)."
    )
    probes: list[str] = Field(
        default_factory=lambda: ["logreg", "xgboost", "knn"],
        description="Probes trained on every foundation-model embedding.",
    )
    models: list[str] = Field(
        default_factory=list, description="Foundation models as NAME=DIR, e.g. geneformer=./gf."
    )
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-model loader options, e.g. {scfoundation: {tgthighres: a5}} or "
        "{scgpt: {max_seq_len: 3000}}.",
    )
    finetune: FinetuneConfig | None = Field(
        None,
        description="Fine-tune every model end to end (null = off; {} = the study's defaults: "
        "3 epochs, lr 5e-5, the run's seed; keys as in `scfmbench finetune --help`).",
    )
    random_controls: bool = Field(
        True, description="Add the random-init control of every foundation model."
    )
    reference: str | None = Field(
        None,
        description="Method the gains (Δabs, Δrel) are computed against (default: the "
        "first baseline).",
    )
    allow_normalized: bool = Field(
        False, description="Let count-based models run on normalized data (with a warning)."
    )
    allow_feature_selected: bool = Field(
        False,
        description="Let rank- and bin-based models (geneformer, scgpt) run on a "
        "feature-selected count matrix (fewer than 5,000 genes, or every gene flagged "
        "var['highly_variable']), with a warning beside their scores.",
    )
    gene_column: str | None = Field(None, description="var column with gene identifiers.")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Cells per embedding batch.")
    device: str = Field(DEFAULT_DEVICE, description="cpu, cuda, cuda:N or auto.")
    figures: bool = Field(True, description="Write confusion-matrix and UMAP figures.")
    layerwise: bool = Field(
        True, description="Probe every layer of each foundation model (logreg, first split)."
    )
    batch_key: str | None = Field(
        None, description="obs column with donor/batch for UMAP colouring (default: detected)."
    )
    backed: bool | None = Field(
        None,
        description="Keep the .h5ad on disk and stream it in chunks (null: for files over 1 GiB).",
    )
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE,
        ge=1,
        description="Cells read, tokenized and embedded at a time when streaming.",
    )
    n_jobs: int = Field(
        -1,
        description="Processes that fit the probes (each split and representation is one "
        "job): -1 every CPU core, 1 this process only; the results do not depend on it.",
    )
    train_sizes: list[int | Literal["all"]] | None = Field(
        None,
        description="Label efficiency: labelled training cells per class to refit every probe "
        "on, e.g. [1, 5, 10, 25, 50, all] (nested subsets of each fold's training cells; same "
        "validation and test cells; null = off).",
    )
    train_size_seeds: int = Field(
        3, ge=1, description="Random draws of the labelled cells per fold and size."
    )

    @field_validator("n_jobs")
    @classmethod
    def _check_n_jobs(cls, value: int) -> int:
        if value == 0:
            raise ValueError(
                "n_jobs must be a number of processes (1, 2, …) or, as in scikit-learn, -1 for "
                "every core, -2 for all but one, …"
            )
        return value

    @field_validator("baselines")
    @classmethod
    def _check_baselines(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in ("majority", *EMBEDDING_BASELINES) and "+" not in item:
                raise ValueError(
                    f"baseline {item!r} must look like 'pca+logreg', 'majority' or 'scvi'."
                    + did_you_mean(item, ["majority", *EMBEDDING_BASELINES])
                )
        return value

    @field_validator("train_sizes", mode="before")
    @classmethod
    def _check_train_sizes(cls, value: Any) -> Any:
        return None if value is None else normalize_train_sizes(value)

    @field_validator("train_groups", "test_groups", mode="before")
    @classmethod
    def _groups_as_list(cls, value: Any) -> Any:
        """One group (``train_groups: ctrl``) is a list of one; numbers (donor 101) are text."""
        values = [value] if isinstance(value, str | int | float) else value
        return [str(v) for v in values] if isinstance(values, list | tuple) else value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        for spec in value:
            ModelSpec.parse(spec)
        return value

    @field_validator("logreg_c")
    @classmethod
    def _check_logreg_c(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or not all(0 < c < math.inf for c in value)):
            raise ValueError(
                f"logreg_c must list positive, finite C values (e.g. [0.01, 0.1, 1]), got {value}."
            )
        return value

    @model_validator(mode="after")
    def _check_model_ids(self) -> RunConfig:
        """Refuse a model named twice: it would be embedded and compared with itself."""
        named: dict[str, ModelSpec] = {}
        for spec in self.model_specs:
            ids = [] if spec.random_only else [spec.name]
            if spec.random_only or self.random_controls:
                ids.append(f"{spec.name}-random")
            for model_id in ids:
                if model_id in named:
                    raise ValueError(
                        f"model {model_id!r} comes from both {str(named[model_id])!r} and "
                        f"{str(spec)!r}; name each model once (NAME=DIR adds its random-init "
                        "control NAME-random itself, unless the config sets "
                        "random_controls: false)."
                    )
                named[model_id] = spec
        return self

    @field_validator("model_options")
    @classmethod
    def _check_model_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if value:
            from scfmbench.models import MODELS

            for name, options in value.items():
                check_model_options(name, MODELS.get(name), options)
        return value

    @field_serializer("finetune")
    def _dump_finetune(self, value: FinetuneConfig | None) -> dict[str, Any] | None:
        # only the keys that were set, so that an unset seed still follows the run's seed
        return None if value is None else value.model_dump(mode="json", exclude_unset=True)

    @property
    def model_specs(self) -> list[ModelSpec]:
        """``models`` parsed (see :class:`ModelSpec`)."""
        return [ModelSpec.parse(spec) for spec in self.models]

    def finetune_settings(self) -> FinetuneConfig | None:
        """Return the ``finetune`` section with the run's ``seed`` unless it sets its own.

        ``None`` when fine-tuning is off.
        """
        if self.finetune is None or "seed" in self.finetune.model_fields_set:
            return self.finetune
        return self.finetune.model_copy(update={"seed": self.seed})

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (value in ("", ".", "..") or {"/", "\\"} & set(value)):
            raise ValueError(
                "a run name is one folder name (no '/', '\\' or '..'), so outputs stay inside --out"
            )
        return value

    @field_validator("out", "data", mode="before")
    @classmethod
    def _check_not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():  # an unset shell variable
            raise ValueError(EMPTY_PATH[info.field_name or "out"])
        return value

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> RunConfig:
        """Load a YAML file; ``overrides`` (e.g. CLI flags that were given) win."""
        return cls.build({**read_yaml(path), **overrides})

    @classmethod
    def build(cls, values: dict[str, Any]) -> RunConfig:
        """Validate ``values``; unknown keys and bad values become one-line ConfigErrors."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    def to_yaml(self) -> str:
        """Return the resolved config as YAML (what a run saves as ``config.yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


EMPTY_PATH = {
    "out": "the folder is empty; give one, e.g. runs (or . for this folder)",
    "data": "the path is empty; give an .h5ad file or a built-in name (pbmc68k_reduced)",
}

SECTIONS: dict[str, tuple[type[BaseModel], str]] = {
    "finetune": (FinetuneConfig, "finetune option"),
    "scvi": (ScviOptions, "scvi option"),
}
"""Typed sections of RunConfig: an error inside one names the section's own keys."""


def describe_validation_error(
    exc: ValidationError, model: type[BaseModel] | None = None, what: str = "config key"
) -> str:
    """One line for the first pydantic error of ``model`` (default :class:`RunConfig`).

    Unknown keys get a did-you-mean and the valid keys; an error inside a typed section
    (``finetune: {epochz: 3}``) names that section's keys (see :data:`SECTIONS`).
    """
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    model = model or RunConfig
    if model is RunConfig and len(loc) > 1 and loc[0] in SECTIONS:
        model, what = SECTIONS[loc.pop(0)]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        valid = list(model.model_fields)
        return (
            f"unknown {what} {key!r}.{did_you_mean(key, valid)}"
            f" Valid {what.split()[-1]}s: {', '.join(valid)}."
        )
    if not loc:  # a check across keys (a model validator): its own message says it all
        return str(error["msg"]).removeprefix("Value error, ")
    found = f"{str(error['msg']).removeprefix('Value error, ')} (got {error.get('input')!r})."
    prefix = "invalid value for" if what == "config key" else f"invalid {what}"
    return f"{prefix} {key!r}: {found}"
