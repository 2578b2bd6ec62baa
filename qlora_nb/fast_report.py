"""Read the recorded GPU runs of the fast path (data/bench/fast/) and turn them into notebook 09's tables and figures.

Leaves out: measuring (qlora_nb.bench, benchmarks/fast_bench.sh, benchmarks/profile_step.py
produce the JSON on a GPU) and the fast path itself (fast.py). Everything here runs without
a GPU, so notebook 09 renders anywhere.

Files (each written by one device run; see data/bench/fast/README.md):
* bench_fast_cuda.json: the side-by-side run: plain, fast and Unsloth at four shapes, one run.
* bench_fast_first_cuda.json, bench_fast_eager_cuda.json: earlier runs, one lever fewer each.
* profile_step_2048x1.json: GPU kernel time of one step by category, plain vs fast.
* bench_fast_liger_h200_cuda.json (name "liger_h200"): plain, plain + Liger Kernel, fast and Unsloth at
  2048x1 and 8192x1, one run on an H200 (a different GPU: compare its ratios, not its tokens/s, with the H100's).

>>> rows = side_by_side(load_run("final"))
>>> [r["shape"] for r in rows]
['512x4', '2048x1', '2048x4', '8192x1']
>>> [r["shape"] for r in side_by_side(load_run("liger_h200"))]
['2048x1', '8192x1']
"""
from __future__ import annotations

from .paths import recorded_json

RUNS = {"final": "bench_fast_cuda.json", "first": "bench_fast_first_cuda.json",
        "eager": "bench_fast_eager_cuda.json"}  # any other name N reads bench_fast_N_cuda.json
SHAPES = ["512x4", "2048x1", "2048x4", "8192x1"]
METHODS = ("qlora", "liger", "fast", "unsloth")  # side_by_side's columns, in this order, where a run has them
LABELS = {"qlora": "plain path", "liger": "plain path + Liger", "fast": "fast path", "unsloth": "Unsloth"}
# (key, numerator, denominator): tokens/s ratios side_by_side adds to a row when both methods ran at that shape
RATIOS = (("liger_over_plain", "liger", "qlora"), ("fast_over_plain", "fast", "qlora"),
          ("fast_over_liger", "fast", "liger"), ("fast_over_unsloth", "fast", "unsloth"))
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet: bf16 tensor-core peak without sparsity
GIB = 2**30


def load_run(name: str = "final") -> dict:
    """One recorded benchmark run ({'environment', 'model', 'runs'}) by name.

    final, first and eager are the H100 runs named in RUNS; any other name N reads
    data/bench/fast/bench_fast_N_cuda.json, e.g. "liger_h200" -> bench_fast_liger_h200_cuda.json.
    A missing file raises FileNotFoundError naming the command that writes it.
    """
    file = RUNS.get(name, f"bench_fast_{name}_cuda.json")
    return recorded_json(f"bench/fast/{file}", "bash benchmarks/fast_bench.sh (see data/bench/fast/README.md)")


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


def side_by_side(result: dict, methods=None, shapes=None) -> list[dict]:
    """Per shape, one row: tokens/s and peak GiB of each method, and the tokens/s ratios between them.

    methods: default, those of METHODS (qlora = plain path, liger = plain path + Liger Kernel, fast,
    unsloth) that the run measured at any shape. shapes: default, every 'SEQxBATCH' where one of them
    ran, shortest first. A row holds 'shape', '<method>_tok_s' (tokens per second), '<method>_peak_gib'
    (peak allocated GiB; both None where that method failed or did not run at the shape), each ratio of
    RATIOS whose two methods ran ('liger_over_plain', 'fast_over_plain', 'fast_over_liger',
    'fast_over_unsloth': numerator's tokens/s over denominator's), and, with Unsloth,
    'fast_memory_le_unsloth' (fast's peak <= Unsloth's).

    Worked example: plain 1,000 tok/s, Liger 1,250, fast 3,000, Unsloth 2,500 at 2048x1 give
    liger_over_plain 1.25, fast_over_plain 3.0, fast_over_liger 2.4, fast_over_unsloth 1.2.

    >>> run = lambda m, tok: {"method": m, "seq": 2048, "batch": 1, "tokens_per_second": tok,
    ...                       "peak_allocated_bytes": 5 * GIB}
    >>> row, = side_by_side({"runs": [run("qlora", 1000.0), run("liger", 1250.0), run("fast", 3000.0),
    ...                                run("unsloth", 2500.0)]})
    >>> [row[k] for k in ("shape", "liger_over_plain", "fast_over_plain", "fast_over_liger", "fast_over_unsloth")]
    ['2048x1', 1.25, 3.0, 2.4, 1.2]
    >>> row["fast_peak_gib"], row["fast_memory_le_unsloth"]
    (5.0, True)
    """
    ok = [r for r in result["runs"] if "error" not in r]
    if methods is None:
        methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    if shapes is None:
        shapes = [f"{s}x{b}" for s, b in sorted({(r["seq"], r["batch"]) for r in ok if r["method"] in methods})]
    rows = []
    for shape in shapes:
        row = {"shape": shape}
        for m in methods:
            r = run_of(result, m, shape)
            row[f"{m}_tok_s"] = r["tokens_per_second"] if r else None
            row[f"{m}_peak_gib"] = r["peak_allocated_bytes"] / GIB if r else None
        for key, num, den in RATIOS:
            if row.get(f"{num}_tok_s") and row.get(f"{den}_tok_s"):
                row[key] = row[f"{num}_tok_s"] / row[f"{den}_tok_s"]
        if row.get("fast_tok_s") and row.get("unsloth_tok_s"):
            row["fast_memory_le_unsloth"] = row["fast_peak_gib"] <= row["unsloth_peak_gib"]
        rows.append(row)
    return rows


def milestones(result: dict, bf16_lora: dict | None = None) -> dict[str, bool]:
    """The issue's three milestones, judged on one run (bf16 LoRA from `bf16_lora`, a run that has it).

    1: bf16-LoRA speed at 2048x4 at no more than the plain path's peak;
    2: at least 2x the plain path at all four shapes;
    3: Unsloth's tokens/s at 2048x4 and 8192x1, at no more than its peak memory.
    """
    rows = {r["shape"]: r for r in side_by_side(result, ("qlora", "fast", "unsloth"), SHAPES)}
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
    names = [LABELS.get(run["method"], run["method"]) for run in profile["runs"]]
    for i, cat in enumerate(cats):
        vals = [sum(phase.get(cat, 0.0) for phase in run["ms"].values()) for run in profile["runs"]]
        ax.bar(names, vals, bottom=bottoms, label=cat, color=f"C{i}")
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    run0 = profile["runs"][0]
    label(ax, f"GPU time of one step at {run0['seq']}x{run0['batch']} by category", "path",
          "kernel time (ms, profiled)", legend=True)
