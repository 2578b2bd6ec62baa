"""One Triton kernel that dequantizes a bitsandbytes NF4 weight (double quantization included) in a single pass.

bitsandbytes' `dequantize_4bit` runs two kernels for a double-quantized weight: the 8-bit
absmax codes back to fp32 (plus the offset), then the 4-bit codes times their block's absmax.
Here each program reads packed bytes and their absmax codes and writes the 16-bit weight at
once, with the same fp32 arithmetic in the same order (no fused multiply-add), so the result
is bit-identical to bitsandbytes' (tests/test_fast.py checks it on the GPU, and on the CPU, where
CPU tensors run through Triton's interpreter).

Leaves out: FP4, blocksizes bitsandbytes never pairs with a nested 256-block absmax other
than its own, and fusing the dequantization into the matmul (cuBLAS runs the matmul).

>>> import bitsandbytes.functional as bnbf
>>> q, state = bnbf.quantize_4bit(torch.randn(8, 128), blocksize=64, quant_type="nf4")
>>> w = torch.nn.Parameter(q, requires_grad=False); w.quant_state = state
>>> bool(torch.equal(dequantize_nf4(w), bnbf.dequantize_4bit(q, state)))  # on the CPU: Triton's interpreter
True
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (no Triton, or a broken install: bitsandbytes' kernel serves)
    triton = tl = None


def available() -> bool:
    """True when Triton imports (it runs the kernel on CUDA, and interprets it for CPU tensors)."""
    return triton is not None


def supports(weight: torch.Tensor) -> bool:
    """True when the fast path should dequantize this bitsandbytes Params4bit here: NF4, on CUDA, Triton present."""
    state = getattr(weight, "quant_state", None)
    return (state is not None and state.quant_type == "nf4" and weight.is_cuda and available()
            and state.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (not state.nested or state.state2.code.numel() == 256))


def _nf4_dequant(packed, codes, absmax, code2, absmax2, offset, out, n_bytes,
                 BYTES: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    """Triton kernel body: BYTES packed bytes per program -> 2 * BYTES weights (high nibble first)."""
    i = tl.program_id(0) * BYTES + tl.arange(0, BYTES)              # packed byte index
    keep = i < n_bytes
    byte = tl.load(packed + i, mask=keep, other=0).to(tl.int32)
    block = (i * 2) // BLOCK                                         # both nibbles share a block
    if NESTED:
        q = tl.load(absmax + block, mask=keep, other=0).to(tl.int32)
        scale = tl.load(code2 + q, mask=keep, other=0.0) * tl.load(absmax2 + block // BLOCK2, mask=keep, other=0.0)
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=keep, other=0.0)
    hi = tl.load(codes + (byte >> 4), mask=keep, other=0.0) * scale  # first element: high nibble
    lo = tl.load(codes + (byte & 15), mask=keep, other=0.0) * scale
    v = tl.reshape(tl.join(hi, lo), [2 * BYTES])  # (BYTES, 2) -> hi0 lo0 hi1 lo1 ...; join is a builtin, interleave is not
    if ROUND_BF16:  # round to nearest even by hand: the GPU's cvt.rn does the same, Triton's interpreter truncates
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    j = tl.program_id(0) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out + j, v.to(out.dtype.element_ty), mask=j < 2 * n_bytes)


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, one per mode: Triton decides when decorating whether to interpret it (CPU tensors) or
    compile it (CUDA), so TRITON_INTERPRET is set only while decorating."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(_nf4_dequant)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


BYTES_PER_PROGRAM = 1024


@torch.library.custom_op("qlora_nb::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor,
                       absmax2: torch.Tensor, offset: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
                       blocksize: int, blocksize2: int, nested: bool) -> torch.Tensor:
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    grid = (-(-n_bytes // BYTES_PER_PROGRAM),)
    kernel = _kernel(not packed.is_cuda)
    kernel[grid](packed, code, absmax, code2, absmax2, offset, out, n_bytes, BYTES=BYTES_PER_PROGRAM, BLOCK=blocksize,
                 BLOCK2=blocksize2, NESTED=nested, ROUND_BF16=dtype == torch.bfloat16,
                 enable_fp_fusion=False)  # mul, then add, each rounded, as bitsandbytes' two kernels do
    return out


@_dequantize_nf4_op.register_fake
def _(packed, code, absmax, code2, absmax2, offset, rows, cols, dtype, blocksize, blocksize2, nested):
    return packed.new_empty((rows, cols), dtype=dtype)


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) weight in the quant state's dtype from a bitsandbytes NF4 Params4bit, as bnb's dequantize_4bit.

    weight: packed uint8 (n/2, 1) (or storage of another dtype holding those bytes, as FSDP-QLoRA's
    bnb_4bit_quant_storage) with `.quant_state`. One kernel launch (a torch custom op, so
    torch.compile keeps it whole), about 2.5 bytes of memory traffic per weight.
    """
    state = weight.quant_state
    packed = weight.data.view(torch.uint8).reshape(-1)
    rows, cols = state.shape
    if state.nested:
        s2 = state.state2
        return _dequantize_nf4_op(packed, state.code, state.absmax, s2.code, s2.absmax, state.offset, rows, cols,
                                  state.dtype, state.blocksize, s2.blocksize, True)
    absmax = state.absmax.float()
    return _dequantize_nf4_op(packed, state.code, absmax, absmax, absmax, absmax, rows, cols, state.dtype,
                              state.blocksize, 1, False)
