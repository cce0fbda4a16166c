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
    finished = sorted(p.name for p in cache.glob("*.part*.npy"))
    assert 2 <= len(finished) < 6, finished  # killed mid-way, some chunks saved
    assert not out.exists()  # no half-written output
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.part*.npy")}

    done = subprocess.run(
        embed_cmd(data, model_dir, out, cache), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("reusing finished chunk") >= len(finished)
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert all(not p.exists() or p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert not list(cache.glob("*.part*"))  # parts folded into one checksummed entry
