"""GPU generation speed of notebook 07's serving choices on a Mistral-7B-shaped model with random weights.

Four models side by side in one run, each answering the same triage prompt greedily at
batch 1, timed by `qlora_nb.serve.tokens_per_second` (interleaved rounds, median):
  - "4-bit base": NF4 + double quant, bf16 compute (`models.load_base(..., quantize="nf4")`),
  - "4-bit base + adapter": the same with a LoRA adapter attached (the model as trained in 05),
  - "bf16 base + adapter": bf16 weights with the adapter attached,
  - "bf16 merged": the bf16 base after `merge_and_unload` (07's shipped model).
The adapter is r=16, alpha 32 on all seven projections with random A and B (B is not left at
zero, so every LoRA product runs on real numbers and merging changes the weights); it is
made once on the bf16 base, saved, and loaded onto the other two, so all three carry the same
one (in fp32, peft's default for adapter weights). `logit_checks` records that the adapter moves
the 4-bit model's logits and how close the merged model stays to bf16 base + adapter.

Memory per variant: `weights_gib` is what loading it (and attaching the adapter) added to
torch.cuda.memory_allocated; `peak_gpu_memory_gib` is that plus the most one generate call
allocated on top, i.e. the peak the variant would reach alone on the GPU (CUDA context not counted).

Leaves out: answer quality (random weights), batching and sampling (serve.py's scope),
compiled or fused kernels, and the Hub (unreachable on the GPU machine): the base is the
random MistralConfig() folder and tokenizer of `gpu_finetune_smoke.py` (reused if it exists).

Usage (on a CUDA machine, from the repo root):
    python benchmarks/gpu_latency.py --repeats 3 --out data/bench/latency_cuda.json   # and latency_cuda.md
    python benchmarks/gpu_latency.py --tiny                                # CPU dry run on a 2-layer model
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

from gpu_finetune_smoke import build_random_mistral, triage_tokenizer  # same folder: the same random base

RANK, ALPHA = 16, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_B_STD = 0.02  # like the base's own init (initializer_range); B = 0 would make the adapter a no-op


def random_adapter(model, folder: Path, seed: int = 0):
    """`model` as a PeftModel with LoRA (r=16, alpha 32, all 7 projections), random A and B, saved to `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                  target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, LORA_B_STD)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def load_variant(base_dir: Path, quantize: str | None, adapter_dir: Path | None = None):
    """(model, bytes it added to torch.cuda.memory_allocated): the base in 4-bit ("nf4") or bf16 (None), adapter attached if given."""
    from peft import PeftModel

    from qlora_nb import models

    before = _allocated()
    model, _ = models.load_base(str(base_dir), quantize=quantize)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), _allocated() - before


def generate_peak_bytes(model, tokenizer, conversation: list[dict], new_tokens: int) -> int | None:
    """Most bytes one greedy generate of `new_tokens` allocates above what was allocated before it (None on the CPU)."""
    import torch

    from qlora_nb.merge import chat_batch, logit_gap, logits_of

    if not torch.cuda.is_available():
        return None
    batch = {k: v.cuda() for k, v in chat_batch(tokenizer, [conversation]).items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=tokenizer.pad_token_id)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def markdown(result: dict) -> str:
    """The variants as a markdown table, headed by date, GPU, versions and what was generated."""
    env = result["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [f"# Notebook 07's serving choices on the GPU: {result['model']}", "",
             f"{env['date']} on {env['gpu']}; {versions}.", "",
             f"Greedy generation, batch 1, a {result['prompt_tokens']}-token triage prompt, exactly "
             f"{result['new_tokens']} new tokens, median of {result['repeats']} interleaved rounds "
             f"(`qlora_nb.serve.tokens_per_second`). Adapter: {result['adapter']}.", "",
             "| model | tokens/s | s per generate | weights (GiB) | peak GPU memory (GiB) |",
             "| --- | --- | --- | --- | --- |"]
    for v in result["variants"]:
        peak = "-" if v["peak_gpu_memory_gib"] is None else f"{v['peak_gpu_memory_gib']:.2f}"
        weights = "-" if v["weights_gib"] is None else f"{v['weights_gib']:.2f}"
        lines.append(f"| {v['label']} | {v['tokens_per_s']:.1f} | {v['seconds']:.3f} | {weights} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens each generate call makes (default 64; tiny 8)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 5; tiny 2)")
    parser.add_argument("--folder", default="/tmp/mistral-7b-random", help="the random base (built if missing)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family: a CPU dry run")
    parser.add_argument("--out", default=None, help="write the results to this JSON file (and .md beside it)")
    args = parser.parse_args(argv)

    import torch

    from qlora_nb import data, evaluate, models, serve
    from qlora_nb.bench import environment
    from qlora_nb.merge import chat_batch, logit_gap, logits_of

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("No CUDA GPU: this benchmark needs one (the CPU latency is notebook 07's own cell).", file=sys.stderr)
        return 2
    new_tokens = args.new_tokens or (8 if args.tiny else 64)
    repeats = args.repeats or (2 if args.tiny else 5)
    base_dir = build_random_mistral(Path(args.folder + ("-tiny" if args.tiny else "")),
                                    triage_tokenizer(data.load_triage("train")), tiny=args.tiny)
    tokenizer = models.load_tokenizer(str(base_dir))
    conversation = evaluate.prompt_of(data.load_triage("test")[0])

    adapter_dir = Path(tempfile.mkdtemp(prefix="latency-adapter-")) / "adapter"
    before = _allocated()
    bf16_adapter = random_adapter(models.load_base(str(base_dir), quantize=None)[0], adapter_dir)
    bf16_adapter_bytes = _allocated() - before
    merged, before_merge = load_variant(base_dir, None, adapter_dir)
    before = _allocated()
    merged = merged.merge_and_unload()  # drops the wrapper: the LoRA tensors are freed with it
    gc.collect()
    merged_bytes = before_merge + _allocated() - before
    variants = {"4-bit base": load_variant(base_dir, "nf4"),  # label -> (model, weight bytes)
                "4-bit base + adapter": load_variant(base_dir, "nf4", adapter_dir),
                "bf16 base + adapter": (bf16_adapter, bf16_adapter_bytes),
                "bf16 merged": (merged, merged_bytes)}

    speed = serve.tokens_per_second({label: m for label, (m, _) in variants.items()}, tokenizer, conversation,
                                    new_tokens=new_tokens, repeats=repeats)
    rows = []
    for label, (model, weights) in variants.items():
        extra = generate_peak_bytes(model, tokenizer, conversation, new_tokens)
        rows.append({"label": label, "tokens_per_s": round(speed[label]["tokens_per_s"], 2),
                     "seconds": round(speed[label]["seconds"], 4),
                     "weights_gib": round(weights / 2**30, 3) if cuda else None,
                     "peak_gpu_memory_gib": round((weights + extra) / 2**30, 3) if cuda else None,
                     "weights_bytes": weights if cuda else None, "generate_extra_bytes": extra})
        print(json.dumps(rows[-1]), flush=True)
    batch = chat_batch(tokenizer, [conversation])
    prompt_tokens = batch["input_ids"].shape[1]
    logits = {label: logits_of(m, batch) for label, (m, _) in variants.items()}
    checks = {  # the adapter is not a no-op, and merging keeps what it does (bf16 rounding aside)
        "adapter_moves_4bit_logits": logit_gap(logits["4-bit base"], logits["4-bit base + adapter"], batch["attention_mask"]),
        "merged_vs_bf16_adapter": logit_gap(logits["bf16 merged"], logits["bf16 base + adapter"], batch["attention_mask"])}
    print(json.dumps(checks), flush=True)
    result = {"environment": environment("cuda" if cuda else "cpu"),
              "model": ("tiny (2 layers, width 64) " if args.tiny else "") + "MistralConfig() shape, random bf16 weights",
              "adapter": f"LoRA r={RANK}, alpha {ALPHA} on {', '.join(TARGETS)}; random A, B ~ N(0, {LORA_B_STD}^2)",
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "batch_size": 1,
              "variants": rows, "logit_checks": checks}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
