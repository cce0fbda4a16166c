"""Scale (issue 9): streaming embed of on-disk .h5ad, torchrun sharding, --batch-size auto."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfmbench.embed.launch as launch
import scfmbench.embed.output as stream_output
from scfmbench.benchmark.commands import embed_dataset
from scfmbench.embed import embed_tokens, parse_batch_size
from scfmbench.errors import ConfigError, DataError
from scfmbench.models import TokenizedCells
from scfmbench.models.base import FoundationModel, PaddedBatch
from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


@pytest.fixture
def subset(tmp_path, pbmc3k_sess) -> Path:
    """240 PBMC3k cells (raw counts, CSR) as an .h5ad file."""
    path = tmp_path / "subset.h5ad"
    pbmc3k_sess[:240].copy().write_h5ad(path)
    return path


def _embed(data, model_dir, out, **options):
    # the toy matrices of 8-9 genes would be refused as feature-selected
    options = {
        "device": "cpu",
        "batch_size": 16,
        "progress": False,
        "allow_feature_selected": True,
        **options,
    }
    return embed_dataset(data, model=f"scgpt={model_dir}", out=out, **options)


# --------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------


def test_streaming_matches_in_memory_and_writes_h5ad(tmp_path, subset, make_scgpt_dir, caplog):
    # at most 256 genes a cell: quick, and every cell's genes are drawn at random
    model_dir = make_scgpt_dir(max_seq_len=256)
    _embed(subset, model_dir, tmp_path / "memory.npy", backed=False)
    memory = np.load(tmp_path / "memory.npy")
    key, n = _embed(subset, model_dir, tmp_path / "one_chunk.npy", backed=True, chunk_size=240)
    assert (key, n) == ("X_scgpt", 240)
    # one chunk: tokenized exactly as in memory
    np.testing.assert_array_equal(np.load(tmp_path / "one_chunk.npy"), memory)

    cache = tmp_path / "cache"
    out = tmp_path / "streamed.h5ad"
    _embed(subset, model_dir, out, backed=True, chunk_size=100, cache_dir=cache)
    written = ad.read_h5ad(out)
    source = ad.read_h5ad(subset)
    assert written.obsm["X_scgpt"].shape == (240, 16)
    assert written.obsm["X_scgpt"].dtype == np.float32
    assert written.uns["X_scgpt_info"]["chunk_size"] == 100
    pd.testing.assert_frame_equal(written.obs, source.obs)
    assert (written.X != source.X).nnz == 0
    np.testing.assert_array_equal(written.obsm["X_umap"], source.obsm["X_umap"])
    # random draws are per cell, so other chunk boundaries give the same rows (up to padding)
    np.testing.assert_allclose(written.obsm["X_scgpt"], memory, rtol=1e-5, atol=1e-5)
    assert len(list(cache.glob("*.npy"))) == 3  # one entry per chunk

    with caplog.at_level(logging.INFO, logger="scfmbench"):
        _embed(
            subset, model_dir, tmp_path / "again.npy", backed=True, chunk_size=100, cache_dir=cache
        )
    assert caplog.text.count("reusing finished chunk") == 3
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), written.obsm["X_scgpt"])


def test_streaming_sigkill_resumes(tmp_path, pbmc3k_sess, make_scgpt_dir):
    model_dir = make_scgpt_dir()
    data = tmp_path / "subset400.h5ad"
    pbmc3k_sess[:400].copy().write_h5ad(data)
    reference = tmp_path / "reference.npy"
    short = {"max_seq_len": 256}  # keeps the test fast
    _embed(data, model_dir, reference, backed=True, chunk_size=100, model_options=short)
    cache, out = tmp_path / "cache", tmp_path / "resumed.npy"
    command = [
        sys.executable,
        "-m",
        "scfmbench",
        "embed",
        str(data),
        "--model",
        f"scgpt={model_dir}",
        "--out",
        str(out),
        "--backed",
        "--chunk-size",
        "100",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache),
        "--option",
        "max_seq_len=256",
    ]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    # a chunk is finished once its checksummed .json is written (the .npy comes first)
    while time.time() < deadline and not list(cache.glob("*.json")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = [p for p in cache.glob("*.npy") if p.with_suffix(".json").exists()]
    assert 1 <= len(finished) < 4, finished
    assert not out.exists()  # rows went to a temporary file only
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("reusing finished chunk") >= len(finished)
    assert not list(tmp_path.glob(".resumed.npy*"))  # the killed run's temporary file is gone
    np.testing.assert_array_equal(np.load(out), np.load(reference))


def _write_csr(path: Path, matrix: np.ndarray, *, fmt: str = "csr") -> None:
    n_obs, n_vars = matrix.shape
    genes = ["CD3D", "CD3E", "MS4A1", "CD79A", "LYZ", "CD14", "NKG7", "GNLY"][:n_vars]
    x = sp.csr_matrix(matrix) if fmt == "csr" else sp.csc_matrix(matrix)
    ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=genes),
    ).write_h5ad(path)


def _counts(n_obs: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, size=(n_obs, 8)).astype(np.float32) + 1


def test_streaming_refuses_bad_chunks_on_the_cli(tmp_path, make_scgpt_dir):
    model_dir = make_scgpt_dir()
    counts = _counts()
    counts[150, 3] = -1.0  # a negative value in the second chunk
    data = tmp_path / "negative.h5ad"
    _write_csr(data, counts)
    out = tmp_path / "out.h5ad"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scfmbench",
            "embed",
            str(data),
            "--model",
            f"scgpt={model_dir}",
            "--out",
            str(out),
            "--backed",
            "--chunk-size",
            "100",
            "--device",
            "cpu",
            "--allow-feature-selected",  # 8 genes
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()  # the feature-selection warning, then the error
    error = [line for line in lines if line.startswith("error: ")]
    assert len(error) == 1 and len(lines) == 2 and "--allow-feature-selected" in lines[0]
    assert "cells 100-199" in error[0] and "scaled" in error[0]
    assert not out.exists() and not list(tmp_path.glob(".out.h5ad*"))


def test_streaming_chunk_checks(tmp_path, make_scgpt_dir):
    model_dir = make_scgpt_dir()
    counts = _counts()
    counts[250, 0] = np.nan
    _write_csr(tmp_path / "nan.h5ad", counts)
    with pytest.raises(DataError, match=r"cells 200-299 .* 1 NaN"):
        _embed(tmp_path / "nan.h5ad", model_dir, tmp_path / "o.npy", backed=True, chunk_size=100)

    counts = _counts()
    counts[200:] += 0.5  # normalized values after raw counts
    _write_csr(tmp_path / "mixed.h5ad", counts)
    mixed = r"cells 200-299 .* log-normalized .* first cells hold raw integer"
    with pytest.raises(DataError, match=mixed):
        _embed(tmp_path / "mixed.h5ad", model_dir, tmp_path / "o.npy", backed=True, chunk_size=100)

    _write_csr(tmp_path / "csc.h5ad", _counts(), fmt="csc")
    with pytest.raises(DataError, match=r"csc_matrix; streaming .* needs CSR"):
        _embed(tmp_path / "csc.h5ad", model_dir, tmp_path / "o.npy", backed=True)
    assert not (tmp_path / "o.npy").exists()


def test_streaming_chunk_without_tokens_gets_nan_rows(tmp_path, make_scgpt_dir):
    counts = np.zeros((150, 9), dtype=np.float32)
    counts[:, 8] = 3  # every cell expresses the gene missing from the vocabulary …
    counts[100:, :8] = _counts(50)  # … and only cells 100-149 vocabulary genes
    adata = ad.AnnData(
        X=sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(150)])
    )
    adata.var_names = ["CD3D", "CD3E", "MS4A1", "CD79A", "LYZ", "CD14", "NKG7", "GNLY", "NOPE"]
    adata.write_h5ad(tmp_path / "late.h5ad")
    key, n = _embed(
        tmp_path / "late.h5ad", make_scgpt_dir(), tmp_path / "o.npy", backed=True, chunk_size=50
    )
    rows = np.load(tmp_path / "o.npy")
    assert n == 50 and rows.shape == (150, 16)
    assert np.isnan(rows[:100]).all() and np.isfinite(rows[100:]).all()


def test_backed_default_and_conflicts(tmp_path, monkeypatch, tiny_adata):
    data = tmp_path / "x.h5ad"
    tiny_adata.write_h5ad(data)
    assert not launch.should_stream(data, backed=None)
    monkeypatch.setattr(launch, "BACKED_THRESHOLD_BYTES", 4)
    assert launch.should_stream(data, backed=None)
    assert not launch.should_stream(data, backed=False)
    assert not launch.should_stream(tiny_adata, backed=None)
    with pytest.raises(ConfigError, match="got an in-memory AnnData; write it"):
        launch.should_stream(tiny_adata, backed=True)
    with pytest.raises(DataError, match="does not exist"):
        launch.should_stream(tmp_path / "missing.h5ad", backed=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.should_stream(data, backed=None)
    with pytest.raises(ConfigError, match="drop --no-backed"):
        launch.should_stream(data, backed=False)
    with pytest.raises(ConfigError, match="got 'pbmc68k_reduced'"):
        launch.should_stream("pbmc68k_reduced", backed=None)


# --------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------


def test_torchrun_two_processes_equal_single_process(tmp_path, subset, make_scgpt_dir):
    model_dir = make_scgpt_dir()
    single = tmp_path / "single.npy"
    _embed(subset, model_dir, single, backed=True, chunk_size=50)
    out = tmp_path / "dist.h5ad"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "scfmbench",
            "embed",
            str(subset),
            "--model",
            f"scgpt={model_dir}",
            "--out",
            str(out),
            "--chunk-size",
            "50",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        raise
    assert process.returncode == 0, stderr
    assert stdout.count("wrote obsm['X_scgpt'] of 240 cells") == 1  # rank 0 only
    assert "in 5 chunks of 50 over 2 process(es)" in stderr
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scgpt"], np.load(single), atol=1e-6)


def test_torchrun_cli_finetune_equals_single_process(tmp_path, pbmc3k_sess, shared_dir):
    """The README's `torchrun … -m scfmbench finetune` command: 2 CPU processes (gloo) train
    like one (no dropout, so the runs are comparable step by step)."""
    import json

    from tests._geneformer_factory import write_checkpoint

    model_dir, _ = write_checkpoint(
        tmp_path / "gf",
        shared_dir,
        version="V2",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=128,  # inputs of 128 tokens: quick epochs on 2 CPU processes
    )
    data = tmp_path / "cells.h5ad"
    pbmc3k_sess[::8].copy().write_h5ad(data)
    (tmp_path / "one_split.yaml").write_text("design: study\nn_splits: 1\n")

    def finetune(launcher: list[str], out: str) -> tuple[dict, str]:
        command = [
            *launcher,
            *("-m", "scfmbench", "finetune", str(data), "--model", f"geneformer={model_dir}"),
            *("--config", str(tmp_path / "one_split.yaml"), "--out", str(tmp_path / out)),
            *("--name", "ft", "--epochs", "2", "--lr", "1e-3", "--batch-size", "8", "-q"),
        ]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            env={**ENV, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr
        result = tmp_path / out / "ft" / "finetune" / "geneformer" / "seed42" / "result.json"
        return json.loads(result.read_text()), done.stdout

    single, _ = finetune([sys.executable], "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    dist, stdout = finetune([*torchrun, "--nproc_per_node", "2"], "two")
    assert (single["n_processes"], dist["n_processes"]) == (1, 2)
    assert stdout.count("run directory:") == 1  # rank 0 reports
    assert len(dist["epochs"]) == len(single["epochs"]) == 2
    for got, want in zip(dist["epochs"], single["epochs"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)
    assert dist["test"]["confusion"] == single["test"]["confusion"]


# --------------------------------------------------------------------------------------
# --batch-size auto
# --------------------------------------------------------------------------------------


class OomModel(FoundationModel):
    """Embeds a cell as (sum of its token ids, its length); OOM above ``limit`` cells."""

    name = "fake"

    def __init__(self, limit: int, *, error: type[Exception] = torch.cuda.OutOfMemoryError):
        self.network = torch.nn.Identity()
        self.limit, self.error, self.sizes = limit, error, []
        self.checkpoint_sha256, self.model_dir = "fake", Path(".")

    n_layers = 1
    default_layer = 1

    def tokenize(self, adata, *, seed=0):
        raise NotImplementedError

    def encode(self, batch: PaddedBatch, *, layer: int, pooling: str) -> torch.Tensor:
        self.sizes.append(len(batch.input_ids))
        if len(batch.input_ids) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        ids = (batch.input_ids * batch.attention_mask).sum(1)
        return torch.stack([ids, batch.attention_mask.sum(1)], dim=1).float()


@pytest.fixture
def ragged_tokens() -> TokenizedCells:
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 100, size=n) for n in rng.integers(1, 60, size=300)]
    return TokenizedCells.from_lists(ids, obs_names=pd.Index(map(str, range(300))), settings={})


def test_batch_size_auto_halves_on_out_of_memory(ragged_tokens, caplog):
    options = {"layer": 1, "pooling": "mean", "progress": False}
    fixed = embed_tokens(OomModel(limit=10**6), ragged_tokens, batch_size=7, **options)
    model = OomModel(limit=20)
    with caplog.at_level(logging.WARNING):
        auto = embed_tokens(model, ragged_tokens, batch_size="auto", **options)
    np.testing.assert_array_equal(auto, fixed)
    assert model.sizes[:5] == [256, 128, 64, 32, 16]
    assert "out of memory with 256 cells per batch" in caplog.text
    # a plain RuntimeError saying "out of memory" (e.g. from MPS or the CPU allocator) too
    model = OomModel(limit=20, error=RuntimeError)
    np.testing.assert_array_equal(
        embed_tokens(model, ragged_tokens, batch_size="auto", **options), fixed
    )


def test_batch_size_auto_limits(ragged_tokens):
    options = {"layer": 1, "pooling": "mean", "progress": False}
    with pytest.raises(ConfigError, match="one cell .* alone runs out of memory"):
        embed_tokens(OomModel(limit=0), ragged_tokens, batch_size="auto", **options)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a fixed batch size is kept as asked
        embed_tokens(OomModel(limit=4), ragged_tokens, batch_size=8, **options)
    assert parse_batch_size("auto") == "auto" and parse_batch_size(" 64") == 64
    for bad in ("0", "-3", "x", "2.5", True):
        with pytest.raises(ConfigError, match="positive integer or 'auto'"):
            parse_batch_size(bad)


def test_h5ad_rows_are_anndata_readable(tmp_path, tiny_adata):
    """obsm written with h5py in anndata's encoding reads back (no obsm/uns groups before)."""
    source = tmp_path / "in.h5ad"
    tiny_adata.write_h5ad(source)
    with h5py.File(source, "a") as f:
        for group in ("obsm", "uns"):
            del f[group]
    writer = stream_output._H5adRows(
        tmp_path / "out.h5ad", source=source, n_obs=60, dim=3, key="X_t"
    )
    writer.write(0, np.ones((40, 3), np.float32))
    writer.write(40, np.full((20, 3), np.nan, np.float32))
    writer.close({"model": "t", "dropped_cells": ["cell59"]})
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.obsm["X_t"].shape == (60, 3) and np.isnan(back.obsm["X_t"][40:]).all()
    assert list(back.uns["X_t_info"]["dropped_cells"]) == ["cell59"]
