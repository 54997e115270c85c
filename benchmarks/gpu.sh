#!/usr/bin/env bash
# GPU check and benchmark in one invocation: under 5 minutes on one H100/H200, installs nothing.
#   benchmarks/gpu.sh [OUT_DIR]     (default ./gpu-results)
# 1. correctness: the bf16 training step on the GPU matches the fp32 CPU loss within bf16 tolerance;
# 2. BERT-base, seq 128 and 512, bf16: maskedlm (eager, compiled) vs transformers on the same card,
#    MFU against the datasheet dense bf16 peak and a matmul measured on the spot.
# Results go to OUT_DIR (summary.json, correctness.json, throughput_seq*.json, log.txt); a table prints last.
set -euo pipefail
OUT="${1:-./gpu-results}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: error: no CUDA GPU visible to PyTorch ($PY); nothing was measured" >&2
    exit 3
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 285 "$PY" benchmarks/gpu_check.py "$OUT" 2>&1 | tee "$OUT/log.txt"
