"""Measure what one LoRA / QLoRA training step costs: weight memory, peak memory, step time, tokens per second.

Leaves out: predicting those numbers (memory.py does that), quality (evaluate.py), and
the Trainer: the loop here is the bare forward / backward / AdamW step the Trainer runs,
so nothing but the model is on the device.

Run it as one command; each method runs in its own process (the model loads once, then each
shape is measured with CUDA's peak statistics reset), and peers (Unsloth, Liger Kernel) only
in theirs, from the folder QLORA_NB_PEERS names; without it their rows say they are missing:

    python -m qlora_nb.bench --device cuda --out data/bench      # Mistral-7B shape, random weights
    python -m qlora_nb.bench --device cpu --out /tmp/bench       # embedded model, tiny shapes (CI)

On CUDA it builds a `MistralConfig()` model (7.2 B parameters) with random weights and
saves it to a temporary folder; on the CPU it uses the embedded model at its real size.
Each configuration then loads it the way the notebooks do: QLoRA = `from_pretrained(...,
quantization_config=models.nf4_config())` + `prepare_model_for_kbit_training`; LoRA = bf16
weights; then `get_peft_model` with r=16 on all seven projections, gradient checkpointing
(non-reentrant), sdpa attention, train mode, `torch.optim.AdamW`. Random token ids, no
padding, labels = inputs. Methods: qlora (the plain path above), lora (bf16), fast
(`qlora_nb.fast`, its defaults) and variants with one lever changed (FAST_VARIANTS; each fast
run records its levers as `fast_path`), unsloth, liger. Writes `bench_<device>.json` and `bench_<device>.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .memory import ALL_PROJECTIONS

SHAPES = [(512, 4), (2048, 1), (2048, 4), (8192, 1)]
GPU_CONFIGS = [(m, s, b) for m in ("qlora", "lora", "fast", "unsloth", "liger") for s, b in SHAPES]
CPU_CONFIGS = [("qlora", 16, 2), ("lora", 16, 2)]
RANK, ALPHA, DROPOUT = 16, 32, 0.05
LR = 1e-4


@dataclass
class BenchConfig:
    """One measured configuration. method: one of METHODS ('qlora' = NF4 + double quant, 'lora' = bf16 base, ...)."""
    method: str
    seq: int
    batch: int
    warmup: int = 2
    steps: int = 5
    checkpointing: bool = True
    rank: int = RANK


def _gib(n: int | float) -> float:
    return round(n / 2**30, 3)


def build_random_mistral(folder: str | Path, device: str = "cuda") -> Path:
    """Save a `MistralConfig()` model with random bf16 weights to `folder`; returns it. ~14.5 GB on disk."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig()
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    placeholder_tokenizer(config.vocab_size).save_pretrained(folder)  # Unsloth loads one with the model
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def placeholder_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with `vocab_size` entries ('t0', 't1', ...): random-token benchmarks need no real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"t{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def weight_bytes(model) -> int:
    """Bytes of every distinct storage behind the model's parameters, buffers and 4-bit quant states.

    On the CPU there are no allocator statistics, so this is how the CPU run measures weights:
    packed 4-bit data, absmax (and the double-quant state), bf16/fp32 tensors, tied weights once.
    """
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    return sum(seen.values())


PEERS = ("unsloth", "liger")  # benchmark peers: never imported by the package outside this file's child processes
FAST_VARIANTS = {  # benchmark method -> enable_fast_path keywords: one lever on or off against `fast`
    "fast": {}, "fast_keep": {"keep_weight": True}, "fast_compiled": {"compile_layers": True},
    "fast_eager": {"compile_layers": False}, "fast_dense_window": {"window_attention": False},
    "fast_bnb_dequant": {"triton_dequant": False},
    "fast_full_recompute": {"lean_recompute": False}}
METHODS = ("qlora", "lora", *FAST_VARIANTS, *PEERS)
METHOD_LABELS = {"qlora": "QLoRA NF4+DQ", "lora": "bf16 LoRA", "fast": "QLoRA fast path (qlora_nb.fast)",
                 "fast_keep": "fast path, dequantized weights kept for backward",
                 "fast_compiled": "fast path, decoder layers compiled",
                 "fast_eager": "fast path, decoder layers not compiled",
                 "fast_dense_window": "fast path, sliding window as sdpa's dense mask",
                 "fast_bnb_dequant": "fast path, bitsandbytes' dequantization",
                 "fast_full_recompute": "fast path, recompute forms down_proj's output too",
                 "unsloth": "Unsloth QLoRA", "liger": "QLoRA + Liger kernels"}


def _peer_missing(method: str) -> str | None:
    """None when the peer library for `method` imports, else what to do about it."""
    import importlib.util

    module = {"unsloth": "unsloth", "liger": "liger_kernel"}.get(method)
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return (f"{module} is not installed in this process: build it with `bash ../shared/device/build-site.sh peers` "
            "and set QLORA_NB_PEERS to the unpacked folder (e.g. /tmp/peers); it is a benchmark peer, never a dependency")


def _load_unsloth(model_dir, seq: int, rank: int, checkpointing: bool):
    import torch
    from unsloth import FastLanguageModel  # noqa: import patches transformers; only in this child process

    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=rank, lora_alpha=ALPHA, lora_dropout=0, bias="none", random_state=0,
        target_modules=list(ALL_PROJECTIONS), use_gradient_checkpointing="unsloth" if checkpointing else False)
    return model


def load_for_bench(model_dir: str | Path, method: str, checkpointing: bool = True, rank: int = RANK, seq: int = 2048):
    """The model as each method trains it: (model in train mode, weight bytes right after loading).

    qlora: the notebooks' plain path (NF4+DQ, prepare_model_for_kbit_training, LoRA dropout 0.05).
    lora: bf16 base. fast: NF4+DQ + `fast.enable_fast_path` (LoRA dropout 0); fast_keep, fast_compiled,
    fast_dense_window, fast_full_recompute, ...: the same with one lever changed (FAST_VARIANTS). liger: the
    plain path after `apply_liger_kernel_to_mistral()`. unsloth: `FastLanguageModel` in 4-bit.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from . import fast, models

    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(METHODS)}")
    cuda = torch.cuda.is_available()
    if method == "unsloth":
        model = _load_unsloth(model_dir, seq, rank, checkpointing)
        model.train()
        return model, torch.cuda.memory_allocated() if cuda else weight_bytes(model)
    if method == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_mistral
        apply_liger_kernel_to_mistral()
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if cuda:
        kwargs["device_map"] = {"": 0}
    if method != "lora":
        kwargs["quantization_config"] = models.nf4_config()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if method != "lora":
        models.plain_4bit_kernels(model)
    loaded = torch.cuda.memory_allocated() if cuda else weight_bytes(model)
    gc_kwargs = {"use_reentrant": False}
    if method in ("qlora", "liger"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif method == "lora" and checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.config.use_cache = False
    fast_path = method in FAST_VARIANTS
    lora = LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0 if fast_path else DROPOUT, bias="none",
                      task_type="CAUSAL_LM", target_modules=list(ALL_PROJECTIONS))
    model = get_peft_model(model, lora)
    if fast_path:
        fast.enable_fast_path(model, checkpointing=checkpointing, offload=checkpointing and cuda,
                              **FAST_VARIANTS[method])
    model.train()
    return model, loaded


def step_loss(model, method: str, ids):
    """The training loss of one batch for `method` (labels = inputs): the fast path's chunked loss, else model(...).loss."""
    if method in FAST_VARIANTS:
        from . import fast
        return fast.causal_lm_loss(model, ids, ids)
    return model(input_ids=ids, labels=ids).loss


def _train_steps(model, cfg: BenchConfig, loaded: int, after_setup: int) -> dict:
    """Train `cfg.warmup + cfg.steps` steps of random tokens on a loaded model; the measurements (bytes, seconds)."""
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device = model.get_input_embeddings().weight.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times, phases, losses = [], {}, []
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for step in range(cfg.warmup + cfg.steps):
        ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
        last = step == cfg.warmup + cfg.steps - 1
        sync()
        t0 = time.perf_counter()
        if cuda and last:
            peak_so_far = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss = step_loss(model, cfg.method, ids)  # the output (and any logits) is dropped at once
        if cuda and last:
            phases["forward_peak"] = torch.cuda.max_memory_allocated()
            phases["after_forward"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss.backward()
        if cuda and last:
            phases["backward_peak"] = torch.cuda.max_memory_allocated()
            phases["after_backward"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if cuda and last:
            phases["optimizer_peak"] = torch.cuda.max_memory_allocated()
            phases["end_of_step"] = torch.cuda.memory_allocated()
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        del loss
    peak = max([peak_so_far, *phases.values()]) if cuda else None
    trainable = sum(p.numel() for p in params)
    med = statistics.median(times)
    del optimizer
    return {**dataclasses.asdict(cfg), "tokens_per_step": cfg.seq * cfg.batch,
            "weight_bytes_after_load": loaded, "bytes_after_setup": after_setup,
            "peak_allocated_bytes": peak, "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "phases": phases, "trainable_params": trainable, "losses": losses,
            "step_seconds": {"median": med, "min": min(times), "max": max(times), "all": times},
            "tokens_per_second": cfg.seq * cfg.batch / med, "loss_finite": all(x == x for x in losses)}


def measure_group(model_dir: str | Path, cfgs: list[BenchConfig]) -> list[dict]:
    """Load the model once for `cfgs` (all one method), then measure each shape, peak statistics reset in between."""
    import torch

    methods = {c.method for c in cfgs}
    if len(methods) != 1:
        raise ValueError(f"one method per process, got {sorted(methods)}")
    first = cfgs[0]
    missing = _peer_missing(first.method)
    if missing:
        runs = [{**dataclasses.asdict(c), "error": missing, "not_installed": True} for c in cfgs]
        for run in runs:
            print(json.dumps(run), flush=True)
        return runs
    torch.manual_seed(0)  # the same LoRA initialization for every method
    model, loaded = load_for_bench(model_dir, first.method, first.checkpointing, first.rank,
                                   seq=max(c.seq for c in cfgs))
    after_setup = torch.cuda.memory_allocated() if torch.cuda.is_available() else weight_bytes(model)
    from .fast import levers

    runs = []
    for cfg in cfgs:
        try:
            runs.append(_train_steps(model, cfg, loaded, after_setup))
            on = levers(model)
            if on is not None:
                runs[-1]["fast_path"] = on  # which levers this run had on
        except torch.OutOfMemoryError as e:  # record it and go on to the next shape
            runs.append({**dataclasses.asdict(cfg), "error": f"CUDA out of memory: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(runs[-1]), flush=True)
    return runs


def environment(device: str) -> dict:
    """Date (UTC), device name, library versions: what a result table must say."""
    import torch

    from .env import versions

    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "gpu": name, "versions": versions(("torch", "transformers", "peft", "bitsandbytes",
                                                                 "accelerate")),
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None}


def markdown_table(result: dict) -> str:
    """The results as a markdown table with a header line naming date, device and versions."""
    env = result["environment"]
    v = ", ".join(f"{k} {val}" for k, val in env["versions"].items())
    lines = [f"# LoRA / QLoRA step benchmark: {result['model']}", "",
             f"{env['date']} on {env['gpu']}; {v}.", "",
             "| method | seq x batch | weights after load (GiB) | peak allocated (GiB) | step s median (min, max) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        method = METHOD_LABELS.get(r["method"], r["method"])
        if "error" in r:
            error = r["error"].strip().splitlines()[-1][:160] if r["error"].strip() else "failed"
            lines.append(f"| {method} | {r['seq']}x{r['batch']} | error: {error} | | | |")
            continue
        peak = "-" if r["peak_allocated_bytes"] is None else f"{_gib(r['peak_allocated_bytes']):.2f}"
        s = r["step_seconds"]
        lines.append(f"| {method} | {r['seq']}x{r['batch']} | "
                     f"{_gib(r['weight_bytes_after_load']):.2f} | {peak} | "
                     f"{s['median']:.3f} ({s['min']:.3f}, {s['max']:.3f}) | {r['tokens_per_second']:,.0f} |")
    return "\n".join(lines) + "\n"


def run_all(device: str, out: str | Path, configs=None, model_dir: str | Path | None = None,
            warmup: int | None = None, steps: int | None = None, timeout: float = 900) -> dict:
    """Run every configuration in its own process; write and return {'environment', 'model', 'runs'}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configs or (GPU_CONFIGS if device == "cuda" else CPU_CONFIGS)
    tmp = None
    if model_dir is None:
        if device == "cuda":
            tmp = tempfile.TemporaryDirectory(prefix="bench-mistral7b-")
            model_dir = build_random_mistral(tmp.name)
            model = "Mistral-7B shape (MistralConfig() defaults), random weights"
        else:
            from .models import embedded_base_path
            model_dir = embedded_base_path()
            model = "embedded SmolLM2-135M"
    else:
        built = not (Path(model_dir) / "config.json").exists()
        if built:
            if device != "cuda":
                raise FileNotFoundError(f"--model-dir {model_dir} holds no config.json; on the CPU pass a saved model")
            build_random_mistral(model_dir)
        c = json.loads((Path(model_dir) / "config.json").read_text())
        model = ("Mistral-7B shape (MistralConfig() defaults), random weights" if built else
                 f"{c['model_type']} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                 f"vocab {c['vocab_size']}) from {Path(model_dir).name}")
    result = {"environment": environment(device), "model": model, "runs": []}
    default_warmup, default_steps = (2, 12) if device == "cuda" else (0, 1)
    by_method: dict[str, list[BenchConfig]] = {}
    for method, seq, batch in configs:
        by_method.setdefault(method, []).append(
            BenchConfig(method, seq, batch, warmup if warmup is not None else default_warmup,
                        steps if steps is not None else default_steps))
    for method, cfgs in by_method.items():
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")) \
            if device == "cuda" else dict(os.environ, CUDA_VISIBLE_DEVICES="")
        if method in PEERS and os.environ.get("QLORA_NB_PEERS"):
            # peers pin their own trl/datasets: their folder replaces the project's stack in this child only
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join([os.environ["QLORA_NB_PEERS"], root])
        cmd = [sys.executable, "-m", "qlora_nb.bench", "--group",
               json.dumps([dataclasses.asdict(c) for c in cfgs]), "--model-dir", str(model_dir)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            out_lines, err = proc.stdout.splitlines(), (proc.stderr or proc.stdout)[-2000:]
        except subprocess.TimeoutExpired as e:
            out_lines, err = (e.stdout or b"").decode(errors="replace").splitlines(), f"timed out after {timeout} s"
            proc = None
        done = [json.loads(x) for x in out_lines if x.startswith("{")]
        for cfg in cfgs[len(done):]:  # shapes the process never reached: it crashed or ran out of time
            done.append({**dataclasses.asdict(cfg), "error": err.strip() or f"exit status {proc and proc.returncode}"})
        seconds = round(time.perf_counter() - t0, 1)
        for run in done:
            run["process_seconds"] = seconds
            result["runs"].append(run)
            print(f"{run['method']} {run['seq']}x{run['batch']}: " + (run.get("error", "")[-300:] or
                  f"peak {run['peak_allocated_bytes']} tok/s {run['tokens_per_second']:.0f}"), flush=True)
        (out / f"bench_{device}.json").write_text(json.dumps(result, indent=1))
        (out / f"bench_{device}.md").write_text(markdown_table(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def load_step_costs(path=None) -> dict:
    """The op-by-op H100 timings of benchmarks/step_costs.py (data/bench/step_costs_2048.json)."""
    from .paths import recorded_json

    return recorded_json("bench/step_costs_2048.json",
                         "python benchmarks/step_costs.py --out data/bench/step_costs_2048.json", path)


def load_finetune_smoke(path=None) -> dict:
    """Notebook 05's train.finetune on a random 7B-shaped Mistral in 4-bit, as recorded on an H100.

    {"environment": date, gpu, versions; "model"; "runs": [{"seq_len", "batch_size",
    "peak_gpu_memory_gib", "median_step_seconds", "tokens_per_second", ...}]} from
    data/bench/finetune_smoke_cuda.json (benchmarks/gpu_finetune_smoke.py).
    """
    from .paths import recorded_json

    return recorded_json("bench/finetune_smoke_cuda.json",
                         "python benchmarks/gpu_finetune_smoke.py --out data/bench/finetune_smoke_cuda.json", path)


def load_gpu_latency(path=None) -> dict:
    """Notebook 07's serving choices (4-bit, 4-bit + adapter, bf16 + adapter, bf16 merged) timed on an H100.

    {"environment", "model", "adapter", "new_tokens", "variants": [{"label", "tokens_per_s",
    "weights_gib", "peak_gpu_memory_gib", ...}], "logit_checks"} from data/bench/latency_cuda.json
    (benchmarks/gpu_latency.py).
    """
    from .paths import recorded_json

    return recorded_json("bench/latency_cuda.json", "python benchmarks/gpu_latency.py --out data/bench/latency_cuda.json",
                         path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="data/bench", help="folder for bench_<device>.json / .md")
    parser.add_argument("--model-dir", default=None, help="a saved model to load instead of building one")
    parser.add_argument("--configs", default=None, help="e.g. 'qlora:2048x1,lora:2048x1' (default: all)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per shape (default 2 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per shape (default 12 on CUDA)")
    parser.add_argument("--group", default=None, help=argparse.SUPPRESS)  # child: BenchConfigs of one method, JSON
    args = parser.parse_args(argv)
    if args.group:
        import warnings
        warnings.filterwarnings("ignore")
        measure_group(args.model_dir, [BenchConfig(**c) for c in json.loads(args.group)])  # prints a line per shape
        return
    configs = None
    if args.configs:
        configs = []
        for item in args.configs.split(","):
            method, shape = item.split(":")
            seq, batch = shape.split("x")
            configs.append((method, int(seq), int(batch)))
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here. Use --device cpu (embedded model, tiny shapes).")
    result = run_all(args.device, args.out, configs, args.model_dir, warmup=args.warmup, steps=args.steps)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
