"""One-command accelerator check: embedding at released shapes, bf16 vs fp32, fine-tuning,
torchrun. Run through ``benchmarks/gpu_check.sh``.

On a CUDA card: Geneformer V2-104M, scGPT_human and scFoundation shapes (random weights) embed
``--n-cells`` PBMC3k cells in fp32 and bf16; reported per model are cells/s, the forward FLOP
rate as a fraction of the card's bf16 ``torch.mm`` rate measured in the same process
(target ≥ 0.4), the same with ``--batch-size auto``, and the smallest per-cell cosine between
bf16 and fp32 embeddings (target ≥ 0.999). To say where the time goes, the bf16 forward is
also timed alone (batches collated and on the card beforehand, one sync at the end) and
profiled: CUDA kernel seconds by kind (GEMM, attention, copies, other, with the six costliest
"other" kernels) and the GEMMs' achieved rate. Then ``finetune_throughput.py`` (engine vs
Hugging Face ``Trainer`` training cells/s, batch 16, every expressed gene up to 2,048) and a
1-process ``torchrun`` of ``scfmbench embed``. Writes
``benchmarks/results/gpu_check_<card>.json``.

Without CUDA it runs a CI-sized form: two layers per model, a few cells, fp32 only (CPU autocast
is not used by the engine), two fine-tuning steps per side and the ``torchrun`` embed on the CPU
(gloo); it writes ``gpu_check_cpu.json`` (or ``--out``). A part that fails is recorded as
``{"error": …}`` and the others still run; the exit status is 1 if any part failed.
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
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _common import PBMC3K, RESULTS, SHARED, flop_report, forward_flops

from scfmbench.embed import collate, embed_tokens, length_sorted_batches
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
    embed = partial(embed_tokens, model, tokens, progress=False)
    run = dict(layer=model.default_layer, pooling=pooling, batch_size=batch_size, device="cuda")
    for precision in ("float32", "bfloat16"):
        out[precision], seconds[precision] = synced(partial(embed, precision=precision, **run))
    run["batch_size"] = "auto"  # what docs/scale.md suggests on a card
    _, seconds["auto"] = synced(partial(embed, precision="bfloat16", **run))
    layers = model.default_layer % (model.n_layers + 1)
    flops = forward_flops(tokens.lengths, n_layers=layers, hidden=hidden, ffn=ffn)
    linear = forward_flops(tokens.lengths, n_layers=layers, hidden=hidden, ffn=ffn, scores=False)
    alone, kernels = forward_only(model, tokens, pooling=pooling, batch_size=batch_size)
    return {
        "cells_per_s_fp32": tokens.n_cells / seconds["float32"],
        "cells_per_s_bf16": tokens.n_cells / seconds["bfloat16"],
        "bf16_matmul_tflop_per_s": mm_rate / 1e12,
        "flop_fraction_bf16": flops / seconds["bfloat16"] / mm_rate,
        "flop_fraction_bf16_batch_auto": flops / seconds["auto"] / mm_rate,
        "flop_fraction_bf16_forward_only": flops / alone / mm_rate,
        "kernel_seconds": kernels,
        "gemm_tflop_per_s": linear / kernels["gemm"] / 1e12 if kernels["gemm"] else None,
        "bf16_cosine_min": cosine_min(out["float32"], out["bfloat16"]),
    }


KERNEL_KINDS = {
    "gemm": re.compile(r"gemm|cutlass|nvjet|xmma", re.I),
    "attention": re.compile(r"fmha|flash|attention|efficient", re.I),
    "copy": re.compile(r"memcpy|memset", re.I),
}


def forward_only(model, tokens, *, pooling: str, batch_size: int) -> tuple[float, dict]:
    """The bf16 forward alone: batches collated and on the card first, one sync at the end.

    Returns its seconds (the engine's cost less collation, copies and per-batch syncs), and
    the CUDA kernel seconds of a profiled pass by kind (``gemm``, ``attention``, ``copy``,
    ``other``), with ``busy``: their sum over the profiled pass's wall time.
    """
    batches = [
        collate(tokens, rows, pad_token_id=model.pad_token_id, pad_value=model.pad_value).to("cuda")
        for rows in length_sorted_batches(tokens.lengths, batch_size=batch_size)
    ]
    network = model.network.to("cuda").eval()

    def one_pass() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for batch in batches:
                model.encode(batch, layer=model.default_layer, pooling=pooling)

    _, seconds = synced(one_pass)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        one_pass()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels: dict = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    other: dict[str, float] = {}
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = next((k for k, rx in KERNEL_KINDS.items() if rx.search(event.name)), "other")
        kernels[kind] += event.time_range.elapsed_us() / 1e6
        if kind == "other":
            name = event.name[:80]
            other[name] = other.get(name, 0.0) + event.time_range.elapsed_us() / 1e6
    kernels["busy"] = sum(kernels.values()) / wall
    kernels["top_other"] = dict(sorted(other.items(), key=lambda kv: -kv[1])[:6])
    del network
    return seconds, kernels


def synced(work):
    """``work()``'s result and seconds on the card, after one warm-up call."""
    work()
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


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
            entry = guarded(embedding, build, tmp, adata, depth=depth, batch_size=batch_size)
            result["models"][name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
        result["finetune"] = guarded(finetune_vs_trainer, tmp, cuda=cuda)
        print(f"finetune: {json.dumps(result['finetune'])}", flush=True)
        result["torchrun_embed"] = guarded(torchrun_embed, tmp, adata, cuda=cuda)
        print(f"torchrun_embed: {json.dumps(result['torchrun_embed'])}", flush=True)
    result["seconds"] = time.perf_counter() - started
    result["targets"] = TARGETS
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    out = args.out or RESULTS / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    parts = [*result["models"].values(), result["finetune"], result["torchrun_embed"]]
    if any("error" in part for part in parts):
        raise SystemExit("some parts failed: see their 'error' in " + str(out))
    return result


def guarded(part, *args, **kwargs) -> dict:
    """``part(*args, **kwargs)``, or ``{"error": …}`` if it raised, so the other parts still run."""
    try:
        return part(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, exit status 1 at the end
        return {"error": f"{type(exc).__name__}: {exc}"[-2000:]}


def embedding(build, tmp: Path, adata: ad.AnnData, *, depth: int | None, batch_size: int) -> dict:
    """One model's shape, and its embedding figures on the card (or the CPU FLOP report)."""
    model, hidden, ffn, pooling = build(tmp, depth=depth)
    tokens = model.tokenize(adata)
    entry = {"layers": model.n_layers, "hidden": hidden, "ffn": ffn, "pooling": pooling}
    run = dict(hidden=hidden, ffn=ffn, pooling=pooling, batch_size=batch_size)
    if torch.cuda.is_available():
        return entry | cuda_embedding(model, tokens, **run)
    report = flop_report(model, tokens, **run)
    return (
        entry
        | {k: v for k, v in report.items() if not isinstance(v, np.ndarray)}
        | {"bf16": "skipped: the engine uses autocast on CUDA only"}
    )


def finetune_vs_trainer(tmp: Path, *, cuda: bool) -> dict:
    """``finetune_throughput.py``, one run per side.

    On the card: 20 steps of batch 16 on cells of up to 2,048 genes (Geneformer's input size,
    every expressed gene). On the CPU: 2 steps of batch 4 on cells of up to 32 genes.
    """
    out = tmp / "finetune.json"
    command = [sys.executable, str(REPO / "benchmarks/finetune_throughput.py")]
    command += ["--repeats", "1", "--out", str(out), "--data", str(PBMC3K)]
    if cuda:
        command += ["--steps", "20", "--batch-size", "16", "--max-length", "2048"]
        command += ["--length-scale", "1"]
    else:
        command += ["--steps", "2", "--batch-size", "4", "--max-length", "32", "--device", "cpu"]
        command += ["--in-process"]  # two process start-ups fewer: 20 s of a CI-sized check
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # recorded by guarded(), as for the other parts
        raise RuntimeError(f"exit status {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def torchrun_embed(tmp: Path, adata: ad.AnnData, *, cuda: bool) -> dict:
    """``torchrun --nproc_per_node 1 -m scfmbench embed`` (Geneformer V2 shape, random weights).

    On the card with NCCL, on the CPU with gloo.
    """
    data, emb = tmp / "cells.h5ad", tmp / "emb.npy"
    adata.write_h5ad(data)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    command = [*torchrun, "-m", "scfmbench", "embed", str(data), "--out", str(emb)]
    command += ["--model", f"geneformer-random={tmp / 'Geneformer-V2-104M'}"]
    command += ["--device", "cuda" if cuda else "cpu", "--backed", "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    entry = {"returncode": done.returncode, "seconds": seconds}
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode}: {done.stderr[-2000:]}")
    entry["shape"] = list(np.load(emb, mmap_mode="r").shape)
    return entry


if __name__ == "__main__":
    main()
