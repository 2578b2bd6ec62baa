"""Two baselines every triage score is shown next to: the majority class, and a keyword rule a team would write on day one.

Both return answer strings in the model's JSON format, so they go through the same scorer
(`scoring.score`) as the model on the same rows:
- `majority_answers(train_rows, rows)`: the most frequent training category and priority for every row.
- `keyword_answers(rows)`: the category whose keywords occur most often in the message
  (ties: the earlier category in CATEGORY_KEYWORDS; none: the majority category), and a priority from
  alarm words (urgent), problem words (high), question words (low), else medium.

Leaves out: anything learned (a model is the point of the workbook); the keyword lists are
short on purpose, a first heuristic, not a tuned rule set.

>>> json.loads(keyword_answers([{"messages": [{"role": "user", "content": "I was charged twice!"}]}])[0])["category"]
'billing'
"""
from __future__ import annotations

import json
import re
from collections import Counter

CATEGORY_KEYWORDS = {
    "billing": ["charge", "charged", "invoice", "payment", "paid", "bill", "billed", "vat", "price", "card", "refund",
                "subscription", "fee", "receipt", "discount", "coupon"],
    "shipping": ["delivery", "delivered", "tracking", "parcel", "package", "courier", "shipped", "shipping", "arrive",
                 "arrived", "address", "carrier", "dispatch"],
    "account": ["account", "login", "log in", "password", "sign in", "signin", "email", "e-mail", "username", "profile",
                "two-factor", "2fa", "locked", "suspended"],
    "technical": ["error", "crash", "app", "turn on", "wifi", "wi-fi", "bluetooth", "firmware", "update", "battery",
                  "broken", "not working", "doesn't work", "won't", "connect", "screen"],
    "returns": ["return", "returned", "send back", "sent back", "exchange", "swap", "label", "damaged", "wrong item",
                "replacement", "pickup", "drop off"],
}
ALARM_WORDS = ["urgent", "asap", "immediately", "emergency", "right now", "critical", "now!", "today"]
PROBLEM_WORDS = ["twice", "not working", "broken", "can't", "cannot", "won't", "never", "lost", "locked", "still"]
QUESTION_WORDS = ["how do i", "how can i", "is it possible", "can i", "question", "wondering", "just wanted"]


def _count(text: str, words) -> int:
    return sum(len(re.findall(rf"(?<![a-z]){re.escape(w)}(?![a-z])", text)) for w in words)


def _answer(category: str, priority: str) -> str:
    return json.dumps({"category": category, "priority": priority, "summary": "baseline"})


def majority_labels(train_rows: list[dict]) -> tuple[str, str]:
    """(most frequent category, most frequent priority) in the training rows (ties: first seen)."""
    from .scoring import labels_of

    labels = [labels_of(r) for r in train_rows]
    return Counter(c for c, _ in labels).most_common(1)[0][0], Counter(p for _, p in labels).most_common(1)[0][0]


def majority_answers(train_rows: list[dict], rows: list[dict]) -> list[str]:
    """The majority-class answer for every row (the floor any model must beat)."""
    category, priority = majority_labels(train_rows)
    return [_answer(category, priority)] * len(rows)


def keyword_category(text: str, default: str = "technical") -> str:
    """The category whose CATEGORY_KEYWORDS occur most often in `text` (lower-cased); `default` when none does."""
    text = text.lower()
    counts = {c: _count(text, words) for c, words in CATEGORY_KEYWORDS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else default


def keyword_priority(text: str) -> str:
    """urgent if an alarm word occurs, else high for a problem word, else low for a question word, else medium."""
    text = text.lower()
    if _count(text, ALARM_WORDS):
        return "urgent"
    if _count(text, PROBLEM_WORDS):
        return "high"
    if _count(text, QUESTION_WORDS):
        return "low"
    return "medium"


def keyword_answers(rows: list[dict], default_category: str = "technical") -> list[str]:
    """The keyword rule's answer for every row."""
    from .data import message_of

    return [_answer(keyword_category(message_of(r), default_category), keyword_priority(message_of(r))) for r in rows]
