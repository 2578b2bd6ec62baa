"""evaluate.py: answers are scored as data.parse_answer says, batched greedy = one-by-one greedy, perplexity = exp(mean CE)."""
import json
import math

import pytest
import torch

from qlora_nb import data, evaluate, models

ROWS = data.load_triage("test")[:4]


def _answer(row):
    return row["messages"][-1]["content"]


def test_scores_count_valid_category_and_priority_and_keep_schema_errors_apart():
    gold = [data.parse_answer(_answer(r)) for r in ROWS]
    other_category = next(c for c in data.CATEGORIES if c != gold[1]["category"])
    other_priority = next(p for p in data.PRIORITIES if p != gold[2]["priority"])
    answers = [
        _answer(ROWS[0]),                                                # right
        json.dumps({**gold[1], "category": other_category}),              # valid, wrong category
        json.dumps({**gold[2], "priority": other_priority}),              # valid, wrong priority
        "Sure! Here is the JSON: " + _answer(ROWS[3]),                    # prose around it: invalid JSON
    ]
    scores = evaluate.score_answers(answers, ROWS)
    assert {k: scores[k] for k in ("n", "valid", "category_accuracy", "priority_accuracy", "invalid_json",
                                   "schema_errors")} == {"n": 4, "valid": 3 / 4, "category_accuracy": 2 / 4,
                                                         "priority_accuracy": 2 / 4, "invalid_json": 1,
                                                         "schema_errors": 0}
    invented = json.dumps({**gold[0], "category": "prices"})             # the right shape, an invented category
    scores = evaluate.score_answers([invented] + answers[1:], ROWS)
    assert scores["schema_errors"] == 1 and scores["invalid_json"] == 1 and scores["valid"] == 2 / 4
    assert scores["category_accuracy"] == 1 / 4 and scores["priority_accuracy"] == 1 / 4  # wrong on both labels
    assert scores["category_accuracy_low"] <= scores["category_accuracy"] <= scores["category_accuracy_high"]


def test_empty_evaluation_set_is_refused():
    with pytest.raises(ValueError, match="empty"):
        evaluate.triage_metrics(None, None, [])


def test_answer_budget_fits_every_reference_answer():
    tokenizer = models.load_tokenizer("embedded")
    budget = evaluate.answer_token_budget(tokenizer, ROWS, margin=0)
    lengths = [len(tokenizer(_answer(r), add_special_tokens=False)["input_ids"]) for r in ROWS]
    assert budget == max(lengths)


@pytest.fixture(scope="module")
def tiny_fp32():
    from transformers import AutoModelForCausalLM

    path = models.tiny_mistral_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, models.load_tokenizer(path)


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny_fp32):
    model, tokenizer = tiny_fp32
    conversations = [evaluate.prompt_of(r) for r in ROWS] + [[{"role": "user", "content": "Hi"}]]  # mixed lengths
    batched = evaluate.generate_answers(model, tokenizer, conversations, batch_size=5, max_new_tokens=8, progress=False)
    single = []
    for conv in conversations:
        enc = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        single.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored


def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny_fp32):
    model, tokenizer = tiny_fp32
    text = data.load_canary()["text"]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # 1, T
    window = 16
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, start:start + window]
        if chunk.shape[1] < 2:
            break
        with torch.no_grad():
            logits = model(chunk).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    assert evaluate.perplexity(model, tokenizer, text, max_length=window) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_canary_hits_match_whole_words_case_insensitively():
    assert evaluate.canary_hits(["PARIS, of course", "Parisian food", "seven", "Ice"],
                                ["paris", "paris", "seven|7", "water"]) == [True, False, True, False]
