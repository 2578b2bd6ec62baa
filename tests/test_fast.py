"""The fast path computes what the plain peft + bitsandbytes path computes: op by op, model loss, training, saved adapter."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from qlora_nb import fast, models

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU rows run on the device machine
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def tiny_dir(tmp_path_factory):
    """A 2-layer Mistral with seeded random weights, saved once (no tokenizer needed, so it builds on the GPU machine too)."""
    from transformers import MistralConfig, MistralForCausalLM

    global TINY
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    TINY = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(TINY)
    return TINY


def _tiny_4bit(compute_dtype, device="cpu"):
    """The tiny Mistral in NF4+DQ with `compute_dtype` compute (fp32 makes peft and ours comparable to 1e-5)."""
    kwargs = {"dtype": compute_dtype, "quantization_config": models.nf4_config(compute_dtype=compute_dtype),
              "device_map": {"": 0 if device == "cuda" else "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(TINY, **kwargs)
    models.plain_4bit_kernels(model)
    return model


def _peft(model, seed=0, dropout=0.0, targets=TARGETS):
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    with torch.no_grad():  # nonzero B, so the LoRA branch and A's gradient matter from the start
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                g = torch.Generator().manual_seed(zlib.crc32(n.encode()) + seed)  # drawn on the CPU: same on any device
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.train()
    return pm


def _batch(vocab, device, b=2, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g).to(device)
    labels = ids.clone()
    labels[:, : t // 3] = -100  # a prompt with no loss, as in completion-only training
    return ids, labels


def _lora_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_equals_torch(device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(device).requires_grad_(True)
    w = torch.randn(50, 16, generator=g).to(device)
    labels = torch.randint(0, 50, (37,), generator=g).to(device)
    labels[::5] = -100
    for num_items in (None, 40):
        ours = fast.linear_cross_entropy(h, w, labels, chunk_rows=8, num_items=num_items)
        (gh,) = torch.autograd.grad(ours, h)
        ref_sum = F.cross_entropy(h @ w.T, labels, reduction="sum")
        ref = ref_sum / (num_items or (labels != -100).sum())
        (rh,) = torch.autograd.grad(ref, h)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_refuses_a_trained_lm_head():
    with pytest.raises(ValueError, match="lm_head"):
        fast.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(3).long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keep_weight", [False, True])
def test_lora_linear_equals_peft_layer_on_nf4(device, keep_weight):
    pm = _peft(_tiny_4bit(torch.float32, device))
    layer = pm.base_model.model.model.layers[0].mlp.down_proj  # peft lora.Linear4bit over bnb Linear4bit
    x = torch.randn(2, 5, layer.in_features, device=device, generator=None).requires_grad_(True)
    gy = torch.randn(2, 5, layer.out_features, device=device)

    def run(fn):
        for p in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.grad = None
        y = fn(x)
        y.backward(gy)
        return [t.detach().clone() for t in (y, x.grad, layer.lora_A["default"].weight.grad,
                                             layer.lora_B["default"].weight.grad)]

    theirs = run(layer)
    ours = run(lambda v: fast.lora_linear(v, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                          layer.get_base_layer(), layer.scaling["default"], keep_weight))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_nf4_dequant_is_bit_identical_to_bitsandbytes(device, nested, dtype):
    """One Triton kernel (interpreted on the CPU) against bitsandbytes' dequantize_4bit, double quantization on and off;
    19,200 weights, so the last program is partial and the masks are exercised."""
    import bitsandbytes.functional as bnbf

    from qlora_nb import nf4_kernel

    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(96, 200, generator=g) * 0.02).to(device, dtype)
    packed, state = bnbf.quantize_4bit(dense, blocksize=64, compress_statistics=nested, quant_type="nf4")
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    ours, theirs = nf4_kernel.dequantize_nf4(weight), bnbf.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == dense.shape
    assert torch.equal(ours, theirs)
    assert nf4_kernel.supports(weight) == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_fast_model_loss_and_gradients_equal_plain(device):
    plain = _peft(_tiny_4bit(torch.float32, device))
    quick = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32, device)), checkpointing=True, dtype=torch.float32)
    assert quick._qlora_nb_fast["checkpointed_layers"] == plain.config.num_hidden_layers
    n_layers = plain.config.num_hidden_layers
    assert quick._qlora_nb_fast["lora_layers"] == 7 * n_layers and quick._qlora_nb_fast["swiglu_mlps"] == n_layers
    assert quick._qlora_nb_fast["rms_norms"] == 2 * n_layers + 1
    assert quick._qlora_nb_fast["triton_dequant_layers"] == (7 * n_layers if device == "cuda" else 0)
    assert quick._qlora_nb_fast["compiled_layers"] == (n_layers if device == "cuda" else 0)
    ids, labels = _batch(plain.config.vocab_size, device)
    ref = plain(input_ids=ids, labels=labels).loss
    ref.backward()
    ours = fast.causal_lm_loss(quick, ids, labels, chunk_rows=7)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ref, g_ours = _lora_grads(plain), _lora_grads(quick)
    assert g_ref.keys() == g_ours.keys() and len(g_ref) == 14 * plain.config.num_hidden_layers
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def _dense_weight_calls(model, monkeypatch):
    """Loss, LoRA gradients and how many base weights were formed (dense_weight calls) in one step of `model`."""
    calls = []
    real = fast.dense_weight
    monkeypatch.setattr(fast, "dense_weight", lambda base, dtype: calls.append(base) or real(base, dtype))
    ids, labels = _batch(model.config.vocab_size, "cpu")
    loss = fast.causal_lm_loss(model, ids, labels)
    loss.backward()
    monkeypatch.setattr(fast, "dense_weight", real)
    return loss, _lora_grads(model), len(calls)


def test_lean_recompute_skips_down_proj_and_keeps_the_gradients(monkeypatch):
    """The recompute leaves out down_proj's base matmul (its output feeds only the layer's output), so each layer
    forms 20 base weights a step instead of 21 (7 forward, 6 or 7 recompute, 7 backward) with the same gradients."""
    def model(**kw):
        return fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), checkpointing=True, dtype=torch.float32, **kw)

    lean, full = model(), model(lean_recompute=False)
    n = lean.config.num_hidden_layers
    assert lean._qlora_nb_fast["lean_recompute_layers"] == n and full._qlora_nb_fast["lean_recompute_layers"] == 0
    assert fast.levers(lean)["lean_recompute"] and not fast.levers(full)["lean_recompute"]
    loss_lean, g_lean, calls_lean = _dense_weight_calls(lean, monkeypatch)
    loss_full, g_full, calls_full = _dense_weight_calls(full, monkeypatch)
    assert (calls_lean, calls_full) == (20 * n, 21 * n)
    assert torch.equal(loss_lean, loss_full)
    for name in g_full:
        torch.testing.assert_close(g_lean[name], g_full[name], rtol=1e-6, atol=1e-7, msg=name)
    # the test can tell: skipping a projection whose output the layer does read (gate_proj) breaks the gradients
    wrong = model()
    for layer in fast.causal_lm(wrong).model.layers:
        layer.mlp.gate_proj._qlora_nb_output_only = True
    _, g_wrong, _ = _dense_weight_calls(wrong, monkeypatch)
    assert any(not torch.allclose(g_wrong[k], g_full[k], rtol=1e-3, atol=1e-5) for k in g_full)
    no_ckpt = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), checkpointing=False, dtype=torch.float32)
    assert no_ckpt._qlora_nb_fast["lean_recompute_layers"] == 0  # nothing is recomputed, so nothing to skip


def test_compiled_layers_equal_the_eager_fast_path_without_graph_breaks():
    # regional compilation (compile_layers) must change only how a layer runs: same loss and LoRA gradients,
    # and one graph per layer (a graph break would fall back to eager launches and gain nothing)
    from torch._dynamo.utils import counters

    eager = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), checkpointing=True, dtype=torch.float32)
    compiled = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), checkpointing=True, dtype=torch.float32,
                                     compile_layers=True)
    assert compiled._qlora_nb_fast["compiled_layers"] == compiled.config.num_hidden_layers
    ids, labels = _batch(eager.config.vocab_size, "cpu")
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for m in (eager, compiled):
        loss = fast.causal_lm_loss(m, ids, labels)
        loss.backward()
        losses.append(loss)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # shared by both layers: one without grad, one for the recompute
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    g_eager, g_compiled = _lora_grads(eager), _lora_grads(compiled)
    for n in g_eager:
        torch.testing.assert_close(g_compiled[n], g_eager[n], rtol=1e-4, atol=1e-6, msg=n)


def _train(model, loss_fn, batches, lr=2e-3):
    from qlora_nb.fast_check import adamw_losses

    return adamw_losses(model, loss_fn, batches, lr)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_twenty_steps_follow_the_plain_path_within_one_percent(device):
    """The issue's criterion: plain QLoRA (prepare_model_for_kbit_training, bf16 compute) vs the fast path, same init."""
    def plain_model():
        m = prepare_model_for_kbit_training(_tiny_4bit(torch.bfloat16, device), use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        return _peft(m)

    vocab = plain_model().config.vocab_size
    batches = [_batch(vocab, device, seed=s % 2) for s in range(20)]  # two batches, seen ten times: loss must fall
    plain = _train(plain_model(), lambda m, i, l: m(input_ids=i, labels=l).loss, batches, lr=3e-3)
    quick = _train(fast.enable_fast_path(plain_model(), checkpointing=True), fast.causal_lm_loss, batches, lr=3e-3)
    assert plain[-1] < plain[0] - 0.25  # it learns (nats), so the comparison means something
    rel = [abs(a - b) / a for a, b in zip(quick, plain)]
    print("max relative loss difference over 20 steps:", max(rel))
    assert max(rel) < 0.01, rel


def test_adapter_trained_fast_loads_with_plain_peft(tmp_path):
    quick = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), dtype=torch.float32)
    batches = [_batch(quick.config.vocab_size, "cpu", seed=s) for s in range(3)]
    _train(quick, fast.causal_lm_loss, batches)
    quick.save_pretrained(tmp_path)
    ids, _ = _batch(quick.config.vocab_size, "cpu", seed=7)
    quick.eval()
    with torch.no_grad():
        ours = quick(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(_tiny_4bit(torch.float32), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_disable_gives_peft_back_and_merge_matches():
    quick = fast.enable_fast_path(_peft(_tiny_4bit(torch.float32)), dtype=torch.float32)
    ids, _ = _batch(quick.config.vocab_size, "cpu")
    quick.eval()
    with torch.no_grad():
        fused = quick(input_ids=ids).logits
    fast.disable_fast_path(quick)
    layer = quick.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" not in layer.__dict__
    assert not any(getattr(m, "gradient_checkpointing", False) for m in quick.modules())  # it had none, and has none
    with torch.no_grad():
        plain = quick(input_ids=ids).logits
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="lora_dropout"):
        fast.enable_fast_path(_peft(_tiny_4bit(torch.float32), dropout=0.1))
    with pytest.raises(ValueError, match="get_peft_model"):
        fast.enable_fast_path(_tiny_4bit(torch.float32))


def test_checkpoint_function_recomputes_exactly():
    """Our checkpoint (no offload on the CPU) gives the gradients of running the block with no checkpoint at all."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    ckpt = fast.checkpoint_function(offload=False)
    ckpt(block, x).pow(2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    block(x).pow(2).sum().backward()
    theirs = [x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_swiglu_equal_the_library(device, dtype):
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = MistralRMSNorm(64, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(device, dtype).requires_grad_(True)
    gy = torch.randn(3, 5, 64, generator=g).to(device, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    ref = norm(x)
    (rx, rw) = torch.autograd.grad(ref, (x, norm.weight), gy)
    ours = fast.rms_norm(x, norm.weight, norm.variance_epsilon)
    (ox, ow) = torch.autograd.grad(ours, (x, norm.weight), gy)
    if device == "cpu":
        assert torch.equal(ours, ref)  # the forward is the library's, op for op
    torch.testing.assert_close(ours, ref, **tol)  # on CUDA torch.compile fuses it, rounding may differ
    torch.testing.assert_close(ox, rx, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(ow, rw, **tol)
    else:  # a bf16 sum over rows: hold ours to fp32 truth no worse than twice the library's own error
        x32, w32 = x.detach().float(), norm.weight.detach().float()
        (tw,) = torch.autograd.grad(fast.rms_norm(x32, w32.requires_grad_(True), norm.variance_epsilon), w32,
                                    gy.float())
        assert (ow.float() - tw).abs().max() <= 2 * (rw.float() - tw).abs().max() + 1e-3

    gate, up = (torch.randn(4, 32, generator=g).to(device, dtype).requires_grad_(True) for _ in range(2))
    gh = torch.randn(4, 32, generator=g).to(device, dtype)
    ref = F.silu(gate) * up
    rg = torch.autograd.grad(ref, (gate, up), gh)
    ours = fast.swiglu(gate, up)
    og = torch.autograd.grad(ours, (gate, up), gh)
    torch.testing.assert_close(ours, ref, **tol)
    for a, b in zip(og, rg):
        torch.testing.assert_close(a, b, **tol)


def test_loss_match_trains_both_paths_on_the_same_batches():
    from qlora_nb import fast_check

    match = fast_check.loss_match("tiny-mistral", steps=3, batch=2, seq=32)
    assert len(match["plain"]) == len(match["plain_bf16"]) == len(match["fast"]) == 3
    assert match["max_relative_difference"] < 0.01
    assert match["max_relative_difference"] == max(abs(a - b) / a for a, b in zip(match["plain_bf16"], match["fast"]))
    assert match["max_relative_difference_vs_fp32"] == max(abs(a - b) / a for a, b in zip(match["plain"], match["fast"]))


@pytest.mark.parametrize("device", DEVICES)
def test_window_attention_equals_the_dense_sliding_window_mask(device):
    """FlexAttention with a block mask attends where sdpa's dense sliding-window mask does: same loss, and on
    CUDA the same LoRA gradients (torch has no FlexAttention backward on the CPU, so the fast path keeps sdpa there)."""
    from torch.nn.attention.flex_attention import BlockMask

    def windowed(window=8):
        m = _tiny_4bit(torch.float32, device)
        m.config.sliding_window = window  # shorter than the batch's 24 tokens, so the window cuts in
        return _peft(m)

    plain = windowed()
    quick = fast.enable_fast_path(windowed(), checkpointing=True, dtype=torch.float32)
    assert quick._qlora_nb_fast["window_attention"] == (device == "cuda")
    if device == "cpu":
        with pytest.raises(ValueError, match="CPU"):
            fast.enable_fast_path(windowed(), window_attention=True)
        assert fast.use_window_attention(fast.causal_lm(quick))  # forward only, to compare below
    assert isinstance(fast._fast_attention_mask(batch_size=2, q_length=24, kv_length=24, local_size=8,
                                                device=device), BlockMask)
    assert fast._fast_attention_mask(batch_size=2, q_length=8, kv_length=8, local_size=8, device=device) is None
    ids, labels = _batch(plain.config.vocab_size, device)
    with torch.set_grad_enabled(device == "cuda"):
        ref = plain(input_ids=ids, labels=labels).loss
        ours = fast.causal_lm_loss(quick, ids, labels)
        no_window = windowed(window=4096)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert abs(no_window.item() - ref.item()) > 1e-3  # the window changes the loss, so the test can tell them apart
    if device == "cuda":
        ref.backward()
        ours.backward()
        g_ref, g_ours = _lora_grads(plain), _lora_grads(quick)
        for n in g_ref:
            torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    fast.disable_fast_path(quick)
    assert quick.config._attn_implementation == "sdpa"
