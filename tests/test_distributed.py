"""N-process QLoRA (qlora_nb.distributed via accelerate launch) trains what one process trains; bad launches fail fast; the per-GPU planner."""
import importlib.util
import json
import sys
import time

import pytest
import torch

from qlora_nb import distributed, launch, memory, paths

TINY = ["--base-model", "tiny-mistral", "--global-batch", "4", "--max-steps", "2", "--dropout", "0",
        "--warmup-steps", "0", "--train-limit", "16", "--save-adapter"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process gloo run (accelerate launch) and one plain single-process run of the same global batch."""
    folder = tmp_path_factory.mktemp("dist")
    two = launch.run("cpu_ddp_2proc", TINY + ["--out", folder / "two"], num_processes=2, timeout=300, progress=None)
    one = launch.run_single(TINY + ["--out", folder / "one"], timeout=300, progress=None)
    return folder, two, one


# ---------------------------------------------------------------- the CPU data-parallel run

def test_two_gloo_processes_train_what_one_process_trains(runs):
    folder, _, _ = runs
    par, one = distributed.read_results(folder / "two"), distributed.read_results(folder / "one")
    assert [r["world_size"] for r in par] == [2, 2] and one[0]["world_size"] == 1
    check = distributed.compare_runs(par, one, rtol=1e-5)  # tiny-mistral: no bf16 kernel differences by batch shape
    assert check["same_batches"] and check["loss_from_shares_matches"] and check["loss_matches"], check
    assert check["same_adapter_on_every_rank"]
    assert len(check["losses"]) == 2
    for step_rows in zip(*[[m["rows"] for m in r["micro_steps"]] for r in par]):
        a, b = step_rows
        assert len(a) == len(b) == 2 and not set(a) & set(b)  # each rank its own half of the global batch


def test_ranks_hold_bit_identical_adapters_close_to_the_single_process_one(runs):
    from safetensors.torch import load_file

    folder, _, _ = runs
    r0, r1 = (load_file(str(folder / "two" / f"adapter_rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(folder / "one" / "adapter_rank0.safetensors"))
    assert r0.keys() == r1.keys() == single.keys() and r0
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # Not bit-identical to one process: gradients summed in another order differ in the last bits, and
    # AdamW's first steps move a weight by about lr whatever its gradient's size, so a near-zero gradient
    # whose sign flips moves its weight the other way. Measured: relative difference 4e-4, 50 of 32768 weights.
    diff = torch.cat([(r0[k] - single[k]).flatten() for k in r0])
    assert diff.norm() / torch.cat([single[k].flatten() for k in r0]).norm() < 1e-2
    assert (diff.abs() > 1e-4).float().mean() < 0.01
    assert any(single[k].abs().max() > 0 for k in single if "lora_B" in k)  # training moved B off zero


def test_records_say_how_the_run_was_set_up(runs):
    folder, two, _ = runs
    rec = distributed.read_results(folder / "two")[1]
    assert rec["rank"] == 1 and rec["strategy"] == "ddp" and rec["device"] == "cpu" and rec["batch_per_rank"] == 2
    assert rec["environment"] == distributed.NVLS_OFF  # NVLink multicast off in every rank
    assert rec["optimizer"] == "adamw_torch" and rec["config"]["base_model"] == "tiny-mistral"
    assert "accelerate.commands.launch" in two.command and "--num_processes" in two.command
    assert "[rank 0] step 2/2" in two.log.read_text()


def test_compare_runs_notices_what_would_be_wrong(runs):
    folder, _, _ = runs
    par, one = distributed.read_results(folder / "two"), distributed.read_results(folder / "one")
    drifted = json.loads(json.dumps(par))
    drifted[1]["adapter_sha256"] = "0" * 64
    assert not distributed.compare_runs(drifted, one)["same_adapter_on_every_rank"]
    other_rows = json.loads(json.dumps(par))
    other_rows[0]["micro_steps"][0]["rows"][0] = "not-a-row"
    assert not distributed.compare_runs(other_rows, one)["same_batches"]
    off = json.loads(json.dumps(par))
    off[0]["steps"][1]["loss"] *= 1.01
    result = distributed.compare_runs(off, one, rtol=1e-3)
    assert not result["loss_matches"] and not result["loss_from_shares_matches"]


def test_random_token_rows_train_every_token(tmp_path):
    out = tmp_path / "rnd"
    assert distributed.main(["--out", str(out), "--base-model", "tiny-mistral", "--device", "cpu", "--data", "random",
                             "--max-seq-length", "24", "--global-batch", "2", "--max-steps", "1"]) == 0
    (rec,) = distributed.read_results(out)
    (m,) = rec["micro_steps"]
    assert m["local_tokens"] == m["global_tokens"] == 2 * 23 and m["tokens"] == 48 and m["sequence_length"] == 24
    assert rec["tokens_per_second_median_step"] > 0 and len(rec["step_seconds"]) == 1


# ---------------------------------------------------------------- bad input: a clear message, never a hang

def test_more_processes_than_cpu_cores_is_refused_before_anything_starts():
    n = distributed.cpu_cores() + 1
    with pytest.raises(distributed.DistributedSetupError, match=f"Set num_processes: {n - 1} in .*cpu_ddp_2proc.yaml"):
        launch.run("cpu_ddp_2proc", ["--out", "/nonexistent/never-written"], num_processes=n, timeout=5)


def test_every_rank_refuses_too_many_processes_itself_and_the_launch_ends(tmp_path):
    # bypass launch.run's check, as a person typing `accelerate launch --num_processes 3` would
    n = distributed.cpu_cores() + 1
    cmd = launch.accelerate_command("cpu_ddp_2proc", ["--out", tmp_path, "--device", "cpu"], n)
    start = time.perf_counter()
    with pytest.raises(launch.LaunchError, match=f"{n} CPU processes were asked for") as err:
        launch._stream(cmd, launch.launch_env("cpu"), 120, tmp_path / "log.txt", None)
    assert time.perf_counter() - start < 60
    assert str(err.value).count("were asked for") == 1  # every rank says it; the error says it once


def test_more_gpu_processes_than_gpus_names_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedSetupError, match="only 1 CUDA GPU is visible.*num_processes: 1"):
        distributed.check_devices(2, "cuda", "gpu_ddp_2.yaml")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(distributed.DistributedSetupError, match="no CUDA GPU is visible.*cpu_ddp_2proc"):
        distributed.check_devices(2, "cuda")


def test_missing_config_lists_the_ones_there():
    with pytest.raises(FileNotFoundError, match="not found.*cpu_ddp_2proc, gpu_ddp_2, gpu_fsdp_qlora_2"):
        launch.run("fsdp_8gpu", ["--out", "/nonexistent/never-written"], timeout=5)


def test_model_that_does_not_fit_even_sharded_gets_the_planners_numbers():
    with pytest.raises(distributed.DistributedSetupError) as err:
        distributed.check_fit("llama-3-70b", 2, "fsdp", 4, 8192, 64, "adamw_torch", True, gpu_gib=16)
    msg = str(err.value)
    gp = memory.plan_per_gpu("llama-3-70b", gpus=2, strategy="fsdp", batch=4, seq=8192, rank=64)
    assert f"peak {gp.peak / 2**30:.2f} GiB per GPU" in msg and "does not fit GPUs with 16 GiB" in msg
    assert "no count of up to 64 GPUs fits" in msg and "What to change" in msg


def test_a_model_that_fits_on_more_gpus_is_told_how_many():
    need = memory.min_gpus("llama-3-70b", 48)
    assert need == 2
    with pytest.raises(distributed.DistributedSetupError, match=f"fsdp on {need} GPUs: peak .* \\(fits\\)"):
        distributed.check_fit("llama-3-70b", 1, "ddp", 1, 2048, 16, "paged_adamw_8bit", True, gpu_gib=48)
    assert distributed.check_fit("llama-3-70b", need, "fsdp", 1, 2048, 16, "adamw_torch", True, gpu_gib=48).gpus == need


def test_fsdp_loading_whole_4bit_model_per_gpu_is_planned_and_named():
    # transformers puts the whole 4-bit model on every GPU before FSDP shards it: a 70B step
    # on many 24 GiB GPUs would fit, its load does not, and the refusal says so
    many = memory.plan_per_gpu("llama-3-70b", gpus=16, strategy="fsdp", autocast=True)
    assert many.peak / 2**30 < memory.usable_gib(24) < many.load_peak / 2**30
    assert many.load_peak == many.base.weights_loaded + many.unit_flat and many.fit_peak == many.load_peak
    assert memory.min_gpus("llama-3-70b", 24) is None
    with pytest.raises(distributed.DistributedSetupError, match="loaded onto every GPU before FSDP shards it"):
        distributed.check_fit("llama-3-70b", 2, "fsdp", 1, 2048, 16, "adamw_torch", True, gpu_gib=24)
    ddp = memory.plan_per_gpu("mistral-7b", gpus=2, strategy="ddp")
    assert ddp.load_peak < ddp.peak == ddp.fit_peak


def test_the_script_refuses_before_loading_and_exits(tmp_path, capsys):
    code = distributed.main(["--out", str(tmp_path), "--base-model", "llama-3-70b", "--device", "cpu",
                             "--fit-gpu-gib", "8", "--max-seq-length", "2048", "--global-batch", "2"])
    assert code == 2 and "does not fit GPUs with 8 GiB" in capsys.readouterr().err
    assert not list(tmp_path.glob("rank*.json"))


@pytest.mark.parametrize("argv, fragment", [
    (["--global-batch", "5"], "Use --global-batch 4 or 6"),
    (["--strategy", "fsdp"], "needs CUDA GPUs"),
    (["--strategy", "zero"], "use ddp"),
])
def test_other_bad_settings_say_what_to_change(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of two, one per machine (checks come before any process group)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.main(["--out", str(tmp_path), "--device", "cpu", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_strategy_must_match_the_accelerate_config(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(distributed.DistributedSetupError, match="gpu_ddp_2.yaml"):
        distributed.check_strategy("ddp", "cuda")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(distributed.DistributedSetupError, match="gpu_fsdp_qlora_2.yaml"):
        distributed.check_strategy("fsdp", "cuda")


def test_fsdp_config_on_the_cpu_is_refused():
    with pytest.raises(distributed.DistributedSetupError, match="needs CUDA GPUs"):
        launch.check_launch("gpu_fsdp_qlora_2", device="cpu")


def test_configs_are_what_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in launch.available_configs():
        cfg = load_config_from_file(str(launch.config_path(name)))
        assert cfg.num_processes == 2 and cfg.num_machines == 1
    fsdp = load_config_from_file(str(launch.config_path("gpu_fsdp_qlora_2")))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False  # peft: needed for FSDP-QLoRA's memory savings
    assert fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True


# ---------------------------------------------------------------- the per-GPU planner

def test_one_gpu_ddp_is_the_single_gpu_plan_and_more_gpus_add_only_buckets():
    base = memory.plan("mistral-7b", seq=1024, batch=2)
    one = memory.plan_per_gpu("mistral-7b", gpus=1, strategy="ddp", seq=1024, batch=2)
    assert one.peak == base.peak
    for n in (2, 8):
        gp = memory.plan_per_gpu("mistral-7b", gpus=n, strategy="ddp", seq=1024, batch=2)
        assert gp.peak - base.peak == 4 * base.lora_params == gp.comm_buffers


def test_fsdp_layer_and_root_units_add_up_to_the_model_weights():
    for name in ("mistral-7b", "llama-3-70b"):
        shape = memory.MODELS[name]
        for quant in ("nf4+dq", "nf4", "none"):
            flat, stats = memory._layer_flat_bytes(shape, quant)
            root = (shape.embedding_params() + shape.hidden) * 2
            assert shape.layers * (flat + stats) + root == memory.weight_bytes(shape, quant)


def test_fsdp_shards_weights_and_lora_state_over_gpus():
    plans = [memory.plan_per_gpu("llama-3-70b", gpus=n, strategy="fsdp") for n in (1, 2, 4)]
    sharded = [p.weights - p.unsharded for p in plans]
    assert abs(sharded[0] / sharded[1] - 2) < 1e-3 and abs(sharded[0] / sharded[2] - 4) < 1e-3
    assert plans[0].lora_state == 2 * plans[1].lora_state == 4 * plans[2].lora_state
    assert plans[0].gathered == plans[2].gathered > 0 and plans[0].unsharded == plans[2].unsharded > 0
    assert plans[0].peak > plans[1].peak > plans[2].peak
    assert not plans[0].base.upcast and plans[0].base.act_bytes == 2  # FSDP-QLoRA keeps bf16 activations


def test_seventy_b_fits_48_gib_only_sharded_over_two():
    assert memory.min_gpus("llama-3-70b", 48, "fsdp") == 2
    assert memory.min_gpus("llama-3-70b", 48, "ddp") is None
    assert not memory.fits_per_gpu(memory.plan_per_gpu("llama-3-70b", gpus=1, strategy="ddp"), 48).fits
    answer = memory.fits_per_gpu(memory.plan_per_gpu("llama-3-70b", gpus=2, strategy="ddp"), 48)
    assert not answer.fits and answer.advice[0].startswith("fully shard (strategy 'fsdp') on the same 2 GPUs")


def test_planner_bad_input():
    with pytest.raises(ValueError, match="ddp, fsdp"):
        memory.plan_per_gpu("mistral-7b", gpus=2, strategy="zero3")
    with pytest.raises(ValueError, match="positive integer"):
        memory.plan_per_gpu("mistral-7b", gpus=0)
    with pytest.raises(ValueError, match="upcast=False"):
        memory.plan_per_gpu("mistral-7b", gpus=2, strategy="fsdp", upcast=True)


def test_fsdp_flat_bytes_are_what_bitsandbytes_stores_as_bf16():
    """One decoder layer loaded with bnb_4bit_quant_storage=bfloat16: its parameters are the flat bytes."""
    from transformers import AutoModelForCausalLM

    from qlora_nb import models

    path = models.resolve_base_model("tiny-mistral")
    cfg = models.nf4_config(quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    layer = model.model.layers[0]
    params = list(layer.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}  # one dtype: FSDP can flatten the layer
    flat, _ = memory._layer_flat_bytes(memory.model_shape(path), "nf4+dq")
    assert sum(p.numel() * p.element_size() for p in params) == flat


def test_planner_within_10_percent_of_the_multigpu_measurements():
    # the aim: the 70B FSDP run and the data-parallel runs within 10% of today's planner (replan),
    # the step's peak and, where it is the larger, the load's; the 7B FSDP run is over-predicted (kept
    # on the safe side: never under the measurement, at most 25% over)
    results = distributed.load_gpu_results()
    if not results:
        pytest.skip("data/multigpu/ holds no 2-GPU measurement yet (benchmarks/multigpu_bench.sh)")
    checked = []
    for exp, data in results.items():
        for name, run in data["runs"].items():
            s = distributed.run_summary(run)
            if not (s["ok"] and s["ratio"]):
                continue
            low, high = (1.0, 1.25) if exp == "mistral7b_fsdp" else (0.9, 1.1)
            assert low <= s["ratio"] <= high, (exp, name, s["ratio"])
            if s["load_ratio"] and "fsdp" in name:
                assert 0.9 <= s["load_ratio"] <= 1.1, (exp, name, s["load_ratio"])
            checked.append((exp, name))
    assert ("llama70b_fsdp", "2gpu_fsdp") in checked and ("mistral7b_ddp_scaling", "2gpu_ddp") in checked


def test_seventy_b_measured_does_not_fit_one_capped_gpu_and_trains_on_two():
    runs = distributed.load_gpu_results().get("llama70b_fsdp", {}).get("runs")
    if not runs:
        pytest.skip("data/multigpu/llama70b_fsdp.json is not there yet (benchmarks/multigpu_bench.sh)")
    refused = distributed.run_summary(runs["1gpu_planner"])
    assert not refused["ok"] and "does not fit GPUs with 48 GiB" in refused["error"]
    attempt = distributed.run_summary(runs["1gpu_ddp"])
    assert not attempt["ok"] and "out of memory" in attempt["error"]
    assert max(attempt["peak_gib"]) <= attempt["cap_gib"] < attempt["predicted_gib"]
    two = distributed.run_summary(runs["2gpu_fsdp"])
    assert two["ok"] and two["ranks"] == 2 and two["tokens_per_second"] > 0
    assert max(two["peak_gib"] + two["load_peak_gib"]) <= two["cap_gib"]
    losses = [r["steps"] for r in runs["2gpu_fsdp"]["ranks"]]
    assert losses[0] == losses[1] and len(losses[0]) == runs["2gpu_fsdp"]["ranks"][0]["config"]["max_steps"]


def test_run_summary_reads_a_collected_run(runs, tmp_path):
    folder, _, _ = runs
    spec = importlib.util.spec_from_file_location("multigpu_collect", paths.repo_root() / "benchmarks" / "multigpu_collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    (folder / "two" / "returncode").write_text("0")
    assert collect.main(["--experiment", "cpu_check", "--out", str(tmp_path), "--run", f"two={folder / 'two'}",
                         "--run", f"missing={tmp_path / 'nothing'}"]) == 0
    results = distributed.load_gpu_results(tmp_path)
    s = distributed.run_summary(results["cpu_check"]["runs"]["two"])
    assert s["ok"] and s["ranks"] == 2 and len(s["losses"]) == 2 and s["tokens_per_second"] > 0
    assert s["peak_gib"] == [] and s["ratio"] is None  # CPU: no CUDA peak
    gone = distributed.run_summary(results["cpu_check"]["runs"]["missing"])
    assert not gone["ok"] and "no rank file" in gone["error"]


# ---------------------------------------------------------------- the pre-quantized checkpoint builder

@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_layer_by_layer_quantized_checkpoint_equals_quantizing_on_load(tmp_path, storage):
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(paths.repo_root() / "benchmarks"))
    import multigpu_build as mb

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False)
    built = mb.build(tmp_path / "q", LlamaConfig(**cfg.to_dict()), seed=1, quant_storage=storage, progress=None)
    assert len(list(built.glob("model-*.safetensors"))) == 3  # one shard per layer + the rest
    reference = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    weights = mb.other_weights(cfg, 1)
    for i in range(cfg.num_hidden_layers):
        weights.update(mb.layer_weights(cfg, i, 1))
    loaded = reference.load_state_dict(weights, strict=False)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    reference.save_pretrained(tmp_path / "bf16")
    a = AutoModelForCausalLM.from_pretrained(built)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=mb.bnb_config(storage),
                                             dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (packed bf16 may hold NaN patterns)
    assert all(torch.equal(as_bytes(sa[k]), as_bytes(sb[k])) for k in sa)
    assert a.model.layers[0].mlp.down_proj.weight.dtype == getattr(torch, storage)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


# ---------------------------------------------------------------- FSDP sharding itself, on CPU processes

def test_fsdp_shards_the_bf16_stored_4bit_model_over_two_cpu_processes(tmp_path):
    result = launch.run("cpu_ddp_2proc", ["--out", tmp_path, "--base-model", "tiny-mistral"], num_processes=2,
                        timeout=300, progress=None, module="qlora_nb.launch_fsdp_cpu")
    assert "qlora_nb.launch_fsdp_cpu" in result.command
    ranks = distributed.read_results(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    shape = memory.model_shape(__import__("qlora_nb.models", fromlist=["m"]).resolve_base_model("tiny-mistral"))
    whole = memory.plan_per_gpu(shape, gpus=1, strategy="fsdp").flat_param_bytes
    n_linear = shape.layers * len(memory.ALL_PROJECTIONS)
    for r in ranks:
        assert r["frozen_dtypes"] == ["torch.bfloat16"]  # one float dtype: FSDP could flatten every layer
        assert r["flat_param_bytes"] == r["planner_flat_param_bytes"] and 2 * r["flat_param_bytes"] == whole
        # the planner leaves out each 4-bit layer's two code tables (16 + 256 fp32), nothing at 7B-70B scale
        assert r["quant_stats_bytes"] == r["planner_quant_stats_bytes"] + n_linear * (16 + 256) * 4
        assert r["loss_sharded"] == pytest.approx(r["loss_whole"], rel=1e-6)
        assert r["lora_grad_norm_sharded"] == pytest.approx(r["lora_grad_norm_whole"], rel=1e-5)
        assert r["environment"] == distributed.NVLS_OFF


# ---------------------------------------------------------------- data-parallel scaling (distributed.scaling)

def test_scaling_of_the_measured_data_parallel_run():
    # notebook 10's scaling numbers, recomputed from the rank records themselves
    runs = distributed.load_gpu_results().get("mistral7b_ddp_scaling", {}).get("runs")
    if not runs:
        pytest.skip("data/multigpu/mistral7b_ddp_scaling.json is not there yet (benchmarks/multigpu_bench.sh)")
    one, two = runs["1gpu"]["ranks"], runs["2gpu_ddp"]["ranks"]
    s = distributed.scaling(distributed.run_summary(runs["1gpu"]), distributed.run_summary(runs["2gpu_ddp"]))
    rate1 = sum(r["tokens_per_second_median_step"] for r in one)
    rate2 = sum(r["tokens_per_second_median_step"] for r in two)
    assert s["gpus"] == len(two) == 2
    assert s["tokens_per_second_1"] == pytest.approx(rate1) and s["tokens_per_second_n"] == pytest.approx(rate2)
    assert s["speedup"] == pytest.approx(rate2 / rate1) and s["efficiency"] == pytest.approx(rate2 / (2 * rate1))
    assert s["efficiency"] >= 0.9  # the aim for data parallel on two GPUs
    a = {x["step"]: x["loss"] for x in one[0]["steps"]}
    b = {x["step"]: x["loss"] for x in two[0]["steps"]}
    assert [t[0] for t in s["losses"]] == sorted(a) == sorted(b)
    worst = max(abs(b[k] - a[k]) / a[k] for k in a)
    assert s["max_relative_loss_difference"] == pytest.approx(worst) and worst <= 1e-3  # same global batch


def test_scaling_refuses_a_multi_gpu_baseline_and_has_no_rate_for_a_failed_run():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(distributed.scaling, globs={"scaling": distributed.scaling}):
        runner.run(test)
    assert runner.summarize(verbose=False) == (0, 4)  # the docstring's example: 4 statements, none failing
    ok = {"ranks": 1, "ok": True, "tokens_per_second": 100.0, "losses": [(1, 3.0)]}
    two = {"ranks": 2, "ok": True, "tokens_per_second": 150.0, "losses": [(1, 3.3), (2, 2.0)]}
    s = distributed.scaling(ok, two)
    assert s["efficiency"] == pytest.approx(0.75) and s["losses"] == [(1, 3.0, 3.3)]
    assert s["max_relative_loss_difference"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one-GPU run"):
        distributed.scaling(two, two)
    failed = {**ok, "ok": False, "tokens_per_second": None, "losses": []}
    s = distributed.scaling(failed, two)
    assert s["speedup"] is None and s["efficiency"] is None and s["max_relative_loss_difference"] is None
