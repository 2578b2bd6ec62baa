"""LoRA from scratch: a frozen nn.Linear plus a trainable low-rank update, and counting what it costs.

Leaves out: dropout variants, merging and saving (peft does those; adapters.py wraps them),
quantized bases (qlayer.py) and training loops (train.py). LoRALinear computes exactly what
peft's `lora.Linear` computes, in the same order, so the two agree to the last bit in fp32.

    y = W x + (alpha / r) * B (A x)      W: (out, in) frozen, A: (r, in), B: (out, r)

A starts random (Kaiming-uniform, like peft) and B starts at zero, so before the first
optimizer step the layer is exactly the base layer.

>>> import torch
>>> base = torch.nn.Linear(32, 16)
>>> layer = LoRALinear(base, r=4, alpha=8)
>>> x = torch.randn(2, 32)
>>> torch.equal(layer(x), base(x))
True
>>> layer.trainable_parameters()  # r * (in + out)
192
"""
from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen `base` nn.Linear plus a rank-`r` update B @ A scaled by alpha / r (see module docstring)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"rank r={r} must be a positive integer")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dtype = adapter_dtype or base.weight.dtype  # peft keeps adapters in fp32 next to a bf16 base
        self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's default for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        # Same operations, order and casts as peft's lora.Linear, so results match bit for bit.
        result = self.base(x)
        x = x.to(self.A.dtype)
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.A), self.B)
        return (result + update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the dense update (alpha/r) * B @ A that merging would add to W."""
        return (self.B @ self.A) * self.scaling

    def trainable_parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    @classmethod
    def from_peft(cls, peft_layer, adapter: str = "default") -> "LoRALinear":
        """A LoRALinear with a copy of peft lora.Linear's base weight, A, B and scaling."""
        base = peft_layer.base_layer
        copy = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                         dtype=base.weight.dtype)
        copy.load_state_dict(base.state_dict())
        r = peft_layer.r[adapter]
        layer = cls(copy, r=r, alpha=peft_layer.scaling[adapter] * r,
                    adapter_dtype=peft_layer.lora_A[adapter].weight.dtype)
        layer.scaling = peft_layer.scaling[adapter]  # exact, even if alpha*r/r would round
        with torch.no_grad():
            layer.A.copy_(peft_layer.lora_A[adapter].weight)
            layer.B.copy_(peft_layer.lora_B[adapter].weight)
        return layer


# ---------------------------------------------------------------------------------------------
# Low-rank structure of a matrix

def singular_values(w: torch.Tensor) -> torch.Tensor:
    """float32 singular values of a 2-D weight, largest first (shape (min(out, in),))."""
    return torch.linalg.svdvals(w.float())


def rank_r_errors(s: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error ||W - W_r|| / ||W|| of the best rank-r approximation, for r = 0..len(s).

    By Eckart-Young this is sqrt(sum of s_i^2 for i > r) / ||W||, so it needs only the singular values.

    >>> rank_r_errors(torch.tensor([3.0, 4.0])).tolist()
    [1.0, 0.800000011920929, 0.0]
    """
    energy = s.double() ** 2
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tail[r] = sum_{i>=r}
    return (tail / energy.sum()).sqrt().float()


def rank_r_approximation(w: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation U_r S_r V_r^T of a 2-D weight (float32, same shape)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def finetune_delta(model, module_name: str, input_ids: torch.Tensor, steps: int = 20, lr: float = 1e-4,
                   seed: int = 0, optimizer: str = "adamw") -> torch.Tensor:
    """W_after - W_before (float32, (out, in)) of one weight after `steps` of full fine-tuning.

    Only `module_name`'s weight is trained, on next-token loss over `input_ids` (B, T); the model
    is restored afterwards. optimizer: "sgd" (each step adds -lr * gradient, and a linear layer's
    gradient sum_t g_t x_t^T has rank <= B*T) or "adamw" (divides each entry by its own running
    scale, which breaks that low-rank structure).
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}: use 'sgd' or 'adamw'")
    torch.manual_seed(seed)
    weight = model.get_submodule(module_name).weight
    input_ids = input_ids.to(weight.device)
    before = weight.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    master = nn.Parameter(before.float().clone())  # train in fp32: a bf16 weight would swallow small updates
    opt = (torch.optim.AdamW([master], lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD([master], lr=lr))
    try:
        for _ in range(steps):
            weight.data = master.detach().to(weight.dtype, copy=True)
            weight.requires_grad_(True)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            master.grad = weight.grad.float()
            weight.grad = None
            opt.step()
            opt.zero_grad()
        return master.detach() - before.float()
    finally:
        weight.data = before
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


# ---------------------------------------------------------------------------------------------
# Counting parameters from a config (no weights needed)

@functools.lru_cache(maxsize=8)
def _meta_model(config_json: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):  # shapes only: a 7B model costs no memory here
        return AutoModelForCausalLM.from_config(config)


def _key(config) -> str:
    return config.to_json_string(use_diff=False)


def linear_layer_shapes(config) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} for every nn.Linear in the model `config` describes.

    >>> from transformers import MistralConfig
    >>> linear_layer_shapes(MistralConfig())["model.layers.0.self_attn.k_proj"]
    (1024, 4096)
    """
    model = _meta_model(_key(config))
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def total_parameters(config) -> int:
    """Parameters of the model `config` describes (tied embeddings counted once)."""
    return sum(p.numel() for p in _meta_model(_key(config)).parameters())


def lora_parameter_count(config, r: int, targets=ALL_PROJECTIONS) -> int:
    """Trainable LoRA parameters, sum of r * (in + out) over the Linear layers named in `targets`."""
    shapes = linear_layer_shapes(config)
    known = {name.split(".")[-1] for name in shapes}
    unknown = set(targets) - known
    if unknown:
        raise ValueError(f"target modules {sorted(unknown)} are not in this model; it has {sorted(known)}")
    return sum(r * (i + o) for name, (o, i) in shapes.items() if name.split(".")[-1] in targets)


def adapter_megabytes(n_params: int, bytes_per_param: int = 4) -> float:
    """Size of an adapter file in MB (10^6 bytes): fp32 (4 bytes) is what peft keeps and saves by default.

    >>> adapter_megabytes(1_000_000)
    4.0
    """
    return n_params * bytes_per_param / 1e6
