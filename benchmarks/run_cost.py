"""Cost of a default ``run --model geneformer=…`` on PBMC3k against what it cannot avoid.

Run from the repository root::

    python benchmarks/run_cost.py [--n-cells N] [--layers 4] [--hidden 256]

Three measurements, each in a fresh process (so every one starts cold and reports its own
peak RSS), timed in process CPU seconds (less sensitive to other work on a shared machine
than wall time):

1. the baseline-only default ``run`` (no model);
2. one bare embedding pass (tokenize + ``embed_tokens`` at the default layer and pooling)
   of every network the model run embeds: the model and its random-init control;
3. the default ``run`` with the model: random-init control, layer-wise probing, figures.

Target: (3) ≤ 1.3 × ((1) + (2)). The model is a Geneformer of the V1 (gc30M) dictionaries and
real vocabulary with ``--layers`` layers of width ``--hidden`` and random weights. Writes
``benchmarks/results/run_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))

TARGET = 1.3
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


def stage(name: str, data: Path, model: Path, out: Path) -> dict:
    """Run one measurement in this process (called in a child); CPU s, wall s, peak RSS MB."""
    import logging

    logging.disable(logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    from scfmbench.pipeline import load_models, resolve_config, run

    wall, cpu = time.perf_counter(), time.process_time()
    info: dict = {}
    if name == "baselines":
        run(data, progress=False, out=out, name="baselines")
    elif name == "model":
        result = run(data, progress=False, out=out, name="model", models=[f"geneformer={model}"])
        info["layers_probed"] = {k: len(v) for k, v in result.metrics["layers"].items()}
    else:  # bare: one embedding pass of each network the model run embeds
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
            )
            info["networks"].append(network.model_id)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "peak_rss_mb": peak,
        **info,
    }


def measure(name: str, data: Path, model: Path, out: Path) -> dict:
    """``stage`` in a fresh Python process."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
        "from run_cost import stage;"
        f"print('RESULT', json.dumps(stage({name!r}, Path({str(data)!r}), "
        f"Path({str(model)!r}), Path({str(out)!r}))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=None, help="subset (default: all 2,638)")
    parser.add_argument("--layers", type=int, default=4)
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
        for name in ("baselines", "bare", "model"):
            stages[name] = measure(name, data, model, tmp / f"runs_{name}")
            print(f"{name}: {json.dumps(stages[name])}", flush=True)
    floor = stages["baselines"]["cpu_s"] + stages["bare"]["cpu_s"]
    ratio = stages["model"]["cpu_s"] / floor
    for name, row in stages.items():
        print(
            f"{name:9s} {row['cpu_s']:8.1f} CPU s {row['wall_s']:8.1f} wall s "
            f"peak RSS {row['peak_rss_mb']:7.0f} MB"
        )
    print(
        f"default run with geneformer ({args.layers} layers, hidden {args.hidden}) "
        f"{stages['model']['cpu_s']:.1f} CPU s vs baseline-only run + bare embedding passes of "
        f"{', '.join(stages['bare']['networks'])} {floor:.1f} CPU s → {ratio:.2f}× "
        f"(target ≤ {TARGET})"
    )
    results = {
        "ratio_run_vs_baselines_plus_bare_embedding": ratio,
        "target": TARGET,
        "stages": stages,
        "model": {"layers": args.layers, "hidden": args.hidden, "dictionaries": "V1 gc30M"},
        "n_cells": args.n_cells or "all",
        "threads": os.cpu_count(),
    }
    from benchmarks._common import write_results

    write_results(args.out, results, started=started)
    return results


if __name__ == "__main__":
    main()
