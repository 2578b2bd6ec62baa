"""Notebook 09's numbers come from the recorded GPU runs, and the judgements on them are computed, not typed."""
import json

import pytest

from qlora_nb import fast_report, memory


@pytest.mark.parametrize("name, gpu", [("final", "H100"), ("h200", "H200"), ("before_lean_h200", "H200")])
def test_recorded_side_by_side_run_is_complete_and_from_one_run(name, gpu):
    final = fast_report.load_run(name)
    env = final["environment"]
    assert gpu in env["gpu"] and env["versions"]["bitsandbytes"] != "missing"
    for method in ("qlora", "fast", "unsloth"):
        for shape in fast_report.SHAPES:
            run = fast_report.run_of(final, method, shape)
            assert run is not None, (method, shape)
            s = run["step_seconds"]
            assert run["steps"] >= 12 and len(s["all"]) == run["steps"]
            assert s["min"] <= s["median"] <= s["max"]
            assert run["tokens_per_second"] == pytest.approx(run["seq"] * run["batch"] / s["median"])


@pytest.mark.parametrize("name", ["final", "h200", "before_lean_h200"])
def test_side_by_side_ratios_follow_from_the_runs(name):
    final = fast_report.load_run(name)
    for row in fast_report.side_by_side(final):
        plain, quick, peer = (fast_report.run_of(final, m, row["shape"]) for m in ("qlora", "fast", "unsloth"))
        assert row["fast_over_plain"] == pytest.approx(quick["tokens_per_second"] / plain["tokens_per_second"])
        assert row["fast_over_unsloth"] == pytest.approx(quick["tokens_per_second"] / peer["tokens_per_second"])
        assert row["fast_memory_le_unsloth"] == (quick["peak_allocated_bytes"] <= peer["peak_allocated_bytes"])


def test_milestones_are_judged_from_the_data():
    final = fast_report.load_run("final")
    judged = fast_report.milestones(final, memory.load_bench())
    rows = {r["shape"]: r for r in fast_report.side_by_side(final)}
    assert judged["2: >= 2x plain at all four shapes"] == all(r["fast_over_plain"] >= 2 for r in rows.values())
    # a made-up run where the fast path is 3x plain everywhere and beats Unsloth passes every milestone
    fake = json.loads(json.dumps(final))
    for r in fake["runs"]:
        if r["method"] == "fast":
            plain = fast_report.run_of(final, "qlora", f"{r['seq']}x{r['batch']}")
            r["tokens_per_second"] = 3 * plain["tokens_per_second"] + 1e5
            r["peak_allocated_bytes"] = 1
    assert all(fast_report.milestones(fake, memory.load_bench()).values())


def test_lever_steps_and_profile_render():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = fast_report.lever_steps("2048x4")
    assert len(steps) == 4 and steps[0]["tokens_per_second"] < steps[-1]["tokens_per_second"]
    fig, axes = plt.subplots(1, 2)
    fast_report.plot_levers(axes, steps, fast_report.run_of(fast_report.load_run(), "unsloth", "2048x4"))
    assert axes[0].get_ylabel() == "tokens per second" and axes[1].get_ylabel().startswith("peak")
    prof = fast_report.load_profile()
    assert {r["method"] for r in prof["runs"]} == {"qlora", "fast"}
    fig, ax = plt.subplots()
    fast_report.plot_profile(ax, prof)
    assert ax.get_ylabel().startswith("kernel time")
    plt.close("all")


def test_achieved_flops_use_the_planners_count():
    tflops, frac = fast_report.achieved_tflops(1000.0, 2048)
    per_token = memory.flops_per_token(memory.MODELS["mistral-7b"], 2048)["total"]
    assert tflops == pytest.approx(per_token * 1000 / 1e12)
    assert frac == pytest.approx(tflops / fast_report.H100_BF16_DENSE_TFLOPS)


def test_load_run_reads_the_liger_run_by_name_and_keeps_the_old_names():
    liger = fast_report.load_run("liger_h200")
    assert "H200" in liger["environment"]["gpu"]
    assert {r["method"] for r in liger["runs"]} == {"qlora", "liger", "fast", "unsloth"}
    for name in ("final", "first", "eager"):
        assert "H100" in fast_report.load_run(name)["environment"]["gpu"]
    with pytest.raises(FileNotFoundError, match="fast_bench.sh"):
        fast_report.load_run("no_such_run")


def test_liger_side_by_side_follows_from_the_h200_run():
    liger = fast_report.load_run("liger_h200")
    shapes = sorted({(r["seq"], r["batch"]) for r in liger["runs"]})
    rows = fast_report.side_by_side(liger)
    assert [r["shape"] for r in rows] == [f"{s}x{b}" for s, b in shapes]
    for row in rows:
        run = {m: fast_report.run_of(liger, m, row["shape"]) for m in ("qlora", "liger", "fast", "unsloth")}
        assert all(run.values()), row["shape"]
        tok = {m: r["tokens_per_second"] for m, r in run.items()}
        for m, r in run.items():
            assert row[f"{m}_tok_s"] == tok[m]
            assert row[f"{m}_peak_gib"] == pytest.approx(r["peak_allocated_bytes"] / 2**30)
            assert r["tokens_per_second"] == pytest.approx(r["seq"] * r["batch"] / r["step_seconds"]["median"])
        assert row["liger_over_plain"] == pytest.approx(tok["liger"] / tok["qlora"])
        assert row["fast_over_plain"] == pytest.approx(tok["fast"] / tok["qlora"])
        assert row["fast_over_liger"] == pytest.approx(tok["fast"] / tok["liger"])
        assert row["fast_over_unsloth"] == pytest.approx(tok["fast"] / tok["unsloth"])
    # the H100 run has no Liger: no Liger columns, its rows unchanged
    final_rows = fast_report.side_by_side(fast_report.load_run("final"))
    assert [r["shape"] for r in final_rows] == fast_report.SHAPES
    assert not any(k.startswith("liger") or k.endswith("_liger") for r in final_rows for k in r)


def test_side_by_side_on_a_made_up_run():
    gib = 2**30

    def run(method, seq, batch, tok, peak_gib, **extra):
        return {"method": method, "seq": seq, "batch": batch, "tokens_per_second": tok,
                "peak_allocated_bytes": int(peak_gib * gib), **extra}

    made_up = {"runs": [run("unsloth", 8192, 1, 2500.0, 6.0), run("fast", 8192, 1, 3000.0, 5.0),
                        run("liger", 8192, 1, 1250.0, 12.0), run("qlora", 8192, 1, 1000.0, 14.0),
                        run("qlora", 2048, 1, 2000.0, 8.0), run("liger", 2048, 1, 0.0, 0.0, error="OOM"),
                        run("fast", 2048, 1, 4000.0, 4.5), run("lora", 512, 4, 9e9, 1.0)]}
    rows = fast_report.side_by_side(made_up)
    assert [r["shape"] for r in rows] == ["2048x1", "8192x1"]  # shortest first; 'lora' is not a column
    short, long = rows
    assert long["liger_over_plain"] == 1.25 and long["fast_over_plain"] == 3.0
    assert long["fast_over_liger"] == 2.4 and long["fast_over_unsloth"] == 1.2
    assert long["liger_peak_gib"] == 12.0 and long["fast_memory_le_unsloth"] is True
    # the failed Liger run and the missing Unsloth run leave None and no ratio, not a crash
    assert short["liger_tok_s"] is None and short["unsloth_peak_gib"] is None
    assert short["fast_over_plain"] == 2.0
    assert not {"liger_over_plain", "fast_over_liger", "fast_over_unsloth", "fast_memory_le_unsloth"} & set(short)
    # methods and shapes can be named
    only = fast_report.side_by_side(made_up, methods=("qlora", "liger"), shapes=["8192x1"])
    assert only == [{"shape": "8192x1", "qlora_tok_s": 1000.0, "qlora_peak_gib": 14.0, "liger_tok_s": 1250.0,
                     "liger_peak_gib": 12.0, "liger_over_plain": 1.25}]


def test_todays_fast_path_runs_with_every_lever_on():
    for r in fast_report.load_run("h200")["runs"]:
        if r["method"] == "fast":
            assert r["fast_path"] == {"compile_layers": True, "window_attention": True, "triton_dequant": True,
                                      "keep_weight": False, "offload": True, "lean_recompute": True}


def test_lever_effects_follow_from_one_run_each():
    effects = fast_report.lever_effects()
    assert len(effects) == len(fast_report.LEVER_PAIRS)
    for e, (lever, key, shape, name, off, on) in zip(effects, fast_report.LEVER_PAIRS):
        run = fast_report.load_run(name)
        a, b = fast_report.run_of(run, off, shape), fast_report.run_of(run, on, shape)
        assert e["speedup"] == pytest.approx(b["tokens_per_second"] / a["tokens_per_second"])
        assert e["with_peak_gib"] == pytest.approx(b["peak_allocated_bytes"] / 2**30)
    # a pair whose records differ in another lever too is refused, not reported as this lever's effect
    lever, key, shape, name, off, on = fast_report.LEVER_PAIRS[1]  # eager vs compiled layers
    with pytest.raises(ValueError, match="not just"):
        fast_report.lever_effects([(lever, key, "8192x1", name, "fast_dense_window", "fast_compiled")])


def test_h200_lever_steps_end_at_todays_fast_path():
    h200 = fast_report.load_run("h200")
    for shape, steps in fast_report.H200_STEPS.items():
        built = fast_report.lever_steps(shape, gpu="H200")
        assert len(built) == len(steps)
        assert built[0]["tokens_per_second"] == fast_report.run_of(h200, "qlora", shape)["tokens_per_second"]
        assert built[-1]["tokens_per_second"] == fast_report.run_of(h200, "fast", shape)["tokens_per_second"]


def test_recorded_loss_match_is_computed_from_both_paths_losses():
    h200 = fast_report.load_run("h200")
    match = fast_report.recorded_loss_match(h200)
    for shape, rel in match.items():
        plain, quick = (fast_report.run_of(h200, m, shape)["losses"] for m in ("qlora", "fast"))
        assert len(plain) == len(quick) >= 13
        assert rel == max(abs(a - b) / a for a, b in zip(plain, quick))


def test_todays_gpu_run_meets_the_loss_criterion_over_twenty_steps():
    """The issue's criterion on the GPU record: the first 20 steps of the fast path within 1% of the plain path."""
    h200 = fast_report.load_run("h200")
    match = fast_report.recorded_loss_match(h200)  # over every recorded step (its computation is tested above)
    assert set(match) == set(fast_report.SHAPES)
    for shape, rel in match.items():
        assert len(fast_report.run_of(h200, "fast", shape)["losses"]) >= 20, shape
        assert rel < 0.01, shape


def test_lean_recompute_keeps_the_peak_where_its_first_version_raised_it():
    """Lean recompute as first written let the compiler move the MLP into backward (peak up); the shipped version
    keeps the peak of full recompute. Both recorded at the goal's shapes on the H200, each beside full recompute."""
    for name, raised in (("lean_first_h200", True), ("lean_h200", False)):
        run = fast_report.load_run(name)
        for shape in ("2048x4", "8192x1"):
            lean, full = (fast_report.run_of(run, m, shape) for m in ("fast", "fast_full_recompute"))
            assert lean["fast_path"]["lean_recompute"] and not full["fast_path"]["lean_recompute"]
            over = lean["peak_allocated_bytes"] - full["peak_allocated_bytes"]
            assert (over > 2**28) == raised, (name, shape, over)  # first version: +0.44 GiB; now: none
            assert lean["tokens_per_second"] > full["tokens_per_second"], (name, shape)


def test_short_step_profile_says_whether_the_host_sets_the_pace():
    prof = fast_report.load_profile("h200_2048x1")
    assert {r["method"] for r in prof["runs"]} == {"fast", "unsloth"} and "H200" in prof["gpu"]
    for r in prof["runs"]:
        assert (r["seq"], r["batch"]) == (2048, 1)
        assert 0 < r["gpu_busy_ms"] <= r["total_ms"]  # the union of kernel times is at most their sum
        assert r["wall_ms"] > 0


def test_milestone_one_needs_a_bf16_lora_run():
    h200 = fast_report.load_run("h200")
    assert fast_report.run_of(h200, "lora", "2048x4") is None
    assert fast_report.milestones(h200)["1: bf16-LoRA speed at <= plain peak"] is None
    assert fast_report.peak_tflops(h200["environment"]["gpu"]) == fast_report.BF16_DENSE_TFLOPS["H200"]
    with pytest.raises(ValueError, match="BF16_DENSE_TFLOPS"):
        fast_report.peak_tflops("NVIDIA A100")
