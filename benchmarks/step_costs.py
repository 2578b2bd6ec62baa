"""Where the QLoRA step's extra time goes, measured op by op on a CUDA GPU: 4-bit dequantization and fp32 attention.

Leaves out: memory (qlora_nb.bench, peak_trace.py) and the full model. For the seven
Mistral-7B projection shapes at n tokens it times, with CUDA events (median of 20 after
warm-up), the forward and the input-gradient backward of a frozen bf16 nn.Linear and of a
bitsandbytes NF4+DQ Linear4bit, and dequantize_4bit alone; and sdpa at one layer's shape
in bf16 (GQA, flash) and in fp32 (GQA: only the math kernel accepts it), forward + backward.
A checkpointed step runs each forward twice and each backward once, so per step:
    linear cost = 32 layers * (2 * forward + backward), attention likewise.

    python benchmarks/step_costs.py --tokens 2048 --out step_costs.json
"""
from __future__ import annotations

import argparse
import json

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def linear_costs(n: int) -> dict:
    out = {}
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02
        dense = torch.nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        dense.weight.copy_(w)
        packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        q = lambda t: bnb.matmul_4bit(t, packed, quant_state=state)  # what Linear4bit.forward calls
        x = torch.randn(n, i, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(n, o, device="cuda", dtype=torch.bfloat16)
        row = {}
        for label, layer in (("bf16", dense), ("nf4", q)):
            row[f"{label}_fwd_ms"] = median_ms(lambda: layer(x))
            row[f"{label}_fwd_bwd_ms"] = median_ms(lambda: torch.autograd.grad(layer(x), x, g))
        row["dequant_ms"] = median_ms(lambda: bnb.functional.dequantize_4bit(packed, state))
        out[name] = row
        del dense, q, x, g, w, packed
    return out


def attention_costs(n: int, heads: int = 32, kv: int = 8, d: int = 128) -> dict:
    out = {}
    for label, dt in (("bf16_flash_gqa", torch.bfloat16), ("fp32_math_gqa", torch.float32)):
        q = torch.randn(1, heads, n, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(1, kv, n, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(1, kv, n, d, device="cuda", dtype=dt, requires_grad=True)
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        g = torch.randn(1, heads, n, d, device="cuda", dtype=dt)
        out[label] = {"fwd_ms": median_ms(f), "fwd_bwd_ms": median_ms(lambda: torch.autograd.grad(f(), (q, k, v), g))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    lin, att = linear_costs(a.tokens), attention_costs(a.tokens)
    layers = 32

    def per_step(fwd, fwd_bwd):  # checkpointing: forward, recompute forward, backward
        return layers * (fwd + fwd_bwd) / 1e3

    summary = {
        "linear_bf16_s": per_step(sum(r["bf16_fwd_ms"] for r in lin.values()), sum(r["bf16_fwd_bwd_ms"] for r in lin.values())),
        "linear_nf4_s": per_step(sum(r["nf4_fwd_ms"] for r in lin.values()), sum(r["nf4_fwd_bwd_ms"] for r in lin.values())),
        "dequant_only_s": layers * 3 * sum(r["dequant_ms"] for r in lin.values()) / 1e3,
        "attention_bf16_s": per_step(att["bf16_flash_gqa"]["fwd_ms"], att["bf16_flash_gqa"]["fwd_bwd_ms"]),
        "attention_fp32_s": per_step(att["fp32_math_gqa"]["fwd_ms"], att["fp32_math_gqa"]["fwd_bwd_ms"]),
    }
    result = {"tokens": a.tokens, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "bitsandbytes": bnb.__version__, "linear": lin, "attention": att, "per_step_seconds": summary}
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
