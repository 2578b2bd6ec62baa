"""GPU smoke test of notebook 05's code path on a Mistral-7B-shaped model with random weights.

Builds `MistralConfig()` (the 7B shape: 32 layers, hidden 4096, 32768-token vocabulary) with
random bf16 weights on the GPU, saves it to /tmp, and runs `train.finetune` on it in 4-bit
NF4 with the triage data for a few steps at each sequence length, every batch padded to
that length so a step really holds batch_size x seq_len tokens. Prints one JSON line per
length: peak GPU memory (torch.cuda.max_memory_allocated) and median step time.

Leaves out: answer quality (random weights), the Hugging Face Hub (unreachable on the GPU
machine), and the embedded model's cache: the tokenizer is a small BPE trained here on the
triage text with a Mistral-style [INST] chat template, which is all the padded steps need.

Usage (on a CUDA machine, from the repo root):
    python benchmarks/gpu_finetune_smoke.py --steps 10 --seq 512 2048 --batch-size 4 \
        --out data/bench/finetune_smoke_cuda.json     # also writes finetune_smoke_cuda.md beside it
    python benchmarks/gpu_finetune_smoke.py --tiny --steps 3 --seq 128 256 --batch-size 2   # CPU dry run

The JSON is {"environment": date, GPU, versions; "model"; "runs": one record per length};
notebook 05 renders it with `qlora_nb.bench.load_finetune_smoke`.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}")


def triage_tokenizer(rows: list[dict], vocab_size: int = 8000):
    """A byte-level BPE fast tokenizer trained on the rows' text, with <s>, </s>, [INST], [/INST] and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for r in rows for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    return fast


def build_random_mistral(folder: Path, tokenizer, tiny: bool = False) -> Path:
    """Save a MistralConfig() model (7B shape; tiny: 2 layers of width 64) with random bf16 weights to `folder`."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else {}
    config = MistralConfig(vocab_size=32768, **shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # init straight in bf16: 14.5 GB instead of 29 GB
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def markdown(result: dict) -> str:
    """The smoke runs as a markdown table, headed by date, GPU and versions."""
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [f"# Notebook 05's fine-tune on the GPU: {result['model']}", "",
             f"{env['date']} on {env['gpu']}; {versions}.", "",
             "| seq x batch | steps | peak GPU memory (GiB) | median step (s) | tokens/s | optimizer |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        peak = "-" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f}"
        lines.append(f"| {r['seq_len']}x{r['batch_size']} | {r['steps']} | {peak} | {r['median_step_seconds']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['optimizer']} |")
    return "\n".join(lines) + "\n"


def write_result(out: str | Path, result: dict) -> None:
    """`out` (JSON) and the markdown table beside it (same name, .md)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per sequence length")
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="sequence lengths (tokens)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--folder", default="/tmp/mistral-7b-random", help="where the random base is saved")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family: a CPU dry run of this script")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file (and .md beside it)")
    args = parser.parse_args(argv)

    import torch
    import trl

    from qlora_nb import data, train
    from qlora_nb.bench import environment

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("No CUDA GPU: this benchmark needs one (the CPU path is notebook 05's CI run).", file=sys.stderr)
        return 2
    rows = data.load_triage("train")
    eval_rows = data.load_triage("validation")[:8]
    t0 = time.perf_counter()
    folder = build_random_mistral(Path(args.folder + ("-tiny" if args.tiny else "")), triage_tokenizer(rows),
                                  tiny=args.tiny)
    build_seconds = time.perf_counter() - t0
    env = environment("cuda" if cuda else "cpu")
    env["versions"]["trl"] = trl.__version__
    model = (("tiny (2 layers, width 64) " if args.tiny else "") +
             "MistralConfig() shape, random weights; 4-bit NF4 + double quant, bf16 compute; "
             "LoRA r=16 on all 7 projections (train.FinetuneConfig defaults)")
    results = []
    for seq in args.seq:
        config = train.FinetuneConfig(base_model=str(folder), max_steps=args.steps, batch_size=args.batch_size,
                                      grad_accum=1, max_seq_length=seq, pad_to_max_length=True,
                                      learning_rate=2e-4, warmup_steps=1, eval_steps=args.steps,
                                      save_steps=args.steps, eval_limit=8, resume=False,
                                      output_dir=f"/tmp/gpu-smoke-runs/seq{seq}")
        t0 = time.perf_counter()
        result = train.finetune(config, progress=False, train_rows=rows, eval_rows=eval_rows)
        wall = time.perf_counter() - t0
        steps = result.step_seconds[1:] or result.step_seconds  # the first step includes CUDA warm-up
        median = statistics.median(steps)
        optim = train.sft_config(config, progress=False).optim
        record = {
            "seq_len": seq, "batch_size": args.batch_size, "steps": result.steps_run,
            "tokens_per_step": args.batch_size * seq,
            "peak_gpu_memory_gib": round(result.peak_gpu_memory_bytes / 2**30, 2) if cuda else None,
            "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes,  # torch.cuda.max_memory_allocated, training only
            "median_step_seconds": round(median, 3),
            "step_seconds": [round(t, 3) for t in result.step_seconds],  # every step, the warm-up one first
            "tokens_per_second": round(args.batch_size * seq / median, 1),
            "trainable_params": result.trainable_params,
            "final_train_loss": result.loss_history["train"][-1][1],
            "optimizer": getattr(optim, "value", optim),  # TrainingArguments holds an enum; keep its name
            "gradient_checkpointing": cuda,
            "finetune_wall_seconds": round(wall, 1), "build_base_seconds": round(build_seconds, 1),
        }
        print(json.dumps(record), flush=True)
        results.append(record)
        del result
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if args.out:  # after every length, so a run cut short still leaves what it measured
            write_result(args.out, {"environment": env, "model": model, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
