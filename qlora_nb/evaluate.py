"""Scoring a model on the triage task (greedy answers -> schema-valid, category, priority) and on a forgetting canary.

`triage_metrics(model, tokenizer, rows)` generates one answer per test row with greedy
decoding, batched with left padding, and scores them with `scoring.score`: schema-valid
answers, invalid JSON and schema errors apart, category and priority accuracy with bootstrap
intervals. `perplexity` and
`canary_answers` check what the fine-tune did to general text and general questions.

Leaves out: sampling (greedy only, so before/after numbers are reproducible), training
(train.py), what a valid answer is (`data.answer_problem`) and the tables (scoring.py).
"""
from __future__ import annotations

import math
import re
import time

METRICS = ("valid", "category_accuracy", "priority_accuracy")  # valid: schema-valid (data.answer_problem)


def prompt_of(row: dict) -> list[dict]:
    """The chat messages a model sees for a row: everything before the final assistant answer."""
    messages = row["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def answer_token_budget(tokenizer, rows: list[dict], margin: int = 8) -> int:
    """max_new_tokens that fits the longest reference answer in `rows` plus `margin` tokens (and the end token)."""
    longest = max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for r in rows)
    return longest + margin


def generate_answers(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16,
                     max_new_tokens: int = 48, progress: bool = True) -> list[str]:
    """Greedy answers (strings, special tokens dropped) to chat prompts, in the order given.

    Prompts are sorted by length so each batch of B is left-padded to a similar T;
    generation stops at the end-of-turn token or after max_new_tokens.
    """
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(conversations)),
                   key=lambda i: len(tokenizer.apply_chat_template(conversations[i], tokenize=False)))
    answers: list[str | None] = [None] * len(conversations)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the new tokens must follow each prompt directly
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            batch = tokenizer.apply_chat_template([conversations[i] for i in idx], add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]  # B, new tokens
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_answers(answers: list[str], rows: list[dict]) -> dict:
    """Fractions in [0, 1] over all rows: valid (schema-valid), category_accuracy, priority_accuracy, both_accuracy,
    each with its bootstrap interval (`name_low`, `name_high`), and the counts invalid_json and schema_errors.

    An answer that is not schema-valid (`data.answer_problem`) is wrong on both labels; see scoring.score.
    """
    from . import scoring

    return scoring.score(answers, rows).summary()


def triage_metrics(model, tokenizer, rows: list[dict], batch_size: int = 16, max_new_tokens: int | None = None,
                   progress: bool = True) -> dict:
    """Greedy answers to the rows, scored: score_answers' keys plus "answers", "score" (the scoring.Score with the
    per-row labels behind the tables) and "seconds".

    max_new_tokens None: just enough for the longest reference answer (see answer_token_budget).
    """
    from . import scoring

    if not rows:
        raise ValueError("No rows to evaluate: the test split (or its sample) is empty. Use a larger eval sample.")
    budget = max_new_tokens or answer_token_budget(tokenizer, rows)
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, [prompt_of(r) for r in rows], batch_size, budget, progress)
    result = scoring.score(answers, rows)
    return {**result.summary(), "answers": answers, "score": result, "seconds": time.perf_counter() - start}


def perplexity(model, tokenizer, text: str, max_length: int = 512) -> float:
    """exp(mean next-token loss in nats) of `text`, read in windows of max_length tokens.

    Lower is better; a fine-tune that damages general language ability raises it.
    """
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]  # T
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, max_length):
            window = ids[start:start + max_length].unsqueeze(0).to(device)  # 1, T
            if window.shape[1] < 2:
                break
            with torch.no_grad():
                loss = model(input_ids=window, labels=window).loss.float().item()
            total += loss * (window.shape[1] - 1)  # the loss is a mean over T - 1 predicted tokens
            count += window.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total / count)


def canary_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 40, progress: bool = False) -> list[str]:
    """Greedy answers to plain general-knowledge questions (one user turn each, no system prompt)."""
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return generate_answers(model, tokenizer, conversations, batch_size=len(questions) or 1,
                            max_new_tokens=max_new_tokens, progress=progress)


def canary_hits(answers: list[str], expected: list[str]) -> list[bool]:
    """Whether each answer contains one of its accepted words (`expected[i]` is "word|other", case-insensitive).

    >>> canary_hits(["There are 7 days.", "Bees make wax."], ["seven|7", "honey"])
    [True, False]
    """
    hits = []
    for answer, accepted in zip(answers, expected):
        words = [w.strip().lower() for w in accepted.split("|") if w.strip()]
        hits.append(any(re.search(rf"\b{re.escape(w)}\b", answer.lower()) for w in words))
    return hits
