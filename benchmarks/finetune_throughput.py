"""Fine-tuning throughput: scfmbench's engine vs a plain Hugging Face ``Trainer``.

Both train the same Geneformer-shaped network (6-layer BERT, hidden 256, 4 heads,
intermediate 512, vocabulary 25,426, dropout 0.02) with the same classification head (mean
pooling + linear), on the same PBMC3k token sequences, with the same batch size, learning
rate and number of steps. Each side runs in its own child process so that its peak RSS is its
own; steps/s counts the training loop only. The sides alternate ``--repeats`` times and each
side's best run counts, so that a change in the load of a shared machine does not decide it.

Sequences: genes ranked by count, as Geneformer does. Geneformer reads up to 2,048 genes, so
PBMC3k cells (212-2,413 expressed genes) differ a lot in length; on a CPU that is too slow,
so by default each cell keeps its top ``n_expressed / --length-scale`` genes (at most
``--max-length``): the same spread of lengths at 1/8 of the cost. ``--length-scale 0`` gives
every cell its top ``--max-length`` genes (nearly all the same length).

Sides: ``engine`` (scfmbench.finetune.train), ``trainer`` (Trainer defaults: random batches,
dynamic padding) and ``trainer_grouped`` (Trainer with
``train_sampling_strategy="group_by_length"``).

Writes ``benchmarks/results/finetune_throughput.json``: ``cells_per_s_ratio_vs_trainer`` (best
engine run / best plain-Trainer run, training cells per second: each side trains one epoch over
the same cells, and the engine's token budget may split a batch of long cells into more
steps), ``cells_per_s_ratio_vs_trainer_grouped``, the same as steps/s,
``peak_rss_mb`` (engine), ``peak_rss_mb_trainer``, ``device`` and the settings.

Usage: ``.venv/bin/python benchmarks/finetune_throughput.py [--data PBMC3K.h5ad]``.

Memory with the study's settings (batch 16, every expressed gene up to 4,096 tokens), the
engine alone, with its default token budget and without (``--max-tokens 0``)::

    finetune_throughput.py --sides engine --batch-size 16 --max-length 4096 --length-scale 0 \
        --steps 4 --repeats 1 --out benchmarks/results/finetune_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests._tiny_model import TinyModel  # noqa: E402

from scfmbench.models.base import TokenizedCells  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pbmc3k_seurat_labels_2638x13714_counts.h5ad"
RESULT = ROOT / "benchmarks" / "results" / "finetune_throughput.json"
GENEFORMER_VOCAB = 25_426  # <pad>, <mask> + 25,424 genes (Geneformer V1 token dictionary)
SIDES = ("trainer", "trainer_grouped", "engine")
SHAPE = {"hidden": 256, "n_layers": 6, "n_heads": 4, "dropout": 0.02}


class ScaledLengthModel(TinyModel):
    """Keeps each cell's top ``n_expressed / length_scale`` genes (all up to the cap if 0)."""

    length_scale: int = 0

    def tokenize(self, adata, *, seed: int = 0) -> TokenizedCells:
        tokens = super().tokenize(adata, seed=seed)
        if not self.length_scale:
            return tokens
        expressed = np.diff(sp.csr_matrix(adata[tokens.obs_names].X).indptr)
        keep = np.minimum(tokens.lengths, np.ceil(expressed / self.length_scale).astype(int))
        return TokenizedCells.from_lists(
            [tokens.cell(i)[0][: keep[i]] for i in range(tokens.n_cells)],
            obs_names=tokens.obs_names,
            settings={**tokens.settings, "length_scale": self.length_scale},
        )


def load(args: argparse.Namespace):
    """(validated data, Geneformer-shaped model, split): ``n_train`` train, 16 val, 16 test."""
    import anndata as ad

    from scfmbench.data.splits import Split
    from scfmbench.data.validate import validate

    adata = ad.read_h5ad(args.data)
    validated = validate(adata, label_key="cell_type")
    genes = list(validated.adata.var_names)
    genes += [f"<unused{i}>" for i in range(GENEFORMER_VOCAB - 1 - len(genes))]
    model = ScaledLengthModel(genes, max_length=args.max_length, seed=0, **SHAPE)
    model.length_scale = args.length_scale
    cells = validated.adata.obs_names[np.random.default_rng(0).permutation(validated.adata.n_obs)]
    n = args.steps * args.batch_size
    split = Split(seed=0, train=cells[:n], val=cells[n : n + 16], test=cells[n + 16 : n + 32])
    return validated, model, split


def run_engine(args: argparse.Namespace) -> dict:
    from scfmbench.finetune.train import FinetuneConfig, finetune

    validated, model, split = load(args)
    config = FinetuneConfig(
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=5e-5,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        device=args.device,
        max_tokens=args.max_tokens or None,
        max_attention=args.max_attention or None,
    )
    with tempfile.TemporaryDirectory() as out:
        result = finetune(validated, model, split, config=config, out_dir=Path(out), progress=False)
    return {"steps": result.train_steps, "seconds": result.train_s}


class MeanPoolClassifier(torch.nn.Module):
    """The engine's classifier as one HF-style module: BERT → mean pooling → linear → loss."""

    def __init__(self, model: TinyModel, n_classes: int) -> None:
        super().__init__()
        self.bert = model.network
        self.head = model.make_classifier_head(n_classes)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def run_trainer(args: argparse.Namespace) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class LoopClock(TrainerCallback):
        """Times the training loop only (train begin → end), as the engine's ``train_s``."""

        def on_train_begin(self, *args, **kwargs) -> None:
            self.started = time.perf_counter()

        def on_train_end(self, *args, **kwargs) -> None:
            self.seconds = time.perf_counter() - self.started

    validated, model, split = load(args)
    tokens = model.tokenize(validated.adata[split.train].copy())
    classes = list(validated.labels.cat.categories)
    codes = validated.labels.loc[tokens.obs_names].cat.codes.to_numpy()
    rows = [
        {"input_ids": tokens.cell(i)[0], "labels": int(codes[i])} for i in range(tokens.n_cells)
    ]

    def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([r["labels"] for r in batch]),
        }

    torch.manual_seed(42)
    network = MeanPoolClassifier(model, len(classes))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=1,
            learning_rate=5e-5,
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="linear",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
            seed=42,
            disable_tqdm=True,
            train_sampling_strategy="group_by_length"
            if args.worker == "trainer_grouped"
            else "random",
        )
        clock = LoopClock()
        trainer = Trainer(
            model=network,
            args=training,
            train_dataset=rows,
            data_collator=pad,
            callbacks=[clock],
        )
        output = trainer.train()
    return {"steps": int(output.global_step), "seconds": clock.seconds}


def run_side(args: argparse.Namespace, side: str) -> dict:
    """Train ``side`` in this process; its steps, seconds and this process's peak memory."""
    torch.set_num_threads(args.threads)
    side_args = argparse.Namespace(**{**vars(args), "worker": side})
    measured = run_engine(side_args) if side == "engine" else run_trainer(side_args)
    measured["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and args.device != "cpu":
        measured["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return measured


def worker(args: argparse.Namespace) -> None:
    print("RESULT " + json.dumps(run_side(args, args.worker)))


def child(args: argparse.Namespace, side: str) -> dict:
    command = [sys.executable, __file__, "--worker", side]
    keys = ("data", "steps", "batch_size", "max_length", "length_scale", "threads", "device")
    for key in (*keys, "max_tokens", "max_attention"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=20, help="Training steps per run.")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Runs per side, alternating; the best counts."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--length-scale", type=int, default=8, help="Keep n_expressed/N genes (0: all to cap)."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"])
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=16_384,
        help="Engine's token budget per batch (0: none, every batch holds --batch-size cells).",
    )
    parser.add_argument(
        "--max-attention",
        type=int,
        default=2**24,
        help="Engine's attention budget per batch, cells × longest² (0: none).",
    )
    parser.add_argument(
        "--sides", nargs="+", choices=SIDES, default=list(SIDES), help="Sides to run."
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run the sides in this process, one after the other (a CI-sized check: each "
        "side's peak RSS then includes the sides before it).",
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found; pass --data PBMC3K.h5ad")
    if args.worker:
        worker(args)
        return
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for _ in range(args.repeats):  # alternate, so a change in machine load hits every side
        for side in args.sides:
            runs[side].append(run_side(args, side) if args.in_process else child(args, side))
    if args.sides == ["engine"]:  # memory only: e.g. the study's settings with or without budget
        found = runs["engine"]
        result = {
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in found), 1),
            "steps": found[0]["steps"],
            "steps_per_s": round(max(r["steps"] / r["seconds"] for r in found), 3),
            **{k: getattr(args, k) for k in ("batch_size", "max_length", "length_scale")},
            "max_tokens": args.max_tokens or None,
            "max_attention": args.max_attention or None,
            "model": "BERT 6 layers, hidden 256, 4 heads, intermediate 512, vocab 25426",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    rates = {side: max(r["steps"] / r["seconds"] for r in found) for side, found in runs.items()}
    # Every side trains one epoch over the same steps × batch_size cells; the engine's token
    # budget can split a batch of long cells into more steps, so cells/s is the fair ratio.
    n_cells = args.steps * args.batch_size
    cells = {side: max(n_cells / r["seconds"] for r in found) for side, found in runs.items()}
    rss = {side: max(r["peak_rss_mb"] for r in found) for side, found in runs.items()}
    engine, trainer = runs["engine"][0], runs["trainer"][0]
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    result = {
        "cells_per_s_ratio_vs_trainer": round(cells["engine"] / cells["trainer"], 3),
        "cells_per_s_ratio_vs_trainer_grouped": round(
            cells["engine"] / cells["trainer_grouped"], 3
        ),
        "cells_per_s": {side: round(rate, 1) for side, rate in cells.items()},
        "train_cells": n_cells,
        "steps_per_s_ratio_vs_trainer": round(rates["engine"] / rates["trainer"], 3),
        "steps_per_s_ratio_vs_trainer_grouped": round(
            rates["engine"] / rates["trainer_grouped"], 3
        ),
        "peak_rss_mb": round(rss["engine"], 1),
        "peak_rss_mb_trainer": round(rss["trainer"], 1),
        "peak_rss_mb_trainer_grouped": round(rss["trainer_grouped"], 1),
        "device": f"{device} ({platform.processor() or platform.machine()}, "
        f"{args.threads} torch thread{'s' if args.threads > 1 else ''})",
        "steps_per_s": {side: round(rate, 3) for side, rate in rates.items()},
        "steps_per_s_all_runs": {
            side: [round(r["steps"] / r["seconds"], 3) for r in found]
            for side, found in runs.items()
        },
        "repeats": args.repeats,
        "sides_in_one_process": args.in_process,  # then peak RSS is not each side's own
        "steps": engine["steps"],
        "steps_trainer": trainer["steps"],
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "length_scale": args.length_scale,
        "model": "BERT 6 layers, hidden 256, 4 heads, intermediate 512, vocab 25426",
        "torch": torch.__version__,
        "date": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
    }
    for key in ("peak_gpu_mb",):
        if key in engine:
            result[key] = round(engine[key], 1)
            result[f"{key}_trainer"] = round(trainer[key], 1)
    result["max_tokens"] = args.max_tokens or None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
