#!/usr/bin/env bash
# The whole 2-GPU H200 measurement of notebook 10 (results: data/multigpu/, written by STAGE=collect).
#
# 1. mistral7b: a Mistral-7B-shaped model (random weights, pre-quantized), data parallel on one GPU
#    (global batch 8 = 2 micro-steps of 4) and on two (configs/accelerate/gpu_ddp_2.yaml, 4 per GPU):
#    tokens/s, scaling efficiency (aim >= 90%), and the same loss trajectory (dropout 0).
#    Also FSDP-QLoRA of the same shape stored bf16-typed on two GPUs (stage fsdp7b): the per-GPU
#    peak next to the planner, and a quick check that FSDP-QLoRA runs before the 70B is tried.
# 2. llama70b: a Llama-3-70B-shaped model (random weights) written already quantized, layer by
#    layer (benchmarks/multigpu_build.py: about 37 GiB on disk, never a 140 GB bf16 copy), trained
#    with QLoRA under a per-process cap of CAP_GIB (default 48) GiB per GPU:
#      - one GPU, notebook 05's recipe: the planner's refusal, then the real attempt (--no-fit-check),
#        expected to run out of memory;
#      - two GPUs, FSDP-QLoRA (configs/accelerate/$FSDP_CONFIG.yaml, default gpu_fsdp_qlora_2): per-GPU peak and tokens/s next to memory.plan_per_gpu's prediction
#        (the aim: within 10%).
#
# NVLink multicast stays off on that machine, here and in every process accelerate starts.
# Use (device tool; each call is at most 10 minutes; /tmp survives only while the machine is warm,
# so every stage builds what it needs when it is missing):
#   carry [".device"]; command: STAGE="mistral fsdp7b" bash benchmarks/multigpu_bench.sh
#   then STAGE="llama2 llama1"   ($OUT/multigpu/*.json -> data/multigpu/; each run collects as it ends)
# Measured 2026-11-23: 193 s for the first call (both 7B builds included), 120 s to build the 70B,
# 100 s for its FSDP run, 50 s for the one-GPU attempts.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -f .device/stack.tgz ]; then tar xzf .device/stack.tgz -C /tmp && export PYTHONPATH=/tmp/stack:$PWD; fi
OUT=${OUT:-/tmp/out}; RUNS=/tmp/multigpu_runs; mkdir -p "$OUT" "$RUNS"
STAGE=${STAGE:-all}; CAP=${CAP_GIB:-48}; FSDP_CONFIG=${FSDP_CONFIG:-gpu_fsdp_qlora_2}
L=/tmp/llama70b-nf4-bf16storage; M=/tmp/mistral7b-nf4
COMMON="--device cuda --data random --max-seq-length ${SEQ:-2048} --dropout 0 --warmup-steps 0 --lr-scheduler constant"
LAUNCH="python3 -m accelerate.commands.launch"

run() {  # run NAME COMMAND...: keep the command, its output and its exit code beside the rank files
  local dir=$RUNS/$1; shift; mkdir -p "$dir"; rm -f "$dir"/rank*.json
  echo "$*" > "$dir/command.txt"; echo "== $dir: $*"
  timeout ${RUN_TIMEOUT:-540} "$@" > "$dir/run.log" 2>&1; echo $? > "$dir/returncode"
  grep -E "^\[rank|error" "$dir/run.log" | tail -20
  collect_all > /dev/null
}

collect_all() {  # $OUT/multigpu/*.json and $OUT/runs/ from every run this machine has finished
  collect() {  # collect EXPERIMENT NAME=RUN...: only the runs this machine has (a later call may add the rest)
    local exp=$1 args=(); shift
    for r in "$@"; do [ -d "$RUNS/${r#*=}" ] && args+=(--run "${r%%=*}=$RUNS/${r#*=}"); done
    [ ${#args[@]} -gt 0 ] && python3 benchmarks/multigpu_collect.py --experiment $exp --out "$OUT/multigpu" "${args[@]}"
  }
  collect llama70b_fsdp 1gpu_planner=llama70b_1gpu_planner 1gpu_ddp=llama70b_1gpu_ddp 2gpu_fsdp=llama70b_2gpu_fsdp
  collect mistral7b_ddp_scaling 1gpu=mistral7b_1gpu 2gpu_ddp=mistral7b_2gpu_ddp
  collect mistral7b_fsdp 2gpu_fsdp=mistral7b_2gpu_fsdp
  mkdir -p "$OUT/runs"; for d in $RUNS/*/; do mkdir -p "$OUT/runs/$(basename $d)"; cp $d/*.txt $d/*.json $d/returncode "$OUT/runs/$(basename $d)/" 2>/dev/null; tail -200 $d/run.log > "$OUT/runs/$(basename $d)/run.log.tail"; done
}
has() { [[ " $STAGE " == *" $1 "* || $STAGE == all ]]; }
M16=/tmp/mistral7b-nf4-bf16storage

if has build7b || has fsdp7b || has mistral; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/diag.txt"
  [ -f $M/config.json ] || python3 benchmarks/multigpu_build.py --shape mistral-7b --out $M
  [ -f $M16/config.json ] || python3 benchmarks/multigpu_build.py --shape mistral-7b --out $M16 --quant-storage bfloat16
  du -sh $M $M16
fi
if has mistral || has mistral1; then  # one process, one visible GPU: with two, the Trainer would use DataParallel
  CUDA_VISIBLE_DEVICES=0 RUN_TIMEOUT=220 run mistral7b_1gpu python3 -m qlora_nb.distributed $COMMON --base-model $M --global-batch 8 --grad-accum 2 \
      --max-steps ${MISTRAL_STEPS:-12} --out $RUNS/mistral7b_1gpu
fi
if has mistral; then
  RUN_TIMEOUT=180 run mistral7b_2gpu_ddp $LAUNCH --config_file configs/accelerate/gpu_ddp_2.yaml -m qlora_nb.distributed $COMMON \
      --base-model $M --global-batch 8 --grad-accum 1 --max-steps ${MISTRAL_STEPS:-12} --out $RUNS/mistral7b_2gpu_ddp
fi
if has fsdp7b; then
  RUN_TIMEOUT=200 run mistral7b_2gpu_fsdp $LAUNCH --config_file configs/accelerate/$FSDP_CONFIG.yaml -m qlora_nb.distributed \
      $COMMON --strategy fsdp --base-model $M16 --global-batch 8 --max-steps ${MISTRAL_STEPS:-12} --gather-adapter \
      --out $RUNS/mistral7b_2gpu_fsdp
fi
if has build70b || has llama1 || has llama2; then
  [ -f $L/config.json ] || python3 benchmarks/multigpu_build.py --shape llama-3-70b --out $L --quant-storage bfloat16
  du -sh $L
fi
if has llama2; then
  run llama70b_2gpu_fsdp $LAUNCH --config_file configs/accelerate/$FSDP_CONFIG.yaml -m qlora_nb.distributed \
      $COMMON --strategy fsdp --base-model $L --global-batch 2 --max-steps ${LLAMA_STEPS:-6} --gpu-mem-cap-gib $CAP \
      --out $RUNS/llama70b_2gpu_fsdp
  tail -5 $RUNS/llama70b_2gpu_fsdp/run.log
fi
if has llama1; then
  CUDA_VISIBLE_DEVICES=0 run llama70b_1gpu_planner python3 -m qlora_nb.distributed $COMMON --base-model $L --global-batch 1 --max-steps 3 \
      --gpu-mem-cap-gib $CAP --out $RUNS/llama70b_1gpu_planner
  CUDA_VISIBLE_DEVICES=0 run llama70b_1gpu_ddp python3 -m qlora_nb.distributed $COMMON --base-model $L --global-batch 1 --max-steps 3 \
      --gpu-mem-cap-gib $CAP --no-fit-check --out $RUNS/llama70b_1gpu_ddp
fi
if has collect; then collect_all; fi
echo "total ${SECONDS}s"
