"""Wall time of the label-efficiency sweep (``run --train-sizes``) on PBMC3k.

Run from the repository root::

    python benchmarks/label_efficiency.py [--sizes 1,5,10,25,50,all] [--draws 3] [--no-scvi]

One ``scfmbench run`` of PBMC3k (2,638 cells, default design: 5-fold cross-validation) with the
default baselines (hvg+logreg, pca+logreg, pca+xgboost, majority and scVI with the logreg,
xgboost and kNN probes) and ``--train-sizes``, in a fresh process. Prints the wall and
process-CPU seconds of the whole run and of the sweep (stage ``label_efficiency``), the stage
breakdown, and the machine's load average before and after (the CPU is shared; CPU seconds are
less sensitive to other work). Target: the sweep ≤ 180 s wall on the 2-core machine. Writes
``benchmarks/results/label_efficiency.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT))

TARGET_S = 180.0


def sweep(data: Path, out: Path, sizes: str, draws: int, no_scvi: bool) -> dict:
    """One run with the sweep in this process (called in a child): seconds and stages."""
    import logging
    import resource
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from scfmbench.benchmark.pipeline import run
    from scfmbench.config import DEFAULT_BASELINES

    baselines = [b for b in DEFAULT_BASELINES if not (no_scvi and b == "scvi")]
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(
        data,
        progress=False,
        out=out,
        name="label_efficiency",
        baselines=baselines,
        train_sizes=sizes,
        train_size_seeds=draws,
    )
    block = result.metrics["label_efficiency"]
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages": result.metrics["timings"],  # each with its cpu_seconds but "total"
        "macro_f1": {
            name: {size: round(v["mean"], 4) for size, v in entry["sizes"].items()}
            for name, entry in block["methods"].items()
        },
        "capped": block["capped"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,5,10,25,50,all")
    parser.add_argument("--draws", type=int, default=3, help="--train-size-seeds")
    parser.add_argument("--no-scvi", action="store_true", help="leave the scVI baseline out")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results")
    args = parser.parse_args(argv)
    from benchmarks._common import PBMC3K, in_fresh_process, write_results

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = in_fresh_process(
            "label_efficiency", "sweep", str(PBMC3K), tmp, args.sizes, args.draws, args.no_scvi
        )
    load_after = os.getloadavg()[0]
    stages = result["stages"]
    for name, info in stages.items():
        cpu = info.get("cpu_seconds")
        shown = f"{cpu:8.1f} CPU s" if cpu is not None else ""
        print(f"  {name:40s} {info['seconds']:8.1f} s wall {shown}")
    swept = stages["label_efficiency"]
    print(
        f"run with --train-sizes {args.sizes} ({args.draws} draws): {result['wall_s']:.1f} s "
        f"wall, {result['cpu_s']:.1f} CPU s; the sweep {swept['seconds']:.1f} s wall, "
        f"{swept['cpu_seconds']:.1f} CPU s (target ≤ {TARGET_S:.0f} s); load average "
        f"{load_before:.2f} → {load_after:.2f}"
    )
    results = {
        **result,
        "sweep_wall_s": swept["seconds"],
        "sweep_cpu_s": swept["cpu_seconds"],
        "target_s": TARGET_S,
        "sizes": args.sizes,
        "draws": args.draws,
        "scvi": not args.no_scvi,
        "load_average_before_after": [load_before, load_after],
        "threads": os.cpu_count(),
    }
    write_results(args.out / "label_efficiency.json", results, started=started)
    return results


if __name__ == "__main__":
    main()
