"""datagen.py: labels follow the situation and its modifier, tone carries no label, the test pool is held out, output is reproducible."""
import collections
import json
import re

import pytest

from qlora_nb import data, datagen as gen
from qlora_nb.triage_bank import MODIFIERS, SITUATIONS


def labels(row):
    answer = json.loads(row["messages"][-1]["content"])
    return answer["category"], answer["priority"]


@pytest.fixture(scope="module")
def rows():
    return gen.generate_split("train", n=1500)


def test_every_label_is_the_guides_rule_applied_to_situation_and_modifier(rows):
    for row in rows:
        category, priority = labels(row)
        meta = row["meta"]
        situation = SITUATIONS[category][int(meta["situation"].split("/")[1])]
        assert meta["situation"].startswith(category + "/")
        assert priority == gen.priority_after(situation["priority"], meta["modifier"])
        assert data.answer_problem(row["messages"][-1]["content"]) is None


def test_modifier_rules_follow_the_guide():
    assert gen.priority_after("medium", "team") == "urgent"
    assert gen.priority_after("medium", "deadline") == "high"
    assert gen.priority_after("high", "deadline") == "high"
    assert gen.priority_after("medium", "chased") == "high"
    assert gen.priority_after("high", "chased") == "high"
    assert gen.priority_after("urgent", "chased") == "urgent"


def test_tone_carries_no_label(rows):
    # the loud phrases (ASAP!!, capitals, anger) appear at about the same rate with every priority
    loud = [p.lower() for p in gen.LOUD]
    rate = collections.defaultdict(list)
    for row in rows:
        text = row["messages"][1]["content"].lower()
        rate[labels(row)[1]].append(any(p.lower().replace(".", "") in text.replace(".", "") for p in loud))
    rates = {p: sum(v) / len(v) for p, v in rate.items()}
    assert max(rates.values()) - min(rates.values()) < 0.08, rates
    assert min(rates.values()) > 0.1, rates  # and they do appear, with low too


def test_no_urgency_word_in_the_situations_or_modifiers():
    banned = re.compile(r"\b(urgent|asap|immediately|emergency|right now|as soon as possible)\b", re.I)
    texts = [s for c in SITUATIONS.values() for sit in c for s in sit["say"] + [sit["summary"]]]
    texts += [s for kind, v in MODIFIERS.items() for s in (v if isinstance(v, list) else sum(v.values(), []))]
    assert not [t for t in texts if banned.search(t)]


def test_test_pool_situations_and_products_never_reach_train():
    train = gen.generate_split("train", n=800)
    test = gen.generate_split("test", n=300)
    assert not {r["meta"]["situation"] for r in train} & {r["meta"]["situation"] for r in test}
    assert not set(gen.PRODUCTS["train"]) & set(gen.PRODUCTS["test"])
    assert not set(gen.NAMES["train"]) & set(gen.NAMES["test"])
    held = gen.pool_of(list(range(20)), "test")
    assert held == [4, 9, 14, 19] and not set(held) & set(gen.pool_of(list(range(20)), "train"))


def test_every_category_and_priority_can_be_made_in_both_pools():
    for pool in ("train", "test"):
        for category in gen.CATEGORIES:
            made = gen.recipes(category, pool)
            assert all(made[p] for p in gen.PRIORITIES), (pool, category)


def test_reproducible_and_distinct():
    a = gen.generate_split("validation", n=50)
    assert a == gen.generate_split("validation", n=50)
    messages = [r["messages"][1]["content"] for r in gen.generate_split("train", n=400)]
    assert len(set(messages)) == len(messages)
