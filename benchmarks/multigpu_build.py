"""Write a random-weight Llama/Mistral-shaped checkpoint already quantized to NF4, one decoder layer at a time.

A Llama-3-70B in bf16 is 140 GB, more than the 2-GPU machine's 128 GB disk and more than
one GPU holds; in NF4 with double quantization it is about 37 GiB. So no bf16 copy is
ever made whole: for each decoder layer the seven projections are drawn (normal, std =
config.initializer_range, seeded per tensor name), quantized with bitsandbytes'
`quantize_4bit` exactly as `from_pretrained(..., quantization_config=...)` would, and
written to that layer's safetensors shard in transformers' 4-bit format (the packed
weight plus its `weight.absmax`, `weight.quant_map`, `weight.nested_*` and
`weight.quant_state.bitsandbytes__nf4` entries, what `Linear4bit` saves). Embeddings,
norms and lm_head are bf16. `from_pretrained(folder)` then loads it pre-quantized.

    python benchmarks/multigpu_build.py --shape llama-3-70b --out /tmp/llama70b-nf4 --quant-storage bfloat16
    python benchmarks/multigpu_build.py --shape mistral-7b --out /tmp/m7b-nf4

tests/test_distributed.py builds a tiny shape on the CPU and checks it equal, byte for
byte, to transformers quantizing the same bf16 weights on load.

Leaves out: real weights (quality is not measured here), biases, tied embeddings other than
as the config says, and sliding-window details beyond the config.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def shape_config(name: str, vocab: int | None = None):
    """A transformers config (LlamaConfig / MistralConfig) of a named shape in qlora_nb.memory.MODELS."""
    from transformers import LlamaConfig, MistralConfig

    from qlora_nb import memory

    s = memory.MODELS[name]
    cls = MistralConfig if name.startswith("mistral") else LlamaConfig
    kw = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
              num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate,
              vocab_size=vocab or s.vocab, tie_word_embeddings=s.tied, max_position_embeddings=8192)
    if cls is MistralConfig:
        kw["sliding_window"] = s.sliding_window
    return cls(**kw)


def bnb_config(quant_storage: str = "uint8"):
    """NF4 + double quantization + bf16 compute (models.nf4_config), with the given storage dtype."""
    import torch

    from qlora_nb.models import nf4_config

    return nf4_config(quant_storage=getattr(torch, quant_storage))


def random_tensor(name: str, shape, std: float, seed: int, device: str = "cpu", dtype=None):
    """A normal(0, std) tensor in bf16 that depends only on (name, seed, shape, device type): rebuilds are identical.

    Drawn on `device` (a 70B model's 69 billion numbers take minutes on a CPU, seconds on a GPU).
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    t = torch.randn(*shape, generator=g, dtype=torch.float32, device=device)
    return t.mul_(std).to(dtype or torch.bfloat16)


def layer_weights(config, i: int, seed: int = 0, device: str = "cpu") -> dict:
    """{name: bf16 tensor} of decoder layer i: the seven projections (random) and two norms (ones)."""
    import torch

    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    out = {}
    for block, projs in PROJECTIONS.items():
        for p in projs:
            name = f"model.layers.{i}.{block}.{p}.weight"
            out[name] = random_tensor(name, shapes[p], config.initializer_range, seed, device)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
    return out


def other_weights(config, seed: int = 0, device: str = "cpu") -> dict:
    """Embeddings, final norm and (untied) lm_head in bf16."""
    import torch

    out = {"model.embed_tokens.weight": random_tensor("model.embed_tokens.weight", (config.vocab_size, config.hidden_size),
                                                      config.initializer_range, seed, device),
           "model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16, device=device)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = random_tensor("lm_head.weight", (config.vocab_size, config.hidden_size),
                                              config.initializer_range, seed, device)
    return out


def quantize_entries(name: str, w, quant_storage: str = "uint8") -> dict:
    """The state-dict entries Linear4bit saves for weight `name` quantized NF4 + double quantization."""
    import bitsandbytes.functional as F
    import torch

    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=getattr(torch, quant_storage))
    entries = {name: packed.cpu()}
    for k, v in state.as_dict(packed=True).items():
        entries[f"{name}.{k}"] = v.cpu()
    return entries


def build(folder, config, seed: int = 0, device: str = "cpu", quant_storage: str = "uint8", tokenizer=None,
          progress=print) -> Path:
    """Write the pre-quantized checkpoint to `folder` (shards, index, config.json, tokenizer); returns folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = config.num_hidden_layers
    weight_map, total = {}, 0
    for i in range(n + 1):
        shard = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        if i < n:
            tensors = {}
            for name, w in layer_weights(config, i, seed, device).items():
                if name.endswith("norm.weight"):
                    tensors[name] = w.cpu()
                else:
                    tensors.update(quantize_entries(name, w, quant_storage))
        else:
            tensors = {k: v.cpu() for k, v in other_weights(config, seed, device).items()}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
        if progress and (i % 10 == 0 or i == n):
            progress(f"wrote {shard} ({total / 2**30:.1f} GiB so far)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.quantization_config = bnb_config(quant_storage).to_dict()
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help="a name in qlora_nb.memory.MODELS, e.g. llama-3-70b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quant-storage", default="uint8", choices=["uint8", "bfloat16"],
                   help="bfloat16 for FSDP-QLoRA (FSDP shards float tensors only)")
    p.add_argument("--device", default="cuda", help="where to draw and quantize (cuda is fast; cpu works)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_finetune_smoke import triage_tokenizer  # a tokenizer made here, no hub

    from qlora_nb import data

    tokenizer = triage_tokenizer(data.load_triage("train"))
    build(args.out, shape_config(args.shape), args.seed, args.device, args.quant_storage, tokenizer)
    print(f"built {args.shape} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
