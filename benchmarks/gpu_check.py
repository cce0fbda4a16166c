"""One-command accelerator check: embedding at released shapes, bf16 vs fp32, fine-tuning,
torchrun. Run through ``benchmarks/gpu_check.sh``.

On a CUDA card: Geneformer V2-104M, scGPT_human and scFoundation shapes (random weights) embed
``--n-cells`` PBMC3k cells in fp32 and bf16; reported per model are cells/s, the forward FLOP
rate as a fraction of the card's bf16 ``torch.mm`` rate measured in the same process
(target ≥ 0.4) and the smallest per-cell cosine between bf16 and fp32 embeddings (target
≥ 0.999); then ``finetune_throughput.py`` (engine vs Hugging Face ``Trainer`` steps/s) and a
1-process ``torchrun`` of ``scfmbench embed``. Writes
``benchmarks/results/gpu_check_<card>.json``.

Without CUDA it runs a CI-sized form: two layers per model, a few cells, fp32 only (CPU autocast
is not used by the engine), the fine-tuning and torchrun parts marked skipped; it writes
``gpu_check_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _common import PBMC3K, RESULTS, SHARED, flop_report, forward_flops

from scfmbench.embed import embed_tokens
from scfmbench.models.geneformer.adapter import load_geneformer
from scfmbench.models.scfoundation.adapter import ScFoundationModel
from scfmbench.models.scfoundation.network import (
    RELEASED_CONFIG,
    ScFoundationConfig,
    random_encoder,
)
from scfmbench.models.scfoundation.tokenizer import read_gene_index
from scfmbench.models.scgpt.adapter import load_scgpt

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"flop_fraction_gpu": 0.4, "bf16_cosine_min": 0.999}


def geneformer(tmp: Path, *, depth: int | None):
    folder = tmp / "Geneformer-V2-104M"
    folder.mkdir()
    config = json.loads(
        (SHARED / "vocab/geneformer/configs/Geneformer-V2-104M/config.json").read_text()
    )
    if depth:
        config["num_hidden_layers"] = depth
    (folder / "config.json").write_text(json.dumps(config))
    for path in (SHARED / "vocab/geneformer/v2_gc95M").glob("*.pkl"):
        shutil.copy(path, folder / path.name)
    model = load_geneformer(folder, random_init=True)
    net = model.network.config
    return model, net.hidden_size, net.intermediate_size, "mean"


def scgpt(tmp: Path, *, depth: int | None):
    source = SHARED / "vocab/scgpt/scGPT_human"
    folder = tmp / "scGPT_human"
    folder.mkdir()
    shutil.copy(source / "vocab.json", folder / "vocab.json")
    args = json.loads((source / "args.json").read_text())
    if depth:
        args["nlayers"] = depth
    (folder / "args.json").write_text(json.dumps(args))
    model = load_scgpt(folder, random_init=True)
    config = model.network.config
    return model, config.embsize, config.d_hid, "cls"


def scfoundation(tmp: Path, *, depth: int | None):
    released = ScFoundationConfig.from_dict(RELEASED_CONFIG, source="released architecture")
    config = replace(released, depth=depth) if depth else released
    index = SHARED / "vocab/scfoundation/OS_scRNA_gene_index.19264.tsv"
    model = ScFoundationModel(
        random_encoder(config, seed=0),
        gene_index=read_gene_index(index),
        model_dir=index.parent,
        checkpoint_sha256="gpu-check",
        random_init=True,
    )
    return model, config.hidden_dim, config.hidden_dim * config.ff_mult, "all"


MODELS = {"geneformer": geneformer, "scgpt": scgpt, "scfoundation": scfoundation}


def cuda_embedding(model, tokens, *, hidden, ffn, pooling, batch_size) -> dict:
    """fp32 and bf16 on the card; FLOP fraction of the bf16 ``torch.mm`` rate."""
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    torch.cuda.synchronize()
    mm_rate = 10 * 2 * size**3 / (time.perf_counter() - start)
    out, seconds = {}, {}
    run = dict(layer=model.default_layer, pooling=pooling, batch_size=batch_size, device="cuda")
    for precision in ("float32", "bfloat16"):
        embed_tokens(model, tokens, progress=False, precision=precision, **run)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out[precision] = embed_tokens(model, tokens, progress=False, precision=precision, **run)
        torch.cuda.synchronize()
        seconds[precision] = time.perf_counter() - start
    layers = model.default_layer % (model.n_layers + 1)
    flops = forward_flops(tokens.lengths, n_layers=layers, hidden=hidden, ffn=ffn)
    return {
        "cells_per_s_fp32": tokens.n_cells / seconds["float32"],
        "cells_per_s_bf16": tokens.n_cells / seconds["bfloat16"],
        "bf16_matmul_tflop_per_s": mm_rate / 1e12,
        "flop_fraction_bf16": flops / seconds["bfloat16"] / mm_rate,
        "bf16_cosine_min": cosine_min(out["float32"], out["bfloat16"]),
    }


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-row cosine similarity of two (cells, dim) matrices."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=None, help="GPU: 512, CPU: 4")
    parser.add_argument("--batch-size", type=int, default=None, help="GPU: 64, CPU: 4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    n_cells = args.n_cells or (512 if cuda else 4)
    batch_size = args.batch_size or (64 if cuda else 4)
    depth = None if cuda else 2  # CI-sized on CPU: two layers of each released shape
    started = time.perf_counter()
    adata = ad.read_h5ad(PBMC3K)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False))
    adata = adata[rows].copy()
    result: dict = {"card": card, "n_cells": n_cells, "batch_size": batch_size, "models": {}}
    result["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, build in MODELS.items():
            model, hidden, ffn, pooling = build(tmp, depth=depth)
            tokens = model.tokenize(adata)
            entry = {"layers": model.n_layers, "hidden": hidden, "ffn": ffn, "pooling": pooling}
            if cuda:
                entry |= cuda_embedding(
                    model, tokens, hidden=hidden, ffn=ffn, pooling=pooling, batch_size=batch_size
                )
            else:
                report = flop_report(
                    model, tokens, hidden=hidden, ffn=ffn, pooling=pooling, batch_size=batch_size
                )
                entry |= {k: v for k, v in report.items() if not isinstance(v, np.ndarray)} | {
                    "bf16": "skipped: the engine uses autocast on CUDA only"
                }
            result["models"][name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
        if cuda:
            result["finetune"] = finetune_vs_trainer(tmp)
            result["torchrun_embed"] = torchrun_embed(tmp, adata)
        else:
            result["finetune"] = result["torchrun_embed"] = "skipped: needs CUDA"
    result["seconds"] = time.perf_counter() - started
    result["targets"] = TARGETS
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    out = args.out or RESULTS / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return result


def finetune_vs_trainer(tmp: Path) -> dict:
    """``finetune_throughput.py`` on the card (20 steps, one run per side)."""
    out = tmp / "finetune.json"
    command = [sys.executable, str(REPO / "benchmarks/finetune_throughput.py")]
    command += ["--steps", "20", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(out.read_text())


def torchrun_embed(tmp: Path, adata: ad.AnnData) -> dict:
    """``torchrun --nproc_per_node 1 -m scfmbench embed`` on the card (Geneformer V2 shape)."""
    data, emb = tmp / "cells.h5ad", tmp / "emb.npy"
    adata.write_h5ad(data)
    command = ["torchrun", "--nproc_per_node", "1", "-m", "scfmbench", "embed", str(data)]
    command += ["--model", f"geneformer={tmp / 'Geneformer-V2-104M'}", "--out", str(emb)]
    command += ["--device", "cuda", "--backed", "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    entry = {"returncode": done.returncode, "seconds": seconds}
    if done.returncode == 0:
        entry["shape"] = list(np.load(emb, mmap_mode="r").shape)
    else:
        entry["stderr"] = done.stderr[-2000:]
    return entry


if __name__ == "__main__":
    main()
