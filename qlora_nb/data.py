"""Load and check the triage data set: JSONL chat rows in, validated rows out, answers parsed, splits hashed.

`load_triage("train")` reads data/triage/train.jsonl (regenerating the files with datagen
when the package was installed without the repo's data/ folder, e.g. on Colab) and checks
every row; a bad row raises `DataError` naming the file and line and what to fix.
`parse_answer` is the one definition of a valid model answer the whole workbook uses.

Leaves out: making the data (datagen.py), chat templates and tokens (chat.py), scoring
models (evaluate.py).

>>> parse_answer('{"category": "billing", "priority": "low", "summary": "Charged twice."}')["category"]
'billing'
>>> parse_answer('Sure! {"category": "billing"}') is None
True
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import datagen, paths

CATEGORIES = datagen.CATEGORIES
PRIORITIES = datagen.PRIORITIES
ANSWER_KEYS = ("category", "priority", "summary")
SPLITS = tuple(datagen.SPLITS)
# Typed one by one, never generated, never trained on (tests/test_data.py checks no overlap with train/validation):
# "handwritten_dev" may choose settings; "handwritten" is only ever scored (data/README.md says how both were written).
HANDWRITTEN = {"handwritten": "handwritten.jsonl", "handwritten_dev": "handwritten_dev.jsonl"}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or row is not what the workbook expects; the message names the file, line and fix."""


def parse_answer(text: str) -> dict | None:
    """The answer as a dict if `text` is exactly one JSON object with string values for category, priority, summary.

    Surrounding whitespace is allowed; anything else around the object (prose, a second object, a
    code fence) makes it invalid and returns None. Values are not checked against CATEGORIES here:
    an answer with an invented category is valid JSON but a schema error (`answer_problem`).

    >>> parse_answer(' {"category": "x", "priority": "low", "summary": "s"} ')["category"]
    'x'
    >>> parse_answer('{"category": "billing", "priority": "low"}') is None   # summary missing
    True
    >>> parse_answer('{"category": "billing", "priority": "low", "summary": "s"} {}') is None  # two objects
    True
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    if end != len(text) or not isinstance(obj, dict) or set(obj) != set(ANSWER_KEYS):
        return None
    if not all(isinstance(obj[k], str) for k in ANSWER_KEYS):
        return None
    return obj


def answer_problem(text: str) -> str | None:
    """Why `text` is not a schema-valid triage answer, or None when it is.

    Two kinds of failure, kept apart because a production parser treats them apart:
    "invalid_json" (not exactly one JSON object with the three string keys) and "schema_error"
    (the right shape, but a category or priority outside CATEGORIES / PRIORITIES, e.g. an
    invented category "prices").

    >>> answer_problem('{"category": "prices", "priority": "low", "summary": "s"}')
    'schema_error'
    >>> answer_problem('Sure: {"category": "billing"}'), answer_problem(
    ...     '{"category": "billing", "priority": "low", "summary": "s"}')
    ('invalid_json', None)
    """
    answer = parse_answer(text)
    if answer is None:
        return "invalid_json"
    if answer["category"] not in CATEGORIES or answer["priority"] not in PRIORITIES:
        return "schema_error"
    return None


def _row_problem(row, triage: bool) -> str | None:
    """What is wrong with one parsed row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    messages = row.get("messages")
    if messages is None:
        return "missing field 'messages' (each row is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]})"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        for key in ("role", "content"):
            if key not in m:
                return f"messages[{i}] is missing field '{key}'"
        if m["role"] not in ROLES:
            return f"messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string"
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[:len(turns)] or turns[-1] != "assistant":
        return (f"roles are {roles}; expected an optional 'system' message, then 'user' and 'assistant' "
                "alternating, ending with the 'assistant' answer")
    if triage:
        answer_text = messages[-1]["content"]
        answer = parse_answer(answer_text)
        if answer is None:
            return (f"the assistant answer {answer_text[:80]!r} is not one JSON object with the keys "
                    f"{', '.join(ANSWER_KEYS)} (string values)")
        if answer["category"] not in CATEGORIES:
            return f"unknown category {answer['category']!r} in the answer; use one of {', '.join(CATEGORIES)}"
        if answer["priority"] not in PRIORITIES:
            return f"unknown priority {answer['priority']!r} in the answer; use one of {', '.join(PRIORITIES)}"
    return None


def read_jsonl(path, triage: bool = True) -> list[dict]:
    """Rows of a chat JSONL file, each checked; blank lines are skipped.

    triage=True also checks that each final assistant answer is a triage JSON object with a
    known category and priority (False: any chat rows, e.g. another task's data).
    Raises DataError("<file>, line <n>: <problem>") on the first bad row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file. Regenerate the data with `python -m qlora_nb.datagen`.")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno}). "
                                "Each line must be one JSON object.") from None
            problem = _row_problem(row, triage)
            if problem:
                raise DataError(f"{path}, line {lineno}: {problem}")
            rows.append(row)
    return rows


def triage_dir() -> Path:
    """data/triage, generated with datagen first if the files are not there (pip install without the repo)."""
    folder = paths.data_dir() / "triage"
    if not all((folder / f"{s}.jsonl").exists() for s in SPLITS):
        datagen.write_all(paths.data_dir())
    return folder


def split_path(split: str) -> Path:
    """The JSONL file of a split (train, validation, test) or a hand-written set (handwritten, handwritten_dev)."""
    if split in HANDWRITTEN:
        path = paths.data_dir() / "triage" / HANDWRITTEN[split]
        if not path.exists():
            raise DataError(f"{path}: no such file. The hand-written sets are typed, not generated: they come with "
                            "the repository's data/ folder. Clone the repository, or set QLORA_NB_DATA to its data/.")
        return path
    if split not in SPLITS:
        raise DataError(f"split={split!r}: choose one of {', '.join(SPLITS + tuple(HANDWRITTEN))}")
    return triage_dir() / f"{split}.jsonl"


def load_triage(split: str) -> list[dict]:
    """The checked rows of one triage split or hand-written set: [{"messages": [system, user, assistant], "meta": {...}}].

    >>> len(load_triage("test")) > 0, load_triage("handwritten")[0]["meta"]["source"]
    (True, 'handwritten')
    """
    path = split_path(split)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the {split} split is empty. Regenerate it with `python -m qlora_nb.datagen`.")
    return rows


def normalized(text: str) -> str:
    """A message reduced for overlap checks: lower case, letters and digits only, single spaces.

    >>> normalized("Hi,  I was CHARGED twice!!")
    'hi i was charged twice'
    """
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def message_of(row: dict) -> str:
    """The customer's message of a chat row (its last user turn)."""
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


def shared_messages(rows_a: list[dict], rows_b: list[dict]) -> set[str]:
    """The normalized messages that occur in both row lists (an evaluation set must share none with training).

    >>> a = [{"messages": [{"role": "user", "content": "My parcel is LATE!"}]}]
    >>> shared_messages(a, [{"messages": [{"role": "user", "content": "my parcel is late"}]}])
    {'my parcel is late'}
    """
    return {normalized(message_of(r)) for r in rows_a} & {normalized(message_of(r)) for r in rows_b}


def load_canary() -> dict:
    """The forgetting canary: {"text": general paragraphs (str), "questions": [str], "expected": [str]}.

    `expected[i]` lists accepted words for question i, separated by `|` (e.g. "seven|7").
    """
    folder = paths.data_dir() / "canary"
    if not (folder / "general.txt").exists() or not (folder / "questions.jsonl").exists():
        datagen.write_all(paths.data_dir())
    text = (folder / "general.txt").read_text(encoding="utf-8")
    qs = []
    with open(folder / "questions.jsonl", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    qs.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{folder / 'questions.jsonl'}, line {lineno}: not valid JSON") from None
    return {"text": text, "questions": [q["question"] for q in qs], "expected": [q["expected"] for q in qs]}


def dataset_hash(data) -> str:
    """16 hex digits of sha256 over the rows: a split name, a path, a list of paths, or a list of rows.

    Computed from the rows' canonical JSON, so a split name and its loaded rows hash the same
    and whitespace in the file does not matter; any change to a message or answer does.

    >>> dataset_hash("train") == dataset_hash(load_triage("train"))
    True
    """
    names = SPLITS + tuple(HANDWRITTEN)
    if isinstance(data, str) and data in names:
        rows = load_triage(data)
    elif isinstance(data, (str, Path)):
        rows = read_jsonl(data, triage=False)
    elif isinstance(data, (list, tuple)) and all(isinstance(x, (str, Path)) for x in data) and data:
        rows = [r for p in data for r in (load_triage(p) if p in names else read_jsonl(p, triage=False))]
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise TypeError(f"dataset_hash takes a split name, a path, a list of paths or a list of rows, "
                        f"not {type(data).__name__}")
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]
