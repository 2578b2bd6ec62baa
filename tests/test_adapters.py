"""Adapter artifacts: round trip, refusal of another base / tokenizer / damaged file, atomic save."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_nb import adapters, models


def _tiny(seed=0):
    return AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(seed), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny-mistral")


@pytest.fixture()
def trained(tokenizer):
    """A tiny-mistral PeftModel whose LoRA B is non-zero (so the adapter changes the logits)."""
    torch.manual_seed(0)
    model = get_peft_model(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture()
def ids(tokenizer):
    return tokenizer("Order 1234 arrived broken.", return_tensors="pt")["input_ids"]


def test_round_trip_gives_the_same_logits_and_records_metadata(tmp_path, trained, tokenizer, ids):
    folder = adapters.save_adapter(trained, tmp_path / "a", base_model="tiny-mistral", tokenizer=tokenizer,
                                   data_hash="abc", training_args={"rank": 4}, metrics={"loss": 1.5})
    meta = adapters.read_metadata(folder)
    assert meta["base_fingerprint"] == models.base_fingerprint("tiny-mistral")
    assert meta["tokenizer_fingerprint"] == adapters.tokenizer_fingerprint(tokenizer)
    assert meta["lora_config"]["r"] == 4 and sorted(meta["lora_config"]["target_modules"]) == ["q_proj", "v_proj"]
    assert meta["data_hash"] == "abc" and meta["metrics"] == {"loss": 1.5}
    assert meta["library_versions"]["peft"] and meta["weights_sha256"]
    loaded = adapters.load_adapter(_tiny(), folder, base_model="tiny-mistral", tokenizer=tokenizer).eval()
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        want, got = trained(ids).logits, loaded(ids).logits
        base = _tiny()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter really is on


def test_adapter_of_another_base_is_refused(tmp_path, trained, tokenizer):
    folder = adapters.save_adapter(trained, tmp_path / "a", base_model="tiny-mistral", tokenizer=tokenizer)
    with pytest.raises(adapters.AdapterMismatch, match="trained on base 'tiny-mistral'.*loaded onto 'embedded'"):
        adapters.check_adapter(folder, base_model="embedded")
    # The same refusal when the name claims the right base but the object comes from another folder.
    other = models.tiny_mistral_path(seed=1)
    assert models.base_fingerprint(str(other)) != models.base_fingerprint("tiny-mistral")
    wrong = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    with pytest.raises(adapters.AdapterMismatch, match="loaded from"):
        adapters.load_adapter(wrong, folder, base_model="tiny-mistral")


def test_another_tokenizer_is_refused(tmp_path, trained, tokenizer):
    folder = adapters.save_adapter(trained, tmp_path / "a", base_model="tiny-mistral", tokenizer=tokenizer)
    other = models.load_tokenizer("tiny-mistral")
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(adapters.AdapterMismatch, match="tokenizer"):
        adapters.load_adapter(_tiny(), folder, base_model="tiny-mistral", tokenizer=other)


def test_embedded_adapter_refused_on_tiny_mistral(tmp_path):
    """A real pair of bases: an adapter saved for the embedded SmolLM2 does not load onto tiny-mistral."""
    base, tok = models.load_base("embedded", quantize=None)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    folder = adapters.save_adapter(peft_model, tmp_path / "smol", base_model="embedded", tokenizer=tok)
    with pytest.raises(adapters.AdapterMismatch, match="trained on base 'embedded'"):
        adapters.load_adapter(_tiny(), folder, base_model="tiny-mistral", tokenizer=tok)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_weights_are_refused(tmp_path, trained, tokenizer, damage):
    folder = adapters.save_adapter(trained, tmp_path / "a", base_model="tiny-mistral", tokenizer=tokenizer)
    weights = folder / adapters.WEIGHTS_FILE
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        weights.unlink()
    with pytest.raises(adapters.AdapterMismatch, match="corrupted|missing"):
        adapters.load_adapter(_tiny(), folder, base_model="tiny-mistral")


def test_missing_metadata_is_refused(tmp_path, trained, tokenizer):
    trained.save_pretrained(tmp_path / "plain")  # a bare peft folder: peft itself would load it
    with pytest.raises(adapters.AdapterMismatch, match="no qlora_nb_metadata.json"):
        adapters.load_adapter(_tiny(), tmp_path / "plain", base_model="tiny-mistral")


def test_crash_mid_save_leaves_nothing_loadable(tmp_path, trained, tokenizer, monkeypatch):
    target = tmp_path / "adapter"

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    # Crash after peft has written the weights, while the metadata is being computed.
    monkeypatch.setattr(adapters, "library_versions", crash)
    with pytest.raises(KeyboardInterrupt):
        adapters.save_adapter(trained, target, base_model="tiny-mistral", tokenizer=tokenizer)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temp folder left either

    # With an earlier adapter in place, a crashed re-save keeps the earlier one, intact and loadable.
    monkeypatch.undo()
    adapters.save_adapter(trained, target, base_model="tiny-mistral", tokenizer=tokenizer, metrics={"v": 1})
    monkeypatch.setattr(adapters, "library_versions", crash)
    with pytest.raises(KeyboardInterrupt):
        adapters.save_adapter(trained, target, base_model="tiny-mistral", tokenizer=tokenizer, metrics={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert adapters.check_adapter(target, base_model="tiny-mistral")["metrics"] == {"v": 1}


def test_resave_replaces_the_folder(tmp_path, trained, tokenizer):
    target = tmp_path / "adapter"
    adapters.save_adapter(trained, target, base_model="tiny-mistral", tokenizer=tokenizer, metrics={"v": 1})
    adapters.save_adapter(trained, target, base_model="tiny-mistral", tokenizer=tokenizer, metrics={"v": 2})
    assert json.loads((target / adapters.METADATA_FILE).read_text())["metrics"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_second_adapter_joins_a_peft_model_without_reloading(tmp_path, trained, tokenizer, ids):
    a = adapters.save_adapter(trained, tmp_path / "a", base_model="tiny-mistral", tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
        want_b = trained(ids).logits
    b = adapters.save_adapter(trained, tmp_path / "b", base_model="tiny-mistral", tokenizer=tokenizer)
    model = adapters.load_adapter(_tiny(), a, base_model="tiny-mistral")
    same = adapters.load_adapter(model, b, base_model="tiny-mistral", adapter_name="b")
    assert same is model and model.active_adapter == "b"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already on this model"):
        adapters.load_adapter(model, b, base_model="tiny-mistral", adapter_name="b")


def test_the_recorded_triage_adapter_checks_out_against_the_embedded_base_and_the_committed_data(tmp_path):
    import shutil

    from qlora_nb import data

    folder = adapters.recorded_adapter_dir()
    meta = adapters.check_adapter(folder, base_model="embedded", tokenizer=models.load_tokenizer("embedded"))
    assert meta["data_hash"] == data.dataset_hash(data.load_triage("train"))  # trained on the committed split
    assert adapters.adapter_bytes(folder) < 12 * 2**20
    copy = tmp_path / "triage"
    shutil.copytree(folder, copy)
    weights = copy / adapters.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(adapters.AdapterMismatch, match="corrupted"):
        adapters.check_adapter(copy, base_model="embedded")
