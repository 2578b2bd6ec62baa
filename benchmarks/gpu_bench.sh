#!/usr/bin/env bash
# The GPU benchmark in one device call: unpack the stack, build the Mistral-7B-shaped model once,
# time every configuration (qlora_nb.bench), then trace what is alive at the peak for a few.
# Use: carry [".device"]; command: bash benchmarks/gpu_bench.sh  (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -f .device/stack.tgz ]; then tar xzf .device/stack.tgz -C /tmp && export PYTHONPATH=/tmp/stack:$PWD; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/diag.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/diag.txt"
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
for dt in (torch.float32, torch.bfloat16):
    q = torch.randn(1, 32, 2048, 128, device="cuda", dtype=dt); k = torch.randn(1, 8, 2048, 128, device="cuda", dtype=dt)
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([b]): F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            print(dt, b, "gqa ok")
        except Exception as e:
            print(dt, b, "gqa fails:", str(e).splitlines()[0][:100])
PY
M=/tmp/m7b
[ -f $M/config.json ] || python3 -c "from qlora_nb.bench import build_random_mistral as b; b('$M')"
python3 -m qlora_nb.bench --device cuda --out "$OUT" --model-dir $M ${BENCH_CONFIGS:+--configs $BENCH_CONFIGS} 2>&1 | tee -a "$OUT/diag.txt"
for c in ${TRACES:-qlora:2048x1 lora:2048x1 qlora:8192x1 qlora:2048x4}; do
  [ $SECONDS -gt ${TRACE_UNTIL:-470} ] && { echo "skip trace $c (time)"; continue; }
  m=${c%%:*}; s=${c#*:}; python3 benchmarks/peak_trace.py --model-dir $M --method $m --seq ${s%x*} --batch ${s#*x} \
    --out "$OUT/trace_${m}_${s}.json" 2>&1 | grep -v Loading | tail -30
done
echo "total ${SECONDS}s"
