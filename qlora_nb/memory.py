"""Predict the GPU memory and FLOPs of a LoRA / QLoRA training step from a model's shape, and say whether it fits.

Leaves out: measuring (bench.py does that, and tests/test_memory.py holds these
predictions to its H100 numbers in data/bench/), KV caches and inference, and
fragmentation inside PyTorch's caching allocator (the peak here is
`torch.cuda.max_memory_allocated`; `fits` keeps a margin for the rest). Measured so far:
gradient checkpointing on, LoRA dropout > 0, AdamW 32-bit, CUDA; the other settings
(checkpointing off, dropout 0, 8-bit optimizers, bf16 activations under QLoRA) follow the
same counting; the Trainer's path (bf16 autocast, dropout 0, paged 8-bit AdamW) is checked
by the 2-GPU runs. Several GPUs: `plan_per_gpu` (at the end) predicts the per-GPU peak of
data-parallel (DDP) and fully sharded (FSDP) training, and FSDP's load moment;
tests/test_distributed.py holds it to the H200 runs in data/multigpu/ (70B FSDP, 7B DDP
within 10%; 7B FSDP over-predicted by about a fifth).

The model counts bytes from first principles, for the path the notebooks take
(transformers + peft + bitsandbytes, sdpa attention, no padding, gradient checkpointing):

* weights: 4-bit linears pack two weights per byte plus one absmax per 64 (fp32, or
  with double quantization one byte plus an fp32 per 256 blocks); embeddings, norms and
  lm_head stay 16-bit, and `prepare_model_for_kbit_training` casts them to fp32.
* LoRA: r * (in + out) fp32 parameters per adapted linear, as many gradients, and the
  optimizer's state (AdamW: two fp32 moments; 8-bit AdamW: two bytes).
* checkpoints: with gradient checkpointing each decoder layer keeps only its input,
  B * T * hidden in the activation dtype. That dtype is fp32 for QLoRA, because the
  fp32 embedding that prepare_model_for_kbit_training makes turns the whole residual
  stream fp32 (every 4-bit linear returns its input's dtype), and bf16 for bf16 LoRA.
* the recomputed layer: in backward one layer at a time is run again and keeps all it
  saves for backward: RMSNorm inputs, q/k/v and the attention output, each LoRA
  dropout's copy of its input (fp32) and mask (1 byte), the MLP's gate, up, SiLU and
  product, plus two fp32 gradients of the hidden state in flight or one dequantized
  16-bit weight (bitsandbytes dequantizes the 4-bit weight for each matmul and frees it).
* attention: sdpa picks a kernel by dtype. bf16 with grouped KV heads runs flash
  attention (O(T) memory). fp32 with grouped KV heads (QLoRA after the upcast) only runs
  on the math kernel, which stores B * heads * T * T fp32 scores; in its backward four
  such buffers are alive at once. When T reaches a sliding window the model needs a
  mask: then KV heads are repeated, the memory-efficient kernel runs, and the mask costs
  B * T * T bytes (bool) plus a copy in the activation dtype.
* autocast (the Trainer's `bf16=True`, notebook 05 and distributed.py): the residual stream
  and the checkpoints keep their dtype, but what matmuls and attention make is bf16. So
  q/k/v, the attention output and the MLP's four tensors cost 2 bytes each, sdpa runs
  flash attention (no T x T scores), and each LoRA A keeps autocast's bf16 copy of its
  input. Measured on H100/H200 through the Trainer: within 4% (data/multigpu/, 05's smoke).
* logits: lm_head's output is upcast to fp32 for the loss (transformers' ForCausalLMLoss);
  log_softmax keeps its fp32 output, and backward holds that, its gradient and the
  logits' gradient: 12 bytes per token per vocabulary entry.
* the peak is the static part plus the largest of three moments: the recomputed layer's
  backward, the math attention's backward, the loss's backward (with all checkpoints alive).

>>> p = plan("mistral-7b", quant="nf4+dq", seq=2048, batch=1)
>>> round(p.weights_loaded / 2**30, 2), p.attention_kernel, p.peak_moment
(3.84, 'math', 'attention backward (math kernel)')
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTS = ("none", "nf4", "nf4+dq")
# Optimizer state in bytes per trainable parameter. Paged variants keep the same state but let
# bitsandbytes page it to CPU memory under pressure; the planner counts it on the GPU.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0 + 8 / 256,
                         "paged_adamw_8bit": 2.0 + 8 / 256, "sgd": 0.0}
CUBLAS_WORKSPACES = 2 * 32 * 2**20  # one 32 MiB cuBLAS workspace for the forward thread, one for autograd's
CUDA_CONTEXT_GIB = 0.5              # CUDA context + kernels: outside max_memory_allocated, inside the card


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only causal LM that memory depends on (Llama / Mistral layout).

    head_dim * heads may differ from hidden (Gemma-like); kv_heads < heads is grouped-query
    attention; sliding_window is None for full attention.
    """
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """From a transformers config object (or its dict / config.json path)."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        window = get("sliding_window") if get("use_sliding_window", True) is not False else None
        return cls(name=name or get("model_type", "model"), hidden=hidden, layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or hidden // heads, intermediate=get("intermediate_size"),
                   vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)), sliding_window=window)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{projection: (out_features, in_features)} of one decoder layer.

        >>> MODELS["mistral-7b"].linear_shapes()["k_proj"]
        (1024, 4096)
        """
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def layer_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    def embedding_params(self) -> int:
        """Input embedding plus lm_head (once if tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def norm_params(self) -> int:
        return self.hidden * (2 * self.layers + 1)

    def total_params(self) -> int:
        """All parameters; equals transformers' count for Llama/Mistral models (tests check this)."""
        return self.layers * self.layer_linear_params() + self.embedding_params() + self.norm_params()


# Named shapes, written as code so the widget needs no download. Sources in the comments.
MODELS: dict[str, ModelShape] = {
    # transformers.MistralConfig() defaults (the Mistral-7B-v0.1 shape; sliding window 4096)
    "mistral-7b": ModelShape("Mistral 7B", 4096, 32, 32, 8, 128, 14336, 32000, False, 4096),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": ModelShape("Llama-3 8B", 4096, 32, 32, 8, 128, 14336, 128256, False, None),
    # meta-llama/Llama-2-13b-hf config.json
    "llama-2-13b": ModelShape("Llama-2 13B", 5120, 40, 40, 40, 128, 13824, 32000, False, None),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama-3-70b": ModelShape("Llama-3 70B", 8192, 80, 64, 8, 128, 28672, 128256, False, None),
}
MODEL_CHOICES = ("embedded", *MODELS)


def model_shape(name_or_config) -> ModelShape:
    """A ModelShape from a name in MODEL_CHOICES, a transformers config, a folder, or a ModelShape."""
    if isinstance(name_or_config, ModelShape):
        return name_or_config
    if isinstance(name_or_config, str) and name_or_config in MODELS:
        return MODELS[name_or_config]
    if name_or_config == "embedded":
        from .models import embedded_base_path
        return ModelShape.from_config(embedded_base_path(), name="embedded SmolLM2-135M")
    if isinstance(name_or_config, str) and not Path(name_or_config).exists():
        raise ValueError(f"model {name_or_config!r} is not known: use one of {', '.join(MODEL_CHOICES)}, "
                         "a transformers config, or a folder with a config.json")
    return ModelShape.from_config(name_or_config)


def weight_bytes(shape: ModelShape, quant: str = "nf4+dq", upcast: bool = False,
                 blocksize: int = 64, dq_blocksize: int = 256) -> int:
    """Bytes of the model's weights: decoder linears in 4-bit (or bf16), the rest bf16 (fp32 if `upcast`).

    >>> round(weight_bytes(MODELS["mistral-7b"], "none") / 2**30, 2)
    13.49
    """
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(QUANTS)}")
    other = shape.embedding_params() + shape.norm_params()
    other_bytes = other * (4 if upcast else 2)
    if quant == "none":
        return shape.layers * shape.layer_linear_params() * 2 + other_bytes
    total = 0
    for o, i in shape.linear_shapes().values():
        n = o * i
        blocks = -(-n // blocksize)
        stats = 4 * blocks if quant == "nf4" else blocks + 4 * -(-blocks // dq_blocksize) + 4
        total += -(-n // 2) + stats
    return shape.layers * total + other_bytes


def lora_params(shape: ModelShape, rank: int, targets=ALL_PROJECTIONS) -> int:
    """Trainable LoRA parameters: sum of r * (in + out) over the adapted linears of every layer.

    >>> lora_params(MODELS["mistral-7b"], 16)
    41943040
    """
    shapes = shape.linear_shapes()
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"target modules {sorted(unknown)} are not in this model; it has {sorted(shapes)}")
    return shape.layers * sum(rank * (i + o) for name, (o, i) in shapes.items() if name in targets)


def needs_mask(shape: ModelShape, seq: int) -> bool:
    """True when transformers builds a (B, 1, T, T) mask: T reaches the sliding window (no padding assumed)."""
    return shape.sliding_window is not None and seq >= shape.sliding_window


def attention_kernel(shape: ModelShape, seq: int, act_bytes: int) -> str:
    """Which sdpa kernel a CUDA GPU runs (torch 2.11): 'flash', 'efficient' (with a mask) or 'math'.

    transformers passes no mask (is_causal) unless T reaches the sliding window; with no
    mask it asks sdpa for grouped-query attention, which in fp32 only the math kernel takes.
    """
    if needs_mask(shape, seq):
        return "efficient"
    if act_bytes == 2 or shape.kv_heads == shape.heads:
        return "flash" if act_bytes == 2 else "efficient"
    return "math"


@dataclass
class MemoryPlan:
    """Predicted bytes of one training step; `peak` = static + checkpoints + the largest moment.

    All sizes in bytes. `moments` holds each candidate moment's bytes beyond static + checkpoints.
    """
    model: ModelShape
    quant: str
    rank: int
    targets: tuple
    optimizer: str
    batch: int
    seq: int
    checkpointing: bool
    dropout: float
    upcast: bool
    act_bytes: int
    attention_kernel: str
    weights_loaded: int
    weights: int
    lora_params: int
    lora_bytes: int
    lora_grad_bytes: int
    optimizer_bytes: int
    workspace: int
    checkpoints: int
    moments: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    autocast: bool = False

    @property
    def static(self) -> int:
        return self.weights + self.lora_bytes + self.lora_grad_bytes + self.optimizer_bytes + self.workspace

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    @property
    def activations(self) -> int:
        """Bytes beyond static + checkpoints at the peak moment."""
        return self.moments[self.peak_moment]

    @property
    def logits(self) -> int:
        return self.moments["loss backward (logits)"]

    @property
    def peak(self) -> int:
        return self.static + self.checkpoints + self.activations

    def breakdown(self) -> dict[str, float]:
        """{component: GiB} summing to the peak, in stacking order for a bar chart."""
        return {"weights": self.weights / GIB,
                "LoRA params + grads + optimizer": (self.lora_bytes + self.lora_grad_bytes + self.optimizer_bytes) / GIB,
                "CUDA workspaces": self.workspace / GIB,
                "checkpointed layer inputs" if self.checkpointing else "saved activations (all layers)":
                    self.checkpoints / GIB,
                f"peak moment: {self.peak_moment}": self.activations / GIB}

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.breakdown().items())
        return f"{self.model.name} {self.quant} r={self.rank} {self.seq}x{self.batch}: peak {self.peak / GIB:.2f} GiB ({parts})"


def _layer_bytes_per_token(shape: ModelShape, a: int, kernel: str, targets, rank: int, dropout: float,
                           autocast: bool = False) -> dict:
    """Bytes per token the recomputed layer holds at its backward, by part (see the module docstring).

    a: bytes per element of the residual stream; autocast: matmul and attention outputs are bf16.
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    shapes = shape.linear_shapes()
    ins = [shapes[t][1] for t in targets]
    # residual stream: attention output after o_proj, the residual sum, the second norm's output;
    # bf16 RMSNorm also keeps an fp32 copy of each of its two inputs (in fp32 they are the tensors themselves)
    resid = 3 * a * h + (8 * h if a == 2 else 0)
    c = 2 if autocast else a                 # dtype of what matmuls and attention produce
    if kernel == "flash":
        attn = c * (2 * q + 2 * kv)          # q, k, v (grouped, not repeated), output
    elif kernel == "efficient":
        attn = c * (2 * q + 2 * q)           # q, repeated k and v, output
    else:
        attn = c * 3 * q                     # q, repeated k and v; the T x T scores are counted apart
    if dropout > 0:
        # each adapter's dropout keeps an fp32 copy of its input and a bool mask; a bf16 input is
        # first cast to fp32 (one such cast alive at a time)
        lora = 5 * sum(ins) + (4 * max(ins, default=0) if a == 2 else 0)
    else:
        lora = 4 * sum(ins) if a == 2 and not autocast else 0  # lora_A keeps its fp32 input (a cast copy for bf16)
    if autocast:
        lora += 2 * sum(ins)                     # lora_A's autocast copy of its input, bf16
    lora += (2 if autocast else 4) * rank * len(ins)  # lora_B's input (B, T, r)
    mlp = 4 * c * i                              # gate out, up out, SiLU out, their product
    return {"residual stream": resid, "attention": attn, "LoRA inputs": lora, "MLP": mlp}


def plan(model="mistral-7b", quant: str = "nf4+dq", rank: int = 16, targets=ALL_PROJECTIONS,
         optimizer: str = "adamw", batch: int = 1, seq: int = 2048, checkpointing: bool = True,
         dropout: float = 0.05, upcast: bool | None = None, device: str = "cuda", autocast: bool = False) -> MemoryPlan:
    """Predict a training step's memory (bytes) and FLOPs per token for `model` (name, config or ModelShape).

    upcast None means what the notebooks do: quantized models go through
    prepare_model_for_kbit_training (non-4-bit weights and hence activations in fp32), bf16 ones do not.
    device 'cpu' drops the CUDA workspaces (the CPU has no cuBLAS workspace).
    autocast True: the step runs under bf16 autocast, as the Trainer with bf16=True does (notebook
    05, distributed.py); False: plain calls, as bench.py's loop and the 08 measurements.
    """
    shape = model_shape(model)
    targets = tuple(targets)
    for name, value in {"rank": rank, "batch": batch, "seq": seq}.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: it must be a positive integer")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(QUANTS)}")
    upcast = (quant != "none") if upcast is None else upcast
    a = 4 if upcast else 2
    n = batch * seq
    c = 2 if autocast else a
    kernel = attention_kernel(shape, seq, c)
    n_lora = lora_params(shape, rank, targets)
    per_token = _layer_bytes_per_token(shape, a, kernel, targets, rank, dropout, autocast)
    layer = n * sum(per_token.values())
    scores = batch * shape.heads * seq * seq * 4 if kernel == "math" else 0   # fp32 T x T per head
    mask = batch * seq * seq * (1 + c) if needs_mask(shape, seq) else 0  # bool mask + sdpa's additive copy
    grads = 2 * 4 * n * shape.hidden                                           # two fp32 (B, T, hidden) gradients
    dequant = 2 * max(o * i for o, i in shape.linear_shapes().values()) if quant != "none" else 0
    shapes = shape.linear_shapes()
    qkv_in = sum(shapes[t][1] for t in targets if t in ("q_proj", "k_proj", "v_proj"))
    logits = n * (4 * shape.hidden + 12 * shape.vocab)   # final norm's fp32 input + logits, log-probs, 2 grads
    if checkpointing:
        checkpoints = shape.layers * n * shape.hidden * a
        moments = {"layer backward (recomputed layer)": layer + scores + mask + max(grads, dequant),
                   "loss backward (logits)": logits}
        if kernel == "math":
            moments["attention backward (math kernel)"] = (n * ((5 if dropout > 0 else 0) * qkv_in + 2 * a * shape.heads
                                                                * shape.head_dim) + 4 * scores + grads)
    else:
        # every layer keeps what the recomputed layer keeps above, scores and mask included
        checkpoints = shape.layers * (layer + scores + mask)
        moments = {"layer backward (recomputed layer)": max(grads, dequant) + 3 * scores,
                   "loss backward (logits)": logits}
    state = OPTIMIZER_STATE_BYTES[optimizer]
    result = MemoryPlan(
        model=shape, quant=quant, rank=rank, targets=targets, optimizer=optimizer, batch=batch, seq=seq,
        checkpointing=checkpointing, dropout=dropout, upcast=upcast, act_bytes=a, attention_kernel=kernel,
        autocast=autocast,
        weights_loaded=weight_bytes(shape, quant, upcast=False), weights=weight_bytes(shape, quant, upcast=upcast),
        lora_params=n_lora, lora_bytes=4 * n_lora, lora_grad_bytes=4 * n_lora,
        optimizer_bytes=int(state * n_lora), workspace=CUBLAS_WORKSPACES if device == "cuda" else 0,
        checkpoints=checkpoints, moments=moments,
        flops=flops_per_token(shape, seq, rank, targets, checkpointing))
    return result


def flops_per_token(shape: ModelShape, seq: int, rank: int = 16, targets=ALL_PROJECTIONS,
                    checkpointing: bool = True) -> dict[str, float]:
    """Training FLOPs per token of a LoRA step: {'forward', 'backward', 'recompute', 'total'}.

    Forward: 2 per weight of every matmul (decoder linears + lm_head) plus causal attention,
    2 * 2 * T * heads * head_dim per layer halved by the mask. Backward with a frozen base
    needs only input gradients (one forward's worth), plus weight gradients for LoRA
    (2 * 2 per LoRA weight). Checkpointing re-runs the decoder layers' forward once.

    >>> f = flops_per_token(MODELS["mistral-7b"], 2048)
    >>> round(f["forward"] / 1e9, 1)
    14.8
    """
    matmul = shape.layers * shape.layer_linear_params() + shape.vocab * shape.hidden
    n_lora = lora_params(shape, rank, targets) if rank else 0
    attn = shape.layers * 2 * 2 * seq * shape.heads * shape.head_dim / 2
    forward = 2 * matmul + 2 * n_lora + attn
    backward = 2 * matmul + attn * 2 + 4 * n_lora
    recompute = (forward - 2 * shape.vocab * shape.hidden) if checkpointing else 0
    return {"forward": forward, "backward": backward, "recompute": recompute,
            "total": forward + backward + recompute}


@dataclass
class FitAnswer:
    """fits: does the plan's peak fit in usable memory; advice: changes that make it fit (or save most)."""
    fits: bool
    peak_gib: float
    usable_gib: float
    advice: list

    def __str__(self) -> str:
        head = (f"fits: peak {self.peak_gib:.1f} GiB of {self.usable_gib:.1f} GiB usable" if self.fits else
                f"does not fit: peak {self.peak_gib:.1f} GiB > {self.usable_gib:.1f} GiB usable")
        return "\n".join([head, *[f"- {a}" for a in self.advice]])


def usable_gib(gpu_gib: float, margin: float = 0.1) -> float:
    """GiB that tensors may use on a `gpu_gib` card: minus the CUDA context, minus `margin` for fragmentation.

    >>> round(usable_gib(80), 2)
    71.55
    """
    return (gpu_gib - CUDA_CONTEXT_GIB) * (1 - margin)


def fits(p: MemoryPlan, gpu_gib: float, margin: float = 0.1) -> FitAnswer:
    """Whether plan `p` fits a GPU with `gpu_gib` GiB, and what to change when it does not.

    Each suggestion is re-planned, so its number is the planner's, not a rule of thumb.
    """
    if gpu_gib <= CUDA_CONTEXT_GIB:
        raise ValueError(f"gpu_gib={gpu_gib}: give the card's memory in GiB, e.g. 24 or 80")
    room = usable_gib(gpu_gib, margin)
    peak = p.peak / GIB
    if peak <= room:
        return FitAnswer(True, peak, room, [])
    base = dict(model=p.model, quant=p.quant, rank=p.rank, targets=p.targets, optimizer=p.optimizer,
                batch=p.batch, seq=p.seq, checkpointing=p.checkpointing, dropout=p.dropout, upcast=p.upcast,
                autocast=p.autocast)
    advice = []

    def tryit(label: str, **change):
        q = plan(**{**base, **change})
        gib = q.peak / GIB
        advice.append((gib > room, gib, f"{label}: peak {gib:.1f} GiB" + ("" if gib > room else " (fits)")))

    if p.quant == "none":
        tryit("load the base in 4-bit (quant='nf4+dq', QLoRA)", quant="nf4+dq", upcast=None)
    if not p.checkpointing:
        tryit("turn gradient checkpointing on", checkpointing=True)
    if p.batch > 1:
        b = p.batch
        while b > 1 and plan(**{**base, "batch": b}).peak / GIB > room:
            b //= 2
        tryit(f"batch {b} with gradient accumulation {-(-p.batch // b)} (same tokens per optimizer step)", batch=b)
    if p.seq > 256:
        s = p.seq
        while s > 256 and plan(**{**base, "seq": s}).peak / GIB > room:
            s //= 2
        tryit(f"sequences of {s} tokens", seq=s)
    if p.upcast and p.quant != "none":
        tryit("keep activations bf16 (skip prepare_model_for_kbit_training's fp32 cast; not measured in data/bench)", upcast=False)
    if p.optimizer in ("adamw", "paged_adamw_32bit"):
        tryit("8-bit AdamW (optim='paged_adamw_8bit')", optimizer="paged_adamw_8bit")
    if p.rank > 8:
        tryit("rank 8", rank=8)
    weights = weight_bytes(p.model, "nf4+dq", upcast=False) / GIB
    if weights > room:
        advice.append((True, weights, f"the 4-bit weights alone need {weights:.1f} GiB: use a GPU with at least "
                                      f"{weights / (1 - margin) + CUDA_CONTEXT_GIB:.0f} GiB or a smaller model"))
    advice.sort(key=lambda t: (t[0], t[1]))
    return FitAnswer(False, peak, room, [text for _, _, text in advice])


def compare_with_measurement(run: dict, model="mistral-7b") -> dict:
    """{'predicted', 'measured', 'ratio'} peak bytes for one run of bench.py's JSON (ratio = predicted / measured)."""
    quant = "nf4+dq" if run["method"] == "qlora" else "none"
    p = plan(model, quant=quant, rank=run.get("rank", 16), batch=run["batch"], seq=run["seq"],
             checkpointing=run.get("checkpointing", True))
    measured = run["peak_allocated_bytes"]
    return {"predicted": p.peak, "measured": measured, "ratio": p.peak / measured, "plan": p}


def layer_bytes_per_token(p: MemoryPlan) -> dict[str, int]:
    """{part: bytes per token} the recomputed layer of plan `p` holds (T x T scores and masks not included).

    >>> layer_bytes_per_token(plan("mistral-7b", quant="none"))["MLP"]  # gate, up, SiLU, product in bf16
    114688
    """
    return _layer_bytes_per_token(p.model, p.act_bytes, p.attention_kernel, p.targets, p.rank, p.dropout)


def measured_breakdown(run: dict) -> dict[str, float]:
    """{component: GiB} of one bench.py run, in the planner's stacking order where measurement can tell.

    Weights = memory after set-up minus the fp32 LoRA parameters; LoRA state = parameters,
    gradients and AdamW's two moments (16 bytes each); the rest of the measured peak is
    activations, logits and temporaries together.
    """
    lora_state = 16 * run["trainable_params"]
    weights = run["bytes_after_setup"] - 4 * run["trainable_params"]
    return {"weights": weights / GIB, "LoRA params + grads + optimizer": lora_state / GIB,
            "activations + temporaries (measured)": (run["peak_allocated_bytes"] - weights - lora_state) / GIB}


def load_bench(path=None) -> dict:
    """The committed GPU benchmark (data/bench/bench_cuda.json) as a dict."""
    from .paths import recorded_json

    return recorded_json("bench/bench_cuda.json", "python -m qlora_nb.bench --device cuda --out data/bench", path)


def plan_dict(p: MemoryPlan) -> dict:
    """A JSON-friendly view of a plan (GiB and FLOPs), for tables."""
    d = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("model", "moments", "flops")}
    d.update(model=p.model.name, peak_gib=p.peak / GIB, peak_moment=p.peak_moment,
             breakdown_gib=p.breakdown(), train_flops_per_token=p.flops["total"])
    return d


# ---------------------------------------------------------------- several GPUs (notebook 10)
#
# Data parallel (DDP) keeps a whole replica on every GPU and all-reduces the LoRA gradients;
# fully sharded data parallel (FSDP, PyTorch's FSDP1 through accelerate, FULL_SHARD,
# use_orig_params=False, peft's wrap policy) splits every wrapped unit's flat parameter into
# N shards and all-gathers a unit only while it computes. What each GPU holds:
#
# * DDP: the single-GPU plan with the per-GPU batch, plus DDP's gradient buckets (a second
#   fp32 copy of the LoRA gradients that the all-reduce works on; gradient_as_bucket_view off).
# * FSDP-QLoRA: the 4-bit weights are stored bf16-typed (bnb_4bit_quant_storage=bfloat16, the
#   same bytes as uint8 storage) so they flatten with the bf16 norms into one flat parameter per
#   decoder layer; the recipe skips prepare_model_for_kbit_training (FSDP needs one dtype per
#   unit), so activations stay bf16. Per GPU: 1/N of every unit (padded to a multiple of N),
#   the quantization statistics of every layer (absmax & co. are attributes of the weight, not
#   parameters, so FSDP does not shard them), the root unit (embeddings, lm_head, final norm)
#   all-gathered from forward to the end of backward (FSDP1 does not free the root after
#   forward), two decoder layers all-gathered at once (the one computing and the one prefetched,
#   BACKWARD_PRE), 1/N of the LoRA parameters, gradients and optimizer state, and the
#   activations of the per-GPU batch.
#
# Leaves out: NCCL's own buffers and the CUDA context of the communicator, CPU offload, FSDP2,
# tensor or pipeline parallelism. Not measured yet: the 2-GPU benchmark that would hold these
# numbers to max_memory_allocated (benchmarks/multigpu_bench.sh) has not run.

STRATEGIES = ("ddp", "fsdp")
FSDP_LAYERS_IN_FLIGHT = 2  # the layer computing + the one BACKWARD_PRE prefetches


def _layer_flat_bytes(shape: ModelShape, quant: str) -> tuple[int, int]:
    """(bytes FSDP flattens and shards, bytes of quantization statistics it cannot shard) for one decoder layer.

    The flat parameter holds the packed 4-bit data (or bf16 weights) of the seven projections and
    the layer's two bf16 norms; the statistics are the rest of weight_bytes for the layer.

    >>> flat, stats = _layer_flat_bytes(MODELS["mistral-7b"], "nf4+dq")
    >>> flat, stats
    (109068288, 3461148)
    """
    linears = shape.layer_linear_params()
    norms = 2 * shape.hidden * 2
    if quant == "none":
        return 2 * linears + norms, 0
    packed = sum(-(-o * i // 2) for o, i in shape.linear_shapes().values())
    one_layer = ModelShape(shape.name, shape.hidden, 1, shape.heads, shape.kv_heads, shape.head_dim,
                           shape.intermediate, shape.vocab, shape.tied, shape.sliding_window)
    stats = weight_bytes(one_layer, quant) - packed - (one_layer.embedding_params() + one_layer.norm_params()) * 2
    return packed + norms, stats


@dataclass
class GpuPlan:
    """Predicted bytes on each of `gpus` GPUs for one training step under `strategy` ('ddp' or 'fsdp').

    base: the single-GPU plan with the same per-GPU batch; activations, checkpoints and
    workspaces come from it. weights: weight bytes that stay on one GPU (DDP: a whole
    replica; FSDP: its shards plus the unsharded quantization statistics). gathered: FSDP's
    all-gathered full units alive at the peak. lora_state: LoRA parameters + gradients +
    optimizer state on one GPU. comm_buffers: DDP's gradient buckets. All in bytes.
    """
    base: MemoryPlan
    strategy: str
    gpus: int
    weights: int
    gathered: int
    lora_state: int
    comm_buffers: int
    unsharded: int = 0  # the part of `weights` FSDP cannot shard (quantization statistics)
    unit_flat: int = 0  # FSDP: bytes of one decoder layer's flat parameter, unsharded

    @property
    def load_peak(self) -> int:
        """Per-GPU bytes at load time, before the first step.

        transformers loads a bitsandbytes model whole onto every rank's GPU (its FSDP
        CPU-RAM-efficient loading skips quantized models), and FSDP then flattens one layer at
        a time (a copy of the layer's bytes) and frees all but its shard. So under FSDP the
        load needs the whole 4-bit model plus one layer per GPU, more than a 70B step does
        on two GPUs. DDP: the model on the GPU, below its training peak.
        """
        if self.strategy == "fsdp":
            return self.base.weights_loaded + self.unit_flat
        return self.base.weights

    @property
    def fit_peak(self) -> int:
        """The larger of the step's peak and the load's: what a GPU must hold for the run to get going."""
        return max(self.peak, self.load_peak)

    @property
    def static(self) -> int:
        return self.weights + self.gathered + self.lora_state + self.comm_buffers + self.base.workspace

    @property
    def flat_param_bytes(self) -> int:
        """FSDP: bytes of the flat parameters one GPU keeps between steps (frozen shards + fp32 LoRA shards), what
        torch reports for the rank's FlatParameters; DDP: the replica's parameters (weights + fp32 LoRA)."""
        lora = 4 * (-(-self.base.lora_params // self.gpus) if self.strategy == "fsdp" else self.base.lora_params)
        return self.weights - self.unsharded + lora

    @property
    def peak(self) -> int:
        """Per-GPU peak bytes: static + checkpointed inputs + the largest moment of the per-GPU batch."""
        return self.static + self.base.checkpoints + self.base.activations

    def breakdown(self) -> dict[str, float]:
        """{component: GiB on one GPU}, summing to the peak; the same keys for both strategies."""
        b = self.base
        return {"weights kept on the GPU": self.weights / GIB,
                "all-gathered units (FSDP)": self.gathered / GIB,
                "LoRA params + grads + optimizer": self.lora_state / GIB,
                "gradient buckets (DDP)": self.comm_buffers / GIB,
                "CUDA workspaces": b.workspace / GIB,
                "checkpointed layer inputs" if b.checkpointing else "saved activations (all layers)": b.checkpoints / GIB,
                "peak moment (activations)": b.activations / GIB}

    def summary(self) -> str:
        b = self.base
        return (f"{b.model.name} {b.quant} r={b.rank} {b.seq}x{b.batch} per GPU, {self.strategy} on {self.gpus} GPU"
                f"{'s' if self.gpus > 1 else ''}: peak {self.peak / GIB:.2f} GiB per GPU"
                + (f" (loading: {self.load_peak / GIB:.2f} GiB)" if self.load_peak > self.peak else ""))


def plan_per_gpu(model="mistral-7b", gpus: int = 2, strategy: str = "fsdp", **plan_kwargs) -> GpuPlan:
    """Predict the per-GPU peak of QLoRA / LoRA training on `gpus` GPUs, data parallel or fully sharded.

    plan_kwargs go to `plan` (quant, rank, targets, optimizer, batch = sequences per GPU, seq,
    checkpointing, dropout, upcast); the global batch is gpus x batch. upcast defaults to the
    recipe of each strategy: DDP runs notebook 05's (prepare_model_for_kbit_training, fp32
    activations), FSDP-QLoRA skips that cast (bf16 activations). One GPU with 'ddp' is plain
    single-GPU training and equals plan(); one GPU with 'fsdp' still pays for gathering.

    >>> one = plan_per_gpu("llama-3-70b", gpus=1, strategy="ddp")
    >>> one.peak == plan("llama-3-70b").peak
    True
    >>> two = plan_per_gpu("llama-3-70b", gpus=2, strategy="fsdp")
    >>> round(one.peak / 2**30, 1), round(two.peak / 2**30, 1)
    (53.4, 30.7)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {', '.join(STRATEGIES)} "
                         "(ddp: a whole copy per GPU; fsdp: every GPU holds 1/N of the weights)")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus={gpus!r}: give the number of GPUs as a positive integer")
    if strategy == "fsdp" and plan_kwargs.get("upcast") is None:
        plan_kwargs["upcast"] = False
    base = plan(model, **plan_kwargs)
    shape, n_lora = base.model, base.lora_params
    opt = OPTIMIZER_STATE_BYTES[base.optimizer]
    if strategy == "ddp":
        buckets = 4 * n_lora if gpus > 1 else 0
        return GpuPlan(base, strategy, gpus, weights=base.weights, gathered=0,
                       lora_state=base.lora_bytes + base.lora_grad_bytes + base.optimizer_bytes, comm_buffers=buckets)
    if base.upcast:
        raise ValueError("FSDP needs one dtype per wrapped unit: plan it with upcast=False (the FSDP-QLoRA recipe "
                         "keeps the norms and embeddings bf16)")

    def shard(nbytes: int) -> int:  # FSDP pads each flat parameter (bf16 elements) to a multiple of N
        return 2 * -(-(nbytes // 2) // gpus)

    layer_flat, layer_stats = _layer_flat_bytes(shape, base.quant)
    root_flat = (shape.embedding_params() + shape.hidden) * 2
    weights = shape.layers * (shard(layer_flat) + layer_stats) + shard(root_flat)
    gathered = root_flat + min(FSDP_LAYERS_IN_FLIGHT, shape.layers) * layer_flat
    lora_state = int(-(-n_lora // gpus) * (4 + 4 + opt))
    return GpuPlan(base, strategy, gpus, weights=weights, gathered=gathered, lora_state=lora_state, comm_buffers=0,
                   unsharded=shape.layers * layer_stats, unit_flat=layer_flat)


def fits_per_gpu(gp: GpuPlan, gpu_gib: float, margin: float = 0.1, max_gpus: int = 64) -> FitAnswer:
    """Whether `gp` fits GPUs of `gpu_gib` GiB each, and (re-planned) what to change when it does not."""
    if gpu_gib <= CUDA_CONTEXT_GIB:
        raise ValueError(f"gpu_gib={gpu_gib}: give one GPU's memory in GiB, e.g. 24 or 80")
    room = usable_gib(gpu_gib, margin)
    peak = gp.fit_peak / GIB
    if peak <= room:
        return FitAnswer(True, peak, room, [])
    b = gp.base
    fsdp_kw = dict(quant=b.quant, rank=b.rank, targets=b.targets, optimizer=b.optimizer, batch=b.batch, seq=b.seq,
                   checkpointing=b.checkpointing, dropout=b.dropout, autocast=b.autocast)
    ddp_kw = {**fsdp_kw, "upcast": b.upcast}  # DDP keeps the plan's upcast; FSDP plans its own recipe's (bf16)
    advice = []

    def tryit(label: str, gpus: int, strategy: str, **change):
        kw = ddp_kw if strategy == "ddp" else fsdp_kw
        q = plan_per_gpu(b.model, gpus=gpus, strategy=strategy, **{**kw, **change})
        gib = q.fit_peak / GIB
        advice.append((gib > room, gib, f"{label}: peak {gib:.1f} GiB per GPU" + ("" if gib > room else " (fits)")))

    if gp.strategy == "ddp":
        tryit(f"fully shard (strategy 'fsdp') on the same {gp.gpus} GPUs", gp.gpus, "fsdp")
    need = min_gpus(b.model, gpu_gib, "fsdp", margin=margin, max_gpus=max_gpus, **fsdp_kw)
    if need is not None and need != gp.gpus:
        tryit(f"fsdp on {need} GPUs", need, "fsdp")
    if b.batch > 1:
        tryit(f"1 sequence per GPU with gradient accumulation {b.batch} (same global batch)", gp.gpus, gp.strategy,
              batch=1)
    if b.seq > 256:
        tryit(f"sequences of {b.seq // 2} tokens", gp.gpus, gp.strategy, seq=b.seq // 2)
    if need is None:
        one = plan_per_gpu(b.model, gpus=max_gpus, strategy="fsdp", **fsdp_kw)
        if one.load_peak > one.peak and one.load_peak / GIB > room:
            load = one.load_peak / GIB
            advice.append((True, load, f"no count of GPUs fits with fsdp as transformers loads it: the whole 4-bit "
                                       f"model is loaded onto every GPU before FSDP shards it ({load:.1f} GiB per "
                                       f"GPU); use GPUs with more memory, or a loader that quantizes on the CPU and "
                                       f"shards from there (Answer.AI's fsdp_qlora; not planned here)"))
        fixed = (one.gathered + one.unsharded + one.base.checkpoints + one.base.activations + one.base.workspace) / GIB
        advice.append((True, fixed, f"no count of up to {max_gpus} GPUs fits with fsdp: what sharding does not "
                                    f"shrink (gathered units, quantization statistics, activations, workspaces) "
                                    f"needs {fixed:.1f} GiB per GPU "
                                    f"alone; use GPUs with more memory, shorter sequences, or CPU offload "
                                    f"(fsdp_offload_params: true, not planned here)"))
    advice.sort(key=lambda t: (t[0], t[1]))
    return FitAnswer(False, peak, room, [text for _, _, text in advice])


def min_gpus(model, gpu_gib: float, strategy: str = "fsdp", margin: float = 0.1, max_gpus: int = 64,
             **plan_kwargs) -> int | None:
    """The fewest GPUs of `gpu_gib` GiB on which `plan_per_gpu` fits, or None if none up to max_gpus does.

    >>> min_gpus("llama-3-70b", 48), min_gpus("llama-3-70b", 48, strategy="ddp")
    (2, None)
    """
    room = usable_gib(gpu_gib, margin)
    for n in range(1, max_gpus + 1):
        if plan_per_gpu(model, gpus=n, strategy=strategy, **plan_kwargs).fit_peak / GIB <= room:
            return n
    return None


def gpu_plan_dict(gp: GpuPlan) -> dict:
    """A JSON-friendly view of a per-GPU plan (GiB), for result files and tables."""
    return {"strategy": gp.strategy, "gpus": gp.gpus, "model": gp.base.model.name, "quant": gp.base.quant,
            "rank": gp.base.rank, "batch_per_gpu": gp.base.batch, "seq": gp.base.seq,
            "optimizer": gp.base.optimizer, "upcast": gp.base.upcast,
            "autocast": gp.base.autocast, "dropout": gp.base.dropout, "peak_gib": gp.peak / GIB,
            "load_peak_gib": gp.load_peak / GIB,
            "peak_bytes": gp.peak, "peak_moment": gp.base.peak_moment, "breakdown_gib": gp.breakdown()}
