"""The 4-bit NormalFloat (NF4) data type from scratch: code values, block-wise quantization, packing, double quantization.

Leaves out: fast kernels and the matmul (bitsandbytes does those; qlayer.py dequantizes and
calls F.linear), fp16 storage of absmax, and every block size bitsandbytes refuses. What is
here is written to be bit-identical to `bitsandbytes.functional.quantize_4bit(...,
quant_type="nf4", compress_statistics=False)` on the CPU, so tests can compare bytes.

The recipe, for a weight tensor flattened to length n:
1. split it into blocks of `blocksize` (64) values; each block's absmax is kept in fp32;
2. divide each value by its block's absmax, so it lies in [-1, 1];
3. replace it by the index (0..15) of the nearest of the 16 NF4 code values;
4. pack two indices per byte, the first one in the high nibble.
Double quantization then stores the fp32 absmax values as 8-bit codes in blocks of 256.

>>> import torch
>>> w = torch.randn(128, 64)
>>> packed, absmax = quantize_nf4(w)
>>> packed.shape, packed.dtype, absmax.shape
(torch.Size([4096, 1]), torch.uint8, torch.Size([128]))
>>> float((dequantize_nf4(packed, absmax, w.shape) - w).abs().max() / w.abs().max()) < 0.2
True
"""
from __future__ import annotations

import math

import torch

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NF4_OFFSET = 0.9677083  # the outermost quantile bitsandbytes uses (about 1.85 standard deviations)
KINDS = ("nf4", "fp4", "int4")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize}: use one of {VALID_BLOCKSIZES} (bitsandbytes accepts only these)")


def _check_float(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"weight dtype {w.dtype} cannot be quantized: pass a float32, bfloat16 or float16 tensor")


# ---------------------------------------------------------------------------------------------
# The three 4-bit code books (each 16 sorted float32 values in [-1, 1])

def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, float32, sorted, from -1 to 1 with an exact 0 (shape (16,)).

    Normal quantiles at evenly spaced probabilities: 8 for the positive half and 7 for the
    negative half (plus 0), so zero is representable exactly; then scaled so the largest is 1.
    The probabilities are taken in float32 and the quantiles rounded to float32 before the
    division, in that order, because that is what makes the result equal bitsandbytes' table.

    >>> code = nf4_code()
    >>> code.shape, float(code[0]), float(code[7]), float(code[-1])
    (torch.Size([16]), -1.0, 0.0, 1.0)
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values < 0
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 (E2M1: sign, 2 exponent bits, 1 mantissa bit) values bitsandbytes uses, sorted, in [-1, 1].

    Normal numbers are 2**e * (1 + m/2) for e in 1..3; the one subnormal is 1/16 (bitsandbytes'
    choice); then everything is divided by the largest (12). Both +0 and -0 are kept.

    >>> [round(float(v), 4) for v in fp4_code()[9:]]
    [0.0052, 0.1667, 0.25, 0.3333, 0.5, 0.6667, 1.0]
    """
    magnitudes = [0.0, 1 / 16] + [2.0**e * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)]
    values = torch.tensor(magnitudes + [-v for v in magnitudes], dtype=torch.float32).sort().values
    return values / values.abs().max()


def int4_code() -> torch.Tensor:
    """Uniform symmetric INT4 as bitsandbytes defines it: k/7 for k = -7..7 (15 levels; 0 appears twice).

    >>> int4_code()[[0, 7, 15]].tolist()
    [-1.0, 0.0, 1.0]
    """
    k = torch.tensor([-7, -6, -5, -4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float32)
    return k / 7


def code_for(kind: str) -> torch.Tensor:
    """The code book of a 4-bit data type by name: 'nf4', 'fp4' or 'int4'."""
    makers = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
    if kind not in makers:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
    return makers[kind]()


# ---------------------------------------------------------------------------------------------
# Block-wise absmax quantization to code indices, and nibble packing

def quantize_to_codes(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, absmax): each value of `w` -> index of the nearest code value after absmax scaling.

    indices: uint8, shape (n,) with n = w.numel(), each in 0..15 (or 0..255 for an 8-bit code).
    absmax: float32, shape (ceil(n / blocksize),), one scale per block of the flattened tensor.
    Values exactly halfway between two code values go to the lower one (torch.bucketize, as in
    bitsandbytes). Full blocks are scaled by multiplying with 1/absmax, the last partial block
    by dividing: bitsandbytes does exactly this and the two round differently.
    """
    _check_float(w)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    code = code.to(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2  # decision boundaries between neighbouring code values
    indices = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return indices, absmax


def codes_to_values(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """float32 values code[indices] * absmax of their block, shape (n,): the inverse of quantize_to_codes."""
    values = code.to(indices.device)[indices.reshape(-1).long()]  # (n,)
    block_of = torch.arange(values.numel(), device=values.device) // blocksize
    return values * absmax[block_of]


def pack_nibbles(indices: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Two 4-bit indices per byte, first in the high nibble: uint8 (n,) -> uint8 (ceil(n/2), 1).

    An odd count is padded with index `pad` (bitsandbytes pads with the code of 0.0).

    >>> pack_nibbles(torch.tensor([1, 2, 15], dtype=torch.uint8)).flatten().tolist()
    [18, 240]
    """
    if indices.numel() and int(indices.max()) > 15:
        raise ValueError("pack_nibbles takes 4-bit indices (0..15); got a larger value")
    flat = indices.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/2), 1) -> the n 4-bit indices as uint8 (n,)."""
    flat = packed.reshape(-1)
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return indices[:n]


# ---------------------------------------------------------------------------------------------
# NF4 (and the other 4-bit kinds) end to end

def quantize_4bit(w: torch.Tensor, blocksize: int = 64, kind: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (ceil(n/2), 1), absmax float32 (n_blocks,)) for a float tensor of any shape."""
    _check_blocksize(blocksize)
    code = code_for(kind)
    indices, absmax = quantize_to_codes(w, code, blocksize)
    zero_index = int(torch.bucketize(torch.zeros(1), (code[:-1] + code[1:]) / 2))  # pad value for odd counts
    return pack_nibbles(indices, pad=zero_index), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                    kind: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of `shape` and `dtype` that (packed, absmax) stands for (computed in float32, then cast)."""
    _check_blocksize(blocksize)
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes but shape {tuple(shape)} needs {(n + 1) // 2}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} blocks but shape {tuple(shape)} with blocksize "
                         f"{blocksize} needs {-(-n // blocksize)}; was it quantized with another blocksize?")
    values = codes_to_values(unpack_nibbles(packed, n), absmax.float().to(packed.device), code_for(kind), blocksize)
    return values.reshape(shape).to(dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: (packed uint8 (ceil(n/2), 1), absmax float32 (ceil(n/blocksize),)), bit-identical to bitsandbytes."""
    return quantize_4bit(w, blocksize, "nf4")


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The NF4 tensor back as `dtype` with `shape`; equals bitsandbytes' dequantize_4bit."""
    return dequantize_4bit(packed, absmax, shape, blocksize, "nf4", dtype)


def roundtrip(w: torch.Tensor, kind: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """`w` after 4-bit quantization and back, float32 with w's shape (what the model computes with)."""
    packed, absmax = quantize_4bit(w, blocksize, kind)
    return dequantize_4bit(packed, absmax, w.shape, blocksize, kind)


def uniform_int4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Same as roundtrip(w, 'int4', blocksize): evenly spaced levels, the baseline NF4 is compared with."""
    return roundtrip(w, "int4", blocksize)


# ---------------------------------------------------------------------------------------------
# Double quantization: the absmax constants themselves in 8 bits

def dynamic_map_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 256 values of bitsandbytes' 8-bit 'dynamic' data type (sorted), used for the absmax constants.

    A dynamic exponent (a run of zeros after the sign) followed by a linear fraction: small values
    get fine steps, large ones coarse steps. Equals bitsandbytes.functional.create_dynamic_map().
    """
    data = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_fraction = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                         else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        edges = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (2**total_bits - len(data))
    return torch.tensor(data, dtype=torch.float32).sort().values


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (n_blocks,), absmax2 float32 (ceil(n_blocks/256),), offset float32 ()) for NF4's absmax.

    The absmax values are all positive, so their mean is subtracted first (the offset) to centre
    them on 0 and use both signs of the 8-bit code; then they are quantized like any tensor.
    Codes are the true nearest; bitsandbytes' CPU C kernel lands one code off for about 0.5%
    of values (its search is approximate), so compare the two by error, not by bytes.
    """
    offset = absmax.float().mean()
    codes, absmax2 = quantize_to_codes(absmax.float() - offset, dynamic_map_code(), blocksize)
    return codes, absmax2, offset


def double_dequantize(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """The float32 absmax values back from double_quantize's output (shape (n_blocks,))."""
    return codes_to_values(codes, absmax2, dynamic_map_code(), blocksize) + offset


def storage_bits_per_parameter(n_params: int, *tensors: torch.Tensor) -> float:
    """Bits of storage per weight: 8 * (bytes of all `tensors`) / n_params.

    >>> w = torch.randn(4096, 64)
    >>> packed, absmax = quantize_nf4(w)
    >>> storage_bits_per_parameter(w.numel(), packed, absmax)  # 4 bits + one fp32 per 64
    4.5
    """
    if n_params <= 0:
        raise ValueError("n_params must be positive: pass the number of weights the tensors encode")
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / n_params


# ---------------------------------------------------------------------------------------------
# Whole-model memory from a config

DTYPES = ("fp32", "bf16", "nf4", "nf4+dq")


def model_memory_bytes(config, dtype: str = "bf16", blocksize: int = 64, dq_blocksize: int = 256) -> int:
    """Bytes of weights for the model `config` describes, stored as fp32, bf16, nf4 or nf4+dq.

    As transformers + bitsandbytes load it: in 'nf4'/'nf4+dq' every nn.Linear except lm_head
    becomes 4-bit with one fp32 absmax per block (or, with dq, one byte per block plus one
    fp32 per 256 blocks and one fp32 offset); embeddings, norms and lm_head stay bf16.
    Shapes come from building the model on the meta device (no memory, no download).
    """
    from .lora import linear_layer_shapes, total_parameters

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    total = total_parameters(config)
    if dtype in ("fp32", "bf16"):
        return total * (4 if dtype == "fp32" else 2)
    quantized = 0
    stats = 0
    for name, (out_f, in_f) in linear_layer_shapes(config).items():
        if name.split(".")[-1] == "lm_head":
            continue
        n = out_f * in_f
        quantized += n
        n_blocks = -(-n // blocksize)
        stats += 4 * n_blocks if dtype == "nf4" else n_blocks + 4 * -(-n_blocks // dq_blocksize) + 4
    quantized_bytes = sum(-(-o * i // 2) for name, (o, i) in linear_layer_shapes(config).items()
                          if name.split(".")[-1] != "lm_head")
    return quantized_bytes + stats + 2 * (total - quantized)
