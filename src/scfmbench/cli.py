"""Command-line interface (typer): flags → the Python API → printed results.

Every option is declared once in :mod:`scfmbench._cli_options` (commands that share a flag
share its declaration; help texts read their defaults from the configuration). Every
ScfmbenchError is printed as one line (``error: …``) with exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import typer

from scfmbench import _cli_options as opt
from scfmbench._cli_options import api_default
from scfmbench.benchmark.commands import check_dataset, embed_dataset, finetune_dataset
from scfmbench.benchmark.pipeline import run as run_benchmark
from scfmbench.benchmark.transfer import transfer as run_transfer
from scfmbench.benchmark.transfer_settings import transfer_settings
from scfmbench.config import RunConfig
from scfmbench.data.io import check_config_data
from scfmbench.embed.launch import env_rank
from scfmbench.errors import ScfmbenchError
from scfmbench.report.compare import compare_runs
from scfmbench.report.transfer import transfer_markdown
from scfmbench.report.write import markdown_table, results_table, write_report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="How much does a single-cell foundation model add on your data?\n\n"
    "Examples:\n\n"
    "  scfmbench run        # the built-in demo data, scanpy's pbmc68k_reduced\n\n"
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
    _warned.clear()
    for noisy in ("numba", "matplotlib", "h5py", "urllib3", "fsspec", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_warned: set[str] = set()
"""The warnings this command has printed: a model's tokenizer warns at every tokenization."""


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if text not in _warned:  # each distinct warning once per command
        _warned.add(text)
        logging.getLogger("scfmbench").warning("warning: %s", text)


def _load_config(config: Path | None, data: str | None = None) -> RunConfig | None:
    """Read --config; its ``data:`` is checked here unless ``data`` (the command line's) wins."""
    if config is None:
        return None
    loaded = RunConfig.from_yaml(config)
    if data is None:
        check_config_data(loaded.data, config)
    return loaded


@app.command()
def run(
    data: opt.DataOption = None,
    label_key: opt.LabelKey = None,
    config: opt.ConfigFile = None,
    out: opt.RunsFolder = None,
    name: opt.RunName = None,
    seed: opt.Seed = None,
    design: opt.Design = None,
    n_splits: opt.NSplits = None,
    n_repeats: opt.NRepeats = None,
    holdout_key: opt.HoldoutKey = None,
    train_groups: opt.TrainGroups = None,
    test_groups: opt.TestGroups = None,
    model: opt.Models = None,
    reference: opt.Reference = None,
    min_cells_per_class: opt.MinCellsPerClass = None,
    allow_normalized: opt.AllowNormalized = None,
    allow_feature_selected: opt.AllowFeatureSelected = None,
    merge_similar_labels: opt.MergeSimilarLabels = None,
    gene_column: opt.GeneColumn = None,
    device: opt.Device = None,
    batch_size: opt.BatchSize = None,
    geneformer_dicts: opt.GeneformerDicts = None,
    finetune: opt.AlsoFinetune = False,
    backed: opt.Backed = None,
    chunk_size: opt.ChunkSize = None,
    n_jobs: opt.NJobs = None,
    no_scvi: opt.NoScvi = False,
    train_sizes: opt.TrainSizes = None,
    train_size_seeds: opt.TrainSizeSeeds = None,
    quiet: opt.Quiet = False,
) -> None:
    """Benchmark baselines (and foundation models) on one labelled dataset."""
    _setup_logging(quiet)
    overrides = opt.given(
        data=data,
        label_key=label_key,
        out=out,
        name=name,
        seed=seed,
        design=design,
        n_splits=n_splits,
        n_repeats=n_repeats,
        holdout_key=holdout_key,
        train_groups=opt.comma_list(train_groups),
        test_groups=opt.comma_list(test_groups),
        models=model or None,
        reference=reference,
        min_cells_per_class=min_cells_per_class,
        allow_normalized=allow_normalized,
        allow_feature_selected=allow_feature_selected,
        merge_similar_labels=merge_similar_labels,
        gene_column=gene_column,
        device=device,
        batch_size=batch_size,
        backed=backed,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
        train_sizes=train_sizes,
        train_size_seeds=train_size_seeds,
    )
    base = _load_config(config, data)
    overrides.update(opt.also_finetune(finetune, model, base))
    if no_scvi:
        overrides["baselines"] = opt.without_scvi(base)
    if geneformer_dicts is not None:
        overrides["model_options"] = opt.model_options_with(
            base.model_options if base is not None else {}, [], geneformer_dicts
        )
    result = run_benchmark(config=base, progress=not quiet, **overrides)
    typer.echo(markdown_table(results_table(result.metrics)))
    typer.echo(f"\nrun directory: {result.run_dir}")


@app.command()
def validate(
    data: opt.DataToCheck = None,
    label_key: opt.LabelKey = None,
    min_cells_per_class: opt.MinCellsPerClass = None,
    merge_similar_labels: opt.MergeSimilarLabels = None,
    config: opt.ConfigFile = None,
    as_json: opt.AsJson = False,
    backed: opt.Backed = None,
    design: opt.Design = None,
    n_splits: opt.NSplits = None,
    holdout_key: opt.HoldoutKey = None,
    train_groups: opt.TrainGroups = None,
    test_groups: opt.TestGroups = None,
    reference: opt.Reference = None,
    model: opt.ModelsMeantFor = None,
    allow_normalized: opt.AllowNormalized = None,
    allow_feature_selected: opt.AllowFeatureSelected = None,
) -> None:
    """Check a dataset: counts, identifiers, classes and problems found (writes nothing).

    Stops with the same one-line error as `run` for anything `run` would refuse with the same
    settings (e.g. a class too small to stratify, a --holdout-key or group value not in obs,
    an unknown --reference), including what a named model (--model, or
    `models` of --config) refuses about the data, such as a feature-selected count matrix or
    log-normalized values. Without a model, which models would refuse the data is listed under
    problems.
    """
    _setup_logging(quiet=True)
    settings = opt.given(
        label_key=label_key,
        min_cells_per_class=min_cells_per_class,
        merge_similar_labels=merge_similar_labels,
        backed=backed,
        design=design,
        n_splits=n_splits,
        holdout_key=holdout_key,
        train_groups=opt.comma_list(train_groups),
        test_groups=opt.comma_list(test_groups),
        reference=reference,
        allow_normalized=allow_normalized,
        allow_feature_selected=allow_feature_selected,
    )
    diag = check_dataset(data, _load_config(config, data), models=model, **settings)
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
    data: opt.DataArgument,
    model: opt.ModelToEmbed,
    out: opt.EmbeddingsFile,
    layer: opt.Layer = None,
    pooling: opt.Pooling = None,
    batch_size: opt.EmbedBatchSize = str(api_default(embed_dataset, "batch_size")),
    device: opt.EmbedDevice = api_default(embed_dataset, "device"),
    precision: opt.Precision = api_default(embed_dataset, "precision"),
    cache_dir: opt.CacheDir = None,
    chunk_size: opt.EmbedChunkSize = api_default(embed_dataset, "chunk_size"),
    backed: opt.Backed = None,
    option: opt.LoaderOptions = None,
    geneformer_dicts: opt.GeneformerDicts = None,
    allow_normalized: opt.AllowNormalized = False,
    allow_feature_selected: opt.AllowFeatureSelected = False,
    gene_column: opt.GeneColumn = None,
    seed: opt.EmbedSeed = api_default(embed_dataset, "seed"),
    quiet: opt.Quiet = False,
) -> None:
    """Write frozen embeddings of DATA to obsm['X_<model>'] (h5ad) or an .npy file.

    Under torchrun (torchrun --nproc_per_node N -m scfmbench embed ...) every process embeds
    a share of the cells and rank 0 writes OUT (see docs/scale.md).
    """
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
            **opt.parse_options(option or []),
            **({"dicts": str(geneformer_dicts)} if geneformer_dicts is not None else {}),
        },
        allow_normalized=bool(allow_normalized),
        allow_feature_selected=bool(allow_feature_selected),
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
    train: opt.TrainData,
    test: opt.TestData,
    labels: opt.LabelMap = api_default(run_transfer, "label_map"),
    label_key_train: opt.LabelKeyTrain = None,
    label_key_test: opt.LabelKeyTest = None,
    one_way: opt.OneWay = False,
    config: opt.ConfigFile = None,
    model: opt.Models = None,
    out: opt.RunsFolder = None,
    name: opt.TransferName = None,
    seed: opt.Seed = None,
    n_splits: opt.TrainingSeeds = None,
    no_scvi: opt.NoScvi = False,
    allow_normalized: opt.AllowNormalized = None,
    allow_feature_selected: opt.AllowFeatureSelected = None,
    gene_column: opt.GeneColumn = None,
    device: opt.Device = None,
    batch_size: opt.BatchSize = None,
    min_cells_per_class: opt.MinCellsPerClass = None,
    n_jobs: opt.NJobs = None,
    geneformer_dicts: opt.GeneformerDicts = None,
    option: opt.ModelLoaderOptions = None,
    quiet: opt.Quiet = False,
) -> None:
    """Train every method on one dataset and score it on another (both directions)."""
    _setup_logging(quiet)
    base = _load_config(config)
    model_options = opt.model_options_with(
        base.model_options if base is not None else {}, option or [], geneformer_dicts
    )
    settings = opt.given(
        models=model or None,
        out=out,
        name=name,
        seed=seed,
        n_splits=n_splits,
        baselines=opt.without_scvi(base) if no_scvi else None,
        allow_normalized=allow_normalized,
        allow_feature_selected=allow_feature_selected,
        gene_column=gene_column,
        device=device,
        batch_size=batch_size,
        min_cells_per_class=min_cells_per_class,
        n_jobs=n_jobs,
        model_options=model_options or None,
    )
    doc = run_transfer(
        train,
        test,
        label_map=labels,
        label_key_train=label_key_train,
        label_key_test=label_key_test,
        both_directions=not one_way,
        config=base,
        progress=not quiet,
        **settings,
    )
    typer.echo(transfer_markdown(doc))
    resolved = transfer_settings(base, settings)
    typer.echo(f"\nrun directory: {resolved.out / doc['run']['name']}")


@app.command()
def finetune(
    data: opt.DataArgument,
    model: opt.ModelsToFinetune,
    config: opt.ConfigFile = None,
    label_key: opt.LabelKey = None,
    out: opt.RunsFolder = None,
    name: opt.RunName = None,
    seed: opt.Seed = None,
    epochs: opt.Epochs = None,
    lr: opt.LearningRate = None,
    batch_size: opt.FinetuneBatchSize = None,
    lora: opt.Lora = None,
    freeze_layers: opt.FreezeLayers = None,
    option: opt.FinetuneSettings = None,
    allow_normalized: opt.AllowNormalized = None,
    allow_feature_selected: opt.AllowFeatureSelected = None,
    resume: opt.Resume = False,
    quiet: opt.Quiet = False,
) -> None:
    """Fine-tune foundation models on the run's train split; report val curve and test scores.

    Multi-GPU: torchrun --nproc_per_node N -m scfmbench finetune …
    """
    _setup_logging(quiet)
    chosen = {
        "seed": seed,
        "epochs": epochs,
        "learning_rate": lr,
        "batch_size": batch_size,
        "lora": lora,
        "freeze_layers": freeze_layers,
        **opt.parse_options(
            option or [], "--set {pair!r} must look like KEY=VALUE, e.g. --set patience=2."
        ),
    }
    run_dir, results = finetune_dataset(
        data,
        models=model,
        config_file=config,
        run_overrides=opt.given(
            label_key=label_key,
            out=out,
            name=name,
            seed=seed,
            allow_normalized=allow_normalized,
            allow_feature_selected=allow_feature_selected,
        ),
        finetune_overrides=opt.given(**chosen),
        resume=resume,
        progress=not quiet,
    )
    if env_rank() != 0:  # under accelerate launch / torchrun: print once
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


@app.command()
def report(run_dir: opt.RunDirArgument, quiet: opt.Quiet = False) -> None:
    """Write RUN_DIR/report.html (self-contained) and refresh RUN_DIR/report.md."""
    _setup_logging(quiet)
    html = write_report(run_dir)
    typer.echo(f"wrote {html} and {html.with_name('report.md')}")


@app.command()
def stats(run_dir: opt.RunDirArgument, quiet: opt.Quiet = False) -> None:
    """Recompute RUN_DIR/metrics.json from the run's saved predictions and compare.

    Every per-split score, interval and paired test (run, methods, comparisons) is recomputed
    from predictions.tsv.gz; a held-out run's holdout section also from random_split/, a
    label-efficiency run's label_efficiency section from the saved per-draw predictions.
    What is not recomputed (e.g. embeddings) is listed. Exit 1 when any value differs.
    """
    from scfmbench.report.stats_check import check_lines
    from scfmbench.results import check_statistics

    _setup_logging(quiet)
    check = check_statistics(run_dir)
    typer.echo(markdown_table(results_table(check.recomputed)))
    typer.echo(f"\nintervals: {check.recomputed['run']['interval_method']}")
    for line in check_lines(check):
        typer.echo(line)
    if check.differences:
        raise SystemExit(1)


@app.command()
def compare(
    run_dirs: opt.RunDirsArgument, out: opt.CompareFolder = None, quiet: opt.Quiet = False
) -> None:
    """Tabulate runs side by side (methods × runs: accuracy, macro F1) as Markdown and HTML."""
    _setup_logging(quiet)
    html = compare_runs(run_dirs, out=out)
    typer.echo(f"wrote {html} and {html.with_name('compare.md')}")


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
    typer.echo(f"interrupted; {opt.kept_on_interrupt(sys.argv[1:])}", err=True)
    return SystemExit(130)


def main() -> None:
    """Run the typer app as the ``scfmbench`` command.

    Raises
    ------
    SystemExit
        With the exit code: 0 success; 2 a ScfmbenchError (one line ``error: …``) or a usage
        error (click's usage message, e.g. an unknown option); 130 interrupted (Ctrl-C); 1 aborted.
    EOFError
        A file ended early in a reader that does not catch it (click makes it a silent abort).
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
        show = getattr(exc, "show", None)
        if isinstance(exc, _usage_error_types()) and callable(show):
            show()
            raise SystemExit(getattr(exc, "exit_code", 2)) from None
        if isinstance(exc, _abort_types()):
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise _interrupted() from None
            if isinstance(exc.__context__, EOFError):  # no prompts: a file ended early
                raise exc.__context__ from None
            raise SystemExit(1) from None
        raise
    # typer turns Ctrl-C into Exit(130), which standalone_mode=False returns as a value
    if code == 130:
        raise _interrupted()
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
