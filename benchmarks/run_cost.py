"""Cost of the default ``run`` on PBMC3k: baseline-only, on a 50k-cell resample, and with a
model against what it cannot avoid.

Run from the repository root::

    python benchmarks/run_cost.py [--parts baselines resample bare bare-all model] [--n-cells N]
        [--resample-cells 50000] [--no-scvi] [--layers 6] [--hidden 256]

Each part runs in a fresh process (so every one starts cold and reports its own peak RSS),
timed in process CPU seconds (less sensitive to other work on a shared machine than wall
time), with the machine's 1-minute load average before and after:

- ``baselines``: the baseline-only default ``run`` (no model), with its stage breakdown
  (``metrics.json["timings"]``: features, probes, statistics, figures, embedding scores);
  target ≤ 60 s on the 2-core machine;
- ``resample``: the same run on ``--resample-cells`` cells drawn with replacement from PBMC3k,
  each count thinned binomially (p = 0.9, seeded) so no two cells are identical; target
  ≤ 10 min;
- ``bare``: one bare embedding pass (tokenize + ``embed_tokens`` at the default layer and
  pooling) of every network the model run embeds: the model and its random-init control;
  the pass stops at the default layer (Geneformer's is the second to last);
- ``bare-all``: the same, pooling every layer (0 = token embeddings, ..., the last) from one
  forward pass per batch, as layer-wise probing needs: the whole network runs;
- ``model``: the default ``run`` with the model: random-init control, layer-wise probing,
  figures. Target: model ≤ 1.3 × (baselines + bare); the ratio to baselines + bare-all is
  printed as well.

The model is a Geneformer of the V1 (gc30M) dictionaries and real vocabulary with
``--layers`` layers of width ``--hidden`` and random weights; the defaults (6 layers of width
256, 4 heads, feed-forward 512) are the shape of the released gf-6L-30M-i2048. ``--no-scvi``
leaves the scVI baseline out of every run. Writes ``benchmarks/results/run_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))

TARGET = 1.3
TARGET_BASELINES_S = 60.0
TARGET_RESAMPLE_S = 600.0
PARTS = ("baselines", "resample", "bare", "bare-all", "model")
THINNING = 0.9
CONFIG = "vocab/geneformer/configs/gf-6L-30M-i2048/config.json"
DICTS = "vocab/geneformer/v1_gc30M"


def write_model(shared: Path, target: Path, *, layers: int, hidden: int) -> Path:
    """A Hugging Face folder: the released 6L config resized, random weights, V1 dictionaries."""
    import shutil

    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = json.loads((shared / CONFIG).read_text())
    config.update(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=max(1, hidden // 64),
    )
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig.from_dict(config)).save_pretrained(target)
    for path in (shared / DICTS).glob("*.pkl"):
        shutil.copy(path, target / path.name)
    return target


def data_file(shared: Path, target: Path, n_cells: int | None) -> Path:
    """PBMC3k, or a seeded subset of ``n_cells`` of it."""
    import anndata as ad
    import numpy as np
    from benchmarks._common import PBMC3K

    source = shared / "data" / PBMC3K.name
    if n_cells is None:
        return source
    adata = ad.read_h5ad(source)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(adata.n_obs, min(n_cells, adata.n_obs), replace=False))
    adata[rows].copy().write_h5ad(target)
    return target


def resample_file(shared: Path, target: Path, n_cells: int, *, seed: int = 0) -> Path:
    """``n_cells`` PBMC3k cells drawn with replacement, every count thinned binomially
    (p = ``THINNING``, seeded): integer counts (scVI takes them), no two cells identical."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    from benchmarks._common import PBMC3K

    source = ad.read_h5ad(shared / "data" / PBMC3K.name)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, source.n_obs, size=n_cells)
    counts = sp.csr_matrix(source.X, dtype=np.float32)[rows]
    counts.data = rng.binomial(counts.data.astype(np.int64), THINNING).astype(np.float32)
    counts.eliminate_zeros()
    obs = source.obs[["cell_type"]].iloc[rows].copy()
    obs.index = [f"cell{i}" for i in range(n_cells)]
    ad.AnnData(X=counts, obs=obs, var=source.var.copy()).write_h5ad(target)
    return target


def stage(
    name: str, data: Path, model: Path, out: Path, no_scvi: bool = False, n_jobs: int | None = None
) -> dict:
    """Run one measurement in this process (called in a child); CPU s, wall s, peak RSS MB,
    and for a run its stage breakdown (``timings``)."""
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    from scfmbench.benchmark.pipeline import load_models, resolve_config, run
    from scfmbench.config import DEFAULT_BASELINES

    wall, cpu = time.perf_counter(), time.process_time()
    info: dict = {}
    options: dict = {"baselines": [b for b in DEFAULT_BASELINES if b != "scvi"]} if no_scvi else {}
    if n_jobs is not None:
        options["n_jobs"] = n_jobs
    if name in ("baselines", "resample"):
        result = run(data, progress=False, out=out, name=name, **options)
        info["timings"] = result.metrics["timings"]
        info["n_cells"] = result.metrics["diagnostics"]["n_cells"]
    elif name == "model":
        models = [f"geneformer={model}"]
        result = run(data, progress=False, out=out, name="model", models=models, **options)
        info["layers_probed"] = {k: len(v) for k, v in result.metrics["layers"].items()}
        info["timings"] = result.metrics["timings"]
    else:  # bare, bare-all: one embedding pass of each network the model run embeds
        import anndata as ad

        from scfmbench.embed import embed_tokens

        config = resolve_config(str(data), None, {"models": [f"geneformer={model}"]})
        adata = ad.read_h5ad(data)
        info["networks"] = []
        for network in load_models(config):
            tokens = network.tokenize(adata, seed=config.seed)
            embed_tokens(
                network,
                tokens,
                layer=network.default_layer,
                pooling=network.default_pooling,
                batch_size=config.batch_size,
                progress=False,
                layers=range(network.n_layers + 1) if name == "bare-all" else None,
            )
            info["networks"].append(network.model_id)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    # the probes' worker processes (n_jobs): stop them so that their CPU time and peak RSS
    # are counted in this process's terminated children
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": cpu + workers.ru_utime + workers.ru_stime,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_cpu_s": workers.ru_utime + workers.ru_stime,
        # as each worker measured it (the children's ru_maxrss also counts forks such as git's)
        "workers_peak_rss_mb": info.get("timings", {}).get("probes", {}).get("workers_peak_rss_mb"),
        **info,
    }


def measure(
    name: str, data: Path, model: Path, out: Path, no_scvi: bool = False, n_jobs: int | None = None
) -> dict:
    """``stage`` in a fresh Python process, with the 1-minute load average before → after."""
    from benchmarks._common import in_fresh_process

    load = os.getloadavg()[0]
    result = in_fresh_process(
        "run_cost", "stage", name, str(data), str(model), str(out), no_scvi, n_jobs
    )
    result["load_avg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


def breakdown(timings: dict) -> list[str]:
    """The run's stages, largest CPU time first: wall s, CPU s, share of the run's CPU time,
    and the parts of the embedding scores."""
    total = timings.get("total", {}).get("cpu_seconds") or 1.0
    rows = sorted(
        ((k, v) for k, v in timings.items() if k != "total"),
        key=lambda item: -item[1].get("cpu_seconds", 0.0),
    )
    lines = [
        "| stage | wall s | CPU s | share of CPU | parts (wall s) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, entry in rows:
        parts = ", ".join(
            f"{k.removesuffix('_s')} {v:.1f}"
            for k, v in entry.items()
            if k.endswith("_s") and k != "cells_per_s"
        )
        cpu = entry.get("cpu_seconds", 0.0)
        lines.append(
            f"| {name} | {entry['seconds']:.1f} | {cpu:.1f} | {cpu / total:.0%} | {parts} |"
        )
    return lines


def print_part(name: str, row: dict) -> None:
    load = "→".join(map(str, row["load_avg_1min"]))
    print(
        f"{name:9s} {row['cpu_s']:8.1f} CPU s {row['wall_s']:8.1f} wall s "
        f"peak RSS {row['peak_rss_mb']:7.0f} MB  load {load}"
    )
    if row.get("workers_peak_rss_mb"):
        print(
            f"{'':9s} of which {row['workers_cpu_s']:.1f} CPU s in the probes' worker "
            f"processes (largest worker's peak RSS {row['workers_peak_rss_mb']:.0f} MB)"
        )
    if "timings" in row:
        print("\n".join(breakdown(row["timings"])))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--n-cells", type=int, default=None, help="subset (default: all 2,638)")
    parser.add_argument("--resample-cells", type=int, default=50_000)
    parser.add_argument("--no-scvi", action="store_true", help="leave the scVI baseline out")
    parser.add_argument(
        "--n-jobs", type=int, default=None, help="processes fitting the probes (default: run's)"
    )
    parser.add_argument(
        "--layers", type=int, default=6, help="default: 6, the released V1 (gf-6L-30M) shape"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/run_cost.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_model(args.shared, tmp / "gf", layers=args.layers, hidden=args.hidden)
        data = data_file(args.shared, tmp / "data.h5ad", args.n_cells)
        stages = {}
        for name in [p for p in PARTS if p in args.parts]:
            source = data
            if name == "resample":
                source = resample_file(args.shared, tmp / "resample.h5ad", args.resample_cells)
            stages[name] = measure(
                name, source, model, tmp / f"runs_{name}", args.no_scvi, args.n_jobs
            )
            print_part(name, stages[name])
    results = {
        "stages": stages,
        "parts": args.parts,
        "no_scvi": args.no_scvi,
        "n_jobs": args.n_jobs if args.n_jobs is not None else "default",
        "model": {"layers": args.layers, "hidden": args.hidden, "dictionaries": "V1 gc30M"},
        "n_cells": args.n_cells or "all",
        "resample_cells": args.resample_cells,
        "threads": os.cpu_count(),
        "targets": {"baselines_s": TARGET_BASELINES_S, "resample_s": TARGET_RESAMPLE_S},
    }
    for name, target in (("baselines", TARGET_BASELINES_S), ("resample", TARGET_RESAMPLE_S)):
        if name in stages:
            row = stages[name]
            print(
                f"{name}: {row['cpu_s']:.1f} CPU s, {row['wall_s']:.1f} wall s "
                f"(target ≤ {target:.0f} s on 2 cores)"
            )
    for bare, key in (("bare", ""), ("bare-all", "_all_layers")):
        if not {"baselines", bare, "model"} <= set(stages):
            continue
        for clock in ("wall_s", "cpu_s"):
            floor = stages["baselines"][clock] + stages[bare][clock]
            ratio = stages["model"][clock] / floor
            print(
                f"default run with geneformer ({args.layers} layers, hidden {args.hidden}) "
                f"{stages['model'][clock]:.1f} {clock} vs baseline-only run + {bare} embedding "
                f"passes of {', '.join(stages[bare]['networks'])} {floor:.1f} {clock} → "
                f"{ratio:.2f}× (target ≤ {TARGET})"
            )
            suffix = "" if clock == "cpu_s" else "_wall"
            results[f"ratio_run_vs_baselines_plus_bare_embedding{key}{suffix}"] = ratio
        results["target"] = TARGET
    from benchmarks._common import write_results

    write_results(args.out, results, started=started)
    return results


if __name__ == "__main__":
    main()
