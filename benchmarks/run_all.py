"""Benchmark suite: the per-model throughput scripts, then streaming `embed` scaling.

1. Runs every ``benchmarks/<name>_throughput.py`` present (geneformer, scgpt, scfoundation,
   finetune) as a subprocess, with ``--quick`` / ``--n-cells N`` where the script takes
   them, and collects the ratios of each ``benchmarks/results/<name>_throughput.json``.
2. Scaling: writes synthetic ``.h5ad`` files once to a temporary folder (cells resampled with
   replacement from PBMC3k, restricted to the genes of the scGPT vocabulary, uncompressed
   CSR), then runs the streaming ``scfmbench embed --backed`` on each in a fresh process with
   a tiny randomly initialised scGPT (real vocabulary, embsize 16, 2 layers) and records wall
   time, CPU time, cells/s and peak RSS (``os.wait4`` on that process). Targets: cells/s
   roughly constant, peak RSS at the largest size ≤ 1.5× that at the smallest.
3. Run scaling: the whole ``scfmbench run`` (validation, PCA baseline, tiny scGPT embedding,
   logistic-regression probes, scores) on the same files, streamed (``--backed``) and in
   memory (``--no-backed``), each in a fresh process: wall time and peak RSS.

Writes ``benchmarks/results/scaling.json``, ``benchmarks/results/run_scaling.json`` and
``benchmarks/results.md``, then rewrites the README's benchmark table from the JSON
(``benchmarks/readme_table.py``).

    python benchmarks/run_all.py                                  # 10k, 50k, 200k cells
    python benchmarks/run_all.py --sizes 2000 5000 --skip-throughput   # a quick run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import readme_table  # benchmarks/readme_table.py, next to this script
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = SHARED / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad"
SCGPT_HUMAN = SHARED / "vocab" / "scgpt" / "scGPT_human"
THROUGHPUT = ("geneformer", "scgpt", "scfoundation", "finetune")
RATIO_KEY = re.compile(r"(speedup|ratio|fraction|utilization)")
RATE_KEY = re.compile(r"(cells|steps)_per_s")
TINY_SCGPT = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2}


def machine() -> str:
    """CPU model, cores and torch threads, e.g. 'AMD EPYC, 2 cores'."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        model = found.group(1).strip() if found else model
    return f"{model}, {os.cpu_count()} cores"


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: this checkout's ``src`` first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# --------------------------------------------------------------------------------------
# 1. per-model throughput scripts
# --------------------------------------------------------------------------------------


def run_throughput(name: str, *, n_cells: int, timeout: int, run: bool = True) -> dict:
    """Run ``benchmarks/<name>_throughput.py`` (or, with ``run=False``, only read its stored
    JSON) and return its ratios, or why there are none."""
    script = REPO / "benchmarks" / f"{name}_throughput.py"
    stored = RESULTS / f"{name}_throughput.json"
    if not script.exists():
        return {"name": name, "note": f"skipped: {script.name} is not in this checkout"}
    text = script.read_text()
    command = [sys.executable, str(script)]
    if '"--quick"' in text:
        command.append("--quick")
    if '"--n-cells"' in text:
        command += ["--n-cells", str(n_cells)]
    flags = " ".join(command[2:])
    if run:
        print(f"$ python {script.relative_to(REPO).as_posix()} {flags}", flush=True)
        try:
            done = subprocess.run(
                command,
                cwd=REPO,
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"name": name, "note": f"failed: no result within {timeout} s"}
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            return {"name": name, "note": f"failed (exit {done.returncode}): {last}"}
    elif not stored.exists():
        return {"name": name, "note": f"not run (--skip-throughput) and no {stored.name}"}
    else:
        flags = f"not rerun: stored {stored.name}"
    result = json.loads(stored.read_text())
    return {
        "name": name,
        "flags": flags,
        "ratios": {k: v for k, v in result.items() if RATIO_KEY.search(k) and _is_number(v)},
        "rates": {k: v for k, v in result.items() if RATE_KEY.search(k) and _is_number(v)},
        "targets": result.get("targets", {}),
        "device": result.get("device", ""),
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# 2. scaling of the streaming embed
# --------------------------------------------------------------------------------------


def tiny_scgpt_dir(folder: Path) -> Path:
    """args.json (scGPT_human with a tiny shape) + the real vocab.json, for scgpt-random."""
    folder.mkdir(parents=True, exist_ok=True)
    args = {**json.loads((SCGPT_HUMAN / "args.json").read_text()), **TINY_SCGPT}
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_bytes((SCGPT_HUMAN / "vocab.json").read_bytes())
    return folder


def vocab_source(data: Path) -> tuple[sp.csr_matrix, pd.DataFrame, np.ndarray]:
    """PBMC3k counts restricted to the genes in the scGPT vocabulary (CSR float32), var and
    the cell-type labels."""
    adata = ad.read_h5ad(data)
    vocab = json.loads((SCGPT_HUMAN / "vocab.json").read_text())
    keep = adata.var_names.isin(list(vocab))
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    return sp.csr_matrix(adata.X[:, keep], dtype=np.float32), adata.var.loc[keep].copy(), labels


def write_synthetic(
    path: Path,
    source: sp.csr_matrix,
    var: pd.DataFrame,
    *,
    n_cells: int,
    seed: int,
    labels: np.ndarray | None = None,
    chunk: int = 10_000,
) -> None:
    """An uncompressed CSR ``.h5ad`` of ``n_cells`` cells drawn with replacement from
    ``source`` (with ``obs['cell_type']`` from ``labels``), written chunk by chunk with h5py
    (anndata's on-disk encoding)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, source.shape[0], size=n_cells)
    lengths = np.diff(source.indptr)[rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    if labels is not None:
        obs["cell_type"] = pd.Categorical(labels[rows])
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for empty in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, empty, {})
        group = f.create_group("X")
        group.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_cells, source.shape[1]),
            }
        )
        group.create_dataset("indptr", data=indptr)
        data = group.create_dataset("data", shape=(indptr[-1],), dtype=np.float32)
        indices = group.create_dataset("indices", shape=(indptr[-1],), dtype=np.int32)
        for start in range(0, n_cells, chunk):
            part = source[rows[start : start + chunk]]
            lo, hi = indptr[start], indptr[min(start + chunk, n_cells)]
            data[lo:hi] = part.data
            indices[lo:hi] = part.indices


def measure_process(command: list[str], threads: int) -> dict:
    """Run ``command`` in a fresh process: wall, CPU seconds and peak RSS of that process."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        env = {**subprocess_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True
        )
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.seek(0)
            raise SystemExit(f"{command[3]} failed (exit {code}): {log.read()[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def measure_embed(data: Path, model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run the streaming embed in a fresh process: wall, CPU, peak RSS of that process."""
    command = [
        sys.executable,
        "-m",
        "scfmbench",
        "embed",
        str(data),
        "--model",
        f"scgpt-random={model_dir}",
        "--out",
        str(out),
        "--backed",
        "--device",
        "cpu",
        "--batch-size",
        str(args.batch_size),
        "--chunk-size",
        str(args.chunk_size),
        "--option",
        f"max_seq_len={args.max_seq_len}",
        "--quiet",
    ]
    measured = measure_process(command, args.threads)
    n_cells = int(np.load(out, mmap_mode="r").shape[0])
    return {
        "n_cells": n_cells,
        **measured,
        "cells_per_s": round(n_cells / measured["wall_s"], 1),
        "cells_per_cpu_s": round(n_cells / measured["cpu_s"], 1),
        "file_mb": round(data.stat().st_size / 2**20, 1),
    }


RUN_SETTINGS = {
    "baselines": ["pca+logreg", "majority"],
    "probes": ["logreg"],
    "n_splits": 1,
    "design": "study",
    "random_controls": False,
    "layerwise": False,
    "figures": False,
}


def measure_run(
    data: Path, model_dir: Path, workdir: Path, args: argparse.Namespace, *, backed: bool
) -> dict:
    """``scfmbench run`` (streamed or in memory) in a fresh process: wall, CPU, peak RSS."""
    config = workdir / "run.yaml"
    settings = {
        **RUN_SETTINGS,
        "models": [f"scgpt-random={model_dir}"],
        "model_options": {"scgpt": {"max_seq_len": args.max_seq_len}},
        "chunk_size": args.chunk_size,
        "device": "cpu",
    }
    config.write_text(json.dumps(settings))  # JSON is YAML
    mode = "backed" if backed else "memory"
    command = [
        *(sys.executable, "-m", "scfmbench", "run", "--data", str(data)),
        *("--config", str(config), "--label-key", "cell_type"),
        *("--out", str(workdir / "runs"), "--name", f"{data.stem}_{mode}", "--quiet"),
        "--backed" if backed else "--no-backed",
    ]
    measured = measure_process(command, args.threads)
    metrics = json.loads((workdir / "runs" / f"{data.stem}_{mode}" / "metrics.json").read_text())
    scores = {
        name: round(entry["summary"]["macro_f1"]["mean"], 4)
        for name, entry in metrics["methods"].items()
    }
    return {
        "n_cells": metrics["diagnostics"]["n_cells"],
        "mode": mode,
        **measured,
        "macro_f1": scores,
    }


def run_scaling(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="scfmbench_scaling_", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model_dir = tiny_scgpt_dir(tmp / "scgpt_tiny")
        source, var, labels = vocab_source(args.data)
        print(
            f"source: {source.shape[0]} PBMC3k cells × {source.shape[1]} vocabulary genes, "
            f"{source.nnz / source.shape[0]:.0f} non-zero genes per cell",
            flush=True,
        )
        rows, run_rows = [], []
        for n_cells in args.sizes:
            data = tmp / f"synthetic_{n_cells}.h5ad"
            started = time.perf_counter()
            write_synthetic(data, source, var, n_cells=n_cells, seed=args.seed, labels=labels)
            print(
                f"wrote {data.name} ({data.stat().st_size / 2**20:.0f} MiB) in "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
            row = measure_embed(data, model_dir, tmp / f"emb_{n_cells}.npy", args)
            print(
                f"{n_cells} cells: {row['wall_s']} s, {row['cells_per_s']} cells/s, "
                f"peak RSS {row['peak_rss_mb']} MB",
                flush=True,
            )
            rows.append(row)
            modes = []
            if args.run_scaling:
                modes = [True] + ([False] if n_cells <= args.memory_run_max else [])
            for backed in modes:
                run_rows.append(measure_run(data, model_dir, tmp, args, backed=backed))
                print(
                    f"run {run_rows[-1]['mode']} {n_cells} cells: {run_rows[-1]['wall_s']} s, "
                    f"peak RSS {run_rows[-1]['peak_rss_mb']} MB",
                    flush=True,
                )
            data.unlink()
            (tmp / f"emb_{n_cells}.npy").unlink()
    common = {
        "machine": machine(),
        "model": "scgpt-random, scGPT_human vocab, embsize 16, 2 layers, 2 heads",
        "max_seq_len": args.max_seq_len,
        "chunk_size": args.chunk_size,
        "torch_threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if run_rows:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "run_scaling.json").write_text(
            json.dumps({**common, "settings": RUN_SETTINGS, "runs": run_rows}, indent=2) + "\n"
        )
    return {**common, "batch_size": args.batch_size, "sizes": rows}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def throughput_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| script | flags | ratio | value | target | rate | device |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "note" in row:
            lines.append(f"| {row['name']} | | {row['note']} | | | | |")
            continue
        rate = ", ".join(f"{k} {v:.3g}" for k, v in row["rates"].items())
        for key, value in row["ratios"].items():
            target = row["targets"].get(key, "")
            lines.append(
                f"| {row['name']} | {row['flags']} | {key} | {value:.3g} | {target} | "
                f"{rate} | {row['device']} |"
            )
    return lines


def scaling_markdown(scaling: dict) -> list[str]:
    rows = scaling["sizes"]
    lines = [
        f"Machine: {scaling['machine']}. Model: {scaling['model']}, max_seq_len "
        f"{scaling['max_seq_len']}; `scfmbench embed --backed --chunk-size "
        f"{scaling['chunk_size']} --batch-size {scaling['batch_size']}`, "
        f"{scaling.get('torch_threads', 'default')} torch thread(s), one fresh process per "
        f"size ({scaling['date']}). load: the machine's 1-minute load average before → after "
        "(other jobs share the CPU; cells/CPU-s is less sensitive to them).",
        "",
        "| cells | file MiB | wall s | CPU s | cells/s | cells/CPU-s | marginal cells/CPU-s "
        "| peak RSS MB | load |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    marginal = _marginal_rates(rows)
    for r, extra in zip(rows, ["", *map(str, marginal)], strict=True):
        load = "→".join(map(str, r["load_avg_1min"]))
        lines.append(
            f"| {r['n_cells']} | {r['file_mb']} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['cells_per_s']} | {r['cells_per_cpu_s']} | {extra} | "
            f"{r['peak_rss_mb']} | {load} |"
        )
    if len(rows) > 1:
        rss = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        speeds = [r["cells_per_s"] for r in rows]
        cpu_speeds = [r["cells_per_cpu_s"] for r in rows]
        lines += [
            "",
            f"- peak RSS {rows[-1]['n_cells']} / {rows[0]['n_cells']} cells: {rss:.2f}× "
            f"(target ≤ 1.5×: {'met' if rss <= 1.5 else 'NOT met'})",
            f"- cells/s max / min: {max(speeds) / min(speeds):.2f}× wall, "
            f"{max(cpu_speeds) / min(cpu_speeds):.2f}× CPU time; these include the start-up "
            "(imports, model) that small sizes pay relatively more",
            f"- marginal cells/CPU-s (Δcells / ΔCPU s between consecutive sizes, start-up "
            f"cancels): max / min {max(marginal) / min(marginal):.2f}× (linear time: ≈ 1×)",
        ]
    return lines


def run_scaling_markdown(doc: dict) -> list[str]:
    settings = ", ".join(f"{k} {v}" for k, v in doc["settings"].items())
    lines = [
        f"Machine: {doc['machine']}. `scfmbench run` with {settings}; model {doc['model']}, "
        f"max_seq_len {doc['max_seq_len']}, chunk size {doc['chunk_size']}; one fresh process "
        f"per row ({doc['date']}).",
        "",
        "| cells | mode | wall s | CPU s | peak RSS MB | macro F1 |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in doc["runs"]:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["macro_f1"].items())
        lines.append(
            f"| {r['n_cells']} | {r['mode']} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['peak_rss_mb']} | {scores} |"
        )
    backed = [r for r in doc["runs"] if r["mode"] == "backed"]
    memory = [r for r in doc["runs"] if r["mode"] == "memory"]
    if len(backed) > 1:
        growth = backed[-1]["peak_rss_mb"] / backed[0]["peak_rss_mb"]
        lines += [
            "",
            f"- streamed run, peak RSS {backed[-1]['n_cells']} / {backed[0]['n_cells']} cells: "
            f"{growth:.2f}×",
        ]
    streamed_rss = {r["n_cells"]: r["peak_rss_mb"] for r in backed}
    for r in memory:
        if r["n_cells"] in streamed_rss:
            lines.append(
                f"- at {r['n_cells']} cells the in-memory run peaks at "
                f"{r['peak_rss_mb'] / streamed_rss[r['n_cells']]:.2f}× the streamed run's RSS"
            )
    return lines


def _marginal_rates(rows: list[dict]) -> list[float]:
    """Δcells / ΔCPU seconds between consecutive sizes (the fixed start-up cost cancels)."""
    return [
        round((b["n_cells"] - a["n_cells"]) / max(b["cpu_s"] - a["cpu_s"], 1e-9), 1)
        for a, b in zip(rows, rows[1:], strict=False)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument(
        "--throughput-cells",
        type=int,
        default=64,
        help="--n-cells for throughput scripts that take it",
    )
    parser.add_argument("--throughput-timeout", type=int, default=1800)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--memory-run-max",
        type=int,
        default=50_000,
        help="largest size also run in memory (--no-backed) for contrast; it needs several GB "
        "per 10k cells more than the streamed run",
    )
    parser.add_argument(
        "--no-run-scaling",
        dest="run_scaling",
        action="store_false",
        help="only the embed scaling, not the whole run streamed vs in memory",
    )
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=128,
        help="scGPT input length (real: 1200; shorter keeps the run short)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the embed process (1: steadier on a shared CPU)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the temporary synthetic files (default: system tmp)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.md")
    args = parser.parse_args()
    args.sizes = sorted(args.sizes)

    lines = ["# Benchmark results", "", f"Written by `benchmarks/run_all.py` on {machine()}.", ""]
    rows = [
        run_throughput(
            name,
            n_cells=args.throughput_cells,
            timeout=args.throughput_timeout,
            run=not args.skip_throughput,
        )
        for name in THROUGHPUT
    ]
    lines += [
        "## Throughput (ratios against a baseline in the same process)",
        "",
        *throughput_markdown(rows),
        "",
    ]
    scaling_json = RESULTS / "scaling.json"
    if not args.skip_scaling:
        RESULTS.mkdir(parents=True, exist_ok=True)
        scaling_json.write_text(json.dumps(run_scaling(args), indent=2) + "\n")
    if scaling_json.exists():
        title = "## Scaling of streaming `embed` (synthetic PBMC3k resamples)"
        if args.skip_scaling:
            title += " — stored `results/scaling.json`, not rerun"
        lines += [title, "", *scaling_markdown(json.loads(scaling_json.read_text())), ""]
    run_json = RESULTS / "run_scaling.json"
    if run_json.exists():
        title = "## Scaling of `run`, streamed (`--backed`) vs in memory"
        if args.skip_scaling or not args.run_scaling:
            title += " — stored `results/run_scaling.json`, not rerun"
        lines += [title, "", *run_scaling_markdown(json.loads(run_json.read_text())), ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    readme_table.main([])  # the README's table from the same JSON


if __name__ == "__main__":
    main()
