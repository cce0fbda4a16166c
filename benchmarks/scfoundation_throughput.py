"""scFoundation embedding throughput: length-sorted dynamic batching vs naive pad-to-max.

Runs a randomly initialised scFoundation encoder with the released layer shape (hidden 768,
12 heads, FFN 3072, 100 value bins, 19,266 positions) on a seeded random subset of PBMC3k
through the shared engine (``embed_tokens``), dynamic and pad-to-max in the same process,
and writes ``benchmarks/results/scfoundation_throughput.json``. The two runs are interleaved
``--repeats`` times and the fastest of each is kept, because the CPU is shared.

The released encoder has 12 such layers; on 2 shared CPU cores that takes several seconds
per cell, so by default the benchmark keeps ``--depth 1`` such layer (a smaller model; the
speed-up is a per-layer ratio: both runs execute the same layers on differently padded
batches). Pass ``--depth 12`` for the full released shape where time allows.

Pad-to-max pads every batch to the longest cell of the subset (scFoundation has no maximum
input length below 19,266 tokens: all non-zero genes are encoded).

    python benchmarks/scfoundation_throughput.py [--n-cells N] [--batch-size B] [--depth D]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _common import PBMC3K, RESULTS, SHARED, flop_report, padded_tokens, print_flop_report  # noqa: E402  (benchmarks/)

from scfmbench.embed import collate
from scfmbench.models.scfoundation.adapter import ScFoundationModel
from scfmbench.models.scfoundation.network import (
    RELEASED_CONFIG,
    ScFoundationConfig,
    random_encoder,
)
from scfmbench.models.scfoundation.tokenizer import read_gene_index

DEFAULT_DATA = PBMC3K
DEFAULT_INDEX = SHARED / "vocab" / "scfoundation" / "OS_scRNA_gene_index.19264.tsv"
DEFAULT_OUT = RESULTS / "scfoundation_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=64, help="cells to embed (seeded subset)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=1, help="encoder layers (released: 12)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best counts")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--gene-index", type=Path, default=DEFAULT_INDEX)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    adata = ad.read_h5ad(args.data)
    n_cells = min(args.n_cells, adata.n_obs)
    rng = np.random.default_rng(args.seed)
    adata = adata[np.sort(rng.choice(adata.n_obs, size=n_cells, replace=False))].copy()
    released = ScFoundationConfig.from_dict(RELEASED_CONFIG, source="released architecture")
    config = replace(released, depth=args.depth)
    model = ScFoundationModel(
        random_encoder(config, seed=args.seed),
        gene_index=read_gene_index(args.gene_index),
        model_dir=args.gene_index.parent,
        checkpoint_sha256="benchmark",
        random_init=True,
    )
    tokens = model.tokenize(adata)
    lengths = tokens.lengths
    width = int(lengths.max())
    print(
        f"PBMC3k: {n_cells} of 2638 cells (seed {args.seed}); scFoundation encoder "
        f"{config.summary()} (released: {released.depth} layers; random weights); tokens per "
        f"cell (non-zero genes + T, S) mean {lengths.mean():.0f}, max {width}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    options = {"batch_size": args.batch_size, "device": args.device}
    short = np.argsort(lengths, kind="stable")[:2]  # warm-up: allocator and kernels
    warm = collate(tokens, short, pad_token_id=model.pad_token_id, pad_value=model.pad_value)
    with torch.inference_mode():
        model.encode(warm, layer=model.default_layer, pooling="all")
    ffn = config.hidden_dim * config.ff_mult
    reports = [  # interleaved dynamic / pad-to-max; the run with the best FLOP fraction counts
        flop_report(model, tokens, hidden=config.hidden_dim, ffn=ffn, pooling="all", **options)
        for _ in range(args.repeats)
    ]
    report = max(reports, key=lambda r: r["flop_fraction"])
    dynamic, naive = report["dynamic"], report["pad_to_max"]
    t_dynamic, t_naive = report["seconds_dynamic"], report["seconds_pad_to_max"]
    cpu_dynamic, cpu_naive = report["cpu_seconds_dynamic"], report["cpu_seconds_pad_to_max"]
    max_diff = float(np.abs(dynamic - naive).max())

    result = {
        "model": "scfoundation (random init, released layer shape)",
        "n_cells": n_cells,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "encoder": {
            "depth": config.depth,
            "released_depth": released.depth,
            "hidden_dim": config.hidden_dim,
            "heads": config.heads,
            "ffn": config.hidden_dim * config.ff_mult,
        },
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_per_cell_mean": round(float(lengths.mean()), 1),
        "tokens_per_cell_max": width,
        "padded_tokens_dynamic": padded_tokens(lengths, batch_size=args.batch_size, width=None),
        "padded_tokens_pad_to_max": padded_tokens(lengths, batch_size=args.batch_size, width=width),
        "seconds_dynamic": round(t_dynamic, 2),
        "seconds_pad_to_max": round(t_naive, 2),
        "cpu_seconds_dynamic": round(cpu_dynamic, 2),
        "cpu_seconds_pad_to_max": round(cpu_naive, 2),
        "cells_per_s_dynamic": round(n_cells / t_dynamic, 3),
        "cells_per_s_pad_to_max": round(n_cells / t_naive, 3),
        "embed_speedup_vs_pad_to_max": round(t_naive / t_dynamic, 2),
        "cpu_speedup_vs_pad_to_max": round(cpu_naive / cpu_dynamic, 2),
        "max_abs_diff_dynamic_vs_pad_to_max": max_diff,
        **{k: v for k, v in report.items() if not isinstance(v, np.ndarray)},
        "targets": {"flop_fraction": 0.5, "speedup_fraction_of_bound": 0.9},
    }
    print(
        f"dynamic: {result['cells_per_s_dynamic']} cells/s ({t_dynamic:.1f} s); pad-to-max: "
        f"{result['cells_per_s_pad_to_max']} cells/s ({t_naive:.1f} s); speed-up "
        f"{result['embed_speedup_vs_pad_to_max']}× wall, {result['cpu_speedup_vs_pad_to_max']}× "
        f"CPU; max |Δ| {max_diff:.2e}"
    )
    print_flop_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
