"""Notebook 09's numbers come from the recorded GPU runs, and the judgements on them are computed, not typed."""
import json

import pytest

from qlora_nb import fast_report, memory


def test_recorded_side_by_side_run_is_complete_and_from_one_run():
    final = fast_report.load_run("final")
    env = final["environment"]
    assert "H100" in env["gpu"] and env["versions"]["bitsandbytes"] != "missing"
    for method in ("qlora", "fast", "unsloth"):
        for shape in fast_report.SHAPES:
            run = fast_report.run_of(final, method, shape)
            assert run is not None, (method, shape)
            s = run["step_seconds"]
            assert run["steps"] >= 12 and len(s["all"]) == run["steps"]
            assert s["min"] <= s["median"] <= s["max"]
            assert run["tokens_per_second"] == pytest.approx(run["seq"] * run["batch"] / s["median"])


def test_side_by_side_ratios_follow_from_the_runs():
    final = fast_report.load_run("final")
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
