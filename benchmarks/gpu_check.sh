#!/usr/bin/env bash
# One-command accelerator check (see benchmarks/gpu_check.py): run from the repository root,
#   bash benchmarks/gpu_check.sh [--n-cells N] [--out FILE]
# with a CUDA card: released model shapes, fp32 and bf16, fine-tuning vs Trainer, torchrun;
# without one: the CI-sized CPU form. Writes benchmarks/results/gpu_check_<card>.json.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
