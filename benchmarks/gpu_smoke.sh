#!/usr/bin/env bash
# GPU smoke run, under 5 minutes on one GPU: build the benchmark models, check seekserve against
# transformers on CUDA (greedy tokens equal in float32, logprobs close in bf16), then bf16 throughput
# and prefix-cache TTFT on CUDA.
#   bash benchmarks/gpu_smoke.sh            # logs also go to $OUT (or ./gpu_smoke_logs) when set
# Env: PYTHON (default python3), DEVICE (default cuda), SKIP_HF=1 to skip transformers in the throughput run.
# Works from a plain checkout (seekserve need not be installed: src/ is put on PYTHONPATH); needs torch
# with CUDA, transformers, tokenizers, safetensors, jinja2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LOGS=${OUT:-gpu_smoke_logs}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start))s] $*"; }

step "environment"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| transformers', transformers.__version__)"
if [[ $DEVICE == cuda* ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'CUDA is not available')"
fi

step "build models"
timeout 60 "$PY" scripts/make_bench_model.py --shape tiny-llama 2>&1 | grep -v '^Writing' | tee "$LOGS/make_models.log"
timeout 60 "$PY" scripts/make_bench_model.py --shape qwen2-150m 2>&1 | grep -v '^Writing' | tee -a "$LOGS/make_models.log"

step "correctness vs transformers on $DEVICE"
timeout 90 "$PY" benchmarks/gpu_check.py --device "$DEVICE" \
  --models bench_models/tiny-llama,bench_models/qwen2-150m 2>&1 | grep -v '^Loading weights' | tee "$LOGS/gpu_check.log"

step "throughput on $DEVICE (bf16)"
timeout 120 "$PY" benchmarks/throughput.py --model bench_models/qwen2-150m --device "$DEVICE" --dtype bfloat16 \
  --repeat 3 --kv-cache-gb 4 ${SKIP_HF:+--skip-hf} 2>&1 | grep -v '^Loading weights' | tee "$LOGS/throughput.log"

step "prefix-cache TTFT on $DEVICE (bf16)"
timeout 45 "$PY" benchmarks/prefix_cache.py --model bench_models/qwen2-150m --device "$DEVICE" --repeat 5 \
  2>&1 | tee "$LOGS/prefix_cache.log"

step "done in $((SECONDS - start))s; logs in $LOGS"
