"""The benchmark runs on the CPU (embedded model, tiny shapes) and writes well-formed JSON and markdown."""
import json

import pytest

from qlora_nb import bench, memory, paths


def test_cpu_bench_writes_json_whose_weights_agree_with_the_planner(tmp_path):
    result = bench.run_all("cpu", tmp_path, configs=[("qlora", 8, 1)], warmup=0, steps=1)
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert data == json.loads(json.dumps(result))
    env = data["environment"]
    assert env["device"] == "cpu" and env["date"].endswith("UTC") and env["versions"]["torch"] != "missing"
    (run,) = data["runs"]
    assert "error" not in run, run.get("error")
    assert run["tokens_per_step"] == 8 and run["tokens_per_second"] > 0
    s = run["step_seconds"]
    assert s["min"] <= s["median"] <= s["max"] and len(s["all"]) == 1
    predicted = memory.plan("embedded", quant="nf4+dq", device="cpu")
    assert abs(predicted.weights_loaded / run["weight_bytes_after_load"] - 1) < 0.02
    assert run["trainable_params"] == predicted.lora_params
    table = (tmp_path / "bench_cpu.md").read_text()
    assert "| QLoRA NF4+DQ | 8x1 |" in table and env["date"] in table


def test_markdown_table_reports_errors_and_numbers():
    result = {"model": "m", "environment": {"date": "d", "gpu": "g", "versions": {"torch": "1"}},
              "runs": [{"method": "lora", "seq": 4, "batch": 2, "error": "CUDA out of memory"},
                       {"method": "qlora", "seq": 8, "batch": 1, "weight_bytes_after_load": 2**30,
                        "peak_allocated_bytes": 3 * 2**30, "tokens_per_second": 1234.4,
                        "step_seconds": {"median": 0.5, "min": 0.25, "max": 1.0}}]}
    table = bench.markdown_table(result)
    assert "| bf16 LoRA | 4x2 | error: CUDA out of memory" in table
    assert "| QLoRA NF4+DQ | 8x1 | 1.00 | 3.00 | 0.500 (0.250, 1.000) | 1,234 |" in table


def test_unknown_method_is_refused_before_loading():
    with pytest.raises(ValueError, match="qlora"):
        bench.load_for_bench("/nonexistent", "int8")


def test_committed_gpu_results_are_complete():
    data = memory.load_bench(paths.data_dir() / "bench" / "bench_cuda.json")
    env = data["environment"]
    assert "H100" in env["gpu"] and env["versions"]["bitsandbytes"] != "missing"
    shapes = {(r["method"], r["seq"], r["batch"]) for r in data["runs"]}
    assert {("qlora", 512, 4), ("qlora", 2048, 1), ("qlora", 2048, 4), ("qlora", 8192, 1), ("lora", 2048, 1)} <= shapes
    for r in data["runs"]:
        s = r["step_seconds"]
        assert s["min"] <= s["median"] <= s["max"] and r["peak_allocated_bytes"] > r["weight_bytes_after_load"]


def test_peak_trace_replays_allocations_to_the_peak():
    import importlib.util

    spec = importlib.util.spec_from_file_location("peak_trace", paths.repo_root() / "benchmarks" / "peak_trace.py")
    peak_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak_trace)
    trace = [{"action": "alloc", "addr": 1, "size": 10}, {"action": "alloc", "addr": 2, "size": 30},
             {"action": "free_requested", "addr": 1}, {"action": "alloc", "addr": 3, "size": 5},
             {"action": "free_requested", "addr": 99},  # freed, but allocated before the trace began
             {"action": "free_requested", "addr": 2}]
    peak, live = peak_trace.live_at_peak(trace)
    assert peak == 40 and sorted(live) == [1, 2]
    frames = [{"filename": "/x/torch/_ops.py", "line": 1, "name": "op"},
              {"filename": "/x/peft/tuners/lora/bnb.py", "line": 552, "name": "forward"}]
    assert peak_trace.frame_key(frames) == "lora/bnb.py:552 forward"


def test_fast_method_runs_in_the_benchmark_and_peers_say_when_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("QLORA_NB_PEERS", raising=False)
    result = bench.run_all("cpu", tmp_path, configs=[("fast", 8, 1), ("fast", 16, 1), ("unsloth", 8, 1)],
                           warmup=0, steps=1)
    fast_runs = [r for r in result["runs"] if r["method"] == "fast"]
    assert [(r["seq"], r["batch"]) for r in fast_runs] == [(8, 1), (16, 1)]  # one process, two shapes
    for r in fast_runs:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_second"] > 0 and r["loss_finite"] and len(r["losses"]) == 1
        # the record says which levers ran: on the CPU, none of the CUDA-only ones; the bench checkpoints, so the
        # recompute is lean
        assert r["fast_path"] == {"compile_layers": False, "window_attention": False, "triton_dequant": False,
                                  "keep_weight": False, "offload": False, "lean_recompute": True}
    (peer,) = [r for r in result["runs"] if r["method"] == "unsloth"]
    assert peer.get("not_installed") and "build-site.sh peers" in peer["error"]
    table = (tmp_path / "bench_cpu.md").read_text()
    assert "| QLoRA fast path (qlora_nb.fast) | 16x1 |" in table and "| Unsloth QLoRA | 8x1 | error:" in table


def _benchmark_script(name, monkeypatch):
    """benchmarks/<name>.py as a module (the folder is no package; gpu_latency imports gpu_finetune_smoke)."""
    import importlib

    monkeypatch.syspath_prepend(str(paths.repo_root() / "benchmarks"))
    return importlib.import_module(name)


def test_recorded_gpu_finetune_smoke_covers_both_lengths(monkeypatch):
    import statistics

    data = bench.load_finetune_smoke()
    env = data["environment"]
    assert "H100" in env["gpu"] and env["date"].endswith("UTC")
    assert env["versions"]["bitsandbytes"] != "missing" and env["versions"]["trl"] != "missing"
    runs = {r["seq_len"]: r for r in data["runs"]}
    assert set(runs) == {512, 2048}
    for r in runs.values():
        assert r["optimizer"] == "paged_adamw_8bit" and r["gradient_checkpointing"] is True
        assert r["steps"] == len(r["step_seconds"]) and r["tokens_per_step"] == r["seq_len"] * r["batch_size"]
        assert r["median_step_seconds"] == pytest.approx(statistics.median(r["step_seconds"][1:]), abs=1e-3)
        assert r["tokens_per_second"] == pytest.approx(r["tokens_per_step"] / r["median_step_seconds"], rel=1e-3)
        assert r["peak_gpu_memory_gib"] == round(r["peak_gpu_memory_bytes"] / 2**30, 2)
    assert runs[2048]["peak_gpu_memory_bytes"] > runs[512]["peak_gpu_memory_bytes"]
    smoke = _benchmark_script("gpu_finetune_smoke", monkeypatch)
    assert (paths.data_dir() / "bench" / "finetune_smoke_cuda.md").read_text() == smoke.markdown(data)


def test_recorded_gpu_latency_has_the_four_serving_choices(monkeypatch):
    data = bench.load_gpu_latency()
    assert "H100" in data["environment"]["gpu"] and data["batch_size"] == 1
    v = {r["label"]: r for r in data["variants"]}
    assert list(v) == ["4-bit base", "4-bit base + adapter", "bf16 base + adapter", "bf16 merged"]
    for r in v.values():
        assert r["tokens_per_s"] == pytest.approx(data["new_tokens"] / r["seconds"], rel=1e-3)
        assert r["peak_gpu_memory_gib"] >= r["weights_gib"] > 0
    # NF4 stores 4 bits a weight (plus scales); the bf16 base 16, so well over 3x more
    assert v["bf16 merged"]["weights_bytes"] > 3 * v["4-bit base"]["weights_bytes"]
    assert v["4-bit base + adapter"]["weights_bytes"] > v["4-bit base"]["weights_bytes"]
    assert v["bf16 base + adapter"]["weights_bytes"] > v["bf16 merged"]["weights_bytes"]
    assert data["logit_checks"]["adapter_moves_4bit_logits"]["max_abs"] > 0  # the random adapter is no no-op
    latency = _benchmark_script("gpu_latency", monkeypatch)
    assert (paths.data_dir() / "bench" / "latency_cuda.md").read_text() == latency.markdown(data)


def test_recorded_result_loaders_name_the_script_when_the_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_finetune_smoke.py"):
        bench.load_finetune_smoke(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError, match="gpu_latency.py"):
        bench.load_gpu_latency(tmp_path / "none.json")


def test_each_fast_variant_switches_a_real_lever():
    import inspect

    from qlora_nb import fast

    params = inspect.signature(fast.enable_fast_path).parameters
    assert bench.FAST_VARIANTS["fast"] == {}
    for method, kwargs in bench.FAST_VARIANTS.items():
        assert set(kwargs) <= set(params), (method, kwargs)
        assert method in bench.METHODS and method in bench.METHOD_LABELS


def test_profile_step_busy_time_is_the_union_of_kernel_intervals(monkeypatch):
    busy_ms = _benchmark_script("profile_step", monkeypatch).busy_ms
    assert busy_ms([(0, 1000), (500, 2000), (3000, 3500)]) == 2.5  # overlap counted once, the gap not at all
    assert busy_ms([(0, 4000), (1000, 2000)]) == 4.0                # one kernel inside another
    assert busy_ms([]) == 0.0
