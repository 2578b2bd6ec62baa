"""Read the recorded GPU runs of the fast path (data/bench/fast/) and turn them into notebook 09's tables and figures.

Leaves out: measuring (qlora_nb.bench, benchmarks/fast_bench.sh, benchmarks/profile_step.py
produce the JSON on a GPU) and the fast path itself (fast.py). Everything here runs without
a GPU, so notebook 09 renders anywhere.

Files (each written by one device run; see data/bench/fast/README.md):
* bench_fast_cuda.json: the side-by-side run: plain, fast and Unsloth at four shapes, one run.
* bench_fast_first_cuda.json, bench_fast_eager_cuda.json: earlier runs, one lever fewer each.
* profile_step_2048x1.json: GPU kernel time of one step by category, plain vs fast.

>>> rows = side_by_side(load_run("final"))
>>> [r["shape"] for r in rows]
['512x4', '2048x1', '2048x4', '8192x1']
"""
from __future__ import annotations

from .paths import recorded_json

RUNS = {"final": "bench_fast_cuda.json", "first": "bench_fast_first_cuda.json",
        "eager": "bench_fast_eager_cuda.json"}
SHAPES = ["512x4", "2048x1", "2048x4", "8192x1"]
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet: bf16 tensor-core peak without sparsity
GIB = 2**30


def load_run(name: str = "final") -> dict:
    """One recorded benchmark run ({'environment', 'model', 'runs'}) by name: final, first or eager."""
    return recorded_json(f"bench/fast/{RUNS[name]}", "bash benchmarks/fast_bench.sh (see data/bench/fast/README.md)")


def load_profile() -> dict:
    """The per-category GPU kernel time of one step (benchmarks/profile_step.py), plain and fast."""
    return recorded_json("bench/fast/profile_step_2048x1.json", 'PROFILE="fast qlora" bash benchmarks/fast_bench.sh')


def run_of(result: dict, method: str, shape: str) -> dict | None:
    """The measured run of `method` at shape 'SEQxBATCH', or None if the run lacks it or it failed."""
    seq, batch = (int(x) for x in shape.split("x"))
    for r in result["runs"]:
        if r["method"] == method and r["seq"] == seq and r["batch"] == batch and "error" not in r:
            return r
    return None


def side_by_side(result: dict, methods=("qlora", "fast", "unsloth")) -> list[dict]:
    """Per shape: tokens/s and peak GiB of each method, fast's speed over plain and over Unsloth, memory vs Unsloth."""
    rows = []
    for shape in SHAPES:
        row = {"shape": shape}
        for m in methods:
            r = run_of(result, m, shape)
            row[f"{m}_tok_s"] = r["tokens_per_second"] if r else None
            row[f"{m}_peak_gib"] = r["peak_allocated_bytes"] / GIB if r else None
        if row.get("fast_tok_s") and row.get("qlora_tok_s"):
            row["fast_over_plain"] = row["fast_tok_s"] / row["qlora_tok_s"]
        if row.get("fast_tok_s") and row.get("unsloth_tok_s"):
            row["fast_over_unsloth"] = row["fast_tok_s"] / row["unsloth_tok_s"]
            row["fast_memory_le_unsloth"] = row["fast_peak_gib"] <= row["unsloth_peak_gib"]
        rows.append(row)
    return rows


def milestones(result: dict, bf16_lora: dict | None = None) -> dict[str, bool]:
    """The issue's three milestones, judged on one run (bf16 LoRA from `bf16_lora`, a run that has it).

    1: bf16-LoRA speed at 2048x4 at no more than the plain path's peak;
    2: at least 2x the plain path at all four shapes;
    3: Unsloth's tokens/s at 2048x4 and 8192x1, at no more than its peak memory.
    """
    rows = {r["shape"]: r for r in side_by_side(result)}
    lora = run_of(bf16_lora or result, "lora", "2048x4")
    fast, plain = run_of(result, "fast", "2048x4"), run_of(result, "qlora", "2048x4")
    m1 = bool(lora and fast and plain and fast["tokens_per_second"] >= lora["tokens_per_second"]
              and fast["peak_allocated_bytes"] <= plain["peak_allocated_bytes"])
    m2 = all((rows[s].get("fast_over_plain") or 0) >= 2 for s in SHAPES)
    m3 = all((rows[s].get("fast_over_unsloth") or 0) >= 1 and rows[s].get("fast_memory_le_unsloth")
             for s in ("2048x4", "8192x1"))
    return {"1: bf16-LoRA speed at <= plain peak": m1, "2: >= 2x plain at all four shapes": m2,
            "3: >= Unsloth at 2048x4 and 8192x1, <= its memory": m3}


def lever_steps(shape: str = "2048x4") -> list[dict]:
    """The fast path built up lever by lever at one shape: label, tokens/s, peak GiB, and which run measured it."""
    final, first, eager = load_run("final"), load_run("first"), load_run("eager")
    steps = [("plain path: prepare_model_for_kbit_training + peft + bitsandbytes", final, "qlora"),
             ("+ bf16 residual, fused NF4+LoRA linear, offloaded checkpoints, chunked CE", first, "fast"),
             ("+ RMSNorm / SwiGLU backwards that recompute, eager (fp32 temporaries)", eager, "fast"),
             ("+ the same, fused by torch.compile", final, "fast")]
    out = []
    for label, result, method in steps:
        r = run_of(result, method, shape)
        out.append({"step": label, "tokens_per_second": r["tokens_per_second"],
                    "peak_gib": r["peak_allocated_bytes"] / GIB, "run": result["environment"]["date"]})
    return out


def achieved_tflops(tokens_per_second: float, seq: int, peak: float = H100_BF16_DENSE_TFLOPS) -> tuple[float, float]:
    """(TFLOP/s, fraction of the GPU's bf16 peak) for a Mistral-7B LoRA step at `seq`, counting memory.flops_per_token."""
    from .memory import MODELS, flops_per_token

    tflops = tokens_per_second * flops_per_token(MODELS["mistral-7b"], seq)["total"] / 1e12
    return tflops, tflops / peak


def plot_levers(axes, steps: list[dict], unsloth: dict | None = None, lora: dict | None = None, shape: str = "2048x4"):
    """Two bar charts (tokens/s, peak GiB) of the lever steps, with Unsloth and bf16 LoRA as dashed reference lines."""
    from .plots import label

    names = [f"{i}" for i in range(len(steps))]
    for ax, key, unit, title in ((axes[0], "tokens_per_second", "tokens per second", "Speed"),
                                 (axes[1], "peak_gib", "peak allocated memory (GiB)", "Memory")):
        ax.bar(names, [s[key] for s in steps], color=["0.6"] + ["C0"] * (len(steps) - 1))
        for ref, name, color in ((unsloth, "Unsloth", "C3"), (lora, "bf16 LoRA", "C2")):
            if ref:
                value = ref["tokens_per_second"] if key == "tokens_per_second" else ref["peak_allocated_bytes"] / GIB
                ax.axhline(value, ls="--", color=color, label=f"{name}: {value:,.1f}" if key == "peak_gib"
                           else f"{name}: {value:,.0f}")
        label(ax, f"{title} at {shape}, lever by lever", "step (see the table above)", unit, legend=True)


def plot_profile(ax, profile: dict):
    """Stacked bars: GPU kernel milliseconds per category for each profiled method (one step)."""
    from .plots import label

    cats = sorted({c for run in profile["runs"] for phase in run["ms"].values() for c in phase})
    bottoms = [0.0] * len(profile["runs"])
    names = [{"qlora": "plain path", "fast": "fast path"}.get(run["method"], run["method"]) for run in profile["runs"]]
    for i, cat in enumerate(cats):
        vals = [sum(phase.get(cat, 0.0) for phase in run["ms"].values()) for run in profile["runs"]]
        ax.bar(names, vals, bottom=bottoms, label=cat, color=f"C{i}")
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    run0 = profile["runs"][0]
    label(ax, f"GPU time of one step at {run0['seq']}x{run0['batch']} by category", "path",
          "kernel time (ms, profiled)", legend=True)
