#!/usr/bin/env bash
# NOT YET RUN: no 2-GPU machine was lent when this was written, so data/multigpu/ holds no
# results and notebook 10 says so. This is the whole 2-GPU H200 measurement of notebook 10.
#
# 1. llama70b: a Llama-3-70B-shaped model (random weights) written already quantized, layer by
#    layer (benchmarks/multigpu_build.py: about 37 GiB on disk, never a 140 GB bf16 copy), trained
#    with QLoRA under a per-process cap of CAP_GIB (default 48) GiB per GPU:
#      - one GPU, notebook 05's recipe: the planner's refusal, then the real attempt (--no-fit-check),
#        expected to run out of memory;
#      - two GPUs, FSDP-QLoRA (configs/accelerate/gpu_fsdp_qlora_2.yaml): per-GPU peak and tokens/s
#        next to memory.plan_per_gpu's prediction (the aim: within 10%).
# 2. mistral7b: a Mistral-7B-shaped model (random weights, pre-quantized), data parallel on one GPU
#    (global batch 8 = 2 micro-steps of 4) and on two (configs/accelerate/gpu_ddp_2.yaml, 4 per GPU):
#    tokens/s, scaling efficiency (aim >= 90%), and the same loss trajectory (dropout 0).
#
# NVLink multicast stays off on that machine, here and in every process accelerate starts.
# Use (device tool; each stage fits one 10-minute call; /tmp survives while the machine is warm):
#   carry [".device"]; command: STAGE=build   bash benchmarks/multigpu_bench.sh
#   then STAGE=llama, STAGE=mistral, STAGE=collect  (results: $OUT/multigpu/*.json -> copy into data/multigpu/)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -f .device/stack.tgz ]; then tar xzf .device/stack.tgz -C /tmp && export PYTHONPATH=/tmp/stack:$PWD; fi
OUT=${OUT:-/tmp/out}; RUNS=/tmp/multigpu_runs; mkdir -p "$OUT" "$RUNS"
STAGE=${STAGE:-all}; CAP=${CAP_GIB:-48}
L=/tmp/llama70b-nf4-bf16storage; M=/tmp/mistral7b-nf4
COMMON="--device cuda --data random --max-seq-length ${SEQ:-2048} --dropout 0 --warmup-steps 0 --lr-scheduler constant"
LAUNCH="python3 -m accelerate.commands.launch"

run() {  # run NAME COMMAND...: keep the command, its output and its exit code beside the rank files
  local dir=$RUNS/$1; shift; mkdir -p "$dir"; rm -f "$dir"/rank*.json
  echo "$*" > "$dir/command.txt"; echo "== $dir: $*"
  timeout ${RUN_TIMEOUT:-540} "$@" > "$dir/run.log" 2>&1; echo $? > "$dir/returncode"
  grep -E "^\[rank|error" "$dir/run.log" | tail -20
}

if [[ $STAGE == build || $STAGE == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/diag.txt"
  [ -f $L/config.json ] || python3 benchmarks/multigpu_build.py --shape llama-3-70b --out $L --quant-storage bfloat16
  [ -f $M/config.json ] || python3 benchmarks/multigpu_build.py --shape mistral-7b --out $M
  du -sh $L $M
fi
if [[ $STAGE == llama || $STAGE == all ]]; then
  run llama70b_1gpu_planner python3 -m qlora_nb.distributed $COMMON --base-model $L --global-batch 1 --max-steps 3 \
      --gpu-mem-cap-gib $CAP --out $RUNS/llama70b_1gpu_planner
  run llama70b_1gpu_ddp python3 -m qlora_nb.distributed $COMMON --base-model $L --global-batch 1 --max-steps 3 \
      --gpu-mem-cap-gib $CAP --no-fit-check --out $RUNS/llama70b_1gpu_ddp
  run llama70b_2gpu_fsdp $LAUNCH --config_file configs/accelerate/gpu_fsdp_qlora_2.yaml -m qlora_nb.distributed \
      $COMMON --strategy fsdp --base-model $L --global-batch 2 --max-steps ${LLAMA_STEPS:-6} --gpu-mem-cap-gib $CAP \
      --out $RUNS/llama70b_2gpu_fsdp
fi
if [[ $STAGE == mistral || $STAGE == all ]]; then
  run mistral7b_1gpu python3 -m qlora_nb.distributed $COMMON --base-model $M --global-batch 8 --grad-accum 2 \
      --max-steps ${MISTRAL_STEPS:-12} --out $RUNS/mistral7b_1gpu
  run mistral7b_2gpu_ddp $LAUNCH --config_file configs/accelerate/gpu_ddp_2.yaml -m qlora_nb.distributed $COMMON \
      --base-model $M --global-batch 8 --grad-accum 1 --max-steps ${MISTRAL_STEPS:-12} --out $RUNS/mistral7b_2gpu_ddp
fi
if [[ $STAGE == collect || $STAGE == all ]]; then
  python3 benchmarks/multigpu_collect.py --experiment llama70b_fsdp --out "$OUT/multigpu" \
      --run 1gpu_planner=$RUNS/llama70b_1gpu_planner --run 1gpu_ddp=$RUNS/llama70b_1gpu_ddp \
      --run 2gpu_fsdp=$RUNS/llama70b_2gpu_fsdp
  python3 benchmarks/multigpu_collect.py --experiment mistral7b_ddp_scaling --out "$OUT/multigpu" \
      --run 1gpu=$RUNS/mistral7b_1gpu --run 2gpu_ddp=$RUNS/mistral7b_2gpu_ddp
  cp -r $RUNS "$OUT/runs"
fi
echo "total ${SECONDS}s"
