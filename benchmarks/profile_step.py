"""Where one training step's GPU time goes, by category and phase, for the plain QLoRA path and the fast path.

Leaves out: memory (qlora_nb.bench, peak_trace.py). Loads the model the way
`qlora_nb.bench` does for each method, runs two warm-up steps, then profiles one step with
torch.profiler and sums the CUDA kernel time each op launched, sorted into categories by the
names of the op and its callers: NF4 dequantization, matmuls, attention, cross-entropy,
optimizer, copies, and the rest (norms, RoPE, activations, casts). Phase = forward, backward
(which includes the checkpoint recompute) or optimizer, by when the op started. It also records the
median wall time of three unprofiled steps (wall_ms) and the GPU's busy time in the profiled one
(gpu_busy_ms, the union of its kernels): where wall_ms is well above gpu_busy_ms, the host sets the pace.

    python benchmarks/profile_step.py --model-dir /tmp/m7b --methods qlora fast --seq 2048 --batch 1 --out prof.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch

CATEGORIES = [  # first match wins; tested against the op name and its parents' names
    ("dequantize", re.compile(r"dequant", re.I)),
    ("attention", re.compile(r"scaled_dot_product|flash|efficient_attention|_cudnn_attention|sdpa", re.I)),
    ("cross_entropy", re.compile(r"cross_entropy|log_softmax|nll_loss|logsumexp|LinearCrossEntropy", re.I)),
    ("optimizer", re.compile(r"Optimizer\.step|adam|_foreach", re.I)),
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$", re.I)),
    ("copy", re.compile(r"aten::(copy_|_to_copy|to)$|Memcpy", re.I)),
]


def busy_ms(intervals) -> float:
    """Milliseconds during which at least one of the (start, end) intervals (microseconds) runs: their union.

    >>> busy_ms([(0, 1000), (500, 2000), (3000, 3500)])
    2.5
    """
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1000


def category(event) -> str:
    """The category of a profiler op event, from its own name first, then its callers' (nearest first)."""
    names, e = [], event
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    for name in names:
        for cat, pattern in CATEGORIES:
            if pattern.search(name):
                return cat
    return "other"


def profile_method(model_dir: str, method: str, seq: int, batch: int, top_n: int = 40) -> dict:
    """{phase: {category: ms}} of CUDA kernel time for one step of `method`, its total, and the `top_n` ops
    (and kernels) by their own GPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from qlora_nb import bench

    torch.manual_seed(0)
    model, _ = bench.load_for_bench(model_dir, method, seq=seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=bench.LR)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        with record_function("phase:forward"):
            loss = bench.step_loss(model, method, ids)
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(3):  # unprofiled, so the host's share of the step shows against gpu_busy_ms
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1000)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    phases = [(e.name.split(":")[1], e.time_range.start, e.time_range.end) for e in events
              if e.name.startswith("phase:")]
    table: dict[str, dict[str, float]] = {}
    for e in events:
        ms = getattr(e, "self_device_time_total", 0) / 1000
        if ms <= 0 or e.name.startswith("phase:"):
            continue
        phase = next((p for p, a, b in phases if a <= e.time_range.start <= b), "backward")  # engine thread ops
        cat = category(e)
        table.setdefault(phase, {}).setdefault(cat, 0.0)
        table[phase][cat] += ms
    top = sorted((a for a in prof.key_averages()
                  if getattr(a, "self_device_time_total", 0) > 0 and not a.key.startswith("phase:")),
                 key=lambda a: -a.self_device_time_total)[:top_n]
    kernels = [(e.time_range.start, e.time_range.end) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    del model, opt
    torch.cuda.empty_cache()
    return {"method": method, "seq": seq, "batch": batch,
            "ms": {p: {c: round(v, 2) for c, v in sorted(d.items())} for p, d in table.items()},
            "total_ms": round(sum(v for d in table.values() for v in d.values()), 1),
            "wall_ms": round(statistics.median(walls), 1), "gpu_busy_ms": round(busy_ms(kernels), 1),
            "top_ops": [{"name": a.key[:120], "ms": round(a.self_device_time_total / 1000, 2), "calls": a.count}
                        for a in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--methods", nargs="+", default=["qlora", "fast"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out")
    args = ap.parse_args()
    results = []
    if args.append:
        try:
            with open(args.out) as fh:
                results = json.load(fh)["runs"]
        except FileNotFoundError:
            pass
    for method in args.methods:
        results.append(profile_method(args.model_dir, method, args.seq, args.batch))
        print(json.dumps(results[-1]), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": results}, fh, indent=1)


if __name__ == "__main__":
    main()
