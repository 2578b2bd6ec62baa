"""train.py: bad settings fail before loading, only the answer is in the loss, and a resumed run continues its checkpoint."""
import json

import pytest
import torch

from qlora_nb import adapters, data, models, train

TRAIN = data.load_triage("train")[:24]
EVAL = data.load_triage("validation")[:4]


def tiny_config(tmp_path, **kw):
    base = dict(base_model="tiny-mistral", max_steps=2, batch_size=4, learning_rate=1e-3, lr_scheduler="constant",
                warmup_steps=0, eval_steps=1, save_steps=1, eval_limit=4, max_seq_length=256,
                output_dir=str(tmp_path / "run"))
    return train.FinetuneConfig(**{**base, **kw})


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load model weights (bad input must be caught before)."""
    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("loaded the base before checking the input"))


def test_defaults_are_the_qlora_recipe():
    config = train.FinetuneConfig()
    lora = train.lora_config(config)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert set(lora.target_modules) == set(train.linear_module_names("embedded"))  # all 7 projections


def test_unknown_target_module_names_it_and_the_real_ones(tmp_path, no_loading):
    config = tiny_config(tmp_path, target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ValueError, match="query_key_value") as err:
        train.finetune(config, train_rows=TRAIN, eval_rows=EVAL)
    assert "gate_proj" in str(err.value) and "target_modules" in str(err.value)


def test_sequence_longer_than_the_context_is_refused(tmp_path, no_loading):
    context = train.model_context_length("tiny-mistral")
    config = tiny_config(tmp_path, max_seq_length=context + 1)
    with pytest.raises(ValueError, match=f"at most {context}"):
        train.finetune(config, train_rows=TRAIN, eval_rows=EVAL)


@pytest.mark.parametrize("field,value", [("rank", 0), ("dropout", 1.0), ("max_steps", 0), ("learning_rate", -1e-4)])
def test_bad_numbers_are_refused(tmp_path, no_loading, field, value):
    with pytest.raises(ValueError, match=field):
        train.finetune(tiny_config(tmp_path, **{field: value}), train_rows=TRAIN, eval_rows=EVAL)


def test_empty_split_is_refused(tmp_path, no_loading):
    with pytest.raises(ValueError, match="train split is empty"):
        train.finetune(tiny_config(tmp_path), train_rows=[], eval_rows=EVAL)


def _write_splits(folder, train_lines):
    good = [json.dumps({"messages": r["messages"]}) for r in data.load_triage("validation")[:3]]
    (folder / "triage").mkdir(parents=True)
    (folder / "triage" / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    for split in ("validation", "test"):
        (folder / "triage" / f"{split}.jsonl").write_text("\n".join(good) + "\n")


@pytest.mark.parametrize("bad_line,problem", [
    ('{"messages": [{"role": "user", "content": "hi"}', "JSON"),                  # cut-off line
    (json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "assistant"),  # missing answer
    (json.dumps({"text": "no messages"}), "messages"),                           # missing field
])
def test_bad_data_file_names_the_line(tmp_path, monkeypatch, no_loading, bad_line, problem):
    good = json.dumps({"messages": TRAIN[0]["messages"]})
    _write_splits(tmp_path / "data", [good, bad_line])
    monkeypatch.setenv("QLORA_NB_DATA", str(tmp_path / "data"))
    with pytest.raises(data.DataError, match="line 2") as err:
        train.finetune(tiny_config(tmp_path))
    assert problem.lower() in str(err.value).lower()


def test_rows_longer_than_max_seq_length_are_refused(tmp_path):
    with pytest.raises(ValueError, match="longer than max_seq_length=48"):
        train.finetune(tiny_config(tmp_path, max_seq_length=48), train_rows=TRAIN, eval_rows=EVAL)


def test_only_the_answer_tokens_carry_loss(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    config = tiny_config(tmp_path)
    model, tokenizer = train.load_for_training(config)
    rows = TRAIN[:3]
    trainer = SFTTrainer(model=model, args=train.sft_config(config, progress=False),
                         train_dataset=Dataset.from_list(train.to_prompt_completion(rows)),
                         eval_dataset=Dataset.from_list(train.to_prompt_completion(EVAL)), processing_class=tokenizer)
    for row, example in zip(rows, trainer.train_dataset):
        labelled = [t for t in example["labels"] if t != -100]
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt)
        assert tokenizer.decode(labelled) == full[len(prompt):]  # the answer + end-of-turn, nothing of the prompt
        assert example["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]


def _dequantized_base(model):
    import bitsandbytes as bnb

    # The packed 4-bit codes. (Not the dequantized weights: bitsandbytes' CPU path re-stores the
    # double-quantized absmax after the first forward, which moves them by up to about 1%.)
    return {name: m.weight.data.clone() for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_training_moves_lora_only_and_saves_adapter_with_metadata(tmp_path):
    config = tiny_config(tmp_path)
    model, tokenizer = train.load_for_training(config)
    frozen = _dequantized_base(model)
    before = _lora_state(model)
    result = train.finetune(config, progress=False, model=model, tokenizer=tokenizer, train_rows=TRAIN, eval_rows=EVAL)
    after = _lora_state(result.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    now = _dequantized_base(model)
    assert frozen and all(torch.equal(codes, now[k]) for k, codes in frozen.items())  # the 4-bit base did not train
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert result.trainable_params == sum(v.numel() for v in before.values())
    assert [s for s, _ in result.loss_history["train"]] == [1, 2]
    assert [s for s, _ in result.loss_history["validation"]] == [1, 2]
    meta = adapters.read_metadata(result.adapter_dir)
    assert meta["data_hash"] == data.dataset_hash(TRAIN)
    assert meta["lora_config"]["r"] == 16 and meta["training_args"]["max_steps"] == 2
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_resume_continues_from_the_checkpoint(tmp_path):
    """Interrupted at step 2 and resumed to step 4 == 4 steps in one go, and only steps 3-4 ran again."""
    whole = train.finetune(tiny_config(tmp_path / "a", max_steps=4), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    first = train.finetune(tiny_config(tmp_path / "b", max_steps=2), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    second = train.finetune(tiny_config(tmp_path / "b", max_steps=4), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    assert second.resumed_from.endswith("checkpoint-2")
    assert (second.steps_run, second.global_step) == (2, 4)
    assert second.loss_history["train"][:2] == first.loss_history["train"]  # history carried over
    resumed, straight, halfway = _lora_state(second.model), _lora_state(whole.model), _lora_state(first.model)
    # Equal up to float noise (bitsandbytes' CPU kernels are not bit-reproducible across a reload) ...
    for k in straight:
        assert resumed[k].dtype == straight[k].dtype  # bf16: TRL keeps QLoRA adapters in bf16, resumed or not
        torch.testing.assert_close(resumed[k], straight[k], atol=2e-4, rtol=1e-2)
    # ... and far from where it was at the checkpoint, so steps 3-4 really trained on top of it.
    moved = max((straight[k] - halfway[k]).abs().max().item() for k in straight)
    assert moved > 5 * 2e-4
    losses = [loss for _, loss in whole.loss_history["train"]]
    assert [loss for _, loss in second.loss_history["train"]] == pytest.approx(losses, rel=1e-3)


def test_resume_false_starts_over_and_a_changed_config_is_refused(tmp_path):
    train.finetune(tiny_config(tmp_path, max_steps=1), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    with pytest.raises(ValueError, match="rank"):
        train.finetune(tiny_config(tmp_path, max_steps=2, rank=8), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    again = train.finetune(tiny_config(tmp_path, max_steps=2, resume=False), progress=False,
                           train_rows=TRAIN, eval_rows=EVAL)
    assert again.resumed_from is None and again.steps_run == 2


def test_empty_data_file_says_which_split(tmp_path, monkeypatch, no_loading):
    _write_splits(tmp_path / "data", [])
    monkeypatch.setenv("QLORA_NB_DATA", str(tmp_path / "data"))
    with pytest.raises(data.DataError, match="train split is empty"):
        train.finetune(tiny_config(tmp_path))


def test_fast_path_switch_trains_like_the_plain_path_and_saves_a_plain_adapter(tmp_path):
    """05's `fast_path` switch: same loss as the plain path step for step (dropout 0), an adapter plain peft loads."""
    from peft import PeftModel

    results = {}
    for fast_path in (False, True):
        config = tiny_config(tmp_path / str(fast_path), dropout=0.0, fast_path=fast_path, max_steps=3)
        results[fast_path] = train.finetune(config, progress=False, train_rows=TRAIN, eval_rows=EVAL)
    plain, quick = ([loss for _, loss in results[k].loss_history["train"]] for k in (False, True))
    assert len(plain) == len(quick) == 3
    assert max(abs(a - b) / a for a, b in zip(plain, quick)) < 0.01
    assert getattr(results[True].model, "_qlora_nb_fast", None)  # it really ran on the fast path
    base, tokenizer = models.load_base("tiny-mistral")
    loaded = PeftModel.from_pretrained(base, results[True].adapter_dir).eval()
    ids = tokenizer("a printer on floor 3 is jammed", return_tensors="pt").input_ids
    results[True].model.eval()
    with torch.no_grad():
        trained = results[True].model(input_ids=ids).logits.float()
        off_by = (loaded(input_ids=ids).logits.float() - trained).abs().max()
        with loaded.disable_adapter():
            adapter_effect = (loaded(input_ids=ids).logits.float() - trained).abs().max()
    print(f"max |logit difference|: loaded vs trained {off_by:.4f}, base vs trained {adapter_effect:.4f}")
    assert off_by < 0.02 and off_by < adapter_effect / 5  # bf16 rounding only, far below what the adapter changes


def test_fast_path_with_dropout_is_refused_before_loading(tmp_path, no_loading):
    with pytest.raises(ValueError, match="dropout=0.0"):
        train.check_config(tiny_config(tmp_path, fast_path=True, dropout=0.05))


def test_a_run_saved_before_a_new_config_field_still_resumes(tmp_path):
    train.finetune(tiny_config(tmp_path, max_steps=1), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    saved = tmp_path / "run" / train.CONFIG_FILE
    identity = json.loads(saved.read_text())
    del identity["fast_path"]  # as written by a version without the field
    saved.write_text(json.dumps(identity))
    again = train.finetune(tiny_config(tmp_path, max_steps=2), progress=False, train_rows=TRAIN, eval_rows=EVAL)
    assert again.resumed_from is not None and again.steps_run == 1
