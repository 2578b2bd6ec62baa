"""Serving LoRA adapters: find or train one, put several on one base, route each request, time generation.

`attach_adapters` loads named adapter folders onto one base model (checked by
adapters.load_adapter, the base loaded once); `answer_requests` answers a mixed batch in
which each request names its adapter (peft's `adapter_names` in generate, "base" for the
bare model); `tokens_per_second` times greedy generation of several models in
interleaved rounds so that machine noise hits them alike.

Leaves out: an HTTP server, batching across time, sampling (greedy only), and merging
(merge.py). `reuse_or_train` reuses a saved adapter whose recorded training args match,
else calls train.finetune; it is not a second training loop.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

BASE = "base"  # the name a request uses for "no adapter"
_NOT_IDENTITY = ("output_dir", "resume", "eval_steps", "save_steps", "eval_limit")


def usable_adapter(folder, base_model: str) -> Path | None:
    """`folder` if it holds an adapter that passes adapters.check_adapter for `base_model`, else None (with the reason printed)."""
    from . import adapters

    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        adapters.check_adapter(folder, base_model=base_model)
    except adapters.AdapterMismatch as err:
        print(f"not using {folder}: {err}")
        return None
    return folder


def reuse_or_train(config, train_rows=None, eval_rows=None, progress: bool = False) -> Path:
    """Adapter folder for a train.FinetuneConfig: `<output_dir>/adapter` if it was trained with the same settings, else trained now.

    train_rows/eval_rows None mean the triage data (train.finetune's default).
    """
    from . import adapters, train

    folder = train.output_dir_of(config) / "adapter"
    if usable_adapter(folder, config.base_model):
        saved = adapters.read_metadata(folder).get("training_args", {})
        wanted = config.to_dict()
        if all(saved.get(k) == v for k, v in wanted.items() if k not in _NOT_IDENTITY):
            return folder
    result = train.finetune(config, progress=progress, train_rows=train_rows, eval_rows=eval_rows)
    return Path(result.adapter_dir)


def attach_adapters(base_obj, adapter_dirs: dict, *, base_model: str, tokenizer=None):
    """PeftModel: every adapter in {name: folder} loaded onto `base_obj` under its name; the first one is active.

    The base weights are loaded once and shared; switch with `model.set_adapter(name)`.
    """
    from . import adapters

    if not adapter_dirs:
        raise ValueError("adapter_dirs is empty: give {name: adapter folder} for at least one adapter.")
    if BASE in adapter_dirs:
        raise ValueError(f"'{BASE}' is reserved for requests without an adapter; name the adapter differently.")
    model = None
    for name, folder in adapter_dirs.items():
        model = adapters.load_adapter(base_obj if model is None else model, folder, base_model=base_model,
                                      tokenizer=tokenizer, adapter_name=name)
    model.set_adapter(next(iter(adapter_dirs)))
    return model.eval()


def answer_requests(peft_model, tokenizer, requests: list[tuple[str, list[dict]]], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to a mixed batch; each request is (adapter name or "base", chat messages).

    One generate call: peft routes each row of the batch through its own adapter
    (`adapter_names`), so requests for different adapters need no switching.
    """
    import torch

    from .merge import chat_batch

    known = set(peft_model.peft_config) | {BASE}
    unknown = sorted({name for name, _ in requests} - known)
    if unknown:
        raise ValueError(f"requests name adapters {unknown}; this model has {sorted(known)}.")
    batch = chat_batch(tokenizer, [messages for _, messages in requests])
    device = next(p.device for p in peft_model.parameters())
    names = ["__base__" if name == BASE else name for name, _ in requests]  # peft's name for "no adapter"
    with torch.no_grad():
        out = peft_model.generate(**{k: v.to(device) for k, v in batch.items()}, adapter_names=names,
                                  do_sample=False, max_new_tokens=max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]  # B, new tokens
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def answers_with(peft_model, tokenizer, adapter: str, conversations: list[list[dict]], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers with one adapter made active by `set_adapter` ("base": adapters disabled)."""
    from .evaluate import generate_answers

    if adapter == BASE:
        with peft_model.disable_adapter():
            return generate_answers(peft_model, tokenizer, conversations, max_new_tokens=max_new_tokens, progress=False)
    peft_model.set_adapter(adapter)
    return generate_answers(peft_model, tokenizer, conversations, max_new_tokens=max_new_tokens, progress=False)


def _generate_seconds(model, batch: dict, new_tokens: int, pad_token_id: int) -> float:
    import torch

    device = next(p.device for p in model.parameters())
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():  # min_new_tokens: every model produces exactly new_tokens, even past its answer's end
        model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def tokens_per_second(models: dict, tokenizer, conversation: list[dict], new_tokens: int = 32, repeats: int = 3) -> dict:
    """{label: {"tokens_per_s", "seconds"}}: greedy generation speed of each model in {label: model}, batch 1.

    Each model generates exactly `new_tokens` tokens after one warm-up call; the rounds are
    interleaved (A, B, C, A, B, C, ...) and the median is kept, so slow spells on a shared
    machine hit every model.
    """
    from .merge import chat_batch

    batch = chat_batch(tokenizer, [conversation])
    for model in models.values():
        _generate_seconds(model, batch, 2, tokenizer.pad_token_id)  # warm-up: first-call allocations
    seconds = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            seconds[label].append(_generate_seconds(model, batch, new_tokens, tokenizer.pad_token_id))
    return {label: {"tokens_per_s": new_tokens / statistics.median(s), "seconds": statistics.median(s)}
            for label, s in seconds.items()}
