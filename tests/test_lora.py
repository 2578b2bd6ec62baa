"""LoRALinear equals peft's LoRA layer (outputs and A/B gradients); parameter counts equal peft's."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from qlora_nb import lora, models


@pytest.fixture()
def tiny():
    return AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=torch.float32)


def _peft_layer(model, r, alpha, targets=("q_proj",)):
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    return peft_model, peft_model.base_model.model.model.layers[0].self_attn.q_proj


def test_step_zero_equals_base():
    base = torch.nn.Linear(48, 24)
    layer = lora.LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 48)
    assert torch.equal(layer(x), base(x))
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.A.abs().sum() > 0 and torch.count_nonzero(layer.B) == 0


def test_lora_linear_equals_peft_outputs_and_gradients(tiny):
    torch.manual_seed(0)
    _, peft_q = _peft_layer(tiny, r=4, alpha=16)
    with torch.no_grad():  # a trained-looking B, otherwise the comparison would be trivial
        peft_q.lora_B["default"].weight.normal_(std=0.1)
    ours = lora.LoRALinear.from_peft(peft_q)
    x = torch.randn(2, 7, peft_q.in_features)
    y_peft, y_ours = peft_q(x), ours(x)
    assert torch.equal(y_ours, y_peft)
    grad_out = torch.randn_like(y_peft)
    y_peft.backward(grad_out)
    y_ours.backward(grad_out)
    assert torch.allclose(ours.A.grad, peft_q.lora_A["default"].weight.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours.B.grad, peft_q.lora_B["default"].weight.grad, rtol=1e-6, atol=1e-7)
    assert ours.base.weight.grad is None
    merged = ours.base.weight + ours.delta_weight()
    assert torch.allclose(x @ merged.T + ours.base.bias if ours.base.bias is not None else x @ merged.T,
                          y_ours, atol=1e-5)


def test_lora_linear_equals_peft_on_a_bf16_base_with_fp32_adapter():
    model = AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=torch.bfloat16)
    _, peft_q = _peft_layer(model, r=8, alpha=16)
    assert peft_q.lora_A["default"].weight.dtype == torch.float32  # peft upcasts adapters next to bf16
    with torch.no_grad():
        peft_q.lora_B["default"].weight.normal_(std=0.1)
    ours = lora.LoRALinear.from_peft(peft_q)
    x = torch.randn(3, peft_q.in_features, dtype=torch.bfloat16)
    y_peft, y_ours = peft_q(x), ours(x)
    assert y_ours.dtype == torch.bfloat16 and torch.equal(y_ours, y_peft)
    grad_out = torch.randn_like(y_peft)
    y_peft.backward(grad_out)
    y_ours.backward(grad_out)
    assert torch.equal(ours.A.grad, peft_q.lora_A["default"].weight.grad)
    assert torch.equal(ours.B.grad, peft_q.lora_B["default"].weight.grad)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), lora.ALL_PROJECTIONS, ("down_proj",)], ids=len)
@pytest.mark.parametrize("r", [1, 8])
def test_parameter_count_equals_peft(r, targets):
    config = AutoConfig.from_pretrained(models.tiny_mistral_path())
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora.lora_parameter_count(config, r, targets) == trainable


def test_total_parameters_equals_instantiated_model():
    config = AutoConfig.from_pretrained(models.tiny_mistral_path())
    assert lora.total_parameters(config) == AutoModelForCausalLM.from_config(config).num_parameters()


def test_mistral_7b_shapes_from_config():
    shapes = lora.linear_layer_shapes(MistralConfig())
    config = MistralConfig()
    q = shapes["model.layers.0.self_attn.q_proj"]
    assert q == (config.num_attention_heads * config.head_dim, config.hidden_size)
    assert len([n for n in shapes if n.endswith("q_proj")]) == config.num_hidden_layers


def test_rank_r_errors_match_explicit_svd():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    errors = lora.rank_r_errors(lora.singular_values(w))
    for r in (0, 5, 29, 30):
        explicit = (w - lora.rank_r_approximation(w, r)).norm() / w.norm()
        assert torch.allclose(errors[r], explicit, atol=1e-5)


def test_low_rank_matrix_is_recovered_exactly():
    torch.manual_seed(0)
    w = torch.randn(50, 3) @ torch.randn(3, 40)
    errors = lora.rank_r_errors(lora.singular_values(w))
    assert errors[2] > 0.01 and errors[3] < 1e-5


def test_finetune_delta_changes_only_a_copy(tiny):
    ids = torch.randint(0, 100, (2, 8))
    name = "model.layers.0.self_attn.q_proj"
    before = tiny.get_submodule(name).weight.detach().clone()
    delta = lora.finetune_delta(tiny, name, ids, steps=2, lr=1e-3)
    assert delta.shape == before.shape and delta.abs().max() > 0
    assert torch.equal(tiny.get_submodule(name).weight, before)


def test_sgd_delta_has_rank_at_most_the_number_of_tokens(tiny):
    ids = torch.randint(0, 100, (1, 5))
    delta = lora.finetune_delta(tiny, "model.layers.1.mlp.down_proj", ids, steps=1, lr=1.0, optimizer="sgd")
    assert torch.linalg.matrix_rank(delta) <= ids.numel()
    adam = lora.finetune_delta(tiny, "model.layers.1.mlp.down_proj", ids, steps=1, lr=1e-3)
    assert torch.linalg.matrix_rank(adam) > ids.numel()


def test_bad_input_has_clear_errors():
    with pytest.raises(ValueError, match="not in this model"):
        lora.lora_parameter_count(MistralConfig(), 8, ("query",))
    with pytest.raises(ValueError, match="positive"):
        lora.LoRALinear(torch.nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        lora.LoRALinear(torch.nn.Conv1d(4, 4, 1))
