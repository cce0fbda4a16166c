"""scGPT embedding throughput: length-sorted dynamic batching vs naive pad-to-max.

Runs a randomly initialised model with the real scGPT_human shape (args.json: 12 layers,
embsize 512, 8 heads) on a seeded random subset of PBMC3k cells, through the shared engine
(``embed_tokens``) twice in the same process, and writes
``benchmarks/results/scgpt_throughput.json``.

    python benchmarks/scgpt_throughput.py [--n-cells N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from _common import PBMC3K, RESULTS, SHARED, flop_report, padded_tokens, print_flop_report  # noqa: E402  (benchmarks/)

from scfmbench.embed import embed_tokens
from scfmbench.models.scgpt.adapter import load_scgpt

DEFAULT_DATA = PBMC3K
DEFAULT_MODEL = SHARED / "vocab" / "scgpt" / "scGPT_human"
DEFAULT_OUT = RESULTS / "scgpt_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=64, help="cells to embed (seeded subset)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL,
        help="folder with the scGPT args.json and vocab.json",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    adata = ad.read_h5ad(args.data)
    n_cells = min(args.n_cells, adata.n_obs)
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(adata.n_obs, size=n_cells, replace=False))
    adata = adata[subset].copy()
    model = load_scgpt(args.model_dir, random_init=True)
    config = model.network.config
    tokens = model.tokenize(adata, seed=args.seed)
    lengths = tokens.lengths
    print(
        f"PBMC3k: {n_cells} of 2638 cells (seed {args.seed}); scGPT shape {config.nlayers} "
        f"layers, embsize {config.embsize}, {config.nheads} heads, d_hid {config.d_hid} "
        f"(random weights); tokens per cell mean {lengths.mean():.0f}, max {lengths.max()}, "
        f"pad-to-max width {max(int(lengths.max()), model.max_seq_len)}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    options = {"batch_size": args.batch_size, "device": args.device}
    embed_tokens(
        model,
        tokens,
        layer=1,
        pooling="cls",
        progress=False,
        batch_size=2,
        device=args.device,
        out=np.zeros((tokens.n_cells, config.embsize), np.float32),
    )
    report = flop_report(
        model, tokens, hidden=config.embsize, ffn=config.d_hid, pooling="cls", **options
    )
    dynamic, naive = report["dynamic"], report["pad_to_max"]
    t_dynamic, t_naive = report["seconds_dynamic"], report["seconds_pad_to_max"]
    cpu_dynamic, cpu_naive = report["cpu_seconds_dynamic"], report["cpu_seconds_pad_to_max"]
    max_diff = float(np.abs(dynamic - naive).max())
    width = max(int(lengths.max()), model.max_seq_len)

    result = {
        "model": "scgpt (random init, scGPT_human shape)",
        "n_cells": int(n_cells),
        "device": args.device,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "mean_tokens_per_cell": round(float(lengths.mean()), 1),
        "max_tokens_per_cell": int(lengths.max()),
        "seconds_dynamic": round(t_dynamic, 3),
        "seconds_pad_to_max": round(t_naive, 3),
        "cells_per_s_dynamic": round(n_cells / t_dynamic, 3),
        "cells_per_s_pad_to_max": round(n_cells / t_naive, 3),
        "embed_speedup_vs_pad_to_max": round(t_naive / t_dynamic, 3),
        "cpu_seconds_dynamic": round(cpu_dynamic, 3),
        "cpu_seconds_pad_to_max": round(cpu_naive, 3),
        "embed_speedup_vs_pad_to_max_cpu_time": round(cpu_naive / cpu_dynamic, 3),
        "tokens_processed_dynamic": padded_tokens(lengths, batch_size=args.batch_size, width=None),
        "tokens_processed_pad_to_max": padded_tokens(
            lengths, batch_size=args.batch_size, width=width
        ),
        "max_abs_diff_embeddings": max_diff,
        **{k: v for k, v in report.items() if not isinstance(v, np.ndarray)},
        "targets": {"flop_fraction": 0.5, "speedup_fraction_of_bound": 0.9},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"dynamic (length-sorted) batching: {result['cells_per_s_dynamic']:.2f} cells/s "
        f"({t_dynamic:.1f} s)"
    )
    print(
        f"naive pad-to-max:                 {result['cells_per_s_pad_to_max']:.2f} cells/s "
        f"({t_naive:.1f} s)"
    )
    print(
        f"speedup: {result['embed_speedup_vs_pad_to_max']:.2f}x wall, "
        f"{result['embed_speedup_vs_pad_to_max_cpu_time']:.2f}x CPU time; tokens processed "
        f"{result['tokens_processed_dynamic']} vs {result['tokens_processed_pad_to_max']}; "
        f"same embeddings up to {max_diff:.1e}"
    )
    print_flop_report(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
