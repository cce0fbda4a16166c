"""The bad-input matrix: one line naming problem and fix, exit code 2, no partial output."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import make_tiny_adata, run_cli_in_process


def write(adata, path: Path) -> str:
    adata.write_h5ad(path)
    return str(path)


def with_value(value: float):
    adata = make_tiny_adata()
    X = adata.X.toarray()
    X[1, 1] = value
    adata.X = sp.csr_matrix(X)
    return adata


def one_class():
    adata = make_tiny_adata()
    adata.obs["cell_type"] = "T"
    return adata


def one_cell_class():
    adata = make_tiny_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[0] = "Singleton"
    adata.obs["cell_type"] = labels
    return adata


def all_zero():
    adata = make_tiny_adata()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    return adata


def truncated(path: Path) -> str:
    make_tiny_adata().write_h5ad(path)
    path.write_bytes(path.read_bytes()[:2000])
    return str(path)


CASES = {
    "not_h5ad": (lambda p: (p.write_text("a,b\n1,2\n"), str(p))[1], [], "is not an .h5ad file"),
    "truncated": (truncated, [], "truncated or corrupt"),
    "empty_file": (
        lambda p: (p.write_bytes(b""), str(p))[1],
        [],
        "is empty (0 bytes): a write or copy that did not finish? Write it again",
    ),
    "label_missing": (
        lambda p: write(make_tiny_adata(), p),
        ["--label-key", "celltype"],
        "no column 'celltype'",
    ),
    "single_class": (lambda p: write(one_class(), p), [], "at least 2"),
    "one_cell_class": (
        lambda p: write(one_cell_class(), p),
        ["--config", "CFG1"],
        "'Singleton' has 1 cell",
    ),
    "nan": (lambda p: write(with_value(np.nan), p), [], "NaN"),
    "inf": (lambda p: write(with_value(np.inf), p), [], "infinite"),
    "negative": (lambda p: write(with_value(-2.0), p), [], "negative values"),
    "all_zero": (lambda p: write(all_zero(), p), [], "no cells left"),
    "unknown_config_key": (
        lambda p: write(make_tiny_adata(), p),
        ["--config", "CFG2"],
        "Did you mean 'n_splits'",
    ),
    "unknown_model": (
        lambda p: write(make_tiny_adata(), p),
        ["--model", "genformer=x"],
        "Did you mean 'geneformer'",
    ),
    "escaping_name": (lambda p: write(make_tiny_adata(), p), ["--name", "../x"], "one folder name"),
    "label_key_typo": (
        lambda p: write(make_tiny_adata(), p),
        ["--label-key", "cel_type"],
        "no column 'cel_type'; columns that look like labels: ['cell_type']. Pass --label-key "
        "with one of those. Did you mean 'cell_type'?",
    ),
    "one_fold_before_reading": (  # the settings are checked before the (broken) data
        truncated,
        ["--n-splits", "1"],
        "cross-validation needs ≥ 2 folds, got n_splits=1",
    ),
    "unknown_probe_before_reading": (truncated, ["--config", "CFG5"], "Did you mean 'logreg'"),
    "seed_too_large": (
        lambda p: write(make_tiny_adata(), p),
        ["--config", "CFG4"],
        "invalid value for 'seed': Input should be less than or equal to 2147483647",
    ),
    "batch_key_typo": (
        lambda p: write(with_donor(), p),
        ["--config", "CFG3"],
        "adata.obs has no column 'donr' for batch_key (columns: ['cell_type', 'donor']); set "
        "batch_key to one of those, or drop it to detect one. Did you mean 'donor'?",
    ),
}


@pytest.mark.parametrize("seed", ["-1", "2147483648"])
def test_seed_out_of_range_is_a_usage_error(seed, tmp_path, capsys):
    """A seed below 0 or above 2**31 - 1 stops before anything is written."""
    out = tmp_path / "runs"
    data = write(make_tiny_adata(), tmp_path / "data.h5ad")
    code, _, stderr = run_cli_in_process(
        ["run", "--data", data, "--out", str(out), f"--seed={seed}", "-q"], capsys
    )
    assert code == 2
    assert "Invalid value for '--seed'" in stderr and "Traceback" not in stderr
    assert not out.exists()


def with_donor():
    adata = make_tiny_adata()
    adata.obs["donor"] = np.tile(["d1", "d2"], adata.n_obs // 2)
    return adata


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_cli(case, tmp_path, capsys):
    make, extra, message = CASES[case]
    data = make(tmp_path / "data.h5ad")
    (tmp_path / "cfg1.yaml").write_text("min_cells_per_class: 1\n")
    (tmp_path / "cfg2.yaml").write_text("n_split: 2\n")
    (tmp_path / "cfg3.yaml").write_text("batch_key: donr\n")
    (tmp_path / "cfg4.yaml").write_text("seed: 4294967294\n")  # scikit-learn's largest
    (tmp_path / "cfg5.yaml").write_text("probes: [logreg, logrec]\n")
    configs = {f"CFG{i}": str(tmp_path / f"cfg{i}.yaml") for i in (1, 2, 3, 4, 5)}
    extra = [configs.get(a, a) for a in extra]
    out = tmp_path / "runs"
    name = [] if "--name" in extra else ["--name", "r"]
    # cli.main in this process (an interpreter start per case would take most of the test)
    code, _, stderr = run_cli_in_process(
        ["run", "--data", data, "--out", str(out), "-q", *name, *extra], capsys
    )
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


@pytest.mark.parametrize("command", ["run", "transfer", "finetune"])
def test_an_empty_output_folder_is_refused(command, tmp_path, capsys, monkeypatch):
    """``--out "$UNSET"`` would write into the current folder without a word."""
    monkeypatch.chdir(tmp_path)
    data = write(make_tiny_adata(), tmp_path / "data.h5ad")
    args = {
        "run": ["run", "--data", data],
        "transfer": ["transfer", "--train", data, "--test", "other.h5ad"],
        "finetune": ["finetune", data, "--model", f"geneformer-random={tmp_path}"],
    }[command]
    code, _, stderr = run_cli_in_process([*args, "--out", "", "-q"], capsys)
    assert (code, stderr.strip().splitlines()) == (
        2,
        [
            "error: invalid value for 'out': the folder is empty; give one, e.g. runs (or . for "
            "this folder) (got '')."
        ],
    )
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5ad"]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_config_data_path_that_does_not_exist_names_the_config(
    command, tmp_path, capsys, monkeypatch
):
    """``data:`` is read from the current folder; the error says so and names the config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    write(make_tiny_adata(), tmp_path / "configs" / "data.h5ad")
    config = Path("configs") / "run.yaml"
    config.write_text("data: data.h5ad\nlabel_key: cell_type\n")
    code, _, stderr = run_cli_in_process([command, "--config", str(config)], capsys)
    assert (code, stderr.strip().splitlines()) == (
        2,
        [
            "error: data file 'data.h5ad' (data: in 'configs/run.yaml') does not exist; relative "
            "paths are read from the current folder: write data: 'configs/data.h5ad'."
        ],
    )
    config.write_text("data: elsewhere.h5ad\n")
    code, _, stderr = run_cli_in_process([command, "--config", str(config)], capsys)
    assert code == 2 and stderr.strip() == (
        "error: data file 'elsewhere.h5ad' (data: in 'configs/run.yaml') does not exist; check "
        "the path (relative paths are read from the current folder)."
    )
    if command == "validate":  # the command line's data wins over the config's entry
        code, out, stderr = run_cli_in_process(
            [command, "configs/data.h5ad", "--config", str(config)], capsys
        )
        assert code == 0 and out.startswith("cells: "), stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):  # pragma: no cover - CI runs as root
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IREAD | stat.S_IEXEC)
    done = subprocess.run(
        [sys.executable, "-m", "scfmbench", "run", "--out", str(locked)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "cannot write to" in done.stderr


def test_unwritable_output_dir_message(tmp_path, monkeypatch):
    import scfmbench
    from scfmbench.benchmark.output import check_writable

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(scfmbench.ConfigError, match="cannot write to .*choose another"):
        check_writable(tmp_path / "runs" / "x")


# ---- model inputs: the same one-line contract through `scfmbench embed` and `run` -------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, shared_dir):
    from tests._geneformer_factory import write_checkpoint

    root = tmp_path_factory.mktemp("models")
    geneformer, _ = write_checkpoint(root / "gf", shared_dir, version="V2")
    scgpt = root / "scgpt"
    scgpt.mkdir()
    import json
    import shutil

    import torch

    from scfmbench.models.scgpt.network import ScGPTConfig, TransformerModel, to_flash_layout
    from scfmbench.models.scgpt.tokenizer import load_scgpt_vocab

    human = shared_dir / "vocab" / "scgpt" / "scGPT_human"
    shutil.copy(human / "vocab.json", scgpt / "vocab.json")
    args = {
        **json.loads((human / "args.json").read_text()),
        "embsize": 16,
        "nheads": 2,
        "d_hid": 16,
        "nlayers": 1,
    }
    (scgpt / "args.json").write_text(json.dumps(args))
    network = TransformerModel(
        ScGPTConfig.from_args(args, ntoken=len(load_scgpt_vocab(scgpt / "vocab.json")))
    )
    torch.save(to_flash_layout(network.state_dict()), scgpt / "best_model.pt")
    return {"geneformer": geneformer, "scgpt": scgpt}


def pbmc_cells(pbmc3k_path, n=60):
    import anndata as ad

    return ad.read_h5ad(pbmc3k_path)[:n].copy()


def lognormalized(adata):
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.data = np.log1p(adata.X.data * 3.7)
    return adata


def ensembl_names(adata):
    adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    adata.var = adata.var.iloc[:, :0]  # no symbol column left for the models to find
    return adata


def mouse_like(adata):
    adata.var_names = [f"{name[:1]}{name[1:].lower()}_m" for name in adata.var_names]
    adata.var = adata.var.iloc[:, :0]  # no Ensembl or symbol column to fall back on
    return adata


def copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


MODEL_CASES = {
    "lognorm_to_geneformer": ("geneformer", lognormalized, None, [], "needs raw integer counts"),
    "ensembl_to_scgpt": ("scgpt", ensembl_names, None, [], "look like ensembl identifiers"),
    "mouse_like_genes_to_geneformer": ("geneformer", mouse_like, None, [], "vocabulary"),
    "truncated_geneformer_weights": (
        "geneformer",
        None,
        lambda d: truncate(d / "model.safetensors"),
        [],
        "model.safetensors",
    ),
    "truncated_scgpt_weights": (
        "scgpt",
        None,
        lambda d: truncate(d / "best_model.pt"),
        [],
        "best_model.pt",
    ),
    "missing_scgpt_args": ("scgpt", None, lambda d: (d / "args.json").unlink(), [], "args.json"),
    "missing_geneformer_dictionary": (
        "geneformer",
        None,
        lambda d: next(d.glob("token_dictionary*")).unlink(),
        [],
        "--geneformer-dicts",
    ),
    "scgpt_vocab_size_mismatch": (
        "scgpt",
        None,
        lambda d: (d / "vocab.json").write_text(
            __import__("json").dumps({"<pad>": 0, "<cls>": 1, "CD3D": 2})
        ),
        [],
        "vocab",
    ),
}


@pytest.mark.parametrize("command", ["embed", "run"])
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_input_cli(case, command, model_dirs, pbmc3k_path, tmp_path, capsys):
    model, change_data, change_model, extra, message = MODEL_CASES[case]
    adata = pbmc_cells(pbmc3k_path)
    if change_data is not None:
        adata = change_data(adata)
    data = write(adata, tmp_path / "data.h5ad")
    folder = copy_model(model_dirs[model], tmp_path / "model")
    if change_model is not None:
        change_model(folder)
    out = tmp_path / "out"
    if command == "embed":
        args = ["embed", data, "--model", f"{model}={folder}", "--out", str(out / "e.npy")]
    else:
        args = [
            "run",
            "--data",
            data,
            "--model",
            f"{model}={folder}",
            "--out",
            str(out),
            "--name",
            "r",
        ]
    code, _, stderr = run_cli_in_process([*args, *extra, "-q"], capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and message.lower() in errors[0].lower(), stderr
    assert "Traceback" not in stderr
    assert not out.exists() or not any(out.rglob("*.*")), list(out.rglob("*"))


def no_labels():
    adata = make_tiny_adata()
    adata.obs["cell_type"] = np.nan
    return adata


def one_duplicated_cell():
    adata = make_tiny_adata()
    adata.obs_names = [*adata.obs_names[:-1], adata.obs_names[0]]
    return adata


# each: command line (DATA: the tiny file; CFG: the config file, written with the text given)
ONE_LINE_CASES = {
    "run-data-dot": (["run", "--data", "."], None, None, "'.' is a directory but not an AnnData "
                     "zarr store (no .zgroup or zarr.json); pass the .h5ad file itself."),
    "run-data-parent": (["run", "--data", ".."], None, None, "'..' is a directory but not an "
                        "AnnData zarr store (no .zgroup or zarr.json); pass the .h5ad file "
                        "itself."),
    "run-data-empty": (["run", "--data", ""], None, None, "invalid value for 'data': the path is "
                       "empty; give an .h5ad file or a built-in name (pbmc68k_reduced) (got '')."),
    "validate-data-dot": (["validate", "."], None, None, "'.' is a directory but not an AnnData "
                          "zarr store (no .zgroup or zarr.json); pass the .h5ad file itself."),
    "config-key-twice": (["run", "--config", "CFG"], None, "data: a.h5ad\nseed: 1\ndata: b.h5ad\n",
                         "config file 'CFG' sets 'data' twice (lines 1 and 3); keep one of "
                         "them."),
    "config-empty": (["run", "--config", "CFG"], None, "# nothing set\n", "config file 'CFG' is "
                     "empty; write option: value lines in it (e.g. data: pbmc3k.h5ad) or leave "
                     "out --config."),
    "finetune-without-model": (["run", "--data", "DATA", "--finetune"], make_tiny_adata, None,
                               "--finetune fine-tunes the run's foundation models, but none is "
                               "named; add one with --model NAME=DIR (models: in a config) or "
                               "drop --finetune"),
    "every-label-missing": (["validate", "DATA"], no_labels, None, "every cell's 'cell_type' "
                            "label is missing (NaN, empty or a placeholder such as 'unknown'); "
                            "pick another --label-key."),
    "every-class-too-small": (["run", "--data", "DATA", "--min-cells-per-class", "25"],
                              make_tiny_adata, None, "every class of 'cell_type' has fewer than "
                              "25 cells (the largest, type_0, has 20); lower min_cells_per_class "
                              "(--min-cells-per-class) or pick another --label-key."),
    "one-duplicated-cell": (["validate", "DATA"], one_duplicated_cell, None, "data.h5ad has 1 "
                            "duplicated cell name (obs_names); make them unique "
                            "(adata.obs_names_make_unique()) and write it again."),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ONE_LINE_CASES))
def test_bad_input_is_one_line_and_nothing_else(case, tmp_path, capsys, caplog, monkeypatch):
    """The error is all of stderr: no library warning or dropped-cells warning before it."""
    args, make, config, message = ONE_LINE_CASES[case]
    monkeypatch.chdir(tmp_path)
    if make is not None:
        write(make(), tmp_path / "data.h5ad")
    if config is not None:
        (tmp_path / "CFG").write_text(config)
    args = [{"DATA": "data.h5ad"}.get(a, a) for a in args]
    out = ["--out", "runs", "-q"] if args[0] == "run" else []
    code, _, stderr = run_cli_in_process([*args, *out], capsys)
    assert (code, stderr.splitlines()) == (2, [f"error: {message}"])
    assert caplog.messages == []  # warnings are logged to stderr too
    assert not (tmp_path / "runs").exists()


def test_sizes_beyond_the_data_are_said(tmp_path, capsys, caplog, monkeypatch):
    """n_hvg and n_pcs set larger than the data allow are capped with a warning each."""
    monkeypatch.chdir(tmp_path)
    write(make_tiny_adata(), tmp_path / "data.h5ad")  # 40 genes, 60 cells
    (tmp_path / "big.yaml").write_text("n_hvg: 100000\nn_pcs: 5000\n")
    code, out, stderr = run_cli_in_process(
        ["validate", "data.h5ad", "--config", "big.yaml"], capsys
    )
    assert code == 0 and out.startswith("cells: 60"), stderr
    assert caplog.messages == [
        "warning: n_hvg is 100,000 but the data have 40 genes: the hvg and pca baselines use "
        "all of them",
        "warning: n_pcs is 5,000 but the PCA has at most 40 components (the genes it reads, "
        "and fewer than each split's training cells): each split keeps all it has",
    ]
    caplog.clear()
    code, _, stderr = run_cli_in_process(["validate", "data.h5ad"], capsys)
    assert code == 0 and caplog.messages == [], caplog.messages  # defaults: capped quietly
    (tmp_path / "fits.yaml").write_text("n_hvg: 40\nn_pcs: 39\n")
    code, _, stderr = run_cli_in_process(["validate", "data.h5ad", "--config", "fits.yaml"], capsys)
    assert code == 0 and caplog.messages == [], caplog.messages
