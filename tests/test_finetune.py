"""Fine-tuning engine on a tiny 2-layer BERT and a 300-cell PBMC3k subset."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scfmbench import CheckpointError, ConfigError
from scfmbench.data.splits import stratified_split
from scfmbench.data.validate import validate
from scfmbench.embed import embed_tokens
from scfmbench.finetune.train import (
    FinetuneConfig,
    epoch_batches,
    finetune,
    finetune_in_run,
    load_head,
    metrics_section,
)
from tests._tiny_model import TinyModel, load_tiny, pbmc_subset

TESTS = Path(__file__).resolve().parent
# A learning rate high enough for a tiny model to learn in a few epochs.
FAST = {"epochs": 4, "learning_rate": 1e-2, "batch_size": 16, "device": "cpu"}


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: on a shared, loaded CPU two threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupted(Exception):
    """Raised from on_epoch_end to simulate a crash after a checkpoint."""


@pytest.fixture(scope="session")
def pbmc_small(pbmc3k_path):
    """(validated 300-cell subset, gene vocabulary, split)."""
    adata, genes = pbmc_subset(pbmc3k_path)
    validated = validate(adata, label_key="cell_type")
    return validated, genes, stratified_split(validated.labels, seed=42)


@pytest.fixture(scope="session")
def trained(pbmc_small, tmp_path_factory):
    """One uninterrupted run, shared by several tests."""
    validated, genes, split = pbmc_small
    out = tmp_path_factory.mktemp("ft") / "full"
    result = finetune(
        validated,
        TinyModel(genes),
        split,
        config=FinetuneConfig(**FAST),
        out_dir=out,
        progress=False,
    )
    return result


def test_training_lowers_loss_and_beats_chance(trained, pbmc_small):
    validated, _, _ = pbmc_small
    losses = [e["train_loss"] for e in trained.epochs]
    assert len(trained.epochs) == 4
    assert set(trained.epochs[0]) == {
        "epoch",
        "train_loss",
        "val_loss",
        "val_macro_f1",
        "val_accuracy",
    }
    assert losses[-1] < 0.6 * losses[0]
    assert trained.epochs[-1]["val_loss"] < trained.epochs[0]["val_loss"]
    n_classes = len(validated.labels.cat.categories)
    majority = validated.labels.value_counts(normalize=True).max()
    assert trained.best_val_macro_f1 > 3 / n_classes  # chance macro F1 is about 1/7
    assert trained.test.accuracy > majority + 0.2
    assert trained.kind == "finetuned"
    assert (trained.out_dir / "learning_curve.png").stat().st_size > 0
    saved = json.loads((trained.out_dir / "result.json").read_text())
    assert saved["best_epoch"] == trained.best_epoch
    assert saved["test"]["macro_f1"] == pytest.approx(trained.test.macro_f1)
    assert trained.prediction_payload()["cells"] == trained.test_cells


def test_best_model_reloads_through_embedding_path(trained, pbmc_small):
    validated, _, split = pbmc_small
    reloaded = load_tiny(trained.best_dir / "model")
    head, info = load_head(trained.best_dir, reloaded)
    assert info["classes"] == trained.classes
    assert info["epoch"] == trained.best_epoch
    test = validated.adata[split.test].copy()
    tokens = reloaded.tokenize(test)
    pooled = embed_tokens(
        reloaded, tokens, layer=info["layer"], pooling=info["pooling"], progress=False
    )
    with torch.no_grad():
        codes = head(torch.from_numpy(pooled)).argmax(1).numpy()
    predicted = dict(zip(trained.test_cells, trained.test_pred, strict=True))
    assert [trained.classes[c] for c in codes] == [predicted[c] for c in tokens.obs_names]


def test_resume_after_interruption_equals_uninterrupted(trained, pbmc_small, tmp_path):
    validated, genes, split = pbmc_small

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Interrupted

    config = FinetuneConfig(**FAST)
    with pytest.raises(Interrupted):
        finetune(
            validated,
            TinyModel(genes),
            split,
            config=config,
            out_dir=tmp_path,
            progress=False,
            on_epoch_end=crash_after_first,
        )
    with pytest.raises(CheckpointError, match=r"learning_rate: 0\.01 → 0\.02"):
        finetune(
            validated,
            TinyModel(genes),
            split,
            config=FinetuneConfig(**{**FAST, "learning_rate": 2e-2}),
            out_dir=tmp_path,
            resume=True,
            progress=False,
        )
    resumed = finetune(
        validated,
        TinyModel(genes),
        split,
        config=config,
        out_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert resumed.resumed_from_epoch == 1
    assert resumed.epochs == trained.epochs  # exact float equality on CPU
    assert resumed.test_pred == trained.test_pred
    assert resumed.test.to_dict() == trained.test.to_dict()
    final = torch.load(tmp_path / "checkpoint/last.pt", weights_only=True)
    reference = torch.load(trained.out_dir / "checkpoint/last.pt", weights_only=True)
    for name, tensor in reference["network"].items():
        assert torch.equal(final["network"][name], tensor), name


def test_lora_trains_only_adapters_and_head(pbmc_small, tmp_path):
    validated, genes, split = pbmc_small
    model = TinyModel(genes)
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    config = FinetuneConfig(**{**FAST, "epochs": 1, "lora": True, "lora_r": 4})
    # the entry point for ``run --finetune``: what pipeline.run holds
    result = finetune_in_run(
        validated.adata, validated.labels, model, split, config=config, run_dir=tmp_path
    )
    assert result.out_dir == tmp_path / "finetune" / "tiny" / "seed42"
    hidden, n_classes, n_layers = 32, len(result.classes), 2
    lora = n_layers * 2 * (4 * hidden + hidden * 4)  # query + value: A (r×in) + B (out×r)
    head = hidden * n_classes + n_classes
    assert result.n_trainable_params == lora + head == 1024 + 33 * n_classes
    tuned = result.model
    trainable = {n for n, p in tuned.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora" in n for n in model.network.state_dict())  # caller's model untouched
    after = tuned.network.state_dict()
    for name, tensor in before.items():
        lora_key = name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias"
        )
        assert torch.equal(after.get(name, after.get(lora_key)), tensor), name
    # the saved best model has the adapters merged, loads as a plain model and embeds
    # like the adapter model it came from
    reloaded = load_tiny(result.best_dir / "model")
    assert not any("lora" in n for n in reloaded.network.state_dict())
    tokens = model.tokenize(validated.adata[split.test].copy())
    layer = model.n_layers
    merged = embed_tokens(reloaded, tokens, layer=layer, pooling="mean", progress=False)
    adapted = embed_tokens(tuned, tokens, layer=layer, pooling="mean", progress=False)
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-5)


def test_frozen_layers_unchanged(pbmc_small, tmp_path):
    validated, genes, split = pbmc_small
    model = TinyModel(genes)
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    config = FinetuneConfig(**{**FAST, "epochs": 1, "freeze_embeddings": True, "freeze_layers": 1})
    result = finetune(validated, model, split, config=config, out_dir=tmp_path, progress=False)
    after = result.model.network.state_dict()
    frozen = [k for k in before if k.startswith(("embeddings.", "encoder.layer.0."))]
    trained_ = [k for k in before if k.startswith("encoder.layer.1.")]
    assert frozen and trained_
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not any(torch.equal(before[k], after[k]) for k in trained_ if k.endswith("weight"))
    # the caller's model is not modified, and the tuned copy is a different checkpoint
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in before.items())
    assert result.model.checkpoint_sha256 != model.checkpoint_sha256


def test_two_process_ddp_matches_one_process(trained, pbmc3k_path, tmp_path):
    """2 CPU processes (gloo, launched with torchrun) give the single-process result.

    Each process takes every second cell of the same global batch and divides its summed
    loss by the global batch size (times 2, undoing DDP's averaging), so the gradient is
    the single-process gradient; only float summation order differs.
    """
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(TESTS / "_ddp_finetune.py"),
        str(pbmc3k_path),
        str(out),
        json.dumps(FAST),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((out / "result.json").read_text())
    assert ddp["n_processes"] == 2
    assert len(ddp["epochs"]) == len(trained.epochs)
    for got, want in zip(ddp["epochs"], trained.epochs, strict=True):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert ddp["test"]["macro_f1"] == pytest.approx(trained.test.macro_f1, abs=1e-5)
    assert ddp["best_epoch"] == trained.best_epoch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_control_bf16_checkpointing_class_weights(pbmc_small, tmp_path):
    validated, genes, split = pbmc_small
    control = TinyModel(genes, random_init=True, seed=1)
    options = {"class_weighted": True, "mixed_precision": "bf16", "gradient_checkpointing": True}
    config = FinetuneConfig(**{**FAST, "epochs": 1, **options})
    result = finetune(validated, control, split, config=config, out_dir=tmp_path, progress=False)
    assert result.model.network.is_gradient_checkpointing
    assert np.isfinite(result.epochs[0]["train_loss"])
    assert result.kind == "control"
    assert result.model_id == "tiny-random"
    section = metrics_section([result])
    assert section["tiny-random"]["kind"] == "control"
    assert section["tiny-random"]["splits"]["42"]["epochs"] == result.epochs


def test_early_stopping(pbmc_small, tmp_path, caplog):
    validated, genes, split = pbmc_small
    config = FinetuneConfig(**{**FAST, "learning_rate": 1e-9, "patience": 1})
    with caplog.at_level(logging.INFO, logger="scfmbench.finetune.checkpoint"):
        result = finetune(validated, TinyModel(genes), split, config=config, out_dir=tmp_path)
    saved = [r.getMessage() for r in caplog.records if "best so far" in r.getMessage()]
    # the log names the final folder, not the staging one it is written into first
    assert saved[0] == f"tiny: epoch 1 is the best so far; saved to {tmp_path / 'best'}"
    # nothing is learned, so epoch 2 is no better than epoch 1 and training stops there
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert result.stopped_early
    # equal validation macro F1: the lower validation loss picks the epoch
    first, second = result.epochs
    assert first["val_macro_f1"] == second["val_macro_f1"]
    assert result.best_epoch == (2 if second["val_loss"] < first["val_loss"] else 1)


def test_option_errors(pbmc_small, tmp_path):
    validated, genes, split = pbmc_small
    with pytest.raises(
        ConfigError, match="unknown finetune option 'learning_rat'.*'learning_rate'"
    ):
        FinetuneConfig.build({"learning_rat": 1e-3})
    with pytest.raises(ConfigError, match="invalid finetune option 'epochs'"):
        FinetuneConfig.build({"epochs": 0})

    class NoLora(TinyModel):
        def lora_target_modules(self) -> list[str]:
            raise NotImplementedError

    with pytest.raises(ConfigError, match="lora needs NoLora.lora_target_modules"):
        finetune(
            validated,
            NoLora(genes),
            split,
            config=FinetuneConfig(lora=True, device="cpu"),
            out_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="freeze_layers=5 but tiny has 2 layers"):
        finetune(
            validated,
            TinyModel(genes),
            split,
            config=FinetuneConfig(freeze_layers=5, device="cpu"),
            out_dir=tmp_path,
        )


def test_epoch_batches_depend_on_seed_and_epoch_only():
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    first = epoch_batches(lengths, batch_size=16, seed=42, epoch=1)
    assert sorted(np.concatenate(first).tolist()) == list(range(103))
    assert all(len(b) <= 16 for b in first)
    assert lengths[first[0]].max() == lengths.max()  # longest batch first
    again = epoch_batches(lengths, batch_size=16, seed=42, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = epoch_batches(lengths, batch_size=16, seed=42, epoch=2)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_epoch_batches_keep_a_token_budget():
    # PBMC3k-like lengths with a few cells at the 4,096-token input size
    lengths = np.random.default_rng(1).integers(200, 1500, size=200)
    lengths[[3, 50, 120]] = 4096
    batches = epoch_batches(lengths, batch_size=16, seed=42, epoch=0, max_tokens=8192)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    padded = [len(b) * int(lengths[b].max()) for b in batches]
    assert max(padded) <= 8192 and all(len(b) <= 16 for b in batches)
    assert len(batches[0]) == 2 and lengths[batches[0]].tolist() == [4096, 4096]
    # without the budget the first batch holds 16 cells padded to 4,096 tokens
    unbounded = epoch_batches(lengths, batch_size=16, seed=42, epoch=0)
    assert len(unbounded[0]) * int(lengths[unbounded[0]].max()) == 16 * 4096
    assert FinetuneConfig().max_tokens == 16_384
    # the attention budget: cells × longest² ≤ 2**24 → 2 cells of 2,400 tokens, 16 of 1,024
    scores = epoch_batches(lengths, batch_size=16, seed=42, epoch=0, max_attention=2**24)
    assert max(len(b) * int(lengths[b].max()) ** 2 for b in scores) <= 2**24
    assert [len(b) for b in scores if lengths[b].max() == 4096] == [1, 1, 1]
    short = epoch_batches(np.full(40, 1024), batch_size=16, seed=0, epoch=0, max_attention=2**24)
    assert sorted(len(b) for b in short) == [8, 16, 16]
    assert FinetuneConfig().max_attention == 2**24


def test_config_yaml_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\nfinetune:\n  epochs: 2\n  lora: true\n")
    config = FinetuneConfig.from_yaml(path, learning_rate=1e-4)
    assert (config.epochs, config.lora, config.learning_rate) == (2, True, 1e-4)


@pytest.fixture
def small_file(pbmc3k_path, tmp_path, monkeypatch) -> Path:
    """120 PBMC3k cells in ``small.h5ad``, and a tiny model in ``tiny/`` registered as
    ``tiny`` (removed again after the test)."""
    from scfmbench.models import MODELS

    adata, genes = pbmc_subset(pbmc3k_path, n_cells=120)
    data = tmp_path / "small.h5ad"
    adata.write_h5ad(data)
    TinyModel(genes).save_pretrained(tmp_path / "tiny")
    monkeypatch.setitem(MODELS._entries, "tiny", load_tiny)
    return data


def test_cli_finetune(small_file, tmp_path):
    """``scfmbench finetune DATA --model tiny=DIR`` trains and writes into the run directory."""
    from typer.testing import CliRunner

    from scfmbench.cli import app

    data = small_file
    config = tmp_path / "run.yaml"
    config.write_text("min_cells_per_class: 5\nfinetune:\n  device: cpu\n  learning_rate: 0.01\n")
    args = ["finetune", str(data), "--model", f"tiny={tmp_path / 'tiny'}", "--config", str(config)]
    args += ["--out", str(tmp_path / "runs"), "--epochs", "1", "--set", "patience=1", "-q"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "| tiny | finetuned | 42 | 1 |" in done.output
    result_dir = tmp_path / "runs" / "small" / "finetune" / "tiny" / "seed42"
    assert json.loads((result_dir / "result.json").read_text())["config"]["patience"] == 1
    bad = CliRunner().invoke(app, [*args[:6], "--set", "learning_rat=1"])
    assert isinstance(bad.exception, ConfigError)
    assert "Did you mean 'learning_rate'" in str(bad.exception)


def test_best_epoch_ties_on_validation_f1_go_to_the_lower_validation_loss():
    from scfmbench.finetune.epochs import LoopState

    loop = LoopState()
    for epoch, f1, loss in [(1, 0.5, 1.0), (2, 0.8, 0.9), (3, 0.8, 0.7), (4, 0.8, 0.75)]:
        loop.update({"epoch": epoch, "val_macro_f1": f1, "val_loss": loss}, patience=None)
    assert loop.best_epoch == 3 and loop.bad_epochs == 2  # F1 last rose at epoch 2
    restored = LoopState.from_dict({k: v for k, v in loop.to_dict().items() if k != "best_loss"})
    assert restored.best_epoch == 3  # checkpoints written before the tie-break still load


def test_finetune_in_a_run_folder_uses_the_runs_splits(small_file, tmp_path):
    """In a finished run's folder `finetune` fine-tunes on the run's splits (2 folds here), not
    on splits of its own defaults (5), and leaves the saved splits as they were."""
    from typer.testing import CliRunner

    from scfmbench.cli import app

    data = small_file
    config = tmp_path / "run.yaml"
    config.write_text("min_cells_per_class: 5\nfinetune:\n  device: cpu\n")
    common = ["--config", str(config), "--out", str(tmp_path / "runs"), "-q"]
    done = CliRunner().invoke(
        app, ["run", "--data", str(data), "--n-splits", "2", "--no-scvi", *common]
    )
    assert done.exit_code == 0, done.output
    splits = tmp_path / "runs" / "small" / "splits"
    before = {p.name: p.read_bytes() for p in splits.iterdir()}
    args = ["finetune", str(data), "--model", f"tiny={tmp_path / 'tiny'}", *common]
    done = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert done.exit_code == 0, done.output
    seeds = [line.split("|")[3].strip() for line in done.output.splitlines() if "| tiny |" in line]
    assert seeds == ["42", "43"]
    assert {p.name: p.read_bytes() for p in splits.iterdir()} == before


def test_result_warnings_are_the_tokenizers_not_library_deprecations(pbmc_small, tmp_path):
    """A deprecation raised while tokenizing is given as usual but is not a warning about the
    data, so result.json does not keep it; a warning about the data is kept once."""
    import warnings

    validated, genes, split = pbmc_small

    class Warns(TinyModel):
        def tokenize(self, adata, *, seed=0):
            warnings.warn("some API will change", FutureWarning, stacklevel=2)
            warnings.warn("3 cells have no genes in the vocabulary", UserWarning, stacklevel=2)
            return super().tokenize(adata, seed=seed)

    config = FinetuneConfig(**{**FAST, "epochs": 1})
    with pytest.warns(FutureWarning, match="some API"):
        result = finetune(
            validated, Warns(genes), split, config=config, out_dir=tmp_path, progress=False
        )
    assert result.warnings == ["3 cells have no genes in the vocabulary"]
    assert json.loads((tmp_path / "result.json").read_text())["warnings"] == result.warnings


def test_finetune_records_what_the_tokenizer_warned(
    pbmc3k_path, shared_dir, tmp_path, capsys, caplog
):
    """A standalone `finetune` refuses a feature-selected matrix unless
    --allow-feature-selected, as `run` does, and a checkpoint it cannot read before it writes
    the splits. With both flags, each split's result.json keeps the warnings with the scores
    they qualify, as `run` marks its rows; the command prints each once, though each split's
    cells are tokenized."""
    import scanpy as sc

    from tests._geneformer_factory import write_checkpoint
    from tests.conftest import run_cli_in_process

    adata, genes = pbmc_subset(pbmc3k_path, n_cells=120, n_genes=500)
    adata = adata[:, genes].copy()  # 500 genes: short cells, a fast test
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    data = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(data)
    config = tmp_path / "run.yaml"
    two_splits = "min_cells_per_class: 5\ndesign: study\nn_splits: 2\n"
    config.write_text(two_splits + "finetune:\n  device: cpu\n")
    common = [str(data), "--config", str(config), "--epochs", "1", "--allow-normalized", "-q"]
    common += ["--out", str(tmp_path / "runs")]
    model = f"geneformer={write_checkpoint(tmp_path / 'gf', shared_dir)[0]}"
    capsys.readouterr()  # the checkpoint writer's progress bar
    code, _, err = run_cli_in_process(["finetune", "--model", model, *common], capsys)
    assert code == 2 and err.startswith(
        "error: the count matrix (adata.X) has only 500 genes (fewer than 5,000)"
    ), err
    (tmp_path / "empty").mkdir()
    empty = ["finetune", "--model", f"geneformer={tmp_path / 'empty'}", *common]
    code, _, err = run_cli_in_process([*empty, "--allow-feature-selected"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # no splits written for a model that cannot load

    caplog.clear()
    allowed = ["finetune", "--model", model, *common, "--allow-feature-selected"]
    code, _, err = run_cli_in_process(allowed, capsys)
    assert code == 0, err
    selected = (
        "the count matrix (adata.X) has only 500 genes (fewer than 5,000), a feature-selected "
        "subset; running geneformer on it anyway because --allow-feature-selected is set — "
        "scores are not comparable to the published models"
    )
    normalized = (
        "geneformer expects raw counts but adata.X holds log-normalized values (log-scale: "
        "non-integer, max ≤ 50); proceeding because allow_normalized is set — results are not "
        "comparable to the published model."
    )
    for seed in (42, 43):
        result = tmp_path / "runs/lognorm/finetune/geneformer" / f"seed{seed}" / "result.json"
        assert json.loads(result.read_text())["warnings"] == [selected, normalized]
    assert caplog.messages.count(f"warning: {normalized}") == 1
