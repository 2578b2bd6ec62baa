"""Train the plain QLoRA path and the fast path side by side, same batches and LoRA init: the loss curves.

Three runs: `plain` (prepare_model_for_kbit_training: norms and embeddings in fp32, so the
residual stream and the LoRA sums are fp32), `plain_bf16` (the same peft layers with those
frozen tensors back in bf16, i.e. peft's own bf16 training) and `fast` (qlora_nb.fast, which
also runs the residual stream in bf16). The fast path reproduces `plain_bf16`; against `plain`
it differs in the first steps, where LoRA's tiny first updates survive in fp32 and round away
in bf16.

Leaves out: speed (the GPU benchmark measures it; on a CPU the fast path's offloading and
compiled kernels are off) and the Trainer: a bare AdamW loop, so the only difference
between the curves is how the model computes.

>>> # plain, quick, seconds = loss_match("tiny-mistral", steps=2, batch=2, seq=32)
"""
from __future__ import annotations

import time


def triage_batches(tokenizer, steps: int, batch: int, seq: int, split: str = "train"):
    """`steps` batches of (input_ids, labels), each (batch, seq): chat-formatted triage rows, padding masked."""
    import torch

    from . import data

    rows = data.load_triage(split)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[: steps * batch]]
    enc = tokenizer(texts, max_length=seq, truncation=True, padding="max_length", return_tensors="pt",
                    add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return [(enc.input_ids[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]) for i in range(steps)]


def adamw_losses(model, loss_fn, batches, lr: float) -> tuple[list[float], float]:
    """(loss of each step, seconds): one AdamW step per (input_ids, labels) batch, loss = loss_fn(model, ids, labels)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = model.get_input_embeddings().weight.device
    losses, start = [], time.perf_counter()
    for ids, labels in batches:
        loss = loss_fn(model, ids.to(device), labels.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def loss_match(base_model: str = "embedded", steps: int = 8, batch: int = 4, seq: int = 96, lr: float = 1e-3,
               rank: int = 16, seed: int = 0) -> dict:
    """Losses (nats per token) of `steps` AdamW steps for plain, plain_bf16 and fast, and each run's seconds.

    All load the base in NF4 through `models.load_base`, call prepare_model_for_kbit_training,
    get the same LoRA init (seed) with dropout 0, and see the same batches.
    `max_relative_difference`: fast vs plain_bf16; `max_relative_difference_vs_fp32`: fast vs plain.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from . import fast, models, train

    batches = triage_batches(models.load_tokenizer(base_model), steps, batch, seq)
    out = {}
    for name in ("plain", "plain_bf16", "fast"):
        model, _ = models.load_base(base_model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                                 target_modules=list(train.ALL_PROJECTIONS), task_type="CAUSAL_LM"))
        model.train()
        if name == "fast":
            fast.enable_fast_path(model)
            losses, seconds = adamw_losses(model, fast.causal_lm_loss, batches, lr)
        else:
            if name == "plain_bf16":  # the same tensors in bf16 that the fast path computes with
                fast.cast_frozen_fp32(model)
            losses, seconds = adamw_losses(model, lambda m, i, l: m(input_ids=i, labels=l).loss, batches, lr)
        out[name], out[f"{name}_seconds"] = losses, seconds
        del model

    def worst(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(out[a], out[b]))

    out["max_relative_difference"] = worst("plain_bf16", "fast")       # the same precision: the fast path's bar
    out["max_relative_difference_vs_fp32"] = worst("plain", "fast")     # what the fp32 residual stream adds
    return out
