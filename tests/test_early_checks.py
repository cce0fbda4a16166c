"""Checks that need no data come first: model specs, model options and the finetune section
fail before any data is read, and `embed` and `run` share one seed default."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from scfmbench.config import FinetuneConfig, ModelSpec, RunConfig
from scfmbench.defaults import DEFAULT_SEED
from scfmbench.errors import CheckpointError, ConfigError
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)
from tests._scgpt_fixtures import make_tiny_adata
from tests.conftest import run_cli_in_process


@pytest.fixture
def not_h5ad(tmp_path):
    """A file named .h5ad that no reader can open: an error about it means data were read."""
    path = tmp_path / "broken.h5ad"
    path.write_text("not an HDF5 file")
    return path


def test_model_spec_parse(tmp_path):
    spec = ModelSpec.parse(f" scgpt-random = {tmp_path} ")
    assert (spec.name, spec.path, spec.random_only) == ("scgpt", tmp_path, True)
    assert str(spec) == f"scgpt-random={tmp_path}"
    assert ModelSpec.parse(f"geneformer={tmp_path}").random_only is False
    with pytest.raises(ConfigError, match=r"model 'geneformer' must be written NAME=DIR"):
        ModelSpec.parse("geneformer")
    with pytest.raises(ConfigError, match=r"must be written NAME=DIR"):
        ModelSpec.parse(f"={tmp_path}")
    with pytest.raises(ConfigError, match=r"unknown model 'genefromer'.*Did you mean 'geneformer'"):
        ModelSpec.parse(f"genefromer={tmp_path}")
    with pytest.raises(CheckpointError, match=r"checkpoint folder '.*nowhere' does not exist"):
        ModelSpec.parse(f"scgpt={tmp_path / 'nowhere'}")


def test_run_config_checks_models_and_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'scpgt'"):
        RunConfig.build({"models": [f"scpgt={tmp_path}"]})
    with pytest.raises(ConfigError, match="unknown model 'genformer'.*'geneformer'"):
        RunConfig.build({"model_options": {"genformer": {"dicts": "x"}}})
    with pytest.raises(
        ConfigError, match=r"unknown option 'max_seq_lem' for model 'scgpt'.*'max_seq_len'"
    ):
        RunConfig.build({"model_options": {"scgpt": {"max_seq_lem": 5}}})
    config = RunConfig.build({"model_options": {"scgpt": {"max_seq_len": 5}}})
    assert config.model_options == {"scgpt": {"max_seq_len": 5}}


def test_finetune_section_is_typed_and_checked():
    with pytest.raises(
        ConfigError, match=r"^unknown finetune option 'epochz'\. Did you mean 'epochs'\?"
    ):
        RunConfig.build({"finetune": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"^invalid finetune option 'epochs'"):
        RunConfig.build({"finetune": {"epochs": 0}})
    with pytest.raises(ConfigError, match=r"^unknown scvi option 'max_epoch'"):
        RunConfig.build({"scvi": {"max_epoch": 3}})
    config = RunConfig.build({"finetune": {"epochs": 5}, "seed": 7})
    assert isinstance(config.finetune, FinetuneConfig)
    # the run's seed reaches fine-tuning unless the section sets its own
    settings = config.finetune_settings()
    assert (settings.epochs, settings.seed) == (5, 7)
    own = RunConfig.build({"finetune": {"seed": 3}, "seed": 7}).finetune_settings()
    assert own.seed == 3
    assert RunConfig.build({}).finetune_settings() is None
    # saved and rebuilt (config.yaml, resolve_config) the section keeps only what was set
    again = RunConfig.build(yaml.safe_load(config.to_yaml()))
    assert yaml.safe_load(config.to_yaml())["finetune"] == {"epochs": 5}
    assert again.model_copy(update={"seed": 11}).finetune_settings().seed == 11


def test_run_refuses_a_finetune_typo_before_reading_data(tmp_path, not_h5ad, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"epochz": 3}}))
    code, out, err = run_cli_in_process(
        ["run", "--data", str(not_h5ad), "--config", str(config), "--out", str(tmp_path / "runs")],
        capsys,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unknown finetune option 'epochz'. Did you mean 'epochs'?" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("geneformer", "must be written NAME=DIR"),
        ("genefromer={dir}", "unknown model 'genefromer'"),
        ("scgpt={dir}/missing", "does not exist; check the path"),
    ],
)
@pytest.mark.parametrize("command", ["run", "embed", "finetune"])
def test_bad_model_fails_before_the_data(command, model, message, tmp_path, not_h5ad, capsys):
    data = ["--data", str(not_h5ad)] if command == "run" else [str(not_h5ad)]
    args = [command, *data, "--model", model.format(dir=tmp_path)]
    if command == "embed":
        args += ["--out", str(tmp_path / "out.npy")]
    else:
        args += ["--out", str(tmp_path / "runs")]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 2
    assert message in err and "broken.h5ad" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.npy").exists()


def test_bad_model_option_fails_before_the_data(make_scgpt_dir, not_h5ad, tmp_path, capsys):
    folder = make_scgpt_dir(weights=False)
    args = ["embed", str(not_h5ad), "--model", f"scgpt={folder}", "--out", str(tmp_path / "e.npy")]
    code, _, err = run_cli_in_process([*args, "--option", "max_seq_lem=5"], capsys)
    assert code == 2
    assert "unknown option 'max_seq_lem' for model 'scgpt'" in err and "broken" not in err


def test_embed_and_run_give_the_same_scgpt_embedding(make_scgpt_dir, tmp_path, monkeypatch):
    """Both commands tokenize with one default seed (scGPT's binning breaks ties at random)."""
    import scfmbench.benchmark.commands as commands
    import scfmbench.benchmark.pipeline as pipeline

    folder = make_scgpt_dir()
    adata = make_tiny_adata(n_cells=30)
    adata = adata[:-1].copy()  # the all-zero cell has no token
    adata.obs["cell_type"] = pd.Categorical(np.repeat(["a", "b", "c"], [10, 10, 9]))
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)

    seen = {}
    original = pipeline.embed_cells

    def capture(data, model, **kwargs):
        result = original(data, model, **kwargs)
        seen[model.model_id] = result.matrix
        return result

    monkeypatch.setattr(pipeline, "embed_cells", capture)
    pipeline.run(
        str(path),
        label_key="cell_type",
        out=tmp_path / "runs",
        models=[f"scgpt={folder}"],
        random_controls=False,
        design="study",
        n_splits=1,
        min_cells_per_class=3,
        baselines=["majority"],
        probes=["logreg"],
        layerwise=False,
        figures=False,
        allow_feature_selected=True,  # 12 genes
        progress=False,
    )
    for seed, same in ((DEFAULT_SEED, True), (0, False)):
        out = tmp_path / f"embed_{seed}.npy"
        commands.embed_dataset(
            str(path),
            model=f"scgpt={folder}",
            out=out,
            seed=seed,
            allow_feature_selected=True,
            progress=False,
        )
        assert np.array_equal(np.load(out), seen["scgpt"]) is same
    default = tmp_path / "embed_default.npy"
    commands.embed_dataset(
        str(path), model=f"scgpt={folder}", out=default, allow_feature_selected=True, progress=False
    )
    np.testing.assert_array_equal(np.load(default), seen["scgpt"])


def test_a_model_named_twice_is_refused_before_the_data(tmp_path, not_h5ad, capsys):
    twice = [f"geneformer={tmp_path}", f"geneformer-random={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^model 'geneformer-random' comes from both"):
        RunConfig.build({"models": twice})
    with pytest.raises(ConfigError, match=r"^model 'scgpt' comes from both"):
        RunConfig.build({"models": [f"scgpt={tmp_path}", f"scgpt={tmp_path}"]})
    # without the automatic control the pair names two different models
    config = RunConfig.build({"models": twice, "random_controls": False})
    assert [str(spec) for spec in config.model_specs] == twice
    args = ["run", "--data", str(not_h5ad), "--out", str(tmp_path / "runs")]
    code, _, err = run_cli_in_process([*args, "--model", twice[1], "--model", twice[1]], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: model 'geneformer-random' comes from both '{twice[1]}' and '{twice[1]}'; name "
        "each model once (NAME=DIR adds its random-init control NAME-random itself, unless the "
        "config sets random_controls: false)."
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("values", "shown"), [([-1], "[-1.0]"), ([], "[]"), ([0.1, float("inf")], "[0.1, inf]")]
)
def test_logreg_c_must_be_positive_finite_values(values, shown):
    with pytest.raises(ConfigError) as caught:
        RunConfig.build({"logreg_c": values})
    assert str(caught.value).startswith(
        "invalid value for 'logreg_c': logreg_c must list positive, finite C values "
        f"(e.g. [0.01, 0.1, 1]), got {shown}."
    )
    assert RunConfig.build({"logreg_c": [0.01, 1]}).logreg_c == [0.01, 1.0]


def test_device_is_checked_in_form_and_against_this_machine(tmp_path, not_h5ad, capsys):
    import torch

    from scfmbench.embed.distributed import resolve_device
    from scfmbench.embed.options import EmbedOptions, check_device

    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert check_device(good) == good
    for bad in ("cudaa", "gpu", "cuda:", "CPU", "cuda:x"):
        with pytest.raises(ConfigError, match=rf"unknown device '{bad}'; choose cpu, cuda"):
            check_device(bad)
        with pytest.raises(ConfigError, match=rf"unknown device '{bad}'"):
            EmbedOptions(device=bad)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=rf"this machine's PyTorch sees {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")
    assert resolve_device("cpu") == torch.device("cpu")
    # the command line: one line, exit 2, before the data are read and nothing written; a
    # baseline-only run checks the form only (it runs no model)
    args = ["run", "--data", str(not_h5ad), "--out", str(tmp_path / "runs"), "--device", "gpu"]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 2 and "unknown device 'gpu'" in err and "broken" not in err, err
    for device, message in (("cudaa", "unknown device 'cudaa'"), (f"cuda:{count}", "sees")):
        args = ["run", "--data", str(not_h5ad), "--out", str(tmp_path / "runs"), "--model"]
        args += [f"scgpt-random={tmp_path}", "--device", device]
        code, _, err = run_cli_in_process(args, capsys)
        assert code == 2 and message in err and "broken" not in err, err
        assert len(err.strip().splitlines()) == 1
        args = ["embed", str(not_h5ad), "--model", f"scgpt-random={tmp_path}"]
        args += ["--out", str(tmp_path / "e.npy"), "--device", device]
        code, _, err = run_cli_in_process(args, capsys)
        assert code == 2 and message in err and "broken" not in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "e.npy").exists()


def test_embed_refuses_an_output_that_is_not_npy_or_h5ad(tmp_path, not_h5ad, capsys):
    out = tmp_path / "e.csv"
    args = ["embed", str(not_h5ad), "--model", f"scgpt-random={tmp_path}", "--out", str(out)]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: output '{out}' must end in .npy or .h5ad; e.g. --out emb.npy."
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--precision", "float8"], "error: unknown precision 'float8'; choose float32, bfloat16"),
        (["--chunk-size", "0"], "error: chunk_size must be ≥ 1, got 0; e.g. --chunk-size 2048."),
    ],
)
@pytest.mark.parametrize("backed", ["--backed", "--no-backed"])
def test_embed_settings_fail_before_the_data(option, message, backed, tmp_path, not_h5ad, capsys):
    out = tmp_path / "e.npy"
    args = ["embed", str(not_h5ad), "--model", f"scgpt-random={tmp_path}", "--out", str(out)]
    code, _, err = run_cli_in_process([*args, backed, *option], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith(message) and "broken" not in line, err
    assert not out.exists()


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path, not_h5ad, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("seed: 3\nn_splits: [3\n")
    args = ["run", "--data", str(not_h5ad), "--config", str(config), "--out", str(tmp_path)]
    code, _, err = run_cli_in_process(args, capsys)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: config file '{config}' is not valid YAML at line 3, column 1: ")
    assert line.endswith("; fix that line.")


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_a_config_or_label_map_that_is_not_a_text_file_is_one_line(tmp_path, capsys, kind):
    path = tmp_path / ("conf" if kind == "folder" else "cells.h5ad")
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)))  # an HDF5 signature
    problem = (
        "is a folder; pass a YAML file."
        if kind == "folder"
        else "is not a text file (not UTF-8: binary data such as an .h5ad?); pass a YAML file."
    )
    data, runs = tmp_path / "cells.h5ad", tmp_path / "runs"
    for args, what in [
        (["run", "--data", str(data), "--config", str(path), "--out", str(runs)], "config file"),
        (["validate", str(data), "--config", str(path)], "config file"),
        (
            ["transfer", "--train", str(data), "--test", "x", "--labels", str(path)],
            "label map",
        ),
    ]:
        code, _, err = run_cli_in_process(args, capsys)
        assert (code, err.strip().splitlines()) == (2, [f"error: {what} '{path}' {problem}"])
    assert not runs.exists()


def test_geneformer_messages_name_the_command_line_fix(tmp_path):
    from scfmbench.models.geneformer.adapter import find_weights, load_geneformer

    with pytest.raises(CheckpointError) as caught:
        find_weights(tmp_path)
    assert "use the random-init control (--model geneformer-random=DIR;" in str(caught.value)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"directory {file} is a file, not a folder;"):
        load_geneformer(file)


def test_a_failed_rerun_leaves_the_finished_run_as_it_was(make_scgpt_dir, tmp_path, capsys):
    from tests.conftest import make_tiny_adata as labelled_adata

    data = tmp_path / "tiny.h5ad"
    labelled_adata().write_h5ad(data)
    common = ["--data", str(data), "--out", str(tmp_path / "runs"), "--name", "r", "--no-scvi"]
    common += ["--n-splits", "2", "-q"]
    code, _, err = run_cli_in_process(["run", *common], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    saved = (run_dir / "config.yaml").read_text()
    assert yaml.safe_load(saved)["label_key"] == "cell_type"  # the key detected, not null
    metrics = (run_dir / "metrics.json").read_text()
    model = ["--model", f"scgpt-random={make_scgpt_dir(weights=False)}", "--gene-column", "nope"]
    model += ["--allow-feature-selected"]
    code, _, err = run_cli_in_process(["run", *common, *model], capsys)
    assert code == 2 and "adata.var has no column 'nope'" in err, err
    assert (run_dir / "config.yaml").read_text() == saved  # not the failed run's settings
    assert (run_dir / "metrics.json").read_text() == metrics


def test_half_precision_on_the_cpu_is_logged_once(caplog):
    import logging

    import torch

    from scfmbench.embed import engine

    engine._note_float32.cache_clear()
    with caplog.at_level(logging.WARNING, logger="scfmbench.embed.engine"):
        for _ in range(3):
            with engine._autocast("bfloat16", torch.device("cpu")):
                assert not torch.is_autocast_enabled("cpu")
        with engine._autocast("float32", torch.device("cpu")):
            pass
    assert [r.getMessage() for r in caplog.records] == [
        "warning: precision bfloat16 applies on a CUDA GPU only; embedding in float32 on cpu"
    ]


def test_group_options_are_checked_before_the_data(tmp_path, not_h5ad, capsys):
    args = ["run", "--data", str(not_h5ad), "--out", str(tmp_path / "runs")]
    code, _, err = run_cli_in_process([*args, "--train-groups", "ctrl"], capsys)
    assert code == 2 and "broken" not in err, err
    assert err.strip().splitlines() == [
        "error: train_groups (--train-groups) and test_groups (--test-groups) name values of "
        "an obs column; set holdout_key (--holdout-key) too, e.g. --holdout-key condition "
        "--train-groups ctrl --test-groups stim."
    ]
    assert not (tmp_path / "runs").exists()


def test_group_options_from_a_config_file_are_named_as_its_keys(tmp_path, not_h5ad, capsys):
    config = tmp_path / "shift.yaml"
    config.write_text("holdout_key: condition\ntrain_groups: [ctrl]\n")
    args = ["run", "--data", str(not_h5ad), "--config", str(config)]
    code, _, err = run_cli_in_process([*args, "--out", str(tmp_path / "runs")], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "error: train_groups (--train-groups) needs test_groups (--test-groups) too (a directed "
        "shift trains on one set of groups and tests on another); give both, or neither for "
        "one fold per group."
    ]
    assert not (tmp_path / "runs").exists()


def test_data_a_model_refuses_leave_every_folder_as_it_was(tmp_path, shared_dir, capsys):
    """Log-normalized values, which Geneformer refuses, are refused before anything is
    written: a rerun in a finished run's folder keeps its splits, and `finetune` leaves no
    folder. `finetune` takes the --allow-normalized its message names."""
    import scanpy as sc

    from tests._geneformer_factory import write_checkpoint
    from tests.conftest import make_tiny_adata as labelled_adata

    adata = labelled_adata()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    data = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(data)
    model = f"geneformer={write_checkpoint(tmp_path / 'gf', shared_dir)[0]}"
    common = ["--out", str(tmp_path / "runs"), "-q"]
    run = ["run", "--data", str(data), "--name", "r", "--n-splits", "2", *common]
    code, _, err = run_cli_in_process(run, capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with_model = ["--model", model, "--allow-feature-selected"]  # the tiny data have 40 genes
    rerun = ["run", "--data", str(data), "--name", "r", *with_model, *common]  # 5 folds
    code, _, err = run_cli_in_process(rerun, capsys)
    message = "error: geneformer needs raw integer counts but adata.X holds log-normalized"
    assert code == 2 and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert "or set --allow-normalized to proceed anyway." in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    finetune = ["finetune", str(data), "--model", model, "--name", "f", "--allow-feature-selected"]
    finetune += common
    code, _, err = run_cli_in_process(finetune, capsys)
    assert code == 2 and err.startswith(message), err
    assert not (tmp_path / "runs" / "f").exists()
    code, _, err = run_cli_in_process([*finetune, "--allow-normalized", "--epochs", "x"], capsys)
    assert code == 2 and "--allow-normalized" not in err and "--epochs" in err, err

    label_map = tmp_path / "same.yaml"
    label_map.write_text(yaml.safe_dump({c: c for c in adata.obs["cell_type"].unique()}))
    other = tmp_path / "lognorm_copy.h5ad"
    adata[::-1].copy().write_h5ad(other)  # the same cells, another file (not a byte copy)
    transfer = ["transfer", "--train", str(data), "--test", str(other), "--labels", str(label_map)]
    transfer += [*with_model, "--name", "t", *common]
    code, _, err = run_cli_in_process(transfer, capsys)
    side = "error: train data lognorm: geneformer needs raw integer counts but adata.X holds"
    assert code == 2 and err.startswith(side), err  # the side at fault is named
    assert not (tmp_path / "runs" / "t").exists()


def test_embed_refuses_values_before_loading_the_model(tmp_path, capsys):
    """In memory and streamed, `embed` refuses values the model's tokenizer would refuse
    before it reads the checkpoint: the folder given is empty, and loading it would fail."""
    import scanpy as sc

    from tests.conftest import make_tiny_adata as labelled_adata

    adata = labelled_adata()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    data = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(data)
    (tmp_path / "empty").mkdir()
    npy = tmp_path / "e.npy"
    model = f"geneformer={tmp_path / 'empty'}"
    embed = ["embed", str(data), "--model", model, "--out", str(npy), "--allow-feature-selected"]
    for backed in ("--no-backed", "--backed"):
        code, _, err = run_cli_in_process([*embed, backed, "-q"], capsys)
        assert code == 2 and not npy.exists(), err
        assert err.strip().splitlines() == [
            "error: geneformer needs raw integer counts but adata.X holds log-normalized values "
            "(log-scale: non-integer, max ≤ 50); pass the raw counts (X, layers['counts'] or "
            ".raw) or set --allow-normalized to proceed anyway."
        ]
    adata[:0].copy().write_h5ad(tmp_path / "none.h5ad")  # no cells: refused, as by `run`
    no_cells = ["embed", str(tmp_path / "none.h5ad"), *embed[2:]]
    for backed in ("--no-backed", "--backed"):
        code, _, err = run_cli_in_process([*no_cells, backed, "-q"], capsys)
        (line,) = err.strip().splitlines()
        assert code == 2 and not npy.exists(), err
        assert line.endswith("none.h5ad has no cells; pass a file with at least one cell.")


def test_scfoundation_modes_are_checked_against_the_data(tmp_path, capsys):
    """scFoundation's pre_normalized 'A' reads obs['total_counts'] and 'T'/'A' read log1p
    values: `validate`, `run` and `embed` refuse data that do not fit before any checkpoint
    is read (the folder given is empty), and `run` writes nothing."""
    import scanpy as sc

    from tests.conftest import make_tiny_adata as labelled_adata

    counts = labelled_adata()
    counts_file = tmp_path / "counts.h5ad"
    counts.write_h5ad(counts_file)
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    lognorm = tmp_path / "lognorm.h5ad"
    counts.write_h5ad(lognorm)
    (tmp_path / "empty").mkdir()
    model = f"scfoundation={tmp_path / 'empty'}"
    config = tmp_path / "mode_a.yaml"
    config.write_text(yaml.safe_dump({"model_options": {"scfoundation": {"pre_normalized": "A"}}}))
    missing = [
        "error: pre_normalized='A' reads total counts from adata.obs['total_counts'], which is "
        "missing (obs columns ['cell_type']); set total_counts_key or use pre_normalized='T'."
    ]
    runs = tmp_path / "runs"
    npy = ["--out", str(tmp_path / "e.npy"), "-q"]
    commands = [
        ["validate", str(lognorm), "--config", str(config), "--model", "scfoundation"],
        [
            "run",
            "--data",
            str(lognorm),
            "--config",
            str(config),
            "--model",
            model,
            "--out",
            str(runs),
            "-q",
        ],
        ["embed", str(lognorm), "--model", model, "--option", "pre_normalized=A", *npy],
    ]
    for command in commands:
        code, _, err = run_cli_in_process(command, capsys)
        assert code == 2 and err.strip().splitlines() == missing, (command, err)
    assert not runs.exists() and not (tmp_path / "e.npy").exists()
    code, _, err = run_cli_in_process(
        ["embed", str(counts_file), "--model", model, "--option", "pre_normalized=T", *npy], capsys
    )
    assert code == 2 and err.strip().splitlines() == [
        "error: scfoundation with pre_normalized='T' reads normalize_total + log1p values but "
        "adata.X holds raw integer counts; set pre_normalized='F' (or leave it unset)."
    ], err


def test_scfoundation_totals_and_depth_normalized_values_are_refused(tmp_path, capsys):
    """Mode A's totals must be numbers, finite and positive for every cell, and values
    normalized without log1p fit no mode but F (which wants counts): each is one line with
    exit 2 before the checkpoint (an empty folder) is read, in memory and streamed, and `run`
    writes nothing."""
    import scanpy as sc

    from tests.conftest import make_tiny_adata as labelled_adata

    adata = labelled_adata()
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    sc.pp.normalize_total(adata, target_sum=1e4)
    normalized = tmp_path / "normalized.h5ad"
    adata.write_h5ad(normalized)
    sc.pp.log1p(adata)
    adata.obs["total_counts"] = totals
    adata.obs.loc["cell3", "total_counts"] = np.nan
    lognorm = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(lognorm)
    (tmp_path / "empty").mkdir()
    embed = [
        "embed",
        "--model",
        f"scfoundation={tmp_path / 'empty'}",
        "--out",
        str(tmp_path / "e.npy"),
    ]
    no_total = (
        "error: pre_normalized='A' reads total counts from adata.obs['total_counts'], but 1 "
        "cell(s) have no finite positive total (e.g. cell3: nan); fill in each cell's total raw "
        "counts there."
    )
    text = (
        "error: pre_normalized='A' reads total counts from adata.obs['cell_type'], which holds "
        "category values, not numbers; set total_counts_key to the column of each cell's total "
        "raw counts."
    )
    depth = (
        "error: scfoundation reads raw counts or normalize_total + log1p values but adata.X "
        "holds depth-normalized values without log1p; apply sc.pp.log1p to them, or pass the "
        "raw counts with pre_normalized='F'."
    )
    cases = [
        ([str(lognorm), "--option", "pre_normalized=A"], no_total),
        (
            [
                str(lognorm),
                "--option",
                "pre_normalized=A",
                "--option",
                "total_counts_key=cell_type",
            ],
            text,
        ),
        ([str(normalized), "--option", "pre_normalized=T"], depth),
        ([str(normalized), "--allow-normalized"], depth),
    ]
    for args, line in cases:
        for backed in ("--no-backed", "--backed"):
            code, _, err = run_cli_in_process([*embed, *args, backed, "-q"], capsys)
            assert code == 2 and err.strip().splitlines() == [line], (args, backed, err)
    config = tmp_path / "mode_a.yaml"
    config.write_text(yaml.safe_dump({"model_options": {"scfoundation": {"pre_normalized": "A"}}}))
    run = ["run", "--data", str(lognorm), "--config", str(config), "-q"]
    run += ["--model", f"scfoundation={tmp_path / 'empty'}", "--out", str(tmp_path / "runs")]
    code, _, err = run_cli_in_process(run, capsys)
    assert code == 2 and err.strip().splitlines() == [no_total], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "e.npy").exists()


@pytest.fixture
def corrupt_models(tmp_path, shared_dir, make_scgpt_dir):
    """Checkpoint folders whose settings files are real and whose weights are corrupt: an
    error about the weights means they were read."""
    from tests._geneformer_factory import write_checkpoint as write_geneformer
    from tests._scfoundation_factory import write_checkpoint as write_scfoundation

    geneformer = write_geneformer(tmp_path / "gf", shared_dir)[0]  # V1: no <cls> token
    (geneformer / "model.safetensors").write_bytes(b"corrupt")
    scgpt = make_scgpt_dir(weights=False)  # 2 layers
    (scgpt / "best_model.pt").write_bytes(b"corrupt")
    scfoundation = write_scfoundation(tmp_path / "sf", ["G0", "G1"]).parent
    (scfoundation / "models.ckpt").write_bytes(b"corrupt")
    return {"geneformer": geneformer, "scgpt": scgpt, "scfoundation": scfoundation}


@pytest.fixture
def counts_file(tmp_path):
    """Labelled raw counts with a ``gene_ids`` var column."""
    from tests.conftest import make_tiny_adata as labelled_adata

    adata = labelled_adata()
    adata.var["gene_ids"] = adata.var_names
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    return path


NO_COLUMN = (
    "error: adata.var has no column 'nope' (columns: ['gene_ids']); pass --gene-column with "
    "one of those or 'var_names' for the index."
)


@pytest.mark.parametrize(
    ("model", "option", "message"),
    [
        ("scgpt", ["--gene-column", "nope"], NO_COLUMN),
        ("geneformer", ["--option", "gene_column=nope"], NO_COLUMN),
        (
            "scgpt",
            ["--precision", "float8"],
            "error: unknown precision 'float8'; choose float32, bfloat16 or float16.",
        ),
        (
            "geneformer",
            ["--pooling", "cls"],
            "error: pooling 'cls' is not available for geneformer; choose from ('mean',).",
        ),
        (
            "scfoundation",
            ["--pooling", "cls"],
            "error: pooling 'cls' is not available for scfoundation; choose from ('all', 'max').",
        ),
        (
            "scgpt",
            ["--pooling", "max"],
            "error: pooling 'max' is not available for scgpt; choose from ('cls', 'mean').",
        ),
        (
            "scgpt",
            ["--layer", "3"],
            "error: layer 3 is out of range for scgpt (2 layers); choose 0..2, or -3..-1 from "
            "the last.",
        ),
        (
            "geneformer",
            ["--layer", "-4"],
            "error: layer -4 is out of range for geneformer (2 layers); choose 0..2, or -3..-1 "
            "from the last.",
        ),
    ],
)
@pytest.mark.parametrize("backed", ["--no-backed", "--backed"])
def test_bad_embed_options_fail_before_the_weights_are_read(
    model, option, message, backed, corrupt_models, counts_file, tmp_path, capsys
):
    out = tmp_path / "e.npy"
    args = ["embed", str(counts_file), "--model", f"{model}={corrupt_models[model]}"]
    args += ["--out", str(out), "--allow-feature-selected", backed, "-q"]
    code, _, err = run_cli_in_process([*args, *option], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and lines == [message], err
    assert not out.exists()
    if model != "scfoundation":  # its gene index holds none of the data's genes
        code, _, err = run_cli_in_process(args, capsys)  # the same command reads the weights
        weights = {"scgpt": "best_model.pt", "geneformer": "model.safetensors"}[model]
        assert code == 2 and f"{weights} " in err and not out.exists(), err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"pooling": "cls"},
            "error: pooling 'cls' is not available for geneformer; choose from ('mean',).",
        ),
        (
            {"layer": 5},
            "error: finetune layer 5 is out of range for geneformer (2 layers); choose 0..2, or "
            "-3..-1 from the last.",
        ),
        ({"freeze_layers": 3}, "error: freeze_layers=3 but geneformer has 2 layers; choose 0..2."),
        (
            {"device": "cuda"},
            "error: finetune device 'cuda' is not supported; use auto or cpu (pick GPUs with "
            "CUDA_VISIBLE_DEVICES or accelerate launch).",
        ),
        ({"gene_column": "nope"}, NO_COLUMN),
    ],
)
def test_bad_finetune_settings_fail_before_the_weights_are_read(
    setting, message, corrupt_models, counts_file, tmp_path, capsys
):
    """`finetune` and `run` (with a finetune section) refuse them before any weights are
    read, and write no run folder; `validate` with the model named refuses them too."""
    (key, value), runs = next(iter(setting.items())), tmp_path / "runs"
    section = {} if key == "gene_column" else {"finetune": {key: value}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**section, **({} if section else setting)}))
    model = ["--model", f"geneformer={corrupt_models['geneformer']}", "--allow-feature-selected"]
    common = ["--config", str(config), *model, "--out", str(runs), "-q"]
    commands = [
        ["finetune", str(counts_file), *common],
        ["run", "--data", str(counts_file), *common],
        ["validate", str(counts_file), "--config", str(config), *model],
    ]
    if section:  # the same setting given on the command line
        flag = ["--set", f"{key}={value}", "--out", str(runs), "-q"]
        commands.append(["finetune", str(counts_file), *model, *flag])
    for args in commands:
        code, _, err = run_cli_in_process(args, capsys)
        assert code == 2 and err.strip().splitlines() == [message], (args, err)
        assert not runs.exists()


def test_fp16_finetuning_on_the_cpu_fails_before_the_weights_are_read(
    corrupt_models, counts_file, tmp_path, capsys
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is refused on a machine without a CUDA GPU only")
    args = ["finetune", str(counts_file), "--model", f"geneformer={corrupt_models['geneformer']}"]
    args += ["--set", "mixed_precision=fp16", "--out", str(tmp_path / "runs"), "-q"]
    code, _, err = run_cli_in_process([*args, "--allow-feature-selected"], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "error: mixed_precision fp16 needs a GPU; use bf16 or no on CPU."
    ]
    assert not (tmp_path / "runs").exists()


def test_transfer_refuses_a_gene_column_before_the_weights_are_read(
    corrupt_models, counts_file, tmp_path, capsys
):
    import anndata as ad

    adata = ad.read_h5ad(counts_file)
    other = tmp_path / "other.h5ad"
    adata[::-1].copy().write_h5ad(other)
    label_map = tmp_path / "same.yaml"
    label_map.write_text(yaml.safe_dump({c: c for c in adata.obs["cell_type"].unique()}))
    args = ["transfer", "--train", str(counts_file), "--test", str(other)]
    args += ["--labels", str(label_map), "--model", f"scgpt={corrupt_models['scgpt']}"]
    args += ["--gene-column", "nope", "--allow-feature-selected", "--out", str(tmp_path / "runs")]
    code, _, err = run_cli_in_process([*args, "-q"], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [NO_COLUMN.replace("error: ", "error: train data counts: ")]
    assert not (tmp_path / "runs").exists()
