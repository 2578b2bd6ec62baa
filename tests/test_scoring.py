"""scoring.py and baselines.py: schema errors apart from wrong labels, bootstrap intervals that cover, tables that add up."""
import json
import random

import pytest

from qlora_nb import baselines, data, scoring


def row(category, priority, message="m"):
    answer = json.dumps({"category": category, "priority": priority, "summary": "s."})
    return {"messages": [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]}


def answer(category, priority):
    return json.dumps({"category": category, "priority": priority, "summary": "s."})


def test_an_invented_label_is_a_schema_error_not_a_wrong_label():
    rows = [row("billing", "low"), row("shipping", "high"), row("account", "urgent")]
    s = scoring.score([answer("prices", "low"), answer("shipping", "critical"), "not json"], rows)
    assert (s.schema_errors, s.invalid_json, s.valid) == (2, 1, 0.0)
    assert s.pred["category"] == [scoring.INVALID] * 3  # a parser rejects the whole answer
    assert s.category_accuracy == 0.0 and s.priority_accuracy == 0.0


def test_counts_of_right_labels_and_both():
    rows = [row("billing", "low"), row("billing", "high"), row("returns", "medium"), row("account", "urgent")]
    answers = [answer("billing", "low"), answer("billing", "low"), answer("technical", "medium"), "{}"]
    s = scoring.score(answers, rows)
    assert (s.category_accuracy, s.priority_accuracy, s.both_accuracy, s.valid) == (0.5, 0.5, 0.25, 0.75)
    assert s.correct("both") == [True, False, False, False]


def test_score_refuses_mismatched_lengths_and_empty_sets():
    with pytest.raises(ValueError, match="one answer per row"):
        scoring.score(["x"], [])
    with pytest.raises(ValueError, match="empty"):
        scoring.score([], [])


def test_bootstrap_interval_is_reproducible_contains_the_mean_and_narrows_with_n():
    outcomes = [True] * 70 + [False] * 30
    low, high = scoring.bootstrap_interval(outcomes)
    assert (low, high) == scoring.bootstrap_interval(outcomes)
    assert low < 0.7 < high
    # the normal approximation's 95% half width at p=0.7, n=100 is 1.96 * sqrt(.21/100) = 0.090
    assert 0.06 < (high - low) / 2 < 0.12
    wide = scoring.bootstrap_interval([True] * 7 + [False] * 3)
    assert wide[1] - wide[0] > high - low


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = random.Random(1)
    covered = 0
    for trial in range(200):
        outcomes = [rng.random() < 0.8 for _ in range(60)]
        low, high = scoring.bootstrap_interval(outcomes, resamples=400, seed=trial)
        covered += low <= 0.8 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_per_class_and_confusion_add_up():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", scoring.INVALID, "a"]
    table = {r["label"]: r for r in scoring.per_class(gold, pred, ["a", "b", "c"])}
    assert table["a"]["precision"] == 0.5 and table["a"]["recall"] == 0.5
    assert table["b"]["precision"] == 0.5 and table["b"]["recall"] == 0.5
    assert table["c"]["precision"] == 0.0 and table["c"]["recall"] == 0.0 and table["c"]["support"] == 1
    counts = scoring.confusion(gold, pred, ["a", "b", "c"])
    assert counts == [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]]
    assert sum(map(sum, counts)) == len(gold)
    assert [sum(r) for r in counts] == [r["support"] for r in scoring.per_class(gold, pred, ["a", "b", "c"])]


def test_majority_baseline_predicts_the_most_frequent_training_labels():
    train = [row("billing", "low"), row("billing", "high"), row("returns", "high")]
    answers = baselines.majority_answers(train, [row("account", "urgent")] * 2)
    assert [json.loads(a)["category"] for a in answers] == ["billing", "billing"]
    assert json.loads(answers[0])["priority"] == "high"


def test_keyword_baseline_reads_the_message_and_is_schema_valid():
    rows = [row("billing", "high", "I was charged twice for my order"),
            row("shipping", "medium", "the parcel tracking has not moved"),
            row("account", "low", "How do I change my password?"),
            row("technical", "urgent", "URGENT the app shows an error"),
            row("returns", "medium", "I want to send back the jacket, please send a return label")]
    answers = baselines.keyword_answers(rows)
    assert all(data.answer_problem(a) is None for a in answers)
    assert [json.loads(a)["category"] for a in answers] == ["billing", "shipping", "account", "technical", "returns"]
    assert [json.loads(a)["priority"] for a in answers] == ["high", "medium", "low", "urgent", "medium"]
