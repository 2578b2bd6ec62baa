"""Merging (bf16/fp32 and into NF4) and serving several adapters on one base, on tiny-mistral."""
import types

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_nb import adapters, merge, models, orders, serve, train

TARGETS = ["q_proj", "v_proj", "gate_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny-mistral")


def _tiny(dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=dtype).eval()


def _with_random_lora(model, seed=0, name="default", scale=0.3):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    if hasattr(model, "peft_config"):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}" in n:
                p.normal_(0, scale)
    return model.eval()


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, tokenizer):
    """Two adapter folders for tiny-mistral with different random LoRA weights."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, seed in (("one", 1), ("two", 2)):
        out[name] = adapters.save_adapter(_with_random_lora(_tiny(), seed), root / name,
                                          base_model="tiny-mistral", tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def prompts():
    return [r["messages"][:-1] for r in orders.load_orders("test")[:3]]


def test_fp32_merge_equals_adapter(tokenizer, prompts):
    peft_model = _with_random_lora(_tiny())
    batch = merge.chat_batch(tokenizer, prompts)
    with_adapter = merge.logits_of(peft_model, batch)
    answers = serve.answers_with(peft_model, tokenizer, "default", prompts, max_new_tokens=6)
    merged = merge.merge(peft_model)
    assert not any("lora" in n for n, _ in merged.named_modules())
    gap = merge.logit_gap(with_adapter, merge.logits_of(merged, batch), batch["attention_mask"])
    base_gap = merge.logit_gap(with_adapter, merge.logits_of(_tiny(), batch), batch["attention_mask"])
    assert gap["max_abs"] < 1e-4 < base_gap["max_abs"]  # the adapter matters, and merging keeps it
    from qlora_nb.evaluate import generate_answers
    assert generate_answers(merged, tokenizer, prompts, max_new_tokens=6, progress=False) == answers


def _nf4_tiny_with_lora():
    model = AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), quantization_config=models.nf4_config(),
                                                 dtype=torch.bfloat16)
    peft_model = _with_random_lora(model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight
    deq = F.dequantize_4bit(w.data, w.quant_state)  # before any forward: the plain layout
    want = deq + layer.get_delta_weight("default")  # bf16 + fp32 -> fp32, as peft adds them
    return peft_model, w, want


def test_nf4_merge_requantizes_w_plus_delta_like_bitsandbytes(tokenizer, prompts):
    """Merged 4-bit weights are NF4(dequant(W) + delta), computed here with bitsandbytes' own functions."""
    peft_model, w, want = _nf4_tiny_with_lora()
    expected, _ = F.quantize_4bit(want, blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                  quant_type="nf4")
    assert merge.plain_4bit_kernels(peft_model) == 2 * len(train.ALL_PROJECTIONS)  # every projection of 2 layers
    merge.logits_of(peft_model, merge.chat_batch(tokenizer, prompts))  # an inference call, as in the notebook
    merged = merge.merge(peft_model)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert torch.equal(q_proj.weight.data.flatten(), expected.flatten())


def test_nf4_merge_after_cpu_repacking_is_not_garbage(tokenizer, prompts):
    """bitsandbytes repacks 4-bit weights on the first inference call on AVX-512 CPUs; merge() undoes that
    first (peft alone would read the packed bytes as plain ones)."""
    peft_model, w, want = _nf4_tiny_with_lora()
    merge.logits_of(peft_model, merge.chat_batch(tokenizer, prompts))  # may repack
    merged = merge.merge(peft_model)
    q = merged.model.layers[0].self_attn.q_proj.weight
    got = F.dequantize_4bit(q.data, q.quant_state).float()
    # NF4 keeps about 2 significant bits per weight: the re-quantized sum is within a block's step of it.
    rel = (got - want).norm() / want.norm()
    assert rel < 0.15, rel


def test_save_merged_round_trip(tmp_path, tokenizer, prompts):
    merged = merge.merge(_with_random_lora(_tiny()))
    folder = merge.save_merged(merged, tokenizer, tmp_path / "merged")
    batch = merge.chat_batch(tokenizer, prompts)
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(merge.logits_of(merged, batch), merge.logits_of(again, batch))
    assert merge.folder_bytes(folder) > 0 and list(tmp_path.iterdir()) == [folder]


def test_load_merged_refuses_another_base(saved_pair):
    with pytest.raises(adapters.AdapterMismatch):
        merge.load_merged("embedded", saved_pair["one"])


def test_per_request_routing_matches_set_adapter(tokenizer, saved_pair, prompts):
    model = serve.attach_adapters(_tiny(), saved_pair, base_model="tiny-mistral", tokenizer=tokenizer)
    assert sorted(model.peft_config) == ["one", "two"] and model.active_adapter == "one"
    conv = prompts[0]  # one prompt for every request: no padding differences between the two paths
    routed = serve.answer_requests(model, tokenizer, [("two", conv), (serve.BASE, conv), ("one", conv)],
                                   max_new_tokens=6)
    single = {name: serve.answers_with(model, tokenizer, name, [conv], max_new_tokens=6)[0]
              for name in ("one", "two", serve.BASE)}
    assert routed == [single["two"], single[serve.BASE], single["one"]]
    assert len({single["one"], single["two"], single[serve.BASE]}) == 3  # the adapters really differ
    with pytest.raises(ValueError, match="three"):
        serve.answer_requests(model, tokenizer, [("three", conv)])


def test_tokens_per_second_reports_every_model(tokenizer, prompts):
    speed = serve.tokens_per_second({"a": _tiny(), "b": _tiny()}, tokenizer, prompts[0], new_tokens=3, repeats=1)
    assert set(speed) == {"a", "b"} and all(v["tokens_per_s"] > 0 for v in speed.values())


def test_reuse_or_train_reuses_only_a_matching_adapter(tmp_path, tokenizer, monkeypatch):
    config = train.FinetuneConfig(base_model="tiny-mistral", rank=4, alpha=8, output_dir=str(tmp_path))
    folder = adapters.save_adapter(_with_random_lora(_tiny()), tmp_path / "adapter", base_model="tiny-mistral",
                                   tokenizer=tokenizer, training_args=config.to_dict())
    calls = []

    def fake_finetune(cfg, **kw):
        calls.append(cfg)
        return types.SimpleNamespace(adapter_dir=tmp_path / "new")

    monkeypatch.setattr(train, "finetune", fake_finetune)
    assert serve.reuse_or_train(config) == folder and not calls
    other = train.FinetuneConfig(base_model="tiny-mistral", rank=8, alpha=8, output_dir=str(tmp_path))
    assert serve.reuse_or_train(other) == tmp_path / "new" and calls == [other]
