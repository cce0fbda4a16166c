"""Measurement helpers shared by the embedding throughput benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scfmbench.embed import embed_tokens, length_sorted_batches

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/_padded.py: the pad-to-max loop compared against
from tests._padded import embed_padded_to_max, pad_width  # noqa: E402

SHARED = REPO.parent / "shared"
PBMC3K = SHARED / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad"
RESULTS = REPO / "benchmarks" / "results"


def timed_embedding(
    model, tokens, *, pooling: str, loop=embed_tokens, **options
) -> tuple[np.ndarray, float, float]:
    """Embeddings, wall seconds and process CPU seconds (less sensitive to a shared CPU).

    ``loop``: ``embed_tokens`` (length-sorted dynamic batches) or ``embed_padded_to_max``.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    out = loop(model, tokens, layer=model.default_layer, pooling=pooling, progress=False, **options)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def padded_tokens(lengths: np.ndarray, *, batch_size: int, width: int | None) -> int:
    """Tokens the network processes: each batch padded to its longest cell (or ``width``)."""
    if width is not None:
        return int(width * len(lengths))
    batches = length_sorted_batches(lengths, batch_size=batch_size)
    return int(sum(len(b) * lengths[b].max() for b in batches))


def forward_flops(
    lengths: np.ndarray, *, n_layers: int, hidden: int, ffn: int, scores: bool = True
) -> float:
    """Encoder FLOPs for unpadded sequences: 2·L·(4h² + 2h·ffn) + 4·L²·h per layer.

    The four h×h projections of attention and the two feed-forward matmuls, plus (``scores``)
    the L×L attention scores and their product with the values, at the cells' real lengths.
    """
    lengths = lengths.astype(np.float64)
    per_layer = 2 * lengths * (4 * hidden**2 + 2 * hidden * ffn) + scores * 4 * lengths**2 * hidden
    return float(per_layer.sum() * n_layers)


class Instrumented:
    """Times every model forward and runs a 2048² ``torch.mm`` right after it.

    Works for any model whose ``encode`` calls ``hidden_states(batch, layer=…)`` (the three
    adapters do).

    The CPU is shared with other work, so raw times drift with the load. Each forward's time
    multiplied by the matmul rate measured right after it gives the FLOPs a plain matmul would
    have done in that time: a load-independent measure of the forward's cost.
    """

    size = 2048

    def __init__(self, model) -> None:
        self.model = model
        self.a, self.b = torch.randn(self.size, self.size), torch.randn(self.size, self.size)
        self.forward_s, self.mm_s, self.capacity = 0.0, 0.0, 0.0

    def __enter__(self) -> Instrumented:
        forward = self.model.hidden_states

        def timed(batch, *, layer: int) -> torch.Tensor:
            start = time.perf_counter()
            hidden = forward(batch, layer=layer)
            mid = time.perf_counter()
            torch.mm(self.a, self.b)
            mm_s = time.perf_counter() - mid
            self.forward_s += mid - start
            self.mm_s += mm_s
            self.capacity += (mid - start) * 2 * self.size**3 / mm_s
            return hidden

        self.model.hidden_states = timed  # instance attribute: instruments this model only
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.hidden_states


def flop_report(
    model, tokens, *, hidden: int, ffn: int, pooling: str, batch_size: int, **options
) -> dict:
    """Dynamic vs pad-to-max embedding of ``tokens`` at the default layer, both instrumented.

    Returns the two embeddings (``"dynamic"``, ``"pad_to_max"``), wall and CPU seconds, and
    the load-independent figures: ``flop_fraction`` (encoder FLOPs at the real lengths /
    matmul-equivalent cost of the dynamic run, i.e. achieved FLOP rate as a fraction of
    ``torch.mm``'s in the same process), ``padding_waste_bound`` (tokens processed pad-to-max
    / dynamic) and ``speedup_vs_pad_to_max`` (matmul-equivalent cost pad-to-max / dynamic).
    """
    report: dict = {}
    capacity, forward_s = {}, {}
    for name, loop in (("dynamic", embed_tokens), ("pad_to_max", embed_padded_to_max)):
        with Instrumented(model) as clock:
            report[name], wall, cpu = timed_embedding(
                model, tokens, pooling=pooling, batch_size=batch_size, loop=loop, **options
            )
        capacity[name], forward_s[name] = clock.capacity, clock.forward_s
        report[f"seconds_{name}"], report[f"cpu_seconds_{name}"] = wall - clock.mm_s, cpu
    layers = model.default_layer % (model.n_layers + 1)
    flops = forward_flops(tokens.lengths, n_layers=layers, hidden=hidden, ffn=ffn)
    width = pad_width(model, tokens)
    dynamic = padded_tokens(tokens.lengths, batch_size=batch_size, width=None)
    padded = padded_tokens(tokens.lengths, batch_size=batch_size, width=width)
    report |= {
        "flop_fraction": flops / capacity["dynamic"],
        "model_gflop_per_s": flops / forward_s["dynamic"] / 1e9,
        "matmul_gflop_per_s": capacity["dynamic"] / forward_s["dynamic"] / 1e9,
        "layers_run": layers,
        "tokens_processed_dynamic": dynamic,
        "tokens_processed_pad_to_max": padded,
        "padding_waste_bound": padded / dynamic,
        "speedup_vs_pad_to_max": capacity["pad_to_max"] / capacity["dynamic"],
    }
    report["speedup_fraction_of_bound"] = (
        report["speedup_vs_pad_to_max"] / report["padding_waste_bound"]
    )
    return report


def print_flop_report(report: dict) -> None:
    """One line: FLOP fraction, padding-waste bound and the speed-up against it (targets)."""
    print(
        f"FLOP rate {report['model_gflop_per_s']:.1f} GFLOP/s vs torch.mm "
        f"{report['matmul_gflop_per_s']:.1f} GFLOP/s → fraction {report['flop_fraction']:.2f} "
        f"(target ≥ 0.5); padding-waste bound {report['padding_waste_bound']:.2f}×, "
        f"load-independent speed-up {report['speedup_vs_pad_to_max']:.2f}× = "
        f"{report['speedup_fraction_of_bound']:.2f} of the bound (target ≥ 0.9)"
    )


def write_results(path: Path, results: dict, *, started: float) -> None:
    """Write ``results`` as JSON to ``path`` and say so, with the seconds since ``started``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s in all)")


def in_fresh_process(module: str, function: str, *args: str | int | bool | None) -> dict:
    """``benchmarks/<module>.py``'s ``function(*args)`` in a new Python process (nothing of
    this one's imports, caches or memory carries over); its JSON return value.

    ``args`` are JSON values (pass paths as ``str``). Raises ``RuntimeError`` with the end of
    the child's stderr when it fails.
    """
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks');"
        f"from {module} import {function};"
        f"print('RESULT', json.dumps({function}(*json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))
