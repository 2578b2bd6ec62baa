"""One QLoRA layer by hand: a frozen NF4 weight (nf4.py) plus a trainable LoRA update (lora.py).

Leaves out: fused kernels (the weight is dequantized to the compute dtype on every call, as
bitsandbytes does on the CPU), dropout, merging, and whole models (peft does those). The
forward pass follows peft's `lora.bnb.Linear4bit` step by step (cast to the compute dtype,
4-bit matmul, cast back, add the LoRA branch in the adapter's dtype), so with the same weights
the two give the same numbers.

    y = dequant(W_nf4) x + (alpha / r) * B (A x)

The base weight is never a trainable tensor: `_FrozenNF4Linear` saves only the packed bytes
and absmax for backward, returns a gradient for x, and None for the weight, so a weight
gradient is never computed or stored.

>>> import torch
>>> layer = QLoRALinear(torch.randn(16, 64), r=4, alpha=8)
>>> [name for name, p in layer.named_parameters() if p.requires_grad]
['A', 'B']
>>> layer(torch.randn(2, 64)).shape
torch.Size([2, 16])
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import nf4


class _FrozenNF4Linear(torch.autograd.Function):
    """x @ dequant(W).T for a packed NF4 weight; backward returns dL/dx only."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape, blocksize, bias=None):  # x: (..., in) -> (..., out)
        weight = nf4.dequantize_nf4(packed, absmax, shape, blocksize, dtype=x.dtype)  # (out, in), temporary
        ctx.save_for_backward(packed, absmax)  # 4-bit bytes only; the dense weight is freed after this call
        ctx.shape, ctx.blocksize = shape, blocksize
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (..., out)
        packed, absmax = ctx.saved_tensors
        weight = nf4.dequantize_nf4(packed, absmax, ctx.shape, ctx.blocksize, dtype=grad_out.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None, None, None, None, None  # no gradient for the frozen weight, ever


class QLoRALinear(nn.Module):
    """Frozen NF4 copy of `weight` (out, in) plus LoRA A (r, in), B (out, r) in `adapter_dtype`.

    compute_dtype: the dtype the 4-bit weight is dequantized to for the matmul (bf16 as in QLoRA).
    double_quant: also store absmax as 8-bit codes (nf4.double_quantize) and rebuild it per call.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, r: int = 8, alpha: float = 16,
                 compute_dtype: torch.dtype = torch.bfloat16, adapter_dtype: torch.dtype = torch.float32,
                 blocksize: int = 64, double_quant: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if r < 1:
            raise ValueError(f"rank r={r} must be a positive integer")
        self.out_features, self.in_features = weight.shape
        self.shape, self.blocksize, self.compute_dtype = tuple(weight.shape), blocksize, compute_dtype
        self.double_quant = double_quant
        packed, absmax = nf4.quantize_nf4(weight.detach(), blocksize)
        self.register_buffer("packed", packed)  # uint8 (out*in/2, 1)
        if double_quant:
            codes, absmax2, offset = nf4.double_quantize(absmax)
            self.register_buffer("absmax_codes", codes)  # uint8 (n_blocks,)
            self.register_buffer("absmax2", absmax2)  # fp32 (n_blocks/256,)
            self.register_buffer("absmax_offset", offset)  # fp32 ()
        else:
            self.register_buffer("absmax", absmax)  # fp32 (n_blocks,)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).clone())
        self.r, self.scaling = r, alpha / r
        self.A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def block_absmax(self) -> torch.Tensor:
        """fp32 (n_blocks,): the per-block scales, rebuilt from 8 bits when double-quantized."""
        if self.double_quant:
            return nf4.double_dequantize(self.absmax_codes, self.absmax2, self.absmax_offset)
        return self.absmax

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in): the frozen weight as the matmul sees it."""
        return nf4.dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize,
                                  dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out) in x.dtype
        in_dtype = x.dtype
        result = _FrozenNF4Linear.apply(x.to(self.compute_dtype), self.packed, self.block_absmax(),
                                        self.shape, self.blocksize, self.bias).to(in_dtype)
        update = nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A), self.B) * self.scaling
        return result + update.to(result.dtype)  # same order and casts as peft's lora.bnb.Linear4bit

    def copy_adapter_from(self, peft_layer, adapter: str = "default") -> "QLoRALinear":
        """Take A, B and scaling from a peft LoRA layer (so both layers hold the same numbers)."""
        with torch.no_grad():
            self.A.data = peft_layer.lora_A[adapter].weight.detach().clone()
            self.B.data = peft_layer.lora_B[adapter].weight.detach().clone()
        self.r, self.scaling = peft_layer.r[adapter], peft_layer.scaling[adapter]
        return self

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by each part: the 4-bit weight, its scales, the bias, and the LoRA adapter."""
        def size(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)
        scales = (size(self.absmax_codes, self.absmax2, self.absmax_offset) if self.double_quant
                  else size(self.absmax))
        return {"NF4 weight": size(self.packed), "absmax scales": scales, "bias": size(self.bias),
                "LoRA A+B": size(self.A, self.B)}


def peft_layer_memory_bytes(peft_layer, adapter: str = "default") -> dict[str, int]:
    """The same breakdown as QLoRALinear.memory_bytes for a peft LoRA layer around a bnb Linear4bit."""
    base = peft_layer.base_layer
    state = base.weight.quant_state
    scales = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        scales += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.element_size()
    adapter_bytes = sum(p.numel() * p.element_size() for p in
                        (peft_layer.lora_A[adapter].weight, peft_layer.lora_B[adapter].weight))
    bias = 0 if base.bias is None else base.bias.numel() * base.bias.element_size()
    return {"NF4 weight": base.weight.numel() * base.weight.element_size(), "absmax scales": scales,
            "bias": bias, "LoRA A+B": adapter_bytes}
