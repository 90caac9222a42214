#!/usr/bin/env bash
# Prepared GPU check (<= 8 min on one H100): bf16 distillation of a CIFAR-size UNet, then one-step throughput at
# batch 256 against 50-step DDIM on the same card. Prints one JSON line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import onestep" 2>/dev/null || pip install -q -e .
timeout 480 python bench/gpu_check.py --steps "${STEPS:-200}"
