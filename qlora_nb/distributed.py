"""Notebook 05's QLoRA fine-tune on N processes (data parallel or fully sharded), started by `accelerate launch`; each rank writes what it did.

One process per GPU (or per CPU core with the gloo backend), each running TRL's
SFTTrainer on the same 4-bit base with the same fresh LoRA: `accelerate launch` starts
the processes (torchrun underneath) and the Trainer wraps the model in DDP or FSDP as the
accelerate config says. The global batch (sequences per optimizer step) is split evenly:
each rank sees global_batch / N sequences, the Trainer counts answer tokens over all ranks
(`average_tokens_across_devices`), and DDP all-reduces the LoRA gradients, so the loss and
the update are those of one process with the whole batch.

    accelerate launch --config_file configs/accelerate/cpu_ddp_2proc.yaml -m qlora_nb.distributed \\
        --device cpu --global-batch 4 --max-steps 3 --out runs/10_multi_gpu/ddp2
    python -m qlora_nb.distributed --device cpu --global-batch 4 --max-steps 3 --out runs/10_multi_gpu/single

Every rank writes `<out>/rank<r>.json`: the loss of every optimizer step (the Trainer's,
the same on every rank), its own share of each step (answer tokens, summed loss, a hash of
every sequence it saw), the sha256 of its LoRA weights after training, seconds, tokens/s
and on CUDA its peak memory next to the planner's prediction (memory.plan_per_gpu).
`read_results` and `compare_runs` check a run against a single-process one.

Strategies: 'ddp' loads the base exactly as notebook 05 (train.load_for_training: NF4 +
double quantization + prepare_model_for_kbit_training + LoRA), one whole copy per rank.
'fsdp' (CUDA only, an FSDP accelerate config) stores the 4-bit weights bf16-typed
(`bnb_4bit_quant_storage=torch.bfloat16`) and keeps norms and embeddings bf16, so every
decoder layer flattens into one bf16 parameter that FSDP can shard; the Trainer then
wraps LoRA layers apart (peft's fsdp_auto_wrap_policy). Before anything is loaded each
rank checks its setup and fails at once, with what to change, when there are more
processes than devices, the batch does not split, the strategy does not match the
accelerate config, or (CUDA) the planner says the model does not fit even sharded.

Leaves out: launching (launch.py builds and runs the accelerate command), validation
passes and checkpoints (notebook 05 does those), multi-node runs, and FSDP on the CPU
(accelerate refuses it; launch_fsdp_cpu.py shards the same model with torch's FSDP directly).
NVLink multicast is switched off in every rank's environment (NVLS_OFF), as the project's
2-GPU H200 machine needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# NVLink SHARP / multicast off (NCCL, torch symmetric memory, NVSHMEM): set before any
# process group exists; launch.py also puts them in the environment of `accelerate launch`.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STRATEGIES = ("ddp", "fsdp")
ERROR_PREFIX = "qlora_nb.distributed: error: "


def say(message: str) -> None:
    """One progress line in a single write, so lines of ranks printing at once do not interleave."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class DistributedSetupError(ValueError):
    """The run cannot start as asked; the message says what to change."""


# ---------------------------------------------------------------- who am I

def world() -> dict:
    """{rank, local_rank, world_size, local_world_size} from torchrun's environment (a plain run: one process)."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    ws = get("WORLD_SIZE", 1)
    return {"rank": get("RANK", 0), "local_rank": get("LOCAL_RANK", 0), "world_size": ws,
            "local_world_size": get("LOCAL_WORLD_SIZE", ws)}


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'; 'cuda' without a GPU is refused."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise DistributedSetupError(f"--device {device!r}: use auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError("--device cuda, but no CUDA GPU is visible here. Use --device cpu with "
                                    "configs/accelerate/cpu_ddp_2proc.yaml, or run on a GPU machine.")
    return device


# ---------------------------------------------------------------- checks before loading anything

def check_devices(processes: int, device: str, config_file: str | None = None) -> None:
    """Refuse more processes on this machine than it has devices (GPUs, or CPU cores for gloo).

    With too many processes a rank would pick a GPU that does not exist (or the ranks would
    share cores and crawl); refusing here, before any process group exists, ends every rank
    at once instead of leaving the others waiting for it.
    """
    where = f" in {config_file}" if config_file else ""
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise DistributedSetupError(
                f"{processes} GPU processes were asked for but no CUDA GPU is visible here. On the CPU use "
                "configs/accelerate/cpu_ddp_2proc.yaml with --device cpu, or run on a GPU machine.")
        if processes > gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise DistributedSetupError(
                f"{processes} processes were asked for but only {gpus} CUDA GPU{'s' if gpus != 1 else ''} "
                f"{'is' if gpus == 1 else 'are'} visible"
                + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                + f": one process drives one GPU. Set num_processes: {gpus}{where}, or pass "
                  f"--num_processes {gpus} to accelerate launch.")
    else:
        cores = cpu_cores()
        if processes > cores:
            raise DistributedSetupError(
                f"{processes} CPU processes were asked for but this job may use only {cores} CPU core"
                f"{'s' if cores != 1 else ''}: each gloo process needs a core of its own. Set num_processes: "
                f"{cores}{where}, or pass --num_processes {cores} to accelerate launch.")


def split_batch(global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """Sequences per rank per micro-step so that world_size x that x grad_accum == global_batch.

    >>> split_batch(8, 2), split_batch(8, 2, grad_accum=2)
    (4, 2)
    """
    if not isinstance(global_batch, int) or global_batch < 1:
        raise DistributedSetupError(f"--global-batch {global_batch!r}: give the sequences per optimizer step, e.g. 8")
    per = world_size * grad_accum
    if global_batch % per:
        lower, upper = global_batch - global_batch % per, global_batch + per - global_batch % per
        raise DistributedSetupError(
            f"--global-batch {global_batch} does not split over {world_size} processes x {grad_accum} accumulation "
            f"steps: every rank must see the same number of sequences. Use --global-batch {lower or upper} or {upper}.")
    return global_batch // per


def check_strategy(strategy: str, device: str) -> None:
    """The strategy must match what accelerate launched (FSDP config or not) and the device."""
    if strategy not in STRATEGIES:
        raise DistributedSetupError(f"--strategy {strategy!r}: use ddp (a whole copy per process) or fsdp (sharded)")
    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if strategy == "fsdp" and device != "cuda":
        raise DistributedSetupError("--strategy fsdp needs CUDA GPUs (accelerate's FSDP plugin refuses to run without "
                                    "one). On the CPU use --strategy ddp with configs/accelerate/cpu_ddp_2proc.yaml; "
                                    "qlora_nb.launch_fsdp_cpu shows the sharding itself on CPU processes.")
    if strategy == "fsdp" and not fsdp_env:
        raise DistributedSetupError("--strategy fsdp, but accelerate was not started with an FSDP config. Launch with "
                                    "--config_file configs/accelerate/gpu_fsdp_qlora_2.yaml.")
    if strategy == "ddp" and fsdp_env:
        raise DistributedSetupError("accelerate was started with an FSDP config but --strategy is ddp. Pass --strategy "
                                    "fsdp, or launch with configs/accelerate/gpu_ddp_2.yaml.")


def optimizer_name(optim: str, strategy: str, device: str) -> str:
    """The Trainer optimizer: notebook 05's choice ('auto'), except adamw_torch under FSDP (see below)."""
    if optim != "auto":
        return optim
    if device != "cuda":
        return "adamw_torch"
    # peft's FSDP notes: paged_adamw_8bit fails when an FSDP-QLoRA run saves a checkpoint.
    return "adamw_torch" if strategy == "fsdp" else "paged_adamw_8bit"


def planner_optimizer(optim: str) -> str:
    """Trainer optimizer name -> memory.OPTIMIZER_STATE_BYTES key."""
    return {"adamw_torch": "adamw", "adamw_torch_fused": "adamw"}.get(optim, optim)


def gpu_plan(base_model: str, gpus: int, strategy: str, batch_per_gpu: int, seq: int, rank: int, optimizer: str,
             checkpointing: bool, dropout: float = 0.05):
    """memory.plan_per_gpu for this run (base_model: a name in memory.MODELS, or anything models.resolve_base_model takes).

    The Trainer runs with bf16=True on CUDA, so the plan counts bf16 autocast.
    """
    from . import memory, models

    shape = base_model if base_model in memory.MODELS else memory.model_shape(models.resolve_base_model(base_model))
    return memory.plan_per_gpu(shape, gpus=gpus, strategy=strategy, rank=rank, batch=batch_per_gpu, seq=seq,
                               optimizer=planner_optimizer(optimizer), checkpointing=checkpointing, dropout=dropout,
                               autocast=True)


def check_fit(base_model: str, gpus: int, strategy: str, batch_per_gpu: int, seq: int, rank: int, optimizer: str,
              checkpointing: bool, gpu_gib: float, dropout: float = 0.05):
    """Raise DistributedSetupError with the planner's numbers when the run does not fit GPUs of gpu_gib GiB.

    Returns the memory.GpuPlan when it fits. Runs on any machine (the planner reads shapes only).
    """
    from . import memory

    gp = gpu_plan(base_model, gpus, strategy, batch_per_gpu, seq, rank, optimizer, checkpointing, dropout)
    answer = memory.fits_per_gpu(gp, gpu_gib)
    if not answer.fits:
        raise DistributedSetupError(
            f"{gp.summary()}: it does not fit GPUs with {gpu_gib:.0f} GiB "
            f"({answer.usable_gib:.1f} GiB usable after the CUDA context and a 10% margin). The planner's numbers "
            f"per GPU: " + ", ".join(f"{k} {v:.1f} GiB" for k, v in gp.breakdown().items() if v > 0.005)
            + ". What to change:\n" + "\n".join(f"- {a}" for a in answer.advice)
            + "\n(--no-fit-check runs it anyway, e.g. to see the out-of-memory error.)")
    return gp


# ---------------------------------------------------------------- the model and the data

def load_for_rank(config, strategy: str = "ddp", device: str = "cpu", local_rank: int = 0):
    """(PeftModel, tokenizer) on this rank: notebook 05's load (ddp) or the FSDP-QLoRA variant (fsdp).

    ddp on the CPU is train.load_for_training itself; on CUDA the same steps with the model on
    this rank's GPU (load_base puts everything on cuda:0). fsdp keeps the model on the CPU for
    FSDP to shard, stores the 4-bit weights as bf16 and skips prepare_model_for_kbit_training
    (its fp32 casts would mix dtypes inside a layer, which FSDP cannot flatten).
    """
    import torch

    from . import models, train

    if strategy == "ddp" and device == "cpu":
        return train.load_for_training(config)
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    train.check_config(config)
    torch.manual_seed(config.seed)  # LoRA's A matrices are random: the same seed on every rank
    path = models.resolve_base_model(config.base_model)
    kwargs = {"dtype": torch.bfloat16}
    checkpointing = device == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing
    if strategy == "fsdp":
        kwargs["quantization_config"] = models.nf4_config(quant_storage=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if device == "cpu":  # as load_base: no CPU repacking (it would turn the bf16-typed storage into uint8)
            models.plain_4bit_kernels(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        kwargs["quantization_config"] = models.nf4_config()
        kwargs["device_map"] = {"": local_rank}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, train.lora_config(config))
    return model, models.load_tokenizer(path)


def random_token_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """n pre-tokenized rows of exactly `seq` random token ids in [0, vocab): fixed-size steps for benchmarks.

    Every token counts in the loss (no prompt, no padding), as in bench.py and the planner.

    >>> rows = random_token_rows(2, 5, 100)
    >>> len(rows), len(rows[0]["input_ids"]), rows == random_token_rows(2, 5, 100)
    (2, 5, True)
    """
    import random

    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(vocab) for _ in range(seq)]} for _ in range(n)]


def row_hash(ids) -> str:
    """12 hex digits naming one sequence by its token ids (padding removed by the caller)."""
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]


def adapter_digest(model) -> str:
    """sha256 over the trainable (LoRA) tensors in name order: equal digests mean bit-identical adapters."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda t: t[0]):
        if p.requires_grad:
            t = p.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_tensors(model) -> dict:
    """{name: fp32 CPU copy} of the trainable tensors (what `adapter_digest` hashes)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _recording_trainer_class():
    """Notebook 05's trainer class, also writing down what each micro-step of this rank saw."""
    from .train import _qlora_trainer_class

    class RecordingTrainer(_qlora_trainer_class()):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.micro_steps = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            rows = [row_hash(r[m.bool()] if mask is not None else r)
                    for r, m in zip(ids.cpu(), mask.cpu() if mask is not None else ids.cpu())]
            local = int((labels[..., 1:] != -100).sum())
            total = int(round(float(num_items_in_batch))) if num_items_in_batch is not None else local
            n = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            # compute_loss returned sum(local token losses) / total * n (see trl's SFTTrainer.compute_loss)
            real = int(mask.sum()) if mask is not None else int(ids.numel())
            self.micro_steps.append({"step": self.state.global_step + 1, "tokens": real, "local_tokens": local,
                                     "global_tokens": total, "local_loss_sum": float(loss) * total / n,
                                     "rows": rows, "sequence_length": int(ids.shape[1])})
            return loss

    return RecordingTrainer


def _peak_split_callback(device: str):
    """A callback that, when training begins (after the Trainer has wrapped the model in DDP/FSDP),
    keeps the CUDA peak so far (loading + wrapping) in `.before` and restarts the count, so the
    peak the rank record reports afterwards is the training steps' own."""
    from transformers import TrainerCallback

    class PeakSplit(TrainerCallback):
        before = None

        def on_train_begin(self, args, state, control, **kw):
            if device == "cuda":
                import torch
                self.before = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

    return PeakSplit()


def _progress_callback(max_steps: int):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                say(f"[rank 0] step {state.global_step}/{max_steps}  loss {logs['loss']:.4f}  "
                    f"({time.perf_counter() - self.start:.1f} s)")

    return Progress()


# ---------------------------------------------------------------- the run

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qlora_nb.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json (created)")
    p.add_argument("--base-model", default="embedded", help="embedded, tiny-mistral, a folder or hub id")
    p.add_argument("--strategy", default="auto", help="ddp, fsdp, or auto: fsdp when accelerate runs an FSDP config")
    p.add_argument("--device", default="auto", help="auto, cpu (gloo) or cuda (nccl)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step on each rank")
    p.add_argument("--max-steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--max-seq-length", type=int, default=256, help="tokens; random data: every row is this long")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (0 makes runs comparable bit for bit)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--data", default="triage", choices=["triage", "random"],
                   help="triage: notebook 05's rows; random: rows of exactly --max-seq-length random tokens")
    p.add_argument("--optim", default="auto", help="Trainer optimizer; auto: 05's choice (adamw_torch under FSDP)")
    p.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="auto: on for CUDA, off on the CPU (as in 05)")
    p.add_argument("--gpu-mem-cap-gib", type=float, default=None,
                   help="cap each process's CUDA memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--no-fit-check", action="store_true", help="skip the planner's check before loading (CUDA)")
    p.add_argument("--fit-gpu-gib", type=float, default=None,
                   help="check the planner against GPUs of this many GiB (default on CUDA: the GPU or its cap; "
                        "on the CPU: no check)")
    p.add_argument("--save-adapter", action="store_true", help="also save each rank's LoRA tensors (safetensors)")
    p.add_argument("--gather-adapter", action="store_true",
                   help="fsdp: gather the full state dict on rank 0 to hash the trained LoRA (slow for big models)")
    p.add_argument("--ddp-timeout", type=int, default=600, help="seconds a rank waits for the others before failing")
    return p.parse_args(argv)


def finetune_config(args):
    """The train.FinetuneConfig this run shares with notebook 05 (per-rank batch filled in by run)."""
    from .train import FinetuneConfig

    gc = {"auto": None, "on": True, "off": False}[args.gradient_checkpointing]
    return FinetuneConfig(base_model=args.base_model, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                          learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler,
                          warmup_steps=args.warmup_steps, max_steps=args.max_steps, grad_accum=args.grad_accum,
                          max_seq_length=args.max_seq_length, seed=args.seed, train_limit=args.train_limit,
                          output_dir=str(args.out / "trainer"), resume=False, optim=args.optim,
                          gradient_checkpointing=gc, pad_to_max_length=False, eval_limit=None)


def run(args) -> dict:
    """Check, load, train, write `<out>/rank<r>.json`; returns this rank's record."""
    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)
    # FSDP loads every rank's whole 4-bit model, then frees all but its shard: without expandable
    # segments those freed blocks stay reserved and fragmented (a 70B run hit its cap at 23 GiB in use)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    me = world()
    device = resolve_device(args.device)
    strategy = args.strategy
    if strategy == "auto":
        strategy = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
    check_strategy(strategy, device)
    check_devices(me["local_world_size"], device)
    per_rank = split_batch(args.global_batch, me["world_size"], args.grad_accum)
    config = dataclasses.replace(finetune_config(args), batch_size=per_rank)
    optim = optimizer_name(args.optim, strategy, device)
    checkpointing = device == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing

    import torch

    predicted, cap = None, None
    if device == "cuda":
        torch.cuda.set_device(me["local_rank"])
        total = torch.cuda.get_device_properties(me["local_rank"]).total_memory
        cap = int(args.gpu_mem_cap_gib * 2**30) if args.gpu_mem_cap_gib else total
        if args.gpu_mem_cap_gib:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), me["local_rank"])
    how = (me["world_size"], strategy, per_rank, args.max_seq_length, args.rank, optim, checkpointing)
    if args.fit_gpu_gib or (device == "cuda" and not args.no_fit_check):
        predicted = check_fit(args.base_model, *how, args.fit_gpu_gib or cap / 2**30, dropout=args.dropout)
    elif device == "cuda":
        predicted = gpu_plan(args.base_model, *how, dropout=args.dropout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": me["rank"], "world_size": me["world_size"], "local_rank": me["local_rank"],
              "strategy": strategy, "device": device, "global_batch": args.global_batch,
              "batch_per_rank": per_rank, "grad_accum": args.grad_accum, "optimizer": optim,
              "gradient_checkpointing": checkpointing, "config": config.to_dict(), "data": args.data,
              "environment": {k: os.environ.get(k) for k in NVLS_OFF}, "torch": torch.__version__}
    try:
        record.update(_train(args, config, strategy, device, me, optim, out))
    except torch.cuda.OutOfMemoryError as err:
        record["error"] = f"CUDA out of memory: {str(err).splitlines()[0]}"
    if device == "cuda":
        record.update(peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(me["local_rank"]),
                      gpu_memory_cap_bytes=cap, gpu=torch.cuda.get_device_name(me["local_rank"]))
    if predicted is not None:
        from .memory import gpu_plan_dict
        record["planner"] = gpu_plan_dict(predicted)
        # the shape itself, so a later planner can be held to this run again (replan)
        record["shape"] = dataclasses.asdict(predicted.base.model)
    (out / f"rank{me['rank']}.json").write_text(json.dumps(record, indent=1))
    return record


def _train(args, config, strategy, device, me, optim, out) -> dict:
    import torch
    from datasets import Dataset

    from . import data, train

    t0 = time.perf_counter()
    model, tokenizer = load_for_rank(config, strategy, device, me["local_rank"])
    load_seconds = time.perf_counter() - t0
    if args.data == "random":
        n = config.batch_size * me["world_size"] * config.grad_accum * config.max_steps
        dataset = Dataset.from_list(random_token_rows(n, config.max_seq_length, len(tokenizer), config.seed))
    else:
        rows = data.load_triage("train")
        rows = rows[:config.train_limit] if config.train_limit else rows
        train.check_lengths(tokenizer, rows, config.max_seq_length, "train")
        dataset = Dataset.from_list(train.to_prompt_completion(rows, "train"))
    sft = train.sft_config(config, progress=False)
    sft = dataclasses.replace(sft, eval_strategy="no", save_strategy="no", optim=optim,
                              ddp_find_unused_parameters=False, ddp_timeout=args.ddp_timeout,
                              average_tokens_across_devices=True, use_cpu=device == "cpu",
                              bf16=device == "cuda", disable_tqdm=True)
    clock = train._step_clock()  # wall time of each optimizer step (CUDA synchronized)
    peaks = _peak_split_callback(device)
    trainer = _recording_trainer_class()(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer,
                                         callbacks=[_progress_callback(config.max_steps), clock, peaks])
    say(f"[rank {me['rank']}] {strategy} on {device}, {me['world_size']} process(es), "
        f"{config.batch_size} sequence(s) per micro-step; model loaded in {load_seconds:.1f} s")
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = train.loss_history_of(trainer.state.log_history)["train"]
    local_tokens = sum(m["local_tokens"] for m in trainer.micro_steps)
    seq_tokens = sum(m["tokens"] for m in trainer.micro_steps)
    steps = sorted(clock.seconds)
    median = steps[len(steps) // 2] if steps else None
    result = {"steps": [{"step": s, "loss": loss} for s, loss in history], "micro_steps": trainer.micro_steps,
              "train_seconds": seconds, "load_seconds": load_seconds, "step_seconds": clock.seconds,
              "tokens_per_second": seq_tokens / seconds if seconds > 0 else None,
              # this rank's tokens per second at the median step (the first steps include warm-up)
              "tokens_per_second_median_step": (seq_tokens / len(steps) / median) if median else None,
              "peak_gpu_memory_before_training_bytes": peaks.before,
              "answer_tokens": local_tokens, "trainable_params": sum(p.numel() for p in model.parameters()
                                                                     if p.requires_grad)}
    if strategy == "ddp":
        result["adapter_sha256"] = adapter_digest(trainer.model)
        if args.save_adapter:
            from safetensors.torch import save_file
            save_file(adapter_tensors(trainer.model), str(out / f"adapter_rank{me['rank']}.safetensors"))
    else:  # FSDP: each rank holds 1/N; the full adapter exists only gathered (on rank 0)
        # a full state dict passes every 4-bit weight through rank 0's CPU memory: 40 GiB for a 70B model
        state = trainer.accelerator.get_state_dict(trainer.model) if args.gather_adapter else None
        if me["rank"] == 0 and state:
            lora = {k: v for k, v in state.items() if "lora_" in k}
            digest = hashlib.sha256()
            for k in sorted(lora):
                digest.update(k.encode())
                digest.update(lora[k].float().cpu().numpy().tobytes())
            result["adapter_sha256_gathered"] = digest.hexdigest()
    return result


def read_results(folder) -> list[dict]:
    """The rank<r>.json records of one run, in rank order; an error names what is missing."""
    folder = Path(folder)
    files = sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise FileNotFoundError(f"{folder} holds no rank*.json: the run did not finish. Start it with "
                                "launch.run(...) or the accelerate command in the module docstring.")
    records = [json.loads(p.read_text()) for p in files]
    expected = records[0]["world_size"]
    if len(records) != expected:
        raise FileNotFoundError(f"{folder} holds {len(records)} of {expected} rank files: a rank did not finish.")
    return records


def step_batches(records: list[dict]) -> dict[int, list[str]]:
    """{optimizer step: sorted row hashes over all ranks}: the global batch each step trained on."""
    steps: dict[int, list[str]] = {}
    for rec in records:
        for m in rec.get("micro_steps", []):
            steps.setdefault(m["step"], []).extend(m["rows"])
    return {s: sorted(rows) for s, rows in sorted(steps.items())}


def compare_runs(parallel, single, rtol: float = 1e-3) -> dict:
    """Check an N-process run against a one-process run of the same global batch.

    Returns {'same_adapter_on_every_rank', 'same_batches', 'losses' [(step, single, parallel)],
    'max_relative_loss_difference', 'loss_matches', 'rank_shares' [(step, rank, tokens, mean loss)],
    'loss_from_shares_matches'}. parallel/single: folders or read_results lists.
    """
    par = parallel if isinstance(parallel, list) else read_results(parallel)
    one = single if isinstance(single, list) else read_results(single)
    for rec in (*par, *one):
        if "error" in rec:
            raise RuntimeError(f"rank {rec['rank']} of a run failed: {rec['error']}")
    digests = {r.get("adapter_sha256") for r in par}
    b = {x["step"]: x["loss"] for x in par[0]["steps"]}
    losses, worst = _paired_losses([(x["step"], x["loss"]) for x in one[0]["steps"]], b.items())
    worst = float("inf") if worst is None else worst
    shares, rebuilt = [], {}
    for rec in par:
        for m in rec["micro_steps"]:
            shares.append((m["step"], rec["rank"], m["local_tokens"],
                           m["local_loss_sum"] / m["local_tokens"] if m["local_tokens"] else float("nan")))
            rebuilt[m["step"]] = rebuilt.get(m["step"], 0.0) + m["local_loss_sum"] / m["global_tokens"]
    from_shares = all(abs(rebuilt[s] - b[s]) <= 1e-4 * abs(b[s]) for s in b if s in rebuilt)
    return {"same_adapter_on_every_rank": len(digests) == 1 and None not in digests,
            "same_batches": step_batches(par) == step_batches(one) and bool(losses),
            "losses": losses, "max_relative_loss_difference": worst, "loss_matches": worst <= rtol,
            "rank_shares": sorted(shares), "loss_from_shares_matches": from_shares}


# ---------------------------------------------------------------- measured GPU runs (data/multigpu/)

def load_gpu_results(folder=None) -> dict:
    """{experiment: dict} from data/multigpu/*.json (benchmarks/multigpu_collect.py writes them); {} when none.

    Each holds {"experiment", "environment", "runs": {name: {"command", "returncode", "ranks": [rank records]}}}.
    """
    from .paths import data_dir

    folder = Path(folder) if folder else data_dir() / "multigpu"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def replan(record: dict):
    """The memory.GpuPlan of today's planner for the run a rank record describes (None without its shape).

    Rank records keep the planner's prediction of their day too ("planner"); this one changes
    with the planner, so tests hold the current planner to old measurements.
    """
    from . import memory

    if "shape" not in record:
        return None
    config = record["config"]
    return memory.plan_per_gpu(memory.ModelShape(**record["shape"]), gpus=record["world_size"],
                               strategy=record["strategy"], rank=config["rank"], batch=record["batch_per_rank"],
                               seq=config["max_seq_length"], optimizer=planner_optimizer(record["optimizer"]),
                               checkpointing=record["gradient_checkpointing"], dropout=config["dropout"],
                               autocast=record["device"] == "cuda")


def run_summary(run: dict) -> dict:
    """One measured run -> {ranks, ok, error, peak_gib [per rank], predicted_gib, ratio, load_peak_gib [per rank],
    predicted_load_gib, load_ratio, tokens_per_second, losses, cap_gib}.

    peak: the training steps' (after the model is wrapped); load: loading and wrapping, before the
    first step. Predictions are today's planner's (replan), else what the run recorded.
    tokens_per_second sums the ranks' median-step rates; ratios = predicted / largest measured.
    """
    ranks = run.get("ranks", [])
    errors = [r["error"] for r in ranks if "error" in r] or ([run["error"]] if run.get("error") else [])
    peaks = [r["peak_gpu_memory_bytes"] / 2**30 for r in ranks if r.get("peak_gpu_memory_bytes") is not None]
    loads = [r["peak_gpu_memory_before_training_bytes"] / 2**30 for r in ranks
             if r.get("peak_gpu_memory_before_training_bytes") is not None]
    plan = next((p for p in map(replan, ranks) if p is not None), None)
    predicted = (plan.peak / 2**30 if plan else
                 next((r["planner"]["peak_gib"] for r in ranks if "planner" in r), None))
    predicted_load = plan.load_peak / 2**30 if plan else None
    rates = [r.get("tokens_per_second_median_step") for r in ranks]
    ok = bool(ranks) and not errors and run.get("returncode", 0) == 0
    return {"ranks": len(ranks), "ok": ok, "error": errors[0] if errors else None, "peak_gib": peaks,
            "predicted_gib": predicted, "ratio": predicted / max(peaks) if predicted and peaks and ok else None,
            "load_peak_gib": loads, "predicted_load_gib": predicted_load,
            "load_ratio": predicted_load / max(loads) if predicted_load and loads and ok else None,
            "tokens_per_second": sum(rates) if ok and all(rates) else None,
            "losses": [(x["step"], x["loss"]) for x in ranks[0].get("steps", [])] if ranks else [],
            "cap_gib": (ranks[0].get("gpu_memory_cap_bytes") or 0) / 2**30 if ranks else None}


def scaling(one_gpu_summary: dict, n_gpu_summary: dict) -> dict:
    """Data-parallel scaling: two run_summary dicts of the same global batch, on one GPU and on N GPUs.

    Returns {gpus (N), tokens_per_second_1, tokens_per_second_n (tokens/s, the ranks' median-step
    rates summed), speedup (rate_n / rate_1), efficiency (rate_n / (N x rate_1); 1.0 is perfect),
    losses [(step, loss on 1 GPU, loss on N GPUs)] (nats per token, the steps both logged),
    max_relative_loss_difference (max |loss_n - loss_1| / |loss_1|)}. Rates, speedup and
    efficiency are None when a run did not train or has no rate; the loss difference is None
    without common steps.

    >>> one = {"ranks": 1, "ok": True, "tokens_per_second": 1000.0, "losses": [(1, 2.0), (2, 1.5)]}
    >>> two = {"ranks": 2, "ok": True, "tokens_per_second": 1900.0, "losses": [(1, 2.0), (2, 1.503)]}
    >>> s = scaling(one, two)
    >>> s["gpus"], s["speedup"], s["efficiency"], round(s["max_relative_loss_difference"], 6)
    (2, 1.9, 0.95, 0.002)
    """
    if one_gpu_summary.get("ranks") != 1:
        raise ValueError(f"the first run must be a one-GPU run; it has {one_gpu_summary.get('ranks')} rank(s)")
    n = n_gpu_summary.get("ranks") or 0
    r1 = one_gpu_summary.get("tokens_per_second") if one_gpu_summary.get("ok") else None
    rn = n_gpu_summary.get("tokens_per_second") if n_gpu_summary.get("ok") else None
    losses, worst = _paired_losses(one_gpu_summary.get("losses", []), n_gpu_summary.get("losses", []))
    return {"gpus": n, "tokens_per_second_1": r1, "tokens_per_second_n": rn,
            "speedup": rn / r1 if r1 and rn else None,
            "efficiency": rn / (n * r1) if r1 and rn and n else None, "losses": losses,
            "max_relative_loss_difference": worst}


def _paired_losses(reference, other) -> tuple[list, float | None]:
    """([(step, reference loss, other loss)] over the steps both logged, max relative difference or None)."""
    a, b = dict(reference), dict(other)
    losses = [(s, a[s], b[s]) for s in sorted(a) if s in b]
    return losses, max((abs(y - x) / abs(x) for _, x, y in losses), default=None)


def _close_process_group() -> None:
    """After a good run: wait for every rank, then tear the process group down (a gloo group left to the
    interpreter's exit can abort it with 'terminate called without an active exception')."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except (DistributedSetupError, FileNotFoundError) as err:
        sys.stderr.write(ERROR_PREFIX + str(err).replace("\n", " | ") + "\n")  # one line, one write
        sys.stderr.flush()
        return 2
    if "error" in record:  # no barrier: the other ranks may be stuck in a collective; torchrun ends them
        sys.stderr.write(ERROR_PREFIX + f"rank {record['rank']}: {record['error']}\n")
        sys.stderr.flush()
        return 3
    _close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
