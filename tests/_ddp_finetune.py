"""Fine-tune the tiny model on the PBMC3k subset; run under a DDP launcher.

Usage: ``torchrun --nproc_per_node 2 tests/_ddp_finetune.py DATA OUT_DIR CONFIG_JSON`` (or
``accelerate launch --multi_gpu --num_processes 2``, which also runs on CPU-only machines).
The main process writes ``OUT_DIR/result.json`` (the engine's own result file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scfmbench.data.splits import stratified_split  # noqa: E402
from scfmbench.data.validate import validate  # noqa: E402
from scfmbench.finetune.train import FinetuneConfig, finetune  # noqa: E402
from tests._tiny_model import TinyModel, pbmc_subset  # noqa: E402


def main(data: str, out_dir: str, config_json: str) -> None:
    adata, genes = pbmc_subset(Path(data))
    validated = validate(adata, label_key="cell_type")
    split = stratified_split(validated.labels, seed=42)
    config = FinetuneConfig.build(json.loads(config_json))
    finetune(
        validated, TinyModel(genes), split, config=config, out_dir=Path(out_dir), progress=False
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
