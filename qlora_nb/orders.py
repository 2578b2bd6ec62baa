"""A second small task for multi-adapter serving: pull the order number and product out of a message as JSON.

Rows are chat conversations in the same shape as the triage task ({"messages": [system,
user, assistant]}), generated from fixed templates and a seeded random number generator,
so `write_orders()` rebuilds data/orders/*.jsonl byte for byte. `score_orders` counts
answers that parse and that name exactly the right order id and product.

Leaves out: anything realistic (the messages are template-made, the products a short
list) and training (train.py trains on these rows like on any chat rows).

>>> row = generate_orders(1, seed=0)[0]
>>> [m["role"] for m in row["messages"]]
['system', 'user', 'assistant']
>>> parse_order(row["messages"][-1]["content"]) == row["answer"]
True
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM_PROMPT = ('Extract the order number and the product from the customer\'s message. '
                 'Answer with JSON only: {"order_id": "...", "product": "..."}.')
SPLITS = {"train": (160, 101), "validation": (32, 202), "test": (32, 303)}  # rows, seed

PRODUCTS = ["wireless mouse", "desk lamp", "coffee grinder", "yoga mat", "phone case", "water bottle",
            "hiking boots", "USB-C cable", "office chair", "rice cooker", "backpack", "bluetooth speaker",
            "winter jacket", "electric kettle", "monitor stand", "running shoes", "blender", "notebook set",
            "table fan", "laptop sleeve"]
TEMPLATES = [
    "Hi, my order {oid} with the {product} has not arrived yet. Can you check?",
    "The {product} I got in order {oid} is broken. I want a replacement.",
    "Please cancel order {oid}; I no longer need the {product}.",
    "Order number {oid}: the {product} came in the wrong colour.",
    "I was charged twice for the {product} (order {oid}). Please refund one.",
    "Where is my {product}? It's order {oid} and the tracking hasn't moved in a week.",
    "Can I change the delivery address for order {oid}? It's the {product}.",
    "hello!! {product} from order {oid} stopped working after two days",
    "Re: order {oid} - the {product} is missing a part.",
    "I'd like to return the {product}. Order ref {oid}. Thanks, Sam",
]


def order_id(rng: random.Random) -> str:
    """An order id in one of three shapes: 'A-48213', '#7712093' or 'ORD2024-0457'."""
    shape = rng.randrange(3)
    if shape == 0:
        return f"{rng.choice('ABCDKMPQ')}-{rng.randrange(10000, 99999)}"
    if shape == 1:
        return f"#{rng.randrange(1000000, 9999999)}"
    return f"ORD{rng.randrange(2021, 2027)}-{rng.randrange(0, 10000):04d}"


def generate_orders(n: int, seed: int = 0) -> list[dict]:
    """n chat rows {"messages": [...], "answer": {"order_id", "product"}}; the same seed gives the same rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = {"order_id": order_id(rng), "product": rng.choice(PRODUCTS)}
        text = rng.choice(TEMPLATES).format(oid=answer["order_id"], product=answer["product"])
        rows.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                  {"role": "user", "content": text},
                                  {"role": "assistant", "content": json.dumps(answer)}],
                     "answer": answer})
    return rows


def orders_dir() -> Path:
    from .paths import data_dir

    return data_dir() / "orders"


def write_orders(folder: Path | None = None) -> dict[str, Path]:
    """Write train/validation/test JSONL files (sizes and seeds in SPLITS); returns {split: path}."""
    folder = Path(folder) if folder else orders_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, (n, seed) in SPLITS.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_orders(n, seed)))
        out[split] = path
    return out


def load_orders(split: str = "train") -> list[dict]:
    """The rows of one split from data/orders/{split}.jsonl (generated in memory if the file is missing)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {list(SPLITS)}")
    path = orders_dir() / f"{split}.jsonl"
    if not path.exists():
        n, seed = SPLITS[split]
        return generate_orders(n, seed)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_order(text: str) -> dict | None:
    """{"order_id", "product"} from a model's answer, or None if it is not one JSON object with those two keys.

    >>> parse_order('{"order_id": "#1", "product": "blender"}')
    {'order_id': '#1', 'product': 'blender'}
    >>> parse_order('order #1, a blender') is None
    True
    """
    text = text.strip()
    if text.startswith("```"):  # models like to fence JSON
        text = text.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"order_id", "product"}:
        return None
    return {"order_id": str(obj["order_id"]), "product": str(obj["product"])}


def score_orders(answers: list[str], rows: list[dict]) -> dict:
    """Fractions in [0, 1]: valid_json (parses), exact_match (both fields right), order_id_accuracy."""
    if not rows:
        raise ValueError("No rows to score: pass at least one row.")
    parsed = [parse_order(a) for a in answers]
    n = len(rows)
    return {"n": n,
            "valid_json": sum(p is not None for p in parsed) / n,
            "exact_match": sum(p == r["answer"] for p, r in zip(parsed, rows)) / n,
            "order_id_accuracy": sum(p is not None and p["order_id"] == r["answer"]["order_id"]
                                     for p, r in zip(parsed, rows)) / n}


if __name__ == "__main__":
    for split, path in write_orders().items():
        print(split, path)
