"""Read the recorded GPU runs of the fast path (data/bench/fast/) and turn them into notebook 09's tables and figures.

Leaves out: measuring (qlora_nb.bench, benchmarks/fast_bench.sh, benchmarks/profile_step.py
produce the JSON on a GPU) and the fast path itself (fast.py). Everything here runs without
a GPU, so notebook 09 renders anywhere.

Files (each written by one device run; see data/bench/fast/README.md):
* bench_fast_h200_cuda.json (name "h200"): the side-by-side run of today's fast path: plain, fast and
  Unsloth at four shapes, 20 steps each, one run on an H200.
* bench_fast_window_h200_cuda.json, bench_fast_dequant_h200_cuda.json, bench_fast_lean_h200_cuda.json
  ("window_h200", "dequant_h200", "lean_h200"): H200 runs that switch one of the last four levers off
  beside it (LEVER_PAIRS).
* bench_fast_before_lean_h200_cuda.json ("before_lean_h200"): the side-by-side run before lean recompute.
* bench_fast_lean_first_h200_cuda.json ("lean_first_h200"): lean recompute as first written, whose compiled
  graph moved the MLP into backward and raised the peak (kept as the measurement behind that finding).
* bench_fast_cuda.json ("final"): the side-by-side run of the fast path as first built, on an H100.
* bench_fast_first_cuda.json, bench_fast_eager_cuda.json: earlier H100 runs, one lever fewer each.
* profile_step_2048x1.json: GPU kernel time of one step by category, plain vs fast (H100).
* profile_step_2048x4_h200.json, profile_step_2048x1_h200.json: the same for fast and Unsloth on an H200;
  the 2048x1 one also holds each step's wall time and GPU busy time (is the short step host-bound?).
* bench_fast_liger_h200_cuda.json (name "liger_h200"): plain, plain + Liger Kernel, fast (as of that day) and
  Unsloth at 2048x1 and 8192x1, one run on an H200.
Compare tokens/s only within one run; across runs and GPUs compare ratios.

>>> rows = side_by_side(load_run("h200"))
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
BF16_DENSE_TFLOPS = {"H100": H100_BF16_DENSE_TFLOPS, "H200": 989.4}  # H200: the same GH100 compute, faster memory
GIB = 2**30
# (lever, its key in a run's "fast_path" record, shape, run, method without it, method with it): the last four
# levers, each switched off beside the fast path in one run
LEVER_PAIRS = (("FlexAttention for the sliding window", "window_attention", "8192x1", "window_h200",
                "fast_dense_window", "fast"),
               ("compiled decoder layers", "compile_layers", "2048x4", "window_h200", "fast", "fast_compiled"),
               ("compiled decoder layers", "compile_layers", "8192x1", "window_h200", "fast", "fast_compiled"),
               ("Triton NF4 dequantization", "triton_dequant", "2048x1", "dequant_h200", "fast_bnb_dequant", "fast"),
               ("Triton NF4 dequantization", "triton_dequant", "2048x4", "dequant_h200", "fast_bnb_dequant", "fast"),
               ("lean recompute", "lean_recompute", "2048x4", "lean_h200", "fast_full_recompute", "fast"),
               ("lean recompute", "lean_recompute", "8192x1", "lean_h200", "fast_full_recompute", "fast"))
# the fast path built up on the H200, per shape: (label, run, method); the last step is today's fast path
H200_STEPS = {
    "2048x4": (("plain path", "h200", "qlora"),
               ("fast path, eager layers, bitsandbytes dequantization", "window_h200", "fast"),
               ("+ compiled decoder layers", "window_h200", "fast_compiled"),
               ("+ Triton NF4 dequantization", "before_lean_h200", "fast"),
               ("+ lean recompute: today's fast path", "h200", "fast")),
    "8192x1": (("plain path", "h200", "qlora"),
               ("fast path, eager layers, sliding window as sdpa's dense mask", "window_h200", "fast_dense_window"),
               ("+ FlexAttention for the sliding window", "window_h200", "fast"),
               ("+ compiled decoder layers", "window_h200", "fast_compiled"),
               ("+ Triton NF4 dequantization", "before_lean_h200", "fast"),
               ("+ lean recompute: today's fast path", "h200", "fast"))}


def load_run(name: str = "final") -> dict:
    """One recorded benchmark run ({'environment', 'model', 'runs'}) by name.

    final, first and eager are the H100 runs named in RUNS; any other name N reads
    data/bench/fast/bench_fast_N_cuda.json, e.g. "liger_h200" -> bench_fast_liger_h200_cuda.json.
    A missing file raises FileNotFoundError naming the command that writes it.
    """
    file = RUNS.get(name, f"bench_fast_{name}_cuda.json")
    return recorded_json(f"bench/fast/{file}", "bash benchmarks/fast_bench.sh (see data/bench/fast/README.md)")


PROFILES = {"h100": "profile_step_2048x1.json", "h200": "profile_step_2048x4_h200.json",
            "h200_2048x1": "profile_step_2048x1_h200.json"}


def load_profile(name: str = "h100") -> dict:
    """The per-category GPU kernel time of one step (benchmarks/profile_step.py): "h100", plain and fast (eager
    norms) at 2048x1; "h200", fast (eager layers) and Unsloth at 2048x4, with each method's largest ops;
    "h200_2048x1", today's fast path and Unsloth at 2048x1, with wall_ms and gpu_busy_ms per step."""
    return recorded_json(f"bench/fast/{PROFILES[name]}", 'PROFILE="fast qlora" bash benchmarks/fast_bench.sh')


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

    1: bf16-LoRA speed at 2048x4 at no more than the plain path's peak (None: no bf16 LoRA run to judge by);
    2: at least 2x the plain path at all four shapes;
    3: Unsloth's tokens/s at 2048x4 and 8192x1, at no more than its peak memory.
    """
    rows = {r["shape"]: r for r in side_by_side(result, ("qlora", "fast", "unsloth"), SHAPES)}
    lora = run_of(bf16_lora or result, "lora", "2048x4")
    fast, plain = run_of(result, "fast", "2048x4"), run_of(result, "qlora", "2048x4")
    m1 = None if lora is None else bool(fast and plain and fast["tokens_per_second"] >= lora["tokens_per_second"]
                                        and fast["peak_allocated_bytes"] <= plain["peak_allocated_bytes"])
    m2 = all((rows[s].get("fast_over_plain") or 0) >= 2 for s in SHAPES)
    m3 = all((rows[s].get("fast_over_unsloth") or 0) >= 1 and rows[s].get("fast_memory_le_unsloth")
             for s in ("2048x4", "8192x1"))
    return {"1: bf16-LoRA speed at <= plain peak": m1, "2: >= 2x plain at all four shapes": m2,
            "3: >= Unsloth at 2048x4 and 8192x1, <= its memory": m3}


H100_STEPS = (("plain path: prepare_model_for_kbit_training + peft + bitsandbytes", "final", "qlora"),
              ("+ bf16 residual, fused NF4+LoRA linear, offloaded checkpoints, chunked CE", "first", "fast"),
              ("+ RMSNorm / SwiGLU backwards that recompute, eager (fp32 temporaries)", "eager", "fast"),
              ("+ the same, fused by torch.compile", "final", "fast"))


def lever_steps(shape: str = "2048x4", gpu: str = "H100") -> list[dict]:
    """The fast path built up lever by lever at one shape: label, tokens/s, peak GiB, and which run measured it.

    gpu="H100": the first levers, as they were built (any of the four shapes); gpu="H200": from the plain
    path to today's fast path through the last four levers (H200_STEPS: 2048x4 or 8192x1).
    """
    steps = H100_STEPS if gpu == "H100" else H200_STEPS[shape]
    runs = {name: load_run(name) for name in {run for _, run, _ in steps}}
    out = []
    for label, name, method in steps:
        r = run_of(runs[name], method, shape)
        out.append({"step": label, "tokens_per_second": r["tokens_per_second"],
                    "peak_gib": r["peak_allocated_bytes"] / GIB, "run": runs[name]["environment"]["date"]})
    return out


def lever_effects(pairs=LEVER_PAIRS) -> list[dict]:
    """Each lever switched off beside the fast path in one run: lever, shape, run date, tokens/s and peak GiB
    without and with it, and 'speedup' (with / without), from LEVER_PAIRS. Raises ValueError when the two
    runs' "fast_path" records do not differ in exactly that lever."""
    runs = {name: load_run(name) for name in {p[3] for p in pairs}}
    out = []
    for lever, key, shape, name, off, on in pairs:
        result = runs[name]
        a, b = run_of(result, off, shape), run_of(result, on, shape)
        changed = {k for k in a["fast_path"] if a["fast_path"][k] != b["fast_path"][k]}
        if changed != {key} or not b["fast_path"][key]:
            raise ValueError(f"{name} {shape}: {off} and {on} differ in {sorted(changed)}, not just {key} switched on")
        out.append({"lever": lever, "shape": shape, "run": result["environment"]["date"],
                    "without_tok_s": a["tokens_per_second"], "with_tok_s": b["tokens_per_second"],
                    "without_peak_gib": a["peak_allocated_bytes"] / GIB, "with_peak_gib": b["peak_allocated_bytes"] / GIB,
                    "speedup": b["tokens_per_second"] / a["tokens_per_second"]})
    return out


def recorded_loss_match(result: dict, shapes=SHAPES) -> dict[str, float]:
    """Per shape, the largest relative difference between the fast and the plain path's losses over the recorded steps
    (warm-up included: both saw the same random batches from the same LoRA initialization)."""
    out = {}
    for shape in shapes:
        plain, quick = run_of(result, "qlora", shape), run_of(result, "fast", shape)
        out[shape] = max(abs(a - b) / a for a, b in zip(plain["losses"], quick["losses"]))
    return out


def peak_tflops(gpu_name: str) -> float:
    """The bf16 dense tensor-core peak (TFLOP/s) of an H100 or H200, from the device name a run recorded."""
    for kind, tflops in BF16_DENSE_TFLOPS.items():
        if kind in gpu_name:
            return tflops
    raise ValueError(f"no bf16 peak recorded for {gpu_name!r}: add it to fast_report.BF16_DENSE_TFLOPS")


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
