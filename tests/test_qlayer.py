"""The hand-built QLoRA layer equals BitsAndBytesConfig + get_peft_model; activation metering is honest."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_nb import activations, models, nf4, qlayer

TARGET = "model.layers.0.self_attn.q_proj"


def _pair(double_quant, seed=0):
    """(our QLoRALinear, peft's LoRA layer on a bnb Linear4bit), same base weight, same A and B."""
    path = models.tiny_mistral_path()
    weight = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).get_submodule(TARGET).weight.detach()
    model, _ = models.load_base("tiny-mistral", quantize="nf4", double_quant=double_quant)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model.train()  # bnb repacks weights for a CPU inference kernel in eval mode without grad
    theirs = peft_model.base_model.model.get_submodule(TARGET)
    torch.manual_seed(seed)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(std=0.1)  # nonzero B so the adapter branch matters
    ours = qlayer.QLoRALinear(weight, r=4, alpha=8, double_quant=double_quant).copy_adapter_from(theirs)
    return ours, theirs


def _run(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return y, x.grad


def test_same_nf4_bytes_as_bitsandbytes_linear4bit():
    ours, theirs = _pair(double_quant=False)
    assert torch.equal(ours.packed.flatten(), theirs.base_layer.weight.data.flatten())
    assert torch.equal(ours.absmax, theirs.base_layer.weight.quant_state.absmax)


def test_equal_outputs_and_gradients_without_double_quant():
    ours, theirs = _pair(double_quant=False)
    x = torch.randn(2, 5, ours.in_features, dtype=torch.bfloat16)
    y_ours, gx_ours = _run(ours, x, g := torch.randn(2, 5, ours.out_features, dtype=torch.bfloat16))
    y_theirs, gx_theirs = _run(theirs, x, g)
    assert torch.equal(y_ours, y_theirs) and torch.equal(gx_ours, gx_theirs)
    assert torch.equal(ours.A.grad, theirs.lora_A["default"].weight.grad)
    assert torch.equal(ours.B.grad, theirs.lora_B["default"].weight.grad)


def test_close_outputs_and_gradients_with_double_quant():
    ours, theirs = _pair(double_quant=True)
    x = torch.randn(3, ours.in_features, dtype=torch.bfloat16)
    g = torch.randn(3, ours.out_features, dtype=torch.bfloat16)
    y_ours, _ = _run(ours, x, g)
    y_theirs, _ = _run(theirs, x, g)
    # absmax codes may differ by one 8-bit step (bnb's CPU search is approximate): close, not equal
    assert (y_ours.float() - y_theirs.float()).norm() / y_theirs.float().norm() < 0.02
    assert torch.allclose(ours.A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-2, atol=1e-3)
    assert torch.allclose(ours.B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-2, atol=1e-3)


def test_memory_breakdown_equals_peft_layer():
    for dq in (False, True):
        ours, theirs = _pair(double_quant=dq)
        assert ours.memory_bytes() == qlayer.peft_layer_memory_bytes(theirs)


def test_only_adapter_gets_gradients_and_no_weight_gradient_is_saved():
    layer = qlayer.QLoRALinear(torch.randn(32, 128), r=2, alpha=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True))  # as inside a model
    y.float().sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None
    assert [n for n, p in layer.named_parameters()] == ["A", "B"]
    # nothing of the dense weight's size is kept for backward: only 4-bit bytes and small activations
    assert all(t.numel() < 32 * 128 or t.dtype == torch.uint8 for t in saved)
    assert any(t.dtype == torch.uint8 for t in saved)


def test_step_zero_equals_frozen_nf4_base():
    w = torch.randn(16, 64)
    layer = qlayer.QLoRALinear(w, r=4, alpha=8, compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), x @ nf4.roundtrip(w).T)


def test_checkpointing_reduces_saved_activations():
    model, _ = models.load_base("tiny-mistral", quantize=None)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 1000, (1, 64))
    plain = activations.saved_activation_bytes(peft_model, ids, checkpointing=False)
    ckpt = activations.saved_activation_bytes(peft_model, ids, checkpointing=True)
    assert 0 < ckpt["after_forward"] < plain["after_forward"]
    assert plain["peak"] >= plain["after_forward"]
    assert not peft_model.base_model.model.is_gradient_checkpointing


def test_saved_activations_do_not_depend_on_weight_storage():
    ids = torch.randint(0, 1000, (1, 16))
    counts = []
    for quantize in (None, "nf4"):
        model, _ = models.load_base("tiny-mistral", quantize=quantize)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        counts.append([activations.saved_activation_bytes(peft_model, ids, checkpointing=c)["after_forward"]
                       for c in (False, True)])
    assert counts[0] == counts[1]


def test_meter_counts_a_known_saved_tensor():
    lin = torch.nn.Linear(100, 1, bias=False)
    x = torch.randn(10, 100, requires_grad=True)
    with activations.SavedTensorMeter(lin) as meter:
        y = lin(x)
    assert meter.current == x.numel() * 4  # x is saved for the weight gradient; the weight is excluded
    del y
    assert meter.current == 0


def test_bad_input_has_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        qlayer.QLoRALinear(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        qlayer.QLoRALinear(torch.randn(4, 64), r=0)
