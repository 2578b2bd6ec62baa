"""The memory planner agrees with transformers' shapes, with the loaded embedded model, and with the H100 measurements."""
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, MistralConfig

from qlora_nb import bench, lora, memory, models, nf4

LLAMA_SHAPES = ["llama-3-8b", "llama-2-13b", "llama-3-70b"]


def _llama_config(shape: memory.ModelShape) -> LlamaConfig:
    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                       tie_word_embeddings=shape.tied)


def test_mistral_shape_is_mistralconfig_defaults():
    config = MistralConfig()
    shape = memory.ModelShape.from_config(config, name="Mistral 7B")
    assert shape == memory.MODELS["mistral-7b"]
    assert shape.total_params() == lora.total_parameters(config)
    assert memory.lora_params(shape, 16) == lora.lora_parameter_count(config, 16)


@pytest.mark.parametrize("name", LLAMA_SHAPES)
def test_named_shapes_count_parameters_like_transformers(name):
    shape = memory.MODELS[name]
    config = _llama_config(shape)
    assert shape.total_params() == lora.total_parameters(config)
    assert memory.lora_params(shape, 8, ("q_proj", "v_proj")) == lora.lora_parameter_count(config, 8, ("q_proj", "v_proj"))
    shapes = lora.linear_layer_shapes(config)
    assert {k.split(".")[-1]: v for k, v in shapes.items() if k.startswith("model.layers.0.")} == shape.linear_shapes()


@pytest.mark.parametrize("quant", ["none", "nf4", "nf4+dq"])
def test_weight_bytes_agree_with_nf4_module(quant):
    config = MistralConfig()
    expected = nf4.model_memory_bytes(config, "bf16" if quant == "none" else quant)
    assert memory.weight_bytes(memory.MODELS["mistral-7b"], quant) == expected


@pytest.fixture(scope="module")
def embedded_nf4():
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        models.embedded_base_path(), quantization_config=models.nf4_config(), dtype=torch.bfloat16)
    yield model
    del model


def test_embedded_nf4_weights_within_2_percent_on_cpu(embedded_nf4):
    measured = bench.weight_bytes(embedded_nf4)
    predicted = memory.plan("embedded", quant="nf4+dq", device="cpu").weights_loaded
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)


def test_embedded_bf16_weights_exact():
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(models.embedded_base_path(),
                                                                          dtype=torch.bfloat16)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    assert params == memory.weight_bytes(memory.model_shape("embedded"), "none")
    assert bench.weight_bytes(model) - params == 2 * 4 * 32  # the rotary inv_freq buffers, which the planner leaves out
    assert memory.model_shape("embedded") == memory.ModelShape.from_config(
        AutoConfig.from_pretrained(models.embedded_base_path()), name="embedded SmolLM2-135M")


def test_planner_within_10_percent_of_every_gpu_measurement():
    runs = memory.load_bench()["runs"]
    assert len(runs) >= 5
    for run in runs:
        assert "error" not in run, run
        c = memory.compare_with_measurement(run)
        assert 0.9 <= c["ratio"] <= 1.1, (run["method"], run["seq"], run["batch"], c["ratio"])
        p = c["plan"]
        assert abs(p.weights_loaded / run["weight_bytes_after_load"] - 1) < 0.02
        assert abs((p.weights + p.lora_bytes) / run["bytes_after_setup"] - 1) < 0.02
        assert p.lora_params == run["trainable_params"]


def test_peak_is_static_plus_checkpoints_plus_largest_moment():
    p = memory.plan("mistral-7b", seq=2048, batch=4)
    assert p.peak == p.static + p.checkpoints + max(p.moments.values())
    assert sum(p.breakdown().values()) == pytest.approx(p.peak / memory.GIB)
    # the fp32 math kernel's T x T scores grow with T^2 at a fixed number of tokens
    short, long_ = memory.plan("mistral-7b", seq=512, batch=4), memory.plan("mistral-7b", seq=2048, batch=1)
    assert long_.peak > short.peak and long_.attention_kernel == short.attention_kernel == "math"
    assert memory.plan("mistral-7b", quant="none").attention_kernel == "flash"


def test_checkpointing_off_costs_more_and_8bit_optimizer_less():
    on = memory.plan("mistral-7b", seq=1024, batch=2)
    assert memory.plan("mistral-7b", seq=1024, batch=2, checkpointing=False).peak > on.peak
    assert memory.plan("mistral-7b", seq=1024, batch=2, optimizer="paged_adamw_8bit").peak < on.peak


def test_fits_and_advice_that_is_replanned():
    small = memory.plan("mistral-7b", seq=2048, batch=1)
    assert memory.fits(small, 24).fits
    big = memory.plan("mistral-7b", seq=2048, batch=8)
    answer = memory.fits(big, 24)
    assert not answer.fits and answer.advice and "(fits)" in answer.advice[0]
    assert "batch" in " ".join(answer.advice)
    huge = memory.fits(memory.plan("llama-3-70b", quant="none"), 80)
    assert not huge.fits and any("4-bit" in a for a in huge.advice)
    assert "does not fit" in str(huge)


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="choose one of"):
        memory.plan("mistral-7b", quant="int3")
    with pytest.raises(ValueError, match="not in this model"):
        memory.plan("mistral-7b", targets=("qkv",))
    with pytest.raises(ValueError, match="use one of"):
        memory.plan("gpt-5")
    with pytest.raises(ValueError, match="positive"):
        memory.plan("mistral-7b", batch=0)
    with pytest.raises(ValueError, match="GiB"):
        memory.fits(memory.plan("mistral-7b"), 0)


def test_forward_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    shape = memory.ModelShape("tiny", 64, 2, 4, 2, 16, 128, 100)
    # eager attention: its two batched matmuls are what the counter sees (it has no rule for CPU sdpa)
    config = _llama_config(shape)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    T = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 100, (1, T)))
    ours = T * memory.flops_per_token(shape, T, rank=0)["forward"]
    # the counter counts sdpa's full T x T; we count the causal half
    causal_half = shape.layers * 2 * T * T * shape.heads * shape.head_dim
    assert counter.get_total_flops() == pytest.approx(ours + causal_half, rel=1e-6)


def test_autocast_plans_the_trainers_bf16_matmuls_and_flash_attention():
    # the Trainer's bf16=True: the residual stream stays fp32 after prepare_model_for_kbit_training, but
    # attention and matmul outputs are bf16, so sdpa takes flash attention instead of the fp32 math kernel
    plain = memory.plan("mistral-7b", batch=4, seq=2048, dropout=0.0)
    auto = memory.plan("mistral-7b", batch=4, seq=2048, dropout=0.0, autocast=True)
    assert (plain.attention_kernel, auto.attention_kernel) == ("math", "flash")
    assert "attention backward (math kernel)" in plain.moments and "attention backward (math kernel)" not in auto.moments
    assert auto.checkpoints == plain.checkpoints and auto.static == plain.static
    shape = memory.MODELS["mistral-7b"]
    per = memory._layer_bytes_per_token(shape, 4, "flash", memory.ALL_PROJECTIONS, 16, 0.0, autocast=True)
    assert per["MLP"] == 4 * 2 * shape.intermediate
    assert auto.peak < plain.peak
    # a mask (sequences past Mistral's sliding window) is built in the compute dtype
    long_auto = memory.plan("mistral-7b", batch=1, seq=8192, dropout=0.0, autocast=True)
    assert long_auto.attention_kernel == "efficient"
