"""What is alive at the peak of one training step on a CUDA GPU, grouped by the line of code that allocated it.

Leaves out: timing (qlora_nb.bench) and prediction (qlora_nb.memory). A diagnostic for
calibrating the planner from first principles: it replays CUDA's allocator trace of one
step (after a warm-up step), finds the moment of peak allocation, and lists the blocks
alive then by their allocating frame (file:line function), with sizes in MiB.

    python benchmarks/peak_trace.py --model-dir DIR --method qlora --seq 2048 --batch 1 --out trace.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from qlora_nb.bench import load_for_bench

SKIP = ("torch/utils/_", "torch/_ops.py", "torch/_tensor.py", "torch/nn/modules/module.py", "torch/_library",
        "torch/autograd/function.py", "torch/autograd/graph.py", "torch/_compile", "torch/_dynamo", "<")


def frame_key(frames: list[dict], depth: int = 2) -> str:
    """The innermost `depth` Python frames worth reading (skipping torch plumbing), as 'file:line name'."""
    keep = []
    for f in frames:
        name = f.get("filename", "")
        if not name.endswith(".py") or any(s in name for s in SKIP):
            continue
        short = "/".join(name.split("/")[-2:])
        keep.append(f"{short}:{f.get('line')} {f.get('name')}")
        if len(keep) == depth:
            break
    return " <- ".join(keep) or "(no python frame)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """(peak bytes above the start, {addr: event}) from one device's allocator trace."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: dict[int, dict] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--method", default="qlora")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model, loaded = load_for_bench(a.model_dir, a.method)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    dev = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device=dev)
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=400_000, context="alloc", stacks="python")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, live = live_at_peak(snap["device_traces"][0])
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[frame_key(ev.get("frames", []))]
        g[0] += 1
        g[1] += ev["size"]
    rows = sorted(((k, n, b) for k, (n, b) in groups.items()), key=lambda r: -r[2])
    out = {"method": a.method, "seq": a.seq, "batch": a.batch, "weights_after_load": loaded,
           "base_at_step_start": base, "traced_peak_above_base": peak,
           "max_memory_allocated": torch.cuda.max_memory_allocated(),
           "live_at_peak": [{"where": k, "blocks": n, "mib": round(b / 2**20, 1)} for k, n, b in rows[:60]]}
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"{a.method} {a.seq}x{a.batch}: base {base/2**30:.2f} GiB + peak {peak/2**30:.2f} GiB "
          f"(max_memory_allocated {torch.cuda.max_memory_allocated()/2**30:.2f} GiB)")
    for k, n, b in rows[:25]:
        print(f"{b/2**20:9.1f} MiB  {n:4d}  {k}")


if __name__ == "__main__":
    main()
