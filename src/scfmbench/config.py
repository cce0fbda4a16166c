"""The run configuration: one typed object, loaded from YAML; CLI flags only override it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scfmbench.errors import ConfigError
from scfmbench.registry import did_you_mean

DEFAULT_BASELINES = ["hvg+logreg", "pca+logreg", "pca+xgboost", "majority", "scvi"]
EMBEDDING_BASELINES = ("scvi",)
"""Baseline representations probed like a model embedding: a bare name in ``baselines``
means that representation with every probe of ``probes``."""


class ScviOptions(BaseModel):
    """Settings of the scVI baseline (``scvi`` in ``baselines``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_latent: int = Field(10, ge=1, description="Latent dimensions (the probed features).")
    n_hidden: int = Field(128, ge=1, description="Units per hidden layer.")
    n_layers: int = Field(1, ge=1, description="Hidden layers of encoder and decoder.")
    max_epochs: int = Field(
        15, ge=1, description="Most training epochs (early stopping on the val cells' ELBO)."
    )
    patience: int = Field(
        5, ge=1, description="Epochs without a better validation ELBO before stopping."
    )
    batch_size: int = Field(128, ge=2, description="Cells per training batch.")
    transductive: bool = Field(
        False,
        description="Also train on the test cells (unlabelled); the default never shows them "
        "to scVI and embeds them with the trained encoder.",
    )


class RunConfig(BaseModel):
    """Everything that determines a run's results (the resolved copy is saved as config.yaml)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field("pbmc68k_reduced", description="An .h5ad path or a built-in dataset name.")
    label_key: str | None = Field(
        None, description="obs column with cell types (default: cell_type, or the built-in's)."
    )
    name: str | None = Field(None, description="Run name; the run directory is OUT/NAME.")
    out: Path = Field(Path("runs"), description="Folder that holds run directories.")
    seed: int = Field(42, description="Seed of the first split and of every model.")
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
    finetune: dict[str, Any] | None = Field(
        None,
        description="Fine-tune every model end to end (null = off; {} = the study's defaults: "
        "3 epochs, lr 5e-5, seed 42; keys as in `scfmbench finetune --help`).",
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
    batch_size: int = Field(32, ge=1, description="Cells per embedding batch.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto.")
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
        2048, ge=1, description="Cells read, tokenized and embedded at a time when streaming."
    )

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

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or value in (".", "..") or "/" in value or "\\" in value
        ):
            raise ValueError(
                "a run name is one folder name (no '/', '\\' or '..'), so outputs stay inside --out"
            )
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
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping; ConfigError for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({exc}).") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option: value.")
    return loaded


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the first pydantic error, with a did-you-mean for unknown keys."""
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return (
            f"unknown config key {key!r}."
            + did_you_mean(key, list(RunConfig.model_fields))
            + (f" Valid keys: {', '.join(RunConfig.model_fields)}.")
        )
    return f"invalid value for {key!r}: {error['msg']} (got {error.get('input')!r})."
