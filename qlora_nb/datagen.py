"""Generate the support-ticket triage data set (and the forgetting canary): labels follow the situation a message describes, never its tone.

Each row is a chat conversation: a system prompt that states the JSON schema, a customer
message, and the assistant's answer, exactly one JSON object
`{"category": ..., "priority": ..., "summary": ...}`. A message is built around one
*situation* from `triage_bank.SITUATIONS` (written by hand by the labelling guide in
data/README.md): the situation fixes the category and a base priority, and an optional
*modifier* that says who is affected or what deadline is threatened (`triage_bank.MODIFIERS`)
moves the priority as the guide says (`priority_after`). Everything else is drawn
independently of the labels, so it carries no signal: tone (anger, "ASAP!!", capitals),
greetings, background, signatures, forwarded-mail and reply wrappers, lists, quoted error
text, a second minor question from another category, non-native grammar and keyboard typos.
The test pool holds every HELD_OUT_EVERY-th situation and modifier sentence and its own
products and names.

`python -m qlora_nb.datagen [OUT_DIR]` writes triage/{train,validation,test}.jsonl and
canary/{general.txt,questions.jsonl} under OUT_DIR (default: paths.data_dir()); the output
is byte-identical on every rerun (only `random.Random(seed)`, no global or numpy randomness).

Leaves out: the project's first, cue-driven generator (datagen_cues.py, kept for notebook 04's
comparison), the hand-written sets (typed, not generated) and loading/validation (data.py).

>>> rows = generate_split("train", n=3)
>>> [m["role"] for m in rows[0]["messages"]]
['system', 'user', 'assistant']
>>> sorted(json.loads(rows[0]["messages"][-1]["content"]))
['category', 'priority', 'summary']
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from .triage_bank import MODIFIERS, SITUATIONS

CATEGORIES = ("billing", "shipping", "account", "technical", "returns")
PRIORITIES = ("low", "medium", "high", "urgent")

# Short on purpose (it is in every row): it names the schema and the allowed values so that
# the untrained base model has a fair chance before the fine-tune.
SYSTEM_PROMPT = (
    "Triage this support message. Reply with one JSON object only: "
    '{"category": billing|shipping|account|technical|returns, '
    '"priority": low|medium|high|urgent, "summary": one sentence}')

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

SPLITS = {"train": (2000, 11), "validation": (200, 22), "test": (200, 33)}  # rows, seed
POOL_OF_SPLIT = {"train": "train", "validation": "train", "test": "test"}
PRIORITY_WEIGHTS = (0.25, 0.3, 0.25, 0.2)  # low, medium, high, urgent
HELD_OUT_EVERY = 5  # every 5th situation of a category (and 5th modifier sentence) is kept for the test pool
MODIFIER_PRIORITY = {"team": "urgent", "deadline": "high"}  # "chased" moves one level up, at most to high

PRODUCTS = {
    "train": ["wireless earbuds", "smart thermostat", "espresso machine", "robot vacuum", "gaming keyboard",
              "fitness tracker", "air fryer", "4K monitor", "electric toothbrush", "standing desk",
              "noise-cancelling headphones", "smartwatch", "power bank", "digital camera", "e-reader",
              "coffee grinder", "bluetooth speaker", "office chair", "hair dryer", "webcam", "router", "tablet",
              "blender", "desk lamp", "washing machine", "fridge freezer", "sofa", "winter jacket", "running shoes",
              "garden hose", "lawn mower", "kids' tablet", "microwave", "kettle", "printer", "laptop", "phone case",
              "mattress", "baby stroller", "yoga mat", "card reader", "security camera", "smart plug", "toaster",
              "dishwasher", "bike helmet", "electric blanket", "tent"],
    "test": ["drone", "sewing machine", "projector", "bread maker", "baby monitor", "electric scooter", "soundbar",
             "label printer", "dehumidifier", "rice cooker", "dash cam", "space heater", "barcode scanner",
             "bookshelf", "rain coat", "pressure washer", "graphics card", "doorbell camera", "hiking boots",
             "steam iron"],
}
NAMES = {
    "train": ["Anna", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemi", "Luca",
              "Maya", "Nils", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Yusuf", "Agnieszka", "Thomas", "Priya",
              "Mohammed", "Sofia", "Wei", "Jürgen", "Carmen", "Kofi", "Aisha", "Mark", "Linda"],
    "test": ["Zoe", "Omar", "Hannah", "Ravi", "Marta", "Felix", "Lucia", "Tomasz", "Mei", "Andre"],
}
SURNAMES = ["Schmidt", "Kowalski", "Garcia", "Patel", "Nguyen", "Smith", "Okafor", "Rossi", "Dubois", "Chen",
            "Yilmaz", "Jensen", "Silva", "Murphy", "Novak"]
COMPANIES = ["Brightside Dental", "Hoffmann GmbH", "Corner Café", "Greenleaf Primary School", "Nordic Freight Ltd",
             "Studio Lumen", "Patel & Sons", "Riverside Clinic", "Atlas Logistics", "Bloom Florists"]

GREETINGS = ["Hi,", "Hello,", "Hi there,", "Dear support,", "Hello team,", "Good morning,", "Hey,", "Dear Sir/Madam,",
             "Good afternoon,", "To whom it may concern,", "Hallo,", "hi", "Hello support team,", "Dear customer service,",
             "Hi {n},", "Greetings,", "Morning,", "Hey guys,"]
SIGN_OFFS = ["Thanks.", "Thank you.", "Regards,\n{n}", "Cheers, {n}", "- {n}", "Best regards,\n{n} {s}",
             "Kind regards,\n{n} {s}\n{company}", "Thanks in advance,\n{n}", "Thank you for your help!", "thx",
             "Sent from my iPhone", "{n} {s}\n{company}\nTel. +44 20 7946 0{t}", "BR, {n}", "Many thanks\n{n}",
             "Have a nice day.", "Best,\n{n}", "Greetings from {city},\n{n}", "Sincerely,\n{n} {s}"]
CITIES = ["Leeds", "Lyon", "Gdańsk", "Porto", "Pune", "Graz", "Cork", "Malmö", "Bilbao", "Utrecht"]
BACKGROUND = ["I ordered it on {w}.", "I've been a customer for {y} years.", "My order number is {o}.",
              "I bought the {p} from you {d} days ago.", "It was a present for my mum.",
              "I ordered through the app.", "I already checked the help page.", "This is my first time contacting you.",
              "I bought it with my partner's card.", "We are a small business and order from you regularly.",
              "I have attached a photo.", "I paid with PayPal.", "I'm writing on behalf of my father.",
              "The order also had a few other things in it.", "I usually love your shop.",
              "I tried calling but the line was busy.", "Your chatbot could not help me.",
              "Order details: {o}, placed {w}.", "I live in {city}.", "I read the FAQ but it didn't answer this."]
ASKS = ["Can you help?", "What are my options?", "Please advise.", "Let me know.", "What should I do?",
        "Could you check this for me?", "Please reply.", "Can someone look at this?", "Any idea?",
        "I look forward to your answer.", "What happens now?", "Please get back to me.", ""]
# Tone carries no label: every one of these appears with every priority at the same rate.
LOUD = ["This is unacceptable!", "URGENT!!!", "Please sort this ASAP!!", "I'm really angry about this.",
        "Fix it NOW.", "Worst service ever.", "I need an answer immediately!", "Very disappointed!!",
        "This is ridiculous.", "HELP", "I want this resolved today!", "Absolutely fed up."]
CALM = ["No big deal.", "Thanks for your patience.", "Hope you're well.", "Sorry to bother you.",
        "I appreciate your help.", "Thank you for reading.", "I hope this makes sense.", "Sorry for my English.",
        "Have a good day.", "Thanks a lot in advance."]
SUBJECTS = ["Subject: order {o}", "Subject: problem", "Subject: question", "Subject: my {p}", "Subject: help please",
            "Subject: Re: your message", "Subject: complaint", "Subject: {p} issue", "Subject: (no subject)",
            "Subject: ticket", "Subject: Fwd: order {o}", "Subject: enquiry"]
# A second, minor question from another category: the guide labels the main problem, not the closing aside.
ASIDES = {"billing": ["Also, could you send me the invoice for it?", "By the way, can I pay in instalments next time?"],
          "shipping": ["Also, do you deliver to Ireland?", "Also, how long does standard delivery usually take?"],
          "account": ["Also, how do I change the e-mail on my account?", "Also, please unsubscribe me from the newsletter."],
          "technical": ["Also, is there a manual for it online?", "By the way, does it work with Alexa?"],
          "returns": ["Also, what is your return policy for sale items?", "Also, can I exchange things in a store?"]}
ERRORS = ['The screen says "{c}: operation failed".', "The message says 'Error {c} - please try again later'.",
          'It shows "Something went wrong ({c})".', "Error text: {c} unknown failure.",
          '"Request could not be completed. Code {c}" is what I get.']
# Non-native writers: (pattern, replacement) rewrites, each applied to a message with some probability.
NON_NATIVE = [(r"\bfor (\d+) days\b", r"since \1 days"), (r"\bI have\b", "I am having"),
              (r"\bI'm waiting for\b", "I am waiting"), (r"\bplease check\b", "please to check"),
              (r"\bthe \b", ""), (r"\bdoesn't\b", "not"), (r"\bdidn't\b", "not"), (r"\bCan you\b", "You can"),
              (r"\bI want to\b", "I want"), (r"\bit's\b", "is"), (r"\bI can't\b", "I not can"),
              (r"\bhas\b", "have"), (r"\bPlease\b", "Kindly")]
NON_NATIVE_TAILS = ["Kindly do the needful.", "Waiting your answer.", "Thanking you.", "Please revert back soon.",
                    "I hope for your understanding.", "Thank you for your comprehension."]


def _typo(word: str, rng: random.Random) -> str:
    """One keyboard slip in a word of 4+ letters: swap two neighbours, drop one, or double one."""
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def _add_typos(text: str, rng: random.Random, n: int) -> str:
    words = text.split(" ")
    for _ in range(n):
        j = rng.randrange(len(words))
        words[j] = _typo(words[j], rng)
    return " ".join(words)


def _fill(template: str, slots: dict) -> str:
    return template.format(**slots)


def row_of(t: dict) -> dict:
    """A ticket -> the JSONL row: {"messages": [system, user, assistant], "meta": {...}}."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": t["message"]},
                         {"role": "assistant", "content": json.dumps(t["answer"])}],
            "meta": t["meta"]}


def split_rows(split: str, n: int | None, seed: int | None, splits: dict, pool_of_split: dict, make_ticket,
               weights, other_messages) -> list[dict]:
    """A split's rows for a generator given by its tables and `make_ticket(category, priority, pool, rng)`;
    shared by datagen and datagen_cues. The default n and seed also exclude `other_messages(split)`."""
    if split not in splits:
        raise ValueError(f"split={split!r}: choose one of {', '.join(splits)}")
    default_n, default_seed = splits[split]
    n = default_n if n is None else n
    rng = random.Random(default_seed if seed is None else seed)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    rng.shuffle(categories)
    seen = other_messages(split) if n == default_n and seed is None else set()
    return draw_rows(make_ticket, categories, weights, pool_of_split[split], rng, seen)


def draw_rows(make_ticket, categories: list[str], weights, pool: str, rng: random.Random, seen: set) -> list[dict]:
    """One row per category in order: draw a priority by `weights`, then `make_ticket(category, priority, pool, rng)`,
    redrawing any message already in `seen` (which grows)."""
    rows = []
    for category in categories:
        while True:  # redraw a message that already exists (in this split or an earlier one)
            priority = rng.choices(PRIORITIES, weights=weights)[0]
            t = make_ticket(category, priority, pool, rng)
            if t["message"] not in seen:
                break
        seen.add(t["message"])
        rows.append(row_of(t))
    return rows


def pool_of(items: list, pool: str) -> list:
    """The items a pool may use: every HELD_OUT_EVERY-th item (index 4, 9, ...) is the test pool's, the rest train's."""
    held = [x for i, x in enumerate(items) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return held if pool == "test" else [x for i, x in enumerate(items) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]


def priority_after(base: str, modifier: str | None) -> str:
    """The guide's rule for a modifier: team -> urgent, deadline -> at least high, chased -> one up, at most high.

    >>> priority_after("medium", "deadline"), priority_after("low", "chased"), priority_after("high", "chased")
    ('high', 'medium', 'high')
    """
    if modifier is None:
        return base
    if modifier == "chased":
        return PRIORITIES[min(PRIORITIES.index(base) + 1, PRIORITIES.index("high"))] if base != "urgent" else base
    target = MODIFIER_PRIORITY[modifier]
    return max(base, target, key=PRIORITIES.index)


def recipes(category: str, pool: str) -> dict[str, list[tuple[dict, str | None]]]:
    """{priority: [(situation, modifier kind or None)]}: every way this pool can make a ticket of that priority."""
    out = {p: [] for p in PRIORITIES}
    for situation in pool_of(SITUATIONS[category], pool):
        out[situation["priority"]].append((situation, None))
        if situation.get("raise"):
            for kind in ("team", "deadline", "chased"):
                out[priority_after(situation["priority"], kind)].append((situation, kind))
    return out


def _non_native(text: str, rng: random.Random) -> str:
    """Two or three of the NON_NATIVE rewrites, and sometimes a stock closing line."""
    for pattern, replacement in rng.sample(NON_NATIVE, 3):
        text = re.sub(pattern, replacement, text, count=rng.choice([1, 2]))
    text = re.sub(r"  +", " ", text)
    if rng.random() < 0.4:
        text += " " + rng.choice(NON_NATIVE_TAILS)
    return text


def _slots(pool: str, rng: random.Random) -> dict:
    return {"p": rng.choice(PRODUCTS[pool]), "o": rng.choice(["#", "#", "no. ", "ORD-"]) + str(rng.randrange(10000, 99999)),
            "a": rng.choice(["$", "€", "£"]) + f"{rng.randrange(5, 900)}.{rng.randrange(100):02d}",
            "d": rng.randrange(3, 21), "w": rng.choice(WEEKDAYS), "c": f"E{rng.randrange(10, 99)}",
            "n": rng.choice(NAMES[pool]), "s": rng.choice(SURNAMES), "y": rng.randrange(2, 12),
            "company": rng.choice(COMPANIES), "city": rng.choice(CITIES), "t": rng.randrange(100, 999)}


def _body(category: str, situation: dict, modifier: str | None, pool: str, slots: dict,
          rng: random.Random) -> list[str]:
    """The message's sentences in order: background, the situation, error text, modifier, aside, ask, tone."""
    parts = []
    if rng.random() < 0.35:
        parts.append(_fill(rng.choice(BACKGROUND), slots))
    parts.append(_fill(rng.choice(situation["say"]), slots))
    if category in ("technical", "account") and rng.random() < 0.2:
        parts.append(_fill(rng.choice(ERRORS), slots))
    if modifier is not None:
        sentences = MODIFIERS[modifier] if modifier == "chased" else MODIFIERS[modifier][category]
        parts.append(_fill(rng.choice(pool_of(sentences, pool)), slots))
    if rng.random() < 0.12:
        parts.append(rng.choice(ASIDES[rng.choice([c for c in CATEGORIES if c != category])]))
    if rng.random() < 0.6:
        parts.append(rng.choice(ASKS))
    tone = rng.random()
    if tone < 0.22:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(LOUD))
    elif tone < 0.4:
        parts.append(rng.choice(CALM))
    return [p for p in parts if p]


def _layout(parts: list[str], slots: dict, rng: random.Random) -> str:
    """Join sentences as one of several shapes a real message has: a paragraph, lines, a list, a forwarded mail, a reply."""
    shape = rng.choices(["paragraph", "lines", "list", "forwarded", "reply"], weights=(55, 15, 10, 10, 10))[0]
    if shape == "list" and len(parts) >= 3:
        body = parts[0] + "\n" + "\n".join(f"{rng.choice(['-', '*', '1.'])} {p}" for p in parts[1:])
        body = re.sub(r"\n1\. ", lambda _m, c=iter(range(1, 99)): f"\n{next(c)}. ", body)
    elif shape == "lines":
        body = "\n".join(parts)
    else:
        body = " ".join(parts)
    greeting = _fill(rng.choice(GREETINGS), slots) if rng.random() < 0.7 else ""
    sign_off = _fill(rng.choice(SIGN_OFFS), slots) if rng.random() < 0.6 else ""
    text = "\n".join(x for x in (greeting, body, sign_off) if x) if rng.random() < 0.5 else \
        " ".join(x for x in (greeting, body, sign_off.replace("\n", " ")) if x)
    if rng.random() < 0.12:
        text = _fill(rng.choice(SUBJECTS), slots) + "\n\n" + text
    if shape == "forwarded":
        text = (f"---------- Forwarded message ---------\nFrom: {slots['n']} {slots['s']}\n"
                f"Subject: {rng.choice(['order ' + slots['o'], 'problem', 'my ' + slots['p']])}\n\n{text}")
    elif shape == "reply":
        quoted = rng.choice(["Thank you for contacting us. We will get back to you within 48 hours.",
                             "Your ticket has been received.", "Could you send us your order number?"])
        text = f"{text}\n\n> On {slots['w']}, Customer Service wrote:\n> {quoted}"
    return text


def _register(text: str, rng: random.Random) -> tuple[str, str]:
    """Who typed it: as written, in a hurry (lower case, no full stops), a non-native writer, or in capitals; then typos."""
    kind = rng.choices(["plain", "hurry", "non_native", "caps"], weights=(55, 20, 20, 5))[0]
    if kind == "hurry":
        text = text.lower().replace(".", "")
    elif kind == "non_native":
        text = _non_native(text, rng)
    elif kind == "caps":
        text = text.upper()
    if rng.random() < 0.3:
        text = _add_typos(text, rng, rng.choice([1, 1, 2, 3]))
    return text, kind


def ticket(category: str, priority: str, pool: str, rng: random.Random) -> dict:
    """One customer message and its answer: {"message", "answer": {category, priority, summary}, "meta"}.

    pool: "train" or "test", which situations, modifier sentences, products and names to draw from.
    The category is the situation's; the priority is `priority_after(situation's, modifier)`.
    """
    options = recipes(category, pool)[priority]
    if not options:
        raise ValueError(f"no {pool} situation gives a {priority} {category} ticket: add one to triage_bank.py")
    situation, modifier = rng.choice(options)
    slots = _slots(pool, rng)
    message, register = _register(_layout(_body(category, situation, modifier, pool, slots, rng), slots, rng), rng)
    answer = {"category": category, "priority": priority, "summary": _fill(situation["summary"], slots)}
    meta = {"pool": pool, "situation": f"{category}/{SITUATIONS[category].index(situation)}",
            "base_priority": situation["priority"], "modifier": modifier, "register": register}
    return {"message": message, "answer": answer, "meta": meta}


def generate_split(split: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    """Rows of one split: categories balanced (n/5 each), priorities drawn by PRIORITY_WEIGHTS, no repeated message.

    >>> len(generate_split("test", n=10)), generate_split("test", n=4) == generate_split("test", n=4)
    (10, True)
    """
    return split_rows(split, n, seed, SPLITS, POOL_OF_SPLIT, ticket, PRIORITY_WEIGHTS, _messages_of_other_splits)


def _messages_of_other_splits(split: str) -> set[str]:
    """Validation must not repeat a training message (they share pools): regenerate train to know them."""
    if split != "validation":
        return set()
    return {r["messages"][1]["content"] for r in generate_split("train")}


# The forgetting canary: general text and questions unrelated to support tickets, written for this project.
CANARY_TEXT = """\
The water cycle moves water between the oceans, the air and the land. Sunlight warms the sea, and water \
evaporates into the air as vapour. As the vapour rises it cools and condenses into tiny droplets that form \
clouds. When the droplets grow heavy they fall as rain or snow, and rivers carry the water back to the sea.

Bread is one of the oldest prepared foods. A simple loaf needs only flour, water, salt and yeast. The yeast \
feeds on sugars in the flour and releases carbon dioxide, which makes the dough rise. Baking sets the \
structure of the loaf and browns the crust.

A library lends books, music and films to the people of a town. Many libraries also offer quiet rooms for \
study, free internet access and reading groups for children. Librarians help visitors find information and \
choose what to read next.

Bicycles are an efficient way to travel short distances. A rider turns the pedals, a chain passes the force \
to the rear wheel, and gears let the rider climb hills or ride fast on flat roads. Regular cycling is good \
for the heart and the lungs.

The Moon orbits the Earth about once every twenty-seven days. It does not make its own light; we see it \
because it reflects light from the Sun. The changing shape of the Moon in the sky, from new moon to full \
moon, is called its phases.
"""

CANARY_QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", "seven|7"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
]


def canary_rows() -> list[dict]:
    """The canary questions as rows {"question", "expected"}; `expected` is a `|`-separated list of accepted words."""
    return [{"question": q, "expected": a} for q, a in CANARY_QUESTIONS]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_all(out_dir: Path) -> dict[str, Path]:
    """Write triage/{train,validation,test}.jsonl and canary/{general.txt,questions.jsonl}; returns {name: path}."""
    out_dir = Path(out_dir)
    written = {}
    (out_dir / "triage").mkdir(parents=True, exist_ok=True)
    (out_dir / "canary").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        written[split] = _write(out_dir / "triage" / f"{split}.jsonl", _jsonl(generate_split(split)))
    written["canary_text"] = _write(out_dir / "canary" / "general.txt", CANARY_TEXT)
    written["canary_questions"] = _write(out_dir / "canary" / "questions.jsonl", _jsonl(canary_rows()))
    return written


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".part")  # atomic: a reader never sees half a file
    tmp.write_text(text, encoding="utf-8", newline="\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    from .paths import data_dir

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else data_dir()
    for name, path in write_all(out).items():
        lines = path.read_text(encoding="utf-8").count("\n")
        print(f"{name:17s} {lines:5d} lines  {path}")


if __name__ == "__main__":
    main()
