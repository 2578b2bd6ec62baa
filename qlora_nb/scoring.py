"""Scoring triage answers as a production team would: schema checks, accuracies with bootstrap intervals, per-class precision/recall, confusion matrices.

`score(answers, rows)` takes the model's raw answer strings and the reference rows and
returns a `Score`: how many answers are schema-valid, how many are invalid JSON and how
many are schema errors (the right shape with an invented category or priority, counted
apart from wrong labels), category and priority accuracy over *all* rows (an answer that
is not schema-valid is wrong on both labels, because a parser would reject it whole), and
the predicted labels for the tables. `bootstrap_interval` gives a percentile interval for
any per-row 0/1 outcome; `per_class` and `confusion` build the tables a notebook shows.

Leaves out: generating answers (evaluate.py), what a valid answer is (data.answer_problem),
and the baselines (baselines.py).

>>> rows = [{"messages": [{"role": "assistant", "content": '{"category": "billing", "priority": "low", "summary": "s"}'}]}]
>>> s = score(['{"category": "prices", "priority": "low", "summary": "s"}'], rows)
>>> s.schema_errors, s.valid, s.priority_accuracy
(1, 0.0, 0.0)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

INVALID = "(invalid)"  # the predicted label of an answer that is not schema-valid, in the tables
LEVEL = 0.95           # the confidence level of every interval the workbook prints
RESAMPLES = 2000       # bootstrap resamples: enough for a stable 2.5th/97.5th percentile at n >= 50


@dataclass
class Score:
    """Scores of one answer set on one row set; fractions in [0, 1] over all n rows.

    gold/pred: {"category": [label per row], "priority": [...]}; pred holds INVALID where the
    answer was not schema-valid. problems: None, "invalid_json" or "schema_error" per row.
    """
    n: int
    valid: float
    category_accuracy: float
    priority_accuracy: float
    both_accuracy: float
    invalid_json: int
    schema_errors: int
    gold: dict = field(repr=False)
    pred: dict = field(repr=False)
    problems: list = field(repr=False)

    def correct(self, label: str) -> list[bool]:
        """Per-row outcome for "category", "priority", "both" or "valid" (the bootstrap's input)."""
        if label == "valid":
            return [p is None for p in self.problems]
        if label == "both":
            return [a and b for a, b in zip(self.correct("category"), self.correct("priority"))]
        return [g == p for g, p in zip(self.gold[label], self.pred[label])]

    def interval(self, label: str, seed: int = 0) -> tuple[float, float]:
        """The bootstrap interval (LEVEL) of one accuracy: "category", "priority", "both" or "valid"."""
        return bootstrap_interval(self.correct(label), seed=seed)

    def summary(self) -> dict:
        """The headline numbers as a flat dict, each accuracy with its interval (for tables and adapter metadata)."""
        out = {"n": self.n, "invalid_json": self.invalid_json, "schema_errors": self.schema_errors}
        for name, label in (("valid", "valid"), ("category_accuracy", "category"),
                            ("priority_accuracy", "priority"), ("both_accuracy", "both")):
            low, high = self.interval(label)
            out |= {name: getattr(self, name), f"{name}_low": low, f"{name}_high": high}
        return out


def labels_of(row: dict) -> tuple[str, str]:
    """(category, priority) of a reference row's assistant answer."""
    from . import data

    answer = data.parse_answer(row["messages"][-1]["content"])
    if answer is None:
        raise ValueError("a reference row's answer is not a triage JSON object; check the data file")
    return answer["category"], answer["priority"]


def score(answers: list[str], rows: list[dict]) -> Score:
    """Score raw answer strings against the rows' reference answers (same order, same length)."""
    from . import data

    if len(answers) != len(rows):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows: score one answer per row, in row order")
    if not rows:
        raise ValueError("No rows to score: the evaluation set is empty")
    gold = {"category": [], "priority": []}
    pred = {"category": [], "priority": []}
    problems = []
    for answer, row in zip(answers, rows):
        category, priority = labels_of(row)
        gold["category"].append(category)
        gold["priority"].append(priority)
        problem = data.answer_problem(answer)
        problems.append(problem)
        got = data.parse_answer(answer) if problem is None else None
        pred["category"].append(got["category"] if got else INVALID)
        pred["priority"].append(got["priority"] if got else INVALID)
    n = len(rows)
    right_c = [g == p for g, p in zip(gold["category"], pred["category"])]
    right_p = [g == p for g, p in zip(gold["priority"], pred["priority"])]
    return Score(n=n, valid=problems.count(None) / n, category_accuracy=sum(right_c) / n,
                 priority_accuracy=sum(right_p) / n, both_accuracy=sum(a and b for a, b in zip(right_c, right_p)) / n,
                 invalid_json=problems.count("invalid_json"), schema_errors=problems.count("schema_error"),
                 gold=gold, pred=pred, problems=problems)


def bootstrap_interval(outcomes: list[bool], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes: (low, high) in [0, 1].

    Rows are resampled with replacement `resamples` times (one seeded RNG: the same input gives
    the same interval); the interval is the (1-level)/2 and (1+level)/2 quantiles of the means.

    >>> bootstrap_interval([True] * 40)
    (1.0, 1.0)
    >>> low, high = bootstrap_interval([True] * 30 + [False] * 10); low < 0.75 < high
    True
    """
    n = len(outcomes)
    if n == 0:
        raise ValueError("bootstrap_interval of no outcomes: score at least one row")
    rng = random.Random(seed)
    hits = [1 if o else 0 for o in outcomes]
    means = sorted(sum(rng.choices(hits, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(tail * resamples)]
    high = means[min(resamples - 1, int((1 - tail) * resamples))]
    return low, high


def per_class(gold: list[str], pred: list[str], labels) -> list[dict]:
    """Precision, recall, F1 and support of each label: [{"label", "precision", "recall", "f1", "support"}].

    A label never predicted has precision 0 (no true positives), as scikit-learn's zero_division=0.

    >>> [round(r["precision"], 2) for r in per_class(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])]
    [1.0, 0.5]
    """
    out = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        predicted = sum(p == label for p in pred)
        support = sum(g == label for g in gold)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return out


def confusion(gold: list[str], pred: list[str], labels) -> list[list[int]]:
    """Counts[i][j]: rows whose true label is labels[i] and predicted label is columns[j], where the
    columns are labels plus INVALID (answers that were not schema-valid).

    >>> confusion(["a", "b"], ["a", INVALID], ["a", "b"])
    [[1, 0, 0], [0, 0, 1]]
    """
    columns = list(labels) + [INVALID]
    index = {c: j for j, c in enumerate(columns)}
    counts = [[0] * len(columns) for _ in labels]
    for g, p in zip(gold, pred):
        counts[list(labels).index(g)][index.get(p, len(columns) - 1)] += 1
    return counts


def plot_confusion(ax, gold: list[str], pred: list[str], labels, title: str):
    """Draw a confusion matrix (rows: true label, columns: predicted, last column: not schema-valid)."""
    from .plots import label as label_axes

    counts = confusion(gold, pred, labels)
    columns = list(labels) + ["invalid"]
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            ax.text(j, i, str(c), ha="center", va="center", color="white" if c > max(map(max, counts)) / 2 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30)
    ax.set_yticks(range(len(labels)), list(labels))
    return label_axes(ax, title, "predicted label", "true label (rows)")
