"""Chat rows -> training tokens: templates rendered, the completion-only label mask, lengths, padding vs packing.

`completion_labels` tokenizes a conversation the way TRL's SFTTrainer does for
prompt-completion data with `completion_only_loss=True`: the prompt (everything before the
final assistant message, rendered with the generation prompt) gets label -100, the answer
and the template's end-of-turn tokens keep their ids. tests/test_chat.py checks it token for
token against SFTTrainer's own prepared data set and collator.

Leaves out: training (train.py), loading and checking rows (data.py), and TRL's
`assistant_only_loss` route (it needs `{% generation %}` markers that neither SmolLM2's nor
Mistral's template has; the prompt-completion route works with any template whose prompt
renders as a prefix of the full conversation, see `prefix_consistent`).

>>> fold_system([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
[{'role': 'user', 'content': 'S\\n\\nU'}]
"""
from __future__ import annotations

import random
import statistics
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
MISTRAL_V0_3 = "mistral_instruct_v0_3"
CHATML_SMOLLM2 = "chatml_smollm2"  # SmolLM2-Instruct's own template, as saved with the embedded model
IGNORE = -100  # the label PyTorch's cross-entropy skips


def load_template(name: str = MISTRAL_V0_3) -> str:
    """A chat template (jinja source) kept in qlora_nb/templates/, by file stem."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
        raise FileNotFoundError(f"No chat template {name!r} in {TEMPLATES_DIR}; known: {known}")
    return path.read_text(encoding="utf-8")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None,
           **special_tokens) -> str:
    """The exact string a model sees for `messages`, via `tokenizer.apply_chat_template(tokenize=False)`.

    chat_template None: the tokenizer's own. special_tokens (e.g. bos_token="<s>", eos_token="</s>")
    override what the template's `bos_token`/`eos_token` variables print, to show another model's
    string without its tokenizer.
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template, **special_tokens)


def token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
              chat_template: str | None = None) -> list[int]:
    """Token ids of a rendered conversation (as TRL tokenizes it: apply_chat_template(tokenize=True))."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=chat_template,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens a and b share.

    >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def completion_labels(tokenizer, messages: list[dict], chat_template: str | None = None) -> dict:
    """input_ids and labels (-100 on the prompt) for a conversation whose last message is the answer.

    Returns {"input_ids": [T], "labels": [T], "prompt_len": int, "prompt_is_prefix": bool}.
    The prompt is messages[:-1] rendered with the generation prompt; where that is not a prefix of
    the full conversation's tokens, the answer starts where the two diverge (TRL's rule), so part of
    the prompt is trained on; `prompt_is_prefix` False flags it.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("The last message must be the assistant's answer (the completion to train on).")
    prompt = token_ids(tokenizer, messages[:-1], add_generation_prompt=True, chat_template=chat_template)
    full = token_ids(tokenizer, messages, chat_template=chat_template)
    n = common_prefix_length(prompt, full)
    return {"input_ids": full, "labels": [IGNORE] * n + full[n:], "prompt_len": n,
            "prompt_is_prefix": n == len(prompt)}


def prefix_consistent(tokenizer, messages: list[dict], chat_template: str | None = None) -> bool:
    """True if the template renders the prompt alone as a token prefix of prompt + answer.

    False for Mistral-7B-Instruct v0.3 with a system message: its template puts the system text
    into the *last* user turn only, so it is there at inference and missing from the training row.
    """
    return completion_labels(tokenizer, messages, chat_template)["prompt_is_prefix"]


def fold_system(messages: list[dict]) -> list[dict]:
    """Messages with a leading system message merged into the first user message ("system\\n\\nuser").

    For templates without a system role (or with Mistral v0.3's last-user-turn rule): the model
    sees the same instructions at training and at inference.
    """
    if not messages or messages[0]["role"] != "system":
        return [dict(m) for m in messages]
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = system["content"] + "\n\n" + rest[0]["content"]
        return rest
    return [{"role": "user", "content": system["content"]}] + rest


def fit_to_template(tokenizer, messages: list[dict], chat_template: str | None = None) -> list[dict]:
    """`messages` as they should be trained with this template: unchanged if the prompt renders as a prefix of
    the row, else with the system prompt folded into the user turn (Mistral v0.3), checked again.

    Raises ValueError if even the folded conversation is not prefix-consistent (the mask would be wrong).
    """
    if prefix_consistent(tokenizer, messages, chat_template):
        return messages
    folded = fold_system(messages)
    if not prefix_consistent(tokenizer, folded, chat_template):
        raise ValueError("This chat template renders the prompt differently from the start of the training row, "
                         "even with the system prompt folded into the user turn, so the completion-only mask "
                         "would train on prompt tokens. Use a template whose generation prompt is a prefix of the "
                         "full conversation (see notebook 04).")
    return folded


def other_template(tokenizer) -> tuple[str, str]:
    """(name, jinja) of a well-known template that is *not* this tokenizer's: Mistral's, or ChatML for Mistral-like ones."""
    own = tokenizer.chat_template or ""
    name = CHATML_SMOLLM2 if "[INST]" in own else MISTRAL_V0_3
    return name, load_template(name)


def mask_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """[(text, trained)]: the rendered tokens grouped into runs that are in the loss (True) or masked (False)."""
    spans: list[tuple[str, bool]] = []
    for tok, lab in zip(input_ids, labels):
        text, trained = tokenizer.decode([tok]), lab != IGNORE
        if spans and spans[-1][1] == trained:
            spans[-1] = (spans[-1][0] + text, trained)
        else:
            spans.append((text, trained))
    return spans


def show_mask(tokenizer, input_ids: list[int], labels: list[int], open_: str = "⟦", close: str = "⟧") -> str:
    """The rendered conversation with the tokens that count in the loss wrapped in ⟦ ⟧.

    >>> class T:  # a stand-in tokenizer: one character per token id
    ...     def decode(self, ids): return "".join(chr(i) for i in ids)
    >>> show_mask(T(), [ord(c) for c in "Q:hi A:yo"], [-100] * 7 + [ord("y"), ord("o")])
    'Q:hi A:⟦yo⟧'
    """
    return "".join(f"{open_}{text}{close}" if trained else text
                   for text, trained in mask_spans(tokenizer, input_ids, labels))


def token_lengths(tokenizer, rows: list, chat_template: str | None = None) -> list[int]:
    """Tokens per row (whole conversation, chat template applied), in row order.

    rows: data rows {"messages": [...]} or bare message lists.
    """
    return [len(token_ids(tokenizer, r["messages"] if isinstance(r, dict) else r, chat_template=chat_template))
            for r in rows]


def length_stats(lengths: list[int]) -> dict:
    """{"n", "min", "median", "p90", "max", "mean"} of token lengths.

    >>> length_stats([10, 20, 30, 40])["median"]
    25.0
    """
    ordered = sorted(lengths)
    return {"n": len(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def padding_waste(lengths: list[int], batch_size: int, order: str = "random", pad_to: int | None = None,
                  seed: int = 0) -> dict:
    """Pad tokens when rows are batched B at a time and each batch is padded to its longest row (or to pad_to).

    order: "random" (what a shuffled sampler gives), "sorted" (group rows of similar length), or "given".
    Returns {"real_tokens", "slots" (B x T summed over batches), "pad_tokens", "waste" (pad/slots)}.

    >>> padding_waste([2, 4, 4, 4], batch_size=2, order="given")["pad_tokens"]
    2
    """
    idx = list(range(len(lengths)))
    if order == "random":
        random.Random(seed).shuffle(idx)
    elif order == "sorted":
        idx.sort(key=lambda i: lengths[i])
    elif order != "given":
        raise ValueError(f"order={order!r}: use 'random', 'sorted' or 'given'")
    slots = 0
    for start in range(0, len(idx), batch_size):
        batch = [lengths[i] for i in idx[start:start + batch_size]]
        slots += len(batch) * (pad_to if pad_to else max(batch))
    real = sum(lengths)
    return {"real_tokens": real, "slots": slots, "pad_tokens": slots - real, "waste": (slots - real) / slots}


def packing_waste(lengths: list[int], max_length: int) -> dict:
    """Pack rows into sequences of at most max_length tokens with TRL's best-fit-decreasing packer.

    Returns {"real_tokens", "sequences", "slots" (sequences x max_length), "pad_tokens" (if each packed
    sequence were padded to max_length), "waste", "truncated_tokens"}. TRL trains packed data
    padding-free (rows laid end to end, no pad at all), which needs FlashAttention to keep rows from
    attending to each other; on a CPU the honest comparison is this padded-to-max_length figure.
    """
    import datasets
    from trl import pack_dataset

    ids = [[1] * n for n in lengths]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar for a sub-second map is noise in a notebook
    try:
        packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids}), seq_length=max_length, strategy="bfd")
    finally:
        if bars:
            datasets.enable_progress_bars()
    packed_lengths = [len(x) for x in packed["input_ids"]]
    real = sum(packed_lengths)
    slots = len(packed_lengths) * max_length
    return {"real_tokens": real, "sequences": len(packed_lengths), "slots": slots, "pad_tokens": slots - real,
            "waste": (slots - real) / slots, "truncated_tokens": sum(lengths) - real}


def completion_losses(model, tokenizer, conversations: list[list[dict]], chat_template: str | None = None,
                      batch_size: int = 8) -> list[float]:
    """Per conversation: mean next-token loss of the answer (nats per answer token) under a chat template.

    The number the fine-tune lowers; a template the model was not trained with raises it.
    Rows are right-padded into batches of B; pad positions get label -100 and attention mask 0.
    """
    import torch

    device = next(model.parameters()).device
    encs = [completion_labels(tokenizer, m, chat_template) for m in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = []
    for start in range(0, len(encs), batch_size):
        batch = encs[start:start + batch_size]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch], device=device)
        labels = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in batch], device=device)
        mask = (torch.arange(width, device=device)[None, :] <
                torch.tensor([len(e["input_ids"]) for e in batch], device=device)[:, None]).long()  # B, T
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # B, T, V
        # position t predicts token t+1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                ignore_index=IGNORE, reduction="none")  # B, T-1
        counted = (labels[:, 1:] != IGNORE).sum(dim=1)  # B
        losses += (nll.sum(dim=1) / counted).tolist()
    return losses


def completion_loss(model, tokenizer, messages: list[dict], chat_template: str | None = None) -> float:
    """Mean next-token loss of one conversation's answer in nats per token (the model's own loss with our labels)."""
    import torch

    enc = completion_labels(tokenizer, messages, chat_template)
    device = next(model.parameters()).device
    ids = torch.tensor([enc["input_ids"]], device=device)  # 1, T
    labels = torch.tensor([enc["labels"]], device=device)  # 1, T
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    return float(out.loss)
