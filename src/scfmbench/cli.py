"""Command-line interface (typer): a thin layer over the Python API.

Every ScfmbenchError is printed as one line (``error: …``) with exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import typer

from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import ScfmbenchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="How much does a single-cell foundation model add on your data?\n\n"
    "Examples:\n\n"
    "  scfmbench run                                   # built-in pbmc68k_reduced demo\n\n"
    "  scfmbench run --data pbmc3k.h5ad --label-key cell_type --n-splits 5\n\n"
    "  scfmbench run --data pbmc3k.h5ad --model geneformer=./Geneformer-V1-10M\n\n"
    "  scfmbench validate pbmc3k.h5ad\n\n"
    "  scfmbench embed pbmc3k.h5ad --model geneformer=./gf --out pbmc3k_gf.h5ad",
)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="scfmbench: %(message)s",
        stream=sys.stderr,
    )
    warnings.showwarning = _log_warning
    for noisy in ("numba", "matplotlib", "h5py", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("scfmbench").warning("warning: %s", message)


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``["max_seq_len=3000", "normalize=false"]`` → typed dict (YAML scalars)."""
    import yaml

    from scfmbench.errors import ConfigError

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r} must be KEY=VALUE, e.g. max_seq_len=3000.")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _comma_list(value: str | None) -> list[str] | None:
    """``"ctrl, stim"`` → ["ctrl", "stim"] (None stays None; empty items are dropped)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


@app.command()
def run(
    data: str = typer.Option(None, help="An .h5ad file or a built-in name (pbmc68k_reduced)."),
    label_key: str = typer.Option(None, help="obs column with the cell types."),
    config: Path = typer.Option(None, help="YAML run configuration; flags override it."),
    out: Path = typer.Option(None, help="Folder for run directories (default runs)."),
    name: str = typer.Option(None, help="Run name (default: the data file's stem)."),
    seed: int = typer.Option(None, help=f"Seed of the first split (default {DEFAULT_SEED})."),
    design: str = typer.Option(
        None,
        help="cv: stratified K-fold cross-validation, every cell tested once (default); "
        "study: the study's repeated random 80/10/10 splits (intervals within-split only).",
    ),
    n_splits: int = typer.Option(None, help="Folds K (cv) or random splits (study); default 5."),
    n_repeats: int = typer.Option(
        None, help="Repeats of K-fold cross-validation (default 1; > 1 = repeated CV)."
    ),
    holdout_key: str = typer.Option(
        None,
        help="obs column (donor, sample, condition, batch): one fold per held-out group, "
        "beside the random-split design.",
    ),
    train_groups: str = typer.Option(
        None, help="Comma-separated values of --holdout-key to train on (directed shift)."
    ),
    test_groups: str = typer.Option(
        None, help="Comma-separated values of --holdout-key to test on (directed shift)."
    ),
    model: list[str] = typer.Option(
        None, help="NAME=DIR, repeatable: geneformer=DIR, scgpt=DIR, scfoundation=DIR."
    ),
    reference: str = typer.Option(None, help="Method the gains are computed against."),
    min_cells_per_class: int = typer.Option(
        None, help="Classes with fewer cells are dropped (default 10)."
    ),
    allow_normalized: bool = typer.Option(
        None, "--allow-normalized", help="Let count-based models use normalized data."
    ),
    allow_feature_selected: bool = typer.Option(
        None,
        "--allow-feature-selected",
        help="Let geneformer and scgpt run on a feature-selected count matrix (< 5,000 genes "
        "or all highly variable); refused by default.",
    ),
    merge_similar_labels: bool = typer.Option(
        None,
        "--merge-similar-labels",
        help="Merge labels that differ only by case or whitespace ('B', 'B ', 'b').",
    ),
    gene_column: str = typer.Option(None, help="var column with gene identifiers."),
    device: str = typer.Option(None, help="cpu, cuda or auto."),
    batch_size: int = typer.Option(None, help="Cells per embedding batch."),
    geneformer_dicts: Path = typer.Option(
        None, help="Folder with the Geneformer token/median/name/mapping dictionaries."
    ),
    finetune: bool = typer.Option(
        False, "--finetune", help="Also fine-tune every model (frozen and fine-tuned side by side)."
    ),
    backed: bool = typer.Option(
        None,
        "--backed/--no-backed",
        help="Keep DATA on disk and stream it in chunks; only embeddings and baseline features "
        "are held in memory (default: for .h5ad files over 1 GiB).",
    ),
    chunk_size: int = typer.Option(
        None, help="Cells read at a time when streaming (default 2048)."
    ),
    no_scvi: bool = typer.Option(
        False, "--no-scvi", help="Leave the scVI baseline out (its training is the slow part)."
    ),
    train_sizes: str = typer.Option(
        None,
        help="Label efficiency: refit every probe on N labelled training cells per class, "
        "e.g. 1,5,10,25,50,all (nested, same validation and test cells).",
    ),
    train_size_seeds: int = typer.Option(
        None, help="Random draws of the labelled cells per fold and size (default 3)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Benchmark baselines (and foundation models) on one labelled dataset."""
    from scfmbench.benchmark.pipeline import run as run_pipeline
    from scfmbench.config import RunConfig
    from scfmbench.report.write import markdown_table, results_table

    _setup_logging(quiet)
    overrides = {
        "data": data,
        "label_key": label_key,
        "out": out,
        "name": name,
        "seed": seed,
        "design": design,
        "n_splits": n_splits,
        "n_repeats": n_repeats,
        "holdout_key": holdout_key,
        "train_groups": _comma_list(train_groups),
        "test_groups": _comma_list(test_groups),
        "models": model or None,
        "reference": reference,
        "min_cells_per_class": min_cells_per_class,
        "allow_normalized": allow_normalized,
        "allow_feature_selected": allow_feature_selected,
        "merge_similar_labels": merge_similar_labels,
        "gene_column": gene_column,
        "device": device,
        "batch_size": batch_size,
        "backed": backed,
        "chunk_size": chunk_size,
        "train_sizes": train_sizes,
        "train_size_seeds": train_size_seeds,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = RunConfig.from_yaml(config) if config is not None else None
    if finetune and (base is None or base.finetune is None):
        overrides["finetune"] = {}
    if no_scvi:
        baselines = base.baselines if base is not None else RunConfig().baselines
        overrides["baselines"] = [b for b in baselines if b.split("+", 1)[0] != "scvi"]
    if geneformer_dicts is not None:
        overrides["model_options"] = model_options_with(
            base.model_options if base is not None else {}, [], geneformer_dicts
        )
    result = run_pipeline(config=base, progress=not quiet, **overrides)
    typer.echo(markdown_table(results_table(result.metrics)))
    typer.echo(f"\nrun directory: {result.run_dir}")


@app.command()
def validate(
    data: str = typer.Argument(..., help="An .h5ad file or a built-in name."),
    label_key: str = typer.Option(None, help="obs column with the cell types."),
    min_cells_per_class: int = typer.Option(None, help="Smaller classes are dropped (default 10)."),
    merge_similar_labels: bool = typer.Option(
        None,
        "--merge-similar-labels",
        help="Merge labels that differ only by case or whitespace ('B', 'B ', 'b').",
    ),
    config: Path = typer.Option(
        None, help="Run YAML: check with the settings `run --config` would use."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the diagnostics as JSON."),
    backed: bool = typer.Option(
        None,
        "--backed/--no-backed",
        help="Check the file chunk by chunk without loading it (default: files over 1 GiB).",
    ),
    model: list[str] = typer.Option(
        None,
        help="A model the data is meant for, NAME or NAME=DIR, repeatable: list what it would "
        "refuse (e.g. a feature-selected count matrix for geneformer).",
    ),
    allow_feature_selected: bool = typer.Option(
        None,
        "--allow-feature-selected",
        help="Check as `run --allow-feature-selected` would run.",
    ),
) -> None:
    """Check a dataset: counts, identifiers, classes and problems found (writes nothing).

    Stops with the same one-line error as `run` for anything `run` would refuse with the same
    settings (e.g. a class too small to stratify). What a named model (--model, or `models` of
    --config) would refuse about the data, such as a feature-selected count matrix, is listed
    under problems.
    """
    from scfmbench.benchmark.methods import baseline_methods
    from scfmbench.benchmark.pipeline import open_run_data, resolve_config
    from scfmbench.config import ModelSpec, RunConfig
    from scfmbench.data.backed import BackedData
    from scfmbench.data.splits import check_fractions, check_stratifiable

    _setup_logging(quiet=True)
    settings = {
        "label_key": label_key,
        "min_cells_per_class": min_cells_per_class,
        "merge_similar_labels": merge_similar_labels,
        "backed": backed,
        "allow_feature_selected": allow_feature_selected,
    }
    base = RunConfig.from_yaml(config) if config is not None else None
    resolved = resolve_config(data, base, settings)
    check_fractions(resolved.fractions)
    baseline_methods(resolved)  # unknown representations / probes, as run refuses them
    models = list(model or resolved.models)  # NAME or NAME=DIR
    for spec in models:  # unknown models (and missing folders), as run refuses them
        if "=" in spec:
            ModelSpec.parse(spec)
        else:
            from scfmbench.data.feature_selection import model_name
            from scfmbench.models import MODELS

            MODELS.get(model_name(spec))
    checked = open_run_data(data, resolved, progress=False)
    if isinstance(checked, BackedData):
        checked.close()
    from scfmbench.evaluation.embedding_quality import detect_batch_key

    detect_batch_key(checked.obs, resolved.batch_key)  # a misspelt batch_key, as run refuses it
    check_stratifiable(
        checked.labels, n_folds=resolved.n_splits if resolved.design == "cv" else None
    )
    diag = checked.diagnostics
    _add_feature_selection_problem(diag, models, resolved.allow_feature_selected)
    if as_json:
        typer.echo(json.dumps(diag.to_dict(), indent=2))
        return
    lines = [
        f"cells: {diag.n_cells} (of {diag.n_cells_input})",
        f"genes: {diag.n_genes}",
        f"expression: adata.{diag.matrix_source} holds {diag.matrix_description}"
        + ("" if diag.matrix_kind == "counts" else " (not raw)"),
        f"gene identifiers: {diag.identifier_type}",
        *_gene_source_lines(diag.gene_sources),
        f"label column: {diag.label_key} ({len(diag.classes)} classes)",
        *[f"  {name}: {size}" for name, size in diag.classes.items()],
        "problems: " + ("none" if not diag.warnings else ""),
        *[f"  - {w}" for w in diag.warnings],
    ]
    typer.echo("\n".join(lines))


def _add_feature_selection_problem(diag, models: list[str], allow: bool) -> None:
    """Add to ``diag.warnings`` what ``models`` (names or specs) would make of a
    feature-selected count matrix (see :func:`~.feature_selection.validate_problem`)."""
    from scfmbench.data.feature_selection import matrix_facts, validate_problem

    problem = validate_problem(models, allow=allow, **matrix_facts(diag))
    if problem is not None:
        diag.warnings.append(problem)


def _gene_source_lines(sources: dict[str, str | None]) -> list[str]:
    """Where each model family reads its gene identifiers (as resolved by default)."""
    users = {"ensembl": "Ensembl IDs (Geneformer)", "symbol": "symbols (scGPT, scFoundation)"}
    lines = []
    for kind, column in sources.items():
        where = (
            "none found"
            if column is None
            else (column if column == "var_names" else f"var[{column!r}]")
        )
        if kind == "ensembl" and column is None:
            where += "; Geneformer maps the symbols through its gene-name dictionary"
        lines.append(f"  {users[kind]}: {where}")
    return lines


@app.command()
def embed(
    data: str = typer.Argument(..., help="An .h5ad file or a built-in name."),
    model: str = typer.Option(..., help="NAME=DIR, e.g. geneformer=./gf or scgpt=./scGPT_human."),
    out: Path = typer.Option(..., help="Output .h5ad (copy of DATA + obsm) or .npy."),
    layer: int = typer.Option(None, help="Layer (default: the model's reference layer)."),
    pooling: str = typer.Option(None, help="mean or cls (default: the model's)."),
    batch_size: str = typer.Option(
        "32", help="Cells per batch, or auto (start at 256, halve on out-of-memory)."
    ),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    precision: str = typer.Option("float32", help="float32, bfloat16 or float16 (GPU)."),
    cache_dir: Path = typer.Option(
        None, help="Embedding cache folder (finished chunks survive an interruption)."
    ),
    chunk_size: int = typer.Option(
        2048, help="Cells per saved chunk when caching; cells read at a time when streaming."
    ),
    backed: bool = typer.Option(
        None,
        "--backed/--no-backed",
        help="Stream DATA from disk chunk by chunk (default: for files over 1 GiB and under "
        "torchrun).",
    ),
    option: list[str] = typer.Option(
        None, help="Model loader option KEY=VALUE, repeatable (e.g. tgthighres=a5)."
    ),
    geneformer_dicts: Path = typer.Option(
        None, help="Folder with the Geneformer dictionaries (default: the model folder)."
    ),
    allow_normalized: bool = typer.Option(False, "--allow-normalized"),
    allow_feature_selected: bool = typer.Option(
        False,
        "--allow-feature-selected",
        help="Let geneformer and scgpt embed a feature-selected count matrix (< 5,000 genes "
        "or all highly variable); refused by default.",
    ),
    gene_column: str = typer.Option(None, help="var column with gene identifiers."),
    seed: int = typer.Option(
        DEFAULT_SEED,
        help="Seed of tokenization (scGPT) and of a NAME-random control; the run's default.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write frozen embeddings of DATA to obsm['X_<model>'] (h5ad) or an .npy file.

    Under torchrun (torchrun --nproc_per_node N -m scfmbench embed ...) every process embeds
    a share of the cells and rank 0 writes OUT (see docs/scale.md).
    """
    from scfmbench.benchmark.commands import embed_dataset
    from scfmbench.embed.stream import env_rank

    main_rank = env_rank() == 0
    _setup_logging(quiet or not main_rank)
    key, n_cells = embed_dataset(
        data,
        model=model,
        out=out,
        layer=layer,
        pooling=pooling,
        batch_size=batch_size,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
        chunk_size=chunk_size,
        model_options={
            **parse_options(option or []),
            **({"dicts": str(geneformer_dicts)} if geneformer_dicts is not None else {}),
        },
        allow_normalized=allow_normalized,
        allow_feature_selected=allow_feature_selected,
        gene_column=gene_column,
        progress=not quiet and main_rank,
        backed=backed,
        seed=seed,
    )
    if main_rank:
        where = f"obsm[{key!r}] of" if str(out).endswith(".h5ad") else "the embeddings of"
        typer.echo(f"wrote {where} {n_cells} cells to {out}")


@app.command()
def transfer(
    train: str = typer.Option(..., help="Training dataset (.h5ad or built-in name)."),
    test: str = typer.Option(..., help="Test dataset (.h5ad or built-in name)."),
    labels: str = typer.Option(
        "pbmc3k_kang2018", help="Label map: YAML 'source label: shared label' or a built-in."
    ),
    label_key_train: str = typer.Option(None, help="obs label column of the training data."),
    label_key_test: str = typer.Option(None, help="obs label column of the test data."),
    one_way: bool = typer.Option(False, "--one-way", help="Only train → test."),
    config: Path = typer.Option(
        None, help="YAML run configuration (models, model_options, baselines, …); flags win."
    ),
    model: list[str] = typer.Option(None, help="NAME=DIR, repeatable."),
    out: Path = typer.Option(None, help="Folder for run directories (default runs)."),
    name: str = typer.Option(None, help="Run name (default transfer_<train>__<test>)."),
    seed: int = typer.Option(
        None, help=f"Seed of the training split and probes (default {DEFAULT_SEED})."
    ),
    allow_normalized: bool = typer.Option(
        None, "--allow-normalized", help="Let count-based models use normalized data."
    ),
    allow_feature_selected: bool = typer.Option(
        None,
        "--allow-feature-selected",
        help="Let geneformer and scgpt run on a feature-selected count matrix (< 5,000 genes "
        "or all highly variable); refused by default.",
    ),
    gene_column: str = typer.Option(
        None, help="var column with gene identifiers (default: resolved per model)."
    ),
    device: str = typer.Option(None, help="cpu, cuda or auto."),
    batch_size: int = typer.Option(None, help="Cells per embedding batch."),
    min_cells_per_class: int = typer.Option(None, help="Smaller classes are dropped."),
    geneformer_dicts: Path = typer.Option(
        None, help="Folder with the Geneformer dictionaries (default: found by vocab_size)."
    ),
    option: list[str] = typer.Option(
        None, help="Model loader option MODEL.KEY=VALUE, repeatable (e.g. scgpt.max_seq_len=3000)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train every method on one dataset and score it on another (both directions)."""
    from scfmbench.benchmark.transfer import transfer as run_transfer
    from scfmbench.benchmark.transfer import transfer_markdown
    from scfmbench.config import RunConfig

    _setup_logging(quiet)
    base = RunConfig.from_yaml(config) if config is not None else None
    model_options = model_options_with(
        base.model_options if base is not None else {}, option or [], geneformer_dicts
    )
    overrides = {
        "models": model or None,
        "out": out,
        "name": name,
        "seed": seed,
        "allow_normalized": allow_normalized,
        "allow_feature_selected": allow_feature_selected,
        "gene_column": gene_column,
        "device": device,
        "batch_size": batch_size,
        "min_cells_per_class": min_cells_per_class,
        "model_options": model_options or None,
    }
    doc = run_transfer(
        train,
        test,
        label_map=labels,
        label_key_train=label_key_train,
        label_key_test=label_key_test,
        both_directions=not one_way,
        config=base,
        progress=not quiet,
        **overrides,
    )
    typer.echo(transfer_markdown(doc))


def model_options_with(
    options: dict, pairs: list[str], geneformer_dicts: Path | None
) -> dict[str, dict]:
    """``options`` plus ``MODEL.KEY=VALUE`` pairs and ``--geneformer-dicts``."""
    from scfmbench.errors import ConfigError

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


# ---- fine-tuning (issue 6) ----------------------------------------------------------------


@app.command()
def finetune(
    data: str = typer.Argument(..., help="An .h5ad file with raw counts, or a built-in name."),
    model: list[str] = typer.Option(
        ..., help="NAME=DIR, repeatable: geneformer=DIR, scgpt=DIR (NAME-random=DIR: control)."
    ),
    config: Path = typer.Option(
        None, help="Run YAML: top-level run keys plus a finetune: section; flags override it."
    ),
    label_key: str = typer.Option(None, help="obs column with the cell types."),
    out: Path = typer.Option(None, help="Folder for run directories (default runs)."),
    name: str = typer.Option(None, help="Run name (default: the data file's stem)."),
    seed: int = typer.Option(
        None, help=f"Seed of the split and of training (default {DEFAULT_SEED})."
    ),
    epochs: int = typer.Option(None, help="Training epochs (default 3)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 5e-5)."),
    batch_size: int = typer.Option(None, help="Global batch size in cells (default 16)."),
    lora: bool = typer.Option(None, "--lora/--no-lora", help="Train LoRA adapters + head."),
    freeze_layers: int = typer.Option(None, help="Freeze the first N encoder layers."),
    option: list[str] = typer.Option(
        None,
        "--set",
        help="KEY=VALUE for any finetune option, repeatable: --set patience=2 "
        "--set mixed_precision=bf16 --set gradient_accumulation_steps=4.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Fine-tune foundation models on the run's train split; report val curve and test scores.

    Multi-GPU: torchrun --nproc_per_node N -m scfmbench finetune …
    """
    import os

    import yaml

    from scfmbench.benchmark.commands import finetune_dataset
    from scfmbench.errors import ConfigError

    _setup_logging(quiet)
    chosen = {
        "seed": seed,
        "epochs": epochs,
        "learning_rate": lr,
        "batch_size": batch_size,
        "lora": lora,
        "freeze_layers": freeze_layers,
    }
    for item in option or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE, e.g. --set patience=2.")
        key, value = item.split("=", 1)
        chosen[key.strip()] = yaml.safe_load(value)
    run_overrides = {"label_key": label_key, "out": out, "name": name, "seed": seed}
    run_dir, results = finetune_dataset(
        data,
        models=model,
        config_file=config,
        run_overrides={k: v for k, v in run_overrides.items() if v is not None},
        finetune_overrides={k: v for k, v in chosen.items() if v is not None},
        resume=resume,
        progress=not quiet,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: print once
        return
    typer.echo(
        "| model | kind | split | best epoch | val macro F1 | test accuracy | test macro F1 |"
    )
    typer.echo("|---|---|---|---|---|---|---|")
    for r in results:
        typer.echo(
            f"| {r.model_id} | {r.kind} | {r.split_seed} | {r.best_epoch} | "
            f"{r.best_val_macro_f1:.4f} | {r.test.accuracy:.4f} | {r.test.macro_f1:.4f} |"
        )
    typer.echo(f"\nrun directory: {run_dir}")


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes click raises for usage errors, from every click typer may use.

    typer ≥ 0.20 ships its own copy of click (its exceptions derive from
    ``typer.TyperException``); older typer uses the ``click`` package.
    """
    import click

    return (click.exceptions.ClickException, getattr(typer, "TyperException", click.ClickException))


def _abort_types() -> tuple[type[BaseException], ...]:
    import click

    return (click.exceptions.Abort, typer.Abort)


def _interrupted() -> SystemExit:
    typer.echo("interrupted; finished stages are kept and a rerun resumes", err=True)
    return SystemExit(130)


def main() -> None:
    """Entry point: run the typer app.

    Exit codes: 0 success; 2 a ScfmbenchError (one line ``error: …``) or a usage error
    (click's usage message: missing or unknown option, bad value); 130 interrupted (Ctrl-C);
    1 aborted.
    """
    try:
        code = app(standalone_mode=False)
    except ScfmbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except (typer.Exit, SystemExit) as exc:
        raise SystemExit(getattr(exc, "exit_code", getattr(exc, "code", 0))) from None
    except KeyboardInterrupt:
        raise _interrupted() from None
    except Exception as exc:  # click usage errors come through here in standalone_mode=False
        if isinstance(exc, _usage_error_types()) and hasattr(exc, "show"):
            exc.show()
            raise SystemExit(getattr(exc, "exit_code", 2)) from None
        if isinstance(exc, _abort_types()):
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise _interrupted() from None
            raise SystemExit(1) from None
        raise
    # typer turns Ctrl-C into Exit(130), which standalone_mode=False returns as a value
    if code == 130:
        raise _interrupted()
    if isinstance(code, int) and code:
        raise SystemExit(code)


# ----------------------------------------------------------------------------------------------
# report / compare (issue 8): HTML + Markdown reports from finished run directories
# ----------------------------------------------------------------------------------------------


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `scfmbench run`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Write RUN_DIR/report.html (self-contained) and refresh RUN_DIR/report.md."""
    from scfmbench.report.write import write_report

    _setup_logging(quiet)
    html = write_report(run_dir)
    typer.echo(f"wrote {html} and {html.with_name('report.md')}")


@app.command()
def stats(
    run_dir: Path = typer.Argument(..., help="A run directory written by `scfmbench run`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Recompute every score, interval and test of RUN_DIR/metrics.json from
    RUN_DIR/predictions.tsv.gz and say whether they match (exit 1 when not)."""
    from scfmbench.evaluation.run_stats import PREDICTIONS_FILE
    from scfmbench.report.write import markdown_table, results_table
    from scfmbench.results import check_statistics

    _setup_logging(quiet)
    recomputed, diff = check_statistics(run_dir)
    typer.echo(markdown_table(results_table(recomputed)))
    typer.echo(f"\nintervals: {recomputed['run']['interval_method']}")
    if diff:
        typer.echo(
            f"recomputed from {PREDICTIONS_FILE}: {len(diff)} value(s) differ from metrics.json, "
            f"e.g. {', '.join(diff[:5])}"
        )
        raise SystemExit(1)
    typer.echo(f"recomputed from {PREDICTIONS_FILE}: every statistic matches metrics.json")


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare."),
    out: Path = typer.Option(None, help="Output folder (default: compare/ beside the first run)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """One table across runs (methods × runs: accuracy, macro F1) as Markdown and HTML."""
    from scfmbench.report.compare import compare_runs

    _setup_logging(quiet)
    html = compare_runs(run_dirs, out=out)
    typer.echo(f"wrote {html} and {html.with_name('compare.md')}")


if __name__ == "__main__":
    main()
