#!/usr/bin/env bash
# The fast path against the plain path and its peers in one device call: unpack the stack (and the peers),
# build the Mistral-7B-shaped model once, run the fast path's tests on the GPU (TESTS_K: a -k filter), time
# each method (one process each, qlora_nb.bench), then profile one step of each method in PROFILE ("qlora fast
# unsloth", one process each, at PSEQ x PBATCH).
# Use: carry [".device"]; command: CONFIGS=fast:2048x4,... bash benchmarks/fast_bench.sh   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
tar xzf .device/stack.tgz -C /tmp && export PYTHONPATH=/tmp/stack:$PWD
[ -f .device/peers.tgz ] && tar xzf .device/peers.tgz -C /tmp && export QLORA_NB_PEERS=/tmp/peers
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/m7b
[ -f $M/config.json ] || python3 -c "from qlora_nb.bench import build_random_mistral as b; b('$M')"
echo "model built ${SECONDS}s"
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfE --tb=short tests/test_fast.py ${TESTS_K:+-k "$TESTS_K"} \
    > "$OUT/test_fast_cuda.txt" 2>&1; tail -3 "$OUT/test_fast_cuda.txt"
  echo "tests ${SECONDS}s"
fi
python3 -m qlora_nb.bench --device cuda --out "$OUT" --model-dir $M ${CONFIGS:+--configs $CONFIGS} ${BENCH_ARGS:-} 2>&1 \
  | grep -v "^|" | tail -40
echo "bench ${SECONDS}s"
for m in ${PROFILE:-}; do  # one process per method; a peer's with its own folder in place of the stack
  path=$PYTHONPATH; case $m in unsloth|liger) path=${QLORA_NB_PEERS:-/nonexistent}:$PWD ;; esac
  PYTHONPATH=$path python3 benchmarks/profile_step.py --model-dir $M --methods $m --seq ${PSEQ:-2048} \
    --batch ${PBATCH:-1} --append --out "$OUT/profile_step.json" 2>&1 | grep -v Loading | tail -3 | cut -c1-600
  echo "profile $m ${SECONDS}s"
done
echo "total ${SECONDS}s"
