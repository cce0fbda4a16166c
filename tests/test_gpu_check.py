"""benchmarks/gpu_check.sh runs in its CPU form (fp32 only, CI-sized), so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_shared

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_form(tmp_path):
    require_shared("data/pbmc3k_seurat_labels_2638x13714_counts.h5ad")
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_check.sh"), "--n-cells", "2", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["n_cells"] == 2
    assert set(result["models"]) == {"geneformer", "scgpt", "scfoundation"}
    shapes = {name: (m["hidden"], m["ffn"]) for name, m in result["models"].items()}
    assert shapes == {"geneformer": (768, 3072), "scgpt": (512, 512), "scfoundation": (768, 3072)}
    for entry in result["models"].values():
        assert entry["layers"] == 2 and 0 < entry["flop_fraction"] < 2
        assert entry["padding_waste_bound"] >= 1.0
        assert entry["bf16"] == "skipped: the engine uses autocast on CUDA only"
    finetune = result["finetune"]
    assert finetune["steps"] == finetune["steps_trainer"] == 2, finetune
    assert set(finetune["steps_per_s"]) == {"engine", "trainer", "trainer_grouped"}
    assert finetune["device"].startswith("cpu") and finetune["sides_in_one_process"] is True
    assert result["torchrun_embed"]["shape"] == [2, 768], result["torchrun_embed"]
