"""Base models: the embedded model loads in 4-bit, the cache is verified, hub ids fail fast offline."""
import shutil
import time

import pytest
import torch

from qlora_nb import models


def test_embedded_base_loads_in_4bit_on_cpu():
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    path = models.embedded_base_path()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=models.nf4_config())
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 7 * model.config.num_hidden_layers  # all projections of every layer
    assert linear4[0].weight.quant_state.quant_type == "nf4"


def test_embedded_model_answers_a_chat_question():
    model, tokenizer = models.load_base("embedded", quantize=None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


def test_manifest_detects_a_changed_file(tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(models.embedded_base_path(), folder)
    assert models._embedded_is_valid(folder)
    config = folder / "config.json"
    config.write_text(config.read_text().replace("576", "577"))
    assert not models._embedded_is_valid(folder)


def test_tiny_mistral_is_a_mistral_with_the_embedded_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.tiny_mistral_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "mistral"
    assert len(AutoTokenizer.from_pretrained(path)) == model.config.vocab_size


def test_hub_id_offline_fails_fast_and_names_the_embedded_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(models.BaseModelUnavailable) as err:
        models.resolve_base_model("someone/not-cached-model")
    assert time.perf_counter() - start < 5
    assert "offline" in str(err.value) and "embedded" in str(err.value)


def test_unreachable_hub_host_is_reported_offline(monkeypatch):
    monkeypatch.setattr(models, "HUB_HOST", "127.0.0.1")  # nothing listens on 443 here: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models.hub_reachable(timeout=1.0) is False
    with pytest.raises(models.BaseModelUnavailable, match="cannot be reached"):
        models.resolve_base_model(models.MISTRAL_7B)


def test_auto_choice_without_gpu_is_embedded():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU branch")
    assert models.auto_base_model() == models.EMBEDDED
    assert models.resolve_base_model("auto") == str(models.embedded_base_path())


def test_fingerprints_tell_bases_apart():
    embedded = models.base_fingerprint(str(models.embedded_base_path()))
    tiny = models.base_fingerprint(str(models.tiny_mistral_path()))
    assert embedded != tiny
    assert embedded == models.base_fingerprint("embedded")


def test_unknown_quantize_value_is_rejected():
    with pytest.raises(ValueError, match="nf4"):
        models.load_base("tiny-mistral", quantize="int3")


def test_load_base_keeps_4bit_weights_in_the_training_layout_after_eval():
    import bitsandbytes as bnb

    model, tokenizer = models.load_base("tiny-mistral", quantize="nf4")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = layer.weight.data.clone()
    model.eval()
    with torch.no_grad():
        model(**tokenizer("an eval pass", return_tensors="pt"))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, before)  # bitsandbytes' CPU repacking would change shape and bytes
