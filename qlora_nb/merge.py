"""Merging a LoRA adapter into its base for serving, and measuring how far the merged model is from the adapter.

`merge(peft_model)` folds W + (alpha/r) B A into each wrapped layer with peft's
`merge_and_unload`, leaving a plain transformers model with no adapter code on the hot
path. `logit_gap` and `answer_agreement` compare two models on the same chat prompts:
in bf16 the merged model differs from base + adapter only by rounding; merged into 4-bit
NF4 weights, W + BA is re-quantized and the gap is what 4-bit merging costs.

Leaves out: training (train.py), the checked loading of adapter folders (adapters.py),
and serving several adapters at once (serve.py). On the CPU, bitsandbytes repacks 4-bit
weights into an AVX-512 layout on the first inference call, and peft's 4-bit merge reads
that layout as if it were the plain one (garbage weights); `plain_4bit_kernels` (from
models.py, which `models.load_base` already applies) turns the repacking off, which also
makes eval-mode numbers match training-mode ones.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .models import plain_4bit_kernels  # noqa: F401  (re-exported: notebook 07 calls merge.plain_4bit_kernels)


def merge(peft_model):
    """The plain transformers model with every LoRA update folded into its base weights (peft merge_and_unload).

    Works on bf16/fp32 bases and on 4-bit NF4 bases (each W is de-quantized, W + BA added,
    and the sum quantized to NF4 again). The PeftModel is used up: its layers are replaced.
    """
    plain_4bit_kernels(peft_model)
    return peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights instead of shipping them


def load_merged(base_model: str, adapter_dir, *, quantize: str | None = None):
    """(merged model, tokenizer): the base loaded bf16 (or "nf4"), the adapter attached after its checks, merged."""
    from . import adapters, models

    base, tokenizer = models.load_base(base_model, quantize=quantize)
    peft_model = adapters.load_adapter(base, adapter_dir, base_model=base_model, tokenizer=tokenizer)
    return merge(peft_model).eval(), tokenizer


def save_merged(model, tokenizer, folder) -> Path:
    """Save a merged model + tokenizer (safetensors) to `folder`, atomically (temp folder, then rename); returns it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def folder_bytes(folder, pattern: str = "*.safetensors") -> int:
    """Bytes of the files matching `pattern` in `folder` (default: the weight files)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


def chat_batch(tokenizer, conversations: list[list[dict]]) -> dict:
    """Left-padded tensors {"input_ids", "attention_mask"} (B, T) for chat prompts, generation prompt added."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


def logits_of(model, batch: dict):
    """float32 logits (B, T, V) of `model` on a `chat_batch`, no gradients."""
    import torch

    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    return out.logits.float().cpu()


def logit_gap(a, b, attention_mask) -> dict:
    """How far two logit tensors (B, T, V) are apart at the real (unpadded) positions.

    max_abs, mean_abs: |a - b| in logits (nats); top1_agreement: fraction of positions
    whose most likely next token is the same.

    >>> import torch
    >>> x = torch.zeros(1, 2, 3); y = x.clone(); y[0, 1, 2] = 1.0
    >>> logit_gap(x, y, torch.tensor([[0, 1]]))
    {'max_abs': 1.0, 'mean_abs': 0.3333333432674408, 'top1_agreement': 0.0}
    """
    mask = attention_mask.bool()
    diff = (a - b).abs()[mask]  # positions, V
    same = (a.argmax(-1) == b.argmax(-1))[mask]
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "top1_agreement": same.float().mean().item()}


def answer_agreement(answers_a: list[str], answers_b: list[str]) -> float:
    """Fraction of prompts on which two models gave exactly the same answer text.

    >>> answer_agreement(["a", "b"], ["a", "c"])
    0.5
    """
    if len(answers_a) != len(answers_b) or not answers_a:
        raise ValueError(f"need two equally long, non-empty answer lists, got {len(answers_a)} and {len(answers_b)}")
    return sum(x == y for x, y in zip(answers_a, answers_b)) / len(answers_a)
