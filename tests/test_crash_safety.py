"""Crash safety: a run killed with SIGKILL resumes from its finished units, same results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np

from tests._scgpt_fixtures import *  # noqa: F403  (the scgpt_* fixtures)


def embed_cmd(data, model_dir, out, cache):
    return [
        sys.executable,
        "-m",
        "scfmbench",
        "embed",
        str(data),
        "--model",
        f"scgpt={model_dir}",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--chunk-size",
        "100",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--option",
        "max_seq_len=256",  # at most 256 genes a cell keeps the six chunks quick
    ]


def test_sigkill_during_embedding_resumes(tmp_path, pbmc3k_path, make_scgpt_dir):
    model_dir = make_scgpt_dir()
    data = tmp_path / "subset.h5ad"
    ad.read_h5ad(pbmc3k_path)[:600].copy().write_h5ad(data)

    reference = tmp_path / "reference.npy"
    done = subprocess.run(
        embed_cmd(data, model_dir, reference, tmp_path / "cache_ref"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr

    cache = tmp_path / "cache"
    out = tmp_path / "resumed.npy"
    process = subprocess.Popen(
        embed_cmd(data, model_dir, out, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("*.part*.npy"))) < 2:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # a part is finished once its checksummed .json is written (the .npy comes first)
    parts = [p for p in cache.glob("*.part*.npy") if p.with_suffix(".json").exists()]
    finished = sorted(p.name for p in parts)
    assert 1 <= len(finished) < 6, finished  # killed mid-way, some chunks saved
    assert not out.exists()  # no half-written output
    stamps = {p: p.stat().st_mtime_ns for p in parts}

    done = subprocess.run(
        embed_cmd(data, model_dir, out, cache), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("reusing finished chunk") >= len(finished)
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert all(not p.exists() or p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not list(cache.glob("*.part*"))  # parts folded into one checksummed entry


def test_sigkill_during_finetuning_resumes(tmp_path, pbmc3k_path, shared_dir):
    """Kill fine-tuning after its first epoch checkpoint; --resume ends like a clean run."""
    import json

    from tests._geneformer_factory import write_checkpoint

    # inputs capped at 128 tokens (a PBMC3k cell has ~800 genes): several times quicker epochs
    model_dir, _ = write_checkpoint(
        tmp_path / "gf", shared_dir, version="V2", max_position_embeddings=128
    )
    data = tmp_path / "cells.h5ad"
    ad.read_h5ad(pbmc3k_path)[::10].copy().write_h5ad(data)

    config = tmp_path / "one_split.yaml"
    config.write_text("design: study\nn_splits: 1\n")

    def command(out, *extra):
        return [
            sys.executable,
            "-m",
            "scfmbench",
            "finetune",
            str(data),
            "--model",
            f"geneformer={model_dir}",
            "--out",
            str(out),
            "--name",
            "ft",
            "--epochs",
            "3",
            "--lr",
            "1e-3",
            "--batch-size",
            "8",
            "--config",
            str(config),
            "-q",
            *extra,
        ]

    clean = subprocess.run(command(tmp_path / "clean"), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    result_dir = tmp_path / "clean" / "ft" / "finetune" / "geneformer" / "seed42"
    expected = json.loads((result_dir / "result.json").read_text())

    out = tmp_path / "killed"
    checkpoint = out / "ft" / "finetune" / "geneformer" / "seed42" / "checkpoint" / "last.pt"
    process = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.exists() and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    resumed_dir = out / "ft" / "finetune" / "geneformer" / "seed42"
    assert not (resumed_dir / "result.json").exists()  # killed before the end

    resumed = subprocess.run(command(out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((resumed_dir / "result.json").read_text())
    assert got["resumed_from_epoch"] >= 1
    assert got["epochs"] == expected["epochs"]
    assert got["test"] == expected["test"]


def test_results_written_atomically_get_the_mode_of_a_new_file(tmp_path):
    """The temporary file of an atomic write is private (0600); the result follows the
    umask like any new file, whatever wrote it."""
    import stat

    from scfmbench._atomic import write_json, write_npy, write_with

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"macro_f1": 0.5})
        write_npy(tmp_path / "x.npy", np.zeros(3))
        write_with(tmp_path / "a.txt", lambda path: path.write_text("a"))
        os.umask(0o077)
        write_json(tmp_path / "private.json", {})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"metrics.json": 0o644, "x.npy": 0o644, "a.txt": 0o644, "private.json": 0o600}
