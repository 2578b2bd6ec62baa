"""Shard the FSDP-QLoRA model over CPU processes with PyTorch FSDP (gloo) and write what each rank holds and computes.

accelerate's FSDP plugin refuses to start without a GPU, so on the CPU this wraps the model
the way accelerate and the Trainer wrap it on GPUs, with torch's FullyShardedDataParallel
directly: the model from `distributed.load_for_rank(..., strategy="fsdp")` (4-bit weights
stored bf16-typed, norms and embeddings bf16, fresh fp32 LoRA), peft's
`fsdp_auto_wrap_policy` (decoder layers and LoRA layers as separate units), FULL_SHARD,
use_orig_params=False. Started by accelerate's launcher like the training script:

    accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml -m qlora_nb.launch_fsdp_cpu --out runs/10_multi_gpu/fsdp_cpu

Each rank writes `<out>/rank<r>.json`: the bytes of its flat-parameter shards next to the
planner's `GpuPlan.flat_param_bytes`, the quantization statistics it keeps whole, the
number of FSDP units, and on one fixed batch the loss and LoRA gradient norm of the whole
model (before wrapping) and of the sharded one (forward and backward through all-gathered
layers), which must agree.

Leaves out: training steps and optimizer state (distributed.py trains), memory peaks (a
CPU has no allocator statistics), and speed (gloo on two cores says nothing about NCCL).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def quant_stats_bytes(model) -> int:
    """Bytes of the 4-bit layers' quantization statistics (absmax, nested absmax, code tables), each storage once."""
    seen = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                t = getattr(state, name, None)
                if t is not None and hasattr(t, "untyped_storage"):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            state = getattr(state, "state2", None)
    return sum(seen.values())


def lora_grad_norm(model, sharded: bool = False) -> float:
    """sqrt of the sum of squared gradients of the trainable parameters; sharded: add up every rank's shards."""
    import torch
    import torch.distributed as dist

    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            sq += p.grad.detach().double().pow(2).sum()
    if sharded:
        dist.all_reduce(sq)
    return sq.item() ** 0.5


def run(out: Path, base_model: str = "embedded", batch: int = 2, seq: int = 32, seed: int = 0) -> dict:
    import torch
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from . import memory, models
    from .distributed import NVLS_OFF, load_for_rank, say
    from .train import FinetuneConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = FinetuneConfig(base_model=base_model, dropout=0.0, gradient_checkpointing=False, seed=seed)
    model, tokenizer = load_for_rank(config, strategy="fsdp", device="cpu")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    ids = torch.randint(0, len(tokenizer), (batch, seq), generator=torch.Generator().manual_seed(seed))
    whole = model(input_ids=ids, labels=ids)
    whole.loss.backward()
    whole_loss, whole_grad = whole.loss.item(), lora_grad_norm(model)  # every rank: the whole model, same batch
    model.zero_grad(set_to_none=True)
    stats = quant_stats_bytes(model)
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                   use_orig_params=False, device_id=torch.device("cpu"))
    flat = sum(p.numel() * p.element_size() for p in wrapped.parameters())
    units = sum(1 for m in wrapped.modules() if isinstance(m, FSDP))
    sharded = wrapped(input_ids=ids, labels=ids)
    sharded.loss.backward()
    sharded_grad = lora_grad_norm(wrapped, sharded=True)
    gp = memory.plan_per_gpu(memory.model_shape(models.resolve_base_model(base_model)), gpus=world, strategy="fsdp",
                             rank=config.rank, batch=batch, seq=seq, device="cpu")
    record = {"rank": rank, "world_size": world, "base_model": base_model, "frozen_dtypes": dtypes,
              "flat_param_bytes": flat, "planner_flat_param_bytes": gp.flat_param_bytes,
              "quant_stats_bytes": stats, "planner_quant_stats_bytes": gp.unsharded, "fsdp_units": units,
              "loss_whole": whole_loss, "loss_sharded": sharded.loss.item(),
              "lora_grad_norm_whole": whole_grad, "lora_grad_norm_sharded": sharded_grad,
              "environment": {k: __import__("os").environ.get(k) for k in NVLS_OFF}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    say(f"[rank {rank}] holds {flat:,} bytes of flat parameters in {units} FSDP units "
        f"(planner {gp.flat_param_bytes:,}); loss whole {whole_loss:.6f}, sharded {sharded.loss.item():.6f}")
    dist.barrier()
    dist.destroy_process_group()
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlora_nb.launch_fsdp_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base-model", default="embedded")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args(argv)
    run(args.out, args.base_model, args.batch, args.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
