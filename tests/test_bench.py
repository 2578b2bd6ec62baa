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
