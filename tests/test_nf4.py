"""NF4 from scratch equals bitsandbytes: the code table, packed bytes, absmax, dequantization; DQ and memory."""
import pytest
import torch
import bitsandbytes.functional as bnbF
from transformers import MistralConfig

from qlora_nb import nf4

SHAPES = [(64, 576), (7, 9), (3, 64 * 5 + 3), (1, 1)]  # full blocks, odd count, partial last block, one value


def test_nf4_code_equals_bitsandbytes_table_exactly():
    ours = nf4.nf4_code()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, bnbF.get_4bit_type("nf4", device="cpu"))


def test_nf4_code_shape_of_the_type():
    code = nf4.nf4_code()
    assert (code[1:] > code[:-1]).all(), "sorted and distinct"
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1


def test_fp4_code_equals_bitsandbytes_fp4_values():
    assert torch.equal(nf4.fp4_code(), bnbF.get_4bit_type("fp4", device="cpu").sort().values)


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(nf4.dynamic_map_code(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_nf4_bit_identical_to_bitsandbytes(dtype, shape):
    torch.manual_seed(sum(shape))
    w = (torch.randn(*shape) * 0.02).to(dtype)
    packed, absmax = nf4.quantize_nf4(w, blocksize=64)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert absmax.dtype == state.absmax.dtype and torch.equal(absmax, state.absmax)
    ours = nf4.dequantize_nf4(packed, absmax, shape, blocksize=64, dtype=dtype)
    assert torch.equal(ours, bnbF.dequantize_4bit(ref_packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = torch.randn(40, 300)
    packed, absmax = nf4.quantize_nf4(w, blocksize=blocksize)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, state.absmax)


def test_fp4_roundtrip_matches_bitsandbytes():
    w = torch.randn(32, 64)
    ref_packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert torch.equal(nf4.roundtrip(w, "fp4", 64), bnbF.dequantize_4bit(ref_packed, state))


def test_packing_order_high_nibble_first():
    packed = nf4.pack_nibbles(torch.tensor([0x3, 0xA], dtype=torch.uint8))
    assert packed.flatten().tolist() == [0x3A]
    assert nf4.unpack_nibbles(packed, 2).tolist() == [0x3, 0xA]


def test_nf4_beats_uniform_int4_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    err = {k: (nf4.roundtrip(w, k) - w).pow(2).mean() for k in nf4.KINDS}
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]


def test_double_quantization_codes_are_nearest_and_close_to_bitsandbytes():
    torch.manual_seed(1)
    w = torch.randn(512, 576)
    _, absmax = nf4.quantize_nf4(w)
    codes, absmax2, offset = nf4.double_quantize(absmax)
    _, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(absmax2, state.state2.absmax) and torch.equal(offset, state.offset)
    # bnb's CPU C kernel sometimes picks the second-nearest 8-bit code; ours is never worse, never >1 code away.
    assert (codes.int() - state.absmax.int()).abs().max() <= 1
    ours = nf4.double_dequantize(codes, absmax2, offset)
    theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert ((ours - absmax).abs() <= (theirs - absmax).abs() + 1e-7).all()
    assert (ours - absmax).abs().max() / absmax.max() < 0.01


def test_bits_per_parameter_from_tensors():
    w = torch.randn(4096, 4096 // 16)  # 2**20 weights: 2**14 blocks, 64 DQ blocks
    packed, absmax = nf4.quantize_nf4(w)
    codes, absmax2, offset = nf4.double_quantize(absmax)
    plain = nf4.storage_bits_per_parameter(w.numel(), packed, absmax)
    dq = nf4.storage_bits_per_parameter(w.numel(), packed, codes, absmax2, offset)
    assert plain == 4 + 32 / 64
    assert abs(dq - (4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())) < 1e-9  # + the one fp32 offset


@pytest.fixture(params=[False, True], ids=["nf4", "nf4+dq"])
def tiny_mistral_nf4(request):
    from qlora_nb import models

    model, _ = models.load_base("tiny-mistral", quantize="nf4", double_quant=request.param)
    return model, request.param


def test_model_memory_matches_a_loaded_nf4_model(tiny_mistral_nf4):
    model, dq = tiny_mistral_nf4
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            stored += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                stored += state.state2.absmax.numel() * 4 + 4
    assert nf4.model_memory_bytes(model.config, "nf4+dq" if dq else "nf4") == stored


def test_model_memory_order_for_mistral_7b():
    config = MistralConfig()
    sizes = [nf4.model_memory_bytes(config, d) for d in nf4.DTYPES]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 2 * sizes[1]


def test_bad_input_has_clear_errors():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(8, 8), blocksize=48)
    with pytest.raises(TypeError, match="float32"):
        nf4.quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    packed, absmax = nf4.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4.dequantize_nf4(packed, absmax, (8, 64), blocksize=128)
    with pytest.raises(ValueError, match="dtype"):
        nf4.model_memory_bytes(MistralConfig(), "int3")
