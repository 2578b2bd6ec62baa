"""chat.py: our completion-only label mask equals what TRL's SFTTrainer builds; templates, lengths, padding, packing."""
import math

import pytest
import torch

from qlora_nb import chat, data, models

ROWS = 6


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("embedded")


@pytest.fixture(scope="module")
def rows():
    return data.load_triage("train")[:ROWS]


def sft_prepared(tokenizer, conversations, tmp_path):
    """SFTTrainer's prepared train set and collator for prompt-completion rows (tiny Mistral model, nothing trained)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=torch.float32)
    rows = [{"prompt": m[:-1], "completion": m[-1:]} for m in conversations]
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, completion_only_loss=True, packing=False,
                     report_to="none", use_cpu=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset, trainer.data_collator


@pytest.mark.parametrize("template", ["own", "mistral", "mistral_folded"])
def test_labels_equal_sft_trainer_prepared_labels(tokenizer, rows, tmp_path, template):
    tok = tokenizer
    conversations = [r["messages"] for r in rows]
    if template != "own":  # TRL renders with the tokenizer's template, so give it Mistral's
        tok = models.load_tokenizer("embedded")
        tok.chat_template = chat.load_template(chat.MISTRAL_V0_3)
    if template == "mistral_folded":
        conversations = [chat.fold_system(m) for m in conversations]
    prepared, collator = sft_prepared(tok, conversations, tmp_path)
    ours = [chat.completion_labels(tok, m) for m in conversations]
    for i, enc in enumerate(ours):
        assert prepared[i]["input_ids"] == enc["input_ids"]
        assert prepared[i]["labels"] == enc["labels"]
    # The collator pads a batch: labels -100 on padding, ours padded the same way.
    batch = collator([prepared[i] for i in range(ROWS)])
    width = batch["labels"].shape[1]
    want = torch.tensor([e["labels"] + [chat.IGNORE] * (width - len(e["labels"])) for e in ours])
    assert torch.equal(batch["labels"], want)


def test_the_mask_covers_exactly_the_answer_and_its_end_of_turn(tokenizer, rows):
    for row in rows:
        enc = chat.completion_labels(tokenizer, row["messages"])
        assert enc["prompt_is_prefix"]
        trained = tokenizer.decode([t for t in enc["labels"] if t != chat.IGNORE])
        full = chat.render(tokenizer, row["messages"])
        prompt = chat.render(tokenizer, row["messages"][:-1], add_generation_prompt=True)
        assert full.startswith(prompt) and trained == full[len(prompt):]
        assert row["messages"][-1]["content"] in trained


def test_mistral_template_drops_the_system_prompt_from_training_rows_unless_folded(tokenizer, rows):
    mistral = chat.load_template(chat.MISTRAL_V0_3)
    messages = rows[0]["messages"]
    system = messages[0]["content"]
    prompt = chat.render(tokenizer, messages[:-1], add_generation_prompt=True, chat_template=mistral,
                         bos_token="<s>", eos_token="</s>")
    full = chat.render(tokenizer, messages, chat_template=mistral, bos_token="<s>", eos_token="</s>")
    assert prompt.startswith("<s>[INST] " + system) and system not in full
    assert full.endswith("[/INST] " + messages[-1]["content"] + "</s>")
    assert not chat.prefix_consistent(tokenizer, messages, mistral)
    folded = chat.fold_system(messages)
    assert chat.prefix_consistent(tokenizer, folded, mistral)
    assert system in chat.render(tokenizer, folded, chat_template=mistral)


def test_fold_system_leaves_rows_without_system_alone():
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert chat.fold_system(msgs) == msgs and chat.fold_system(msgs) is not msgs


def test_unknown_template_and_answerless_conversation_are_clear_errors(tokenizer):
    with pytest.raises(FileNotFoundError, match="mistral_instruct_v0_3"):
        chat.load_template("no_such_template")
    with pytest.raises(ValueError, match="last message must be the assistant"):
        chat.completion_labels(tokenizer, [{"role": "user", "content": "hi"}])


def test_token_lengths_match_the_tokenized_rows(tokenizer, rows):
    lengths = chat.token_lengths(tokenizer, rows)
    assert lengths == [len(chat.completion_labels(tokenizer, r["messages"])["input_ids"]) for r in rows]
    stats = chat.length_stats(lengths)
    assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["max"] and stats["n"] == ROWS


def brute_force_pad(lengths, batch_size, pad_to=None):
    pads = 0
    for s in range(0, len(lengths), batch_size):
        b = lengths[s:s + batch_size]
        pads += sum((pad_to or max(b)) - n for n in b)
    return pads


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_padding_waste_counts_pad_tokens(batch_size):
    lengths = [5, 9, 2, 7, 7, 3, 11, 4, 6]
    assert chat.padding_waste(lengths, batch_size, "given")["pad_tokens"] == brute_force_pad(lengths, batch_size)
    assert chat.padding_waste(lengths, batch_size, "given", pad_to=16)["pad_tokens"] == \
        brute_force_pad(lengths, batch_size, 16)
    assert chat.padding_waste(lengths, batch_size, "sorted")["pad_tokens"] <= \
        chat.padding_waste(lengths, batch_size, "random")["pad_tokens"]
    if batch_size == 1:
        assert chat.padding_waste(lengths, 1)["pad_tokens"] == 0


def test_packing_keeps_every_token_and_fits_the_length():
    lengths = [100, 90, 60, 40, 30, 10, 120, 5]
    packed = chat.packing_waste(lengths, max_length=128)
    assert packed["real_tokens"] == sum(lengths) and packed["truncated_tokens"] == 0
    assert packed["sequences"] >= math.ceil(sum(lengths) / 128)
    assert packed["slots"] == packed["sequences"] * 128


def test_batched_answer_losses_equal_the_models_own_loss_per_row(tokenizer, rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.tiny_mistral_path(), dtype=torch.float32)
    conversations = [r["messages"] for r in rows]
    batched = chat.completion_losses(model, tokenizer, conversations, batch_size=4)
    one_by_one = [chat.completion_loss(model, tokenizer, m) for m in conversations]
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    mistral = chat.load_template(chat.MISTRAL_V0_3)
    assert chat.completion_losses(model, tokenizer, conversations[:2], chat_template=mistral) != batched[:2]


def test_fit_to_template_folds_only_where_needed(tokenizer, rows):
    messages = rows[0]["messages"]
    assert chat.fit_to_template(tokenizer, messages) is messages
    mistral = chat.load_template(chat.MISTRAL_V0_3)
    fitted = chat.fit_to_template(tokenizer, messages, mistral)
    assert fitted == chat.fold_system(messages) and chat.prefix_consistent(tokenizer, fitted, mistral)
    broken = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(ValueError, match="prefix of the full conversation"):
        chat.fit_to_template(tokenizer, messages, broken)


def test_the_packaged_chatml_template_is_the_embedded_models_own(tokenizer):
    assert chat.load_template(chat.CHATML_SMOLLM2) == tokenizer.chat_template
    assert chat.other_template(tokenizer)[0] == chat.MISTRAL_V0_3
