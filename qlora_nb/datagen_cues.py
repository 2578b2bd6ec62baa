"""The project's first triage generator, cue-driven, kept so notebook 04 can show why template data overstates accuracy.

Its category comes from an issue template and its priority from an appended urgency cue
("I need this fixed immediately." -> urgent), so a model can read the label off one sentence.
Notebook 04 trains on these rows and scores the hand-written set to measure what that costs.
The test pool draws its issue templates, cue phrases and products from pools that train and
validation never use.

Leaves out: writing files (it writes none; the workbook's data come from datagen.py), and
anything realistic about the wording.

>>> rows = generate_split("train", n=3)
>>> rows[0]["meta"]["pool"], rows[0]["meta"]["cue"] in {cue for pools in CUES.values() for cue in pools["train"]}
('train', True)
"""
from __future__ import annotations

import random

from .datagen import WEEKDAYS, _add_typos, _fill, split_rows

SPLITS = {"train": (1000, 11), "validation": (200, 22), "test": (200, 33)}  # rows, seed
POOL_OF_SPLIT = {"train": "train", "validation": "train", "test": "test"}
PRIORITY_WEIGHTS = (0.2, 0.3, 0.3, 0.2)  # low, medium, high, urgent

PRODUCTS = {
    "train": ["wireless earbuds", "smart thermostat", "espresso machine", "robot vacuum", "gaming keyboard",
              "fitness tracker", "air fryer", "4K monitor", "electric toothbrush", "standing desk",
              "noise-cancelling headphones", "smartwatch", "power bank", "digital camera", "e-reader",
              "coffee grinder", "bluetooth speaker", "office chair", "hair dryer", "webcam",
              "router", "tablet", "blender", "desk lamp"],
    "test": ["drone", "sewing machine", "projector", "bread maker", "baby monitor", "electric scooter",
             "soundbar", "label printer", "dehumidifier", "rice cooker", "dash cam", "space heater"],
}

# Issue templates: (message text, summary). {p} product, {o} order number, {a} amount, {d} days, {w} weekday,
# {c} error code. The "test" pools are different sentences about the same kinds of problem, with the
# words a person would use (charge, delivery, password, error, return), so the labels stay learnable.
ISSUES = {
    "billing": {
        "train": [
            ("I was charged twice for my {p} order.", "Customer was charged twice for a {p} order."),
            ("My card was billed {a} but the {p} costs less than that.",
             "Customer was billed {a}, more than the price of the {p}."),
            ("The invoice for order {o} shows the wrong amount.", "The invoice for order {o} shows the wrong amount."),
            ("You took payment for the {p} but the order was cancelled.",
             "Customer paid for a {p} order that was cancelled."),
            ("My discount code was not applied when I paid for the {p}.",
             "A discount code was not applied to the {p} payment."),
            ("There is a charge of {a} on my card that I don't recognise.",
             "Customer does not recognise a {a} charge."),
            ("I keep getting billed for my subscription even though I cancelled it.",
             "Customer is still billed for a cancelled subscription."),
            ("The payment for the {p} failed but the money left my account anyway.",
             "A failed payment for the {p} was still taken from the customer's account."),
            ("Can I get a copy of the invoice for order {o}? The VAT number is missing.",
             "The invoice for order {o} is missing the VAT number."),
        ],
        "test": [
            ("There are two identical payments of {a} on my credit card for one {p}.",
             "Customer sees a duplicate payment of {a} for one {p}."),
            ("Why was I charged an extra fee on my {p} order?", "Customer was charged an unexpected fee on a {p} order."),
            ("I paid more at checkout for the {p} than the price on your website.",
             "Customer paid more at checkout than the listed price of the {p}."),
            ("My bank shows a {a} charge from your shop that I can't explain.",
             "Customer cannot explain a {a} charge from the shop."),
        ],
    },
    "shipping": {
        "train": [
            ("My {p} still hasn't arrived and it's been {d} days.", "The {p} has not arrived after {d} days."),
            ("Tracking for order {o} hasn't updated since {w}.", "Tracking for order {o} has not updated since {w}."),
            ("The courier says the {p} was delivered but there's nothing at my door.",
             "The {p} is marked as delivered but the customer did not receive it."),
            ("I need to change the delivery address for order {o}.",
             "Customer wants to change the delivery address for order {o}."),
            ("The {p} was shipped to my old address.", "The {p} was shipped to the customer's old address."),
            ("Order {o} was supposed to arrive on {w} and it didn't.", "Order {o} did not arrive on {w} as promised."),
            ("When will my {p} be shipped? I ordered it {d} days ago.",
             "Customer asks when the {p} ordered {d} days ago will ship."),
            ("The delivery driver left my {p} with a neighbour I don't know.",
             "The {p} was left with an unknown neighbour by the delivery driver."),
        ],
        "test": [
            ("The delivery of my {p} seems lost, the tracking stopped updating days ago.",
             "The delivery of the {p} seems lost and its tracking stopped updating."),
            ("The delivery date for order {o} keeps getting pushed back.",
             "The delivery date for order {o} keeps being postponed."),
            ("My {p} was shipped {d} days ago and the tracking says 'exception'.",
             "The {p} shipped {d} days ago shows an exception in tracking."),
            ("My {p} package never showed up, the carrier website says out for delivery.",
             "The {p} package never arrived although the carrier says it is out for delivery."),
        ],
    },
    "account": {
        "train": [
            ("I can't log in to my account, it says my password is wrong.",
             "Customer cannot log in because the password is rejected."),
            ("The password reset email never arrives.", "Customer does not receive the password reset email."),
            ("My account got locked after too many login attempts.",
             "Customer's account is locked after failed login attempts."),
            ("I want to change the email address on my account.",
             "Customer wants to change the account email address."),
            ("Please delete my account and all my personal data.",
             "Customer asks to delete the account and personal data."),
            ("I'm not getting the two-factor code when I sign in.",
             "Customer does not receive the two-factor login code."),
            ("Someone else logged in to my account and changed my details.",
             "Someone else accessed the customer's account and changed its details."),
            ("How do I change the username on my profile?", "Customer wants to change the profile username."),
        ],
        "test": [
            ("The login page says my password is incorrect even after I reset it.",
             "The login page rejects the customer's password even after a reset."),
            ("I have two accounts by mistake and would like them merged into one.",
             "Customer wants two accounts merged into one."),
            ("The verification code for logging in to my account never comes.",
             "Customer does not receive the account login verification code."),
            ("My account profile shows somebody else's name and phone number.",
             "Customer's account profile shows another person's details."),
        ],
    },
    "technical": {
        "train": [
            ("My {p} won't turn on anymore.", "Customer's {p} no longer turns on."),
            ("The {p} keeps disconnecting from the Wi-Fi.", "The {p} keeps losing its Wi-Fi connection."),
            ("The app crashes every time I try to pair the {p}.", "The app crashes when pairing the {p}."),
            ("The {p} shows error code {c} and then stops working.", "The {p} shows error code {c} and stops working."),
            ("Since the latest firmware update the {p} is really slow.",
             "The {p} has been slow since the latest firmware update."),
            ("The battery of my {p} drains in about an hour.", "The battery of the {p} drains within an hour."),
            ("My {p} makes a loud buzzing noise when it runs.", "The {p} makes a loud buzzing noise while running."),
            ("Bluetooth won't connect between my phone and the {p}.",
             "The {p} will not connect to the customer's phone over Bluetooth."),
        ],
        "test": [
            ("The screen of my {p} flickers and then stops working.", "The screen of the {p} flickers and stops working."),
            ("The app freezes every time I set up my {p}.", "The app freezes while setting up the {p}."),
            ("My {p} overheats and then won't turn back on.", "The {p} overheats and does not turn back on."),
            ("The software update for the {p} fails with error {c}.", "The {p} software update fails with error {c}."),
        ],
    },
    "returns": {
        "train": [
            ("I'd like to return the {p}, it isn't what I need.", "Customer wants to return the {p}."),
            ("How do I get a return label for the {p}?", "Customer asks for a return label for the {p}."),
            ("I sent the {p} back {d} days ago and I'm still waiting for the refund.",
             "Customer returned the {p} {d} days ago and awaits the refund."),
            ("Can I exchange the {p} for a different colour?",
             "Customer wants to exchange the {p} for another colour."),
            ("The {p} arrived scratched and I want to send it back.",
             "Customer wants to send back a scratched {p}."),
            ("Is the {p} still within the return window? I bought it {d} days ago.",
             "Customer asks if the {p} bought {d} days ago can still be returned."),
            ("Please arrange a pickup so I can return my {p}.",
             "Customer asks for a pickup to return the {p}."),
            ("I want to swap the {p} for the bigger model.", "Customer wants to swap the {p} for a bigger model."),
        ],
        "test": [
            ("I changed my mind about the {p}. What is your return policy?",
             "Customer changed their mind and asks about returning the {p}."),
            ("The {p} is not the model I ordered, I'd like to send it back for the right one.",
             "Customer received the wrong {p} model and wants to send it back."),
            ("Where can I drop off the {p} to return it?", "Customer asks where to drop off the {p} to return it."),
            ("Does the refund for a returned {p} include the original postage?",
             "Customer asks whether the refund for a returned {p} covers postage."),
        ],
    },
}

# Issues that nobody files as "low": a security problem or money taken twice is at least medium.
NOT_LOW = {"Someone else logged in to my account and changed my details.",
           "My account profile shows somebody else's name and phone number."}

CUES = {
    "low": {
        "train": ["No rush on this.", "Whenever you have time.", "Not urgent at all.", "It's only a minor thing.",
                  "Just letting you know, no hurry.", "Low priority.", "Get back to me when it's convenient."],
        "test": ["No hurry at all, take your time.", "Not important, it can wait.",
                 "Just a minor issue, reply whenever you like."],
    },
    "medium": {
        "train": ["Could you please look into it?", "Please let me know what to do.", "Can you help me with this?",
                  "I'd appreciate your help.", "What should I do?", "Please advise."],
        "test": ["Could someone advise me what to do?", "Any help would be appreciated."],
    },
    "high": {
        "train": ["Please sort this out soon.", "I need this fixed this week.", "This is getting really frustrating.",
                  "Please make this a priority.", "I'd like this handled quickly.", "It's been days and I'm annoyed."],
        "test": ["Please get this sorted by the end of the week.", "It's frustrating, please handle it soon."],
    },
    "urgent": {
        "train": ["URGENT!", "I need this fixed immediately.", "This is an emergency.",
                  "Please help right now, I'm losing money.", "I need this resolved today.",
                  "Critical issue, please respond now!"],
        "test": ["This is urgent, I need a fix right now!", "Emergency: please act immediately, I'm losing customers!"],
    },
}

GREETINGS = ["Hi,", "Hello,", "Hi there,", "Dear support,", "Hello team,", "Good morning,", "Hey,", ""]
SIGN_OFFS = ["Thanks.", "Thank you.", "Regards, {n}", "Cheers, {n}", "- {n}", "", "", ""]
ANGRY = ["This is ridiculous.", "I am very unhappy.", "Really disappointed."]
EXTRAS = ["I ordered it on {w}.", "I've been a customer for {y} years.", "My order number is {o}.",
          "I already checked the help page.", "This is my first time contacting you."]
NAMES = ["Anna", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemi", "Luca", "Maya",
         "Nils", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Yusuf"]


def ticket(category: str, priority: str, pool: str, rng: random.Random) -> dict:
    """One customer message and its answer: {"message", "answer": {category, priority, summary}, "meta"}.

    pool: "train" or "test", which templates, cues and products to draw from.
    """
    choices = [t for t in ISSUES[category][pool] if not (priority == "low" and t[0] in NOT_LOW)]
    issue_i = rng.randrange(len(choices))
    text, summary = choices[issue_i]
    cue = rng.choice(CUES[priority][pool])
    slots = {"p": rng.choice(PRODUCTS[pool]), "o": f"#{rng.randrange(10000, 99999)}",
             "a": f"${rng.randrange(5, 400)}.{rng.randrange(100):02d}", "d": rng.randrange(3, 21),
             "w": rng.choice(WEEKDAYS), "c": f"E{rng.randrange(10, 99)}", "n": rng.choice(NAMES),
             "y": rng.randrange(2, 12)}
    tone = rng.choice(["polite", "plain", "terse"] + (["angry"] if priority in ("high", "urgent") else []))
    parts = []
    if tone == "polite":
        parts.append(rng.choice([g for g in GREETINGS if g]))
    elif tone == "plain" and rng.random() < 0.5:
        parts.append(rng.choice(GREETINGS))
    parts.append(_fill(text, slots))
    if rng.random() < 0.2:
        parts.append(_fill(rng.choice(EXTRAS), slots))
    if tone == "angry":
        parts.append(rng.choice(ANGRY))
    parts.append(cue)
    if tone == "polite" or (tone == "plain" and rng.random() < 0.4):
        parts.append(_fill(rng.choice(SIGN_OFFS), slots))
    message = " ".join(p for p in parts if p)
    if tone == "terse":  # typed in a hurry: lower case, no full stops
        message = message.lower().replace(".", "")
        if priority == "urgent" and rng.random() < 0.5:
            message += "!!"
    if rng.random() < 0.25:
        message = _add_typos(message, rng, rng.choice([1, 1, 2]))
    answer = {"category": category, "priority": priority, "summary": _fill(summary, slots)}
    meta = {"pool": pool, "issue": f"{category}/{pool}/{ISSUES[category][pool].index((text, summary))}",
            "product": slots["p"] if "{p}" in text else None, "cue": cue, "tone": tone}
    return {"message": message, "answer": answer, "meta": meta}


def generate_split(split: str, n: int | None = None, seed: int | None = None) -> list[dict]:
    """Rows of one split: categories balanced (n/5 each), priorities drawn 20/30/30/20 %, no repeated message.

    >>> len(generate_split("test", n=10)), generate_split("test", n=4) == generate_split("test", n=4)
    (10, True)
    """
    return split_rows(split, n, seed, SPLITS, POOL_OF_SPLIT, ticket, PRIORITY_WEIGHTS, _messages_of_other_splits)


def _messages_of_other_splits(split: str) -> set[str]:
    """Validation must not repeat a training message (they share templates): regenerate train to know them."""
    if split != "validation":
        return set()
    return {r["messages"][1]["content"] for r in generate_split("train")}



