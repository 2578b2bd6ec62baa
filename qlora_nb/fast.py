"""The fast QLoRA path: one call that makes a peft QLoRA model train faster and in less memory, same math.

`enable_fast_path(peft_model)` changes how the model computes, never what it holds, so the
adapter saves, merges and loads exactly as before:

* bf16 throughout. `prepare_model_for_kbit_training` casts norms and embeddings to fp32;
  the residual stream then turns fp32, sdpa falls back to its fp32 math kernel and lm_head
  and the elementwise work run in fp32 (data/bench/fast/profile_step_2048x1.json). Here
  frozen fp32 weights go back to the compute dtype.
* `lora_linear`: the 4-bit base matmul and the LoRA branch in one autograd Function,
  y = x W^T + s (x A^T) B^T. Backward reuses x A^T (saved, B*T*r) and dequantizes W only
  to form the input gradient; no dropout, no defensive clone, no fp32 copy of x.
* offloaded checkpoints: each decoder layer keeps only its input, copied to pinned CPU
  memory on a side stream, fetched back one layer ahead in backward, and recomputes the rest.
* lean recompute: the recompute skips what backward never reads. A Llama/Mistral layer ends in
  `residual + down_proj(h)`, and backward needs only h and h A^T there, so the recompute leaves
  out down_proj's base matmul and dequantization (27% of a Mistral-7B layer's weights).
* `rms_norm`, `swiglu`: the library's math with backwards that recompute instead of
  keeping fp32 copies (RMSNorm) or silu(gate) (SwiGLU), each fused into single kernels by
  torch.compile on CUDA (eager elsewhere, in row chunks so fp32 temporaries stay small).
* `linear_cross_entropy`: lm_head + cross-entropy in row chunks with the gradient formed in
  the forward pass, so the (tokens x vocab) logits never exist whole.
* sliding-window attention (Mistral's config, sequences longer than the window) through
  FlexAttention with a block mask instead of sdpa with a dense mask (`use_window_attention`).

Leaves out: LoRA dropout > 0, DoRA and other LoRA variants, several active adapters, an
adapter on lm_head, logit soft-capping (each refused with a message: use the plain path);
multi-GPU; hand-written GEMMs (cuBLAS multiplies; the one hand-written kernel is the NF4 dequantization).
On CUDA each checkpointed decoder layer also runs through torch.compile (regional compilation), and
NF4 weights are dequantized by one Triton kernel (`nf4_kernel`), bit-identical to bitsandbytes'.
Numerics: like peft in bf16, not like the fp32 residual stream of the plain path, whose
first LoRA updates survive where bf16 rounds them (see fast_check.py, notebook 09).

>>> import torch
>>> h, w = torch.randn(6, 4), torch.randn(10, 4)
>>> labels = torch.tensor([1, 2, -100, 3, 4, 5])
>>> ref = torch.nn.functional.cross_entropy(h @ w.T, labels)
>>> bool(torch.allclose(linear_cross_entropy(h, w, labels, chunk_rows=4), ref, atol=1e-6))
True
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from . import nf4_kernel

IGNORE_INDEX = -100


# ---------------------------------------------------------------- fused 4-bit + LoRA linear
def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight of a frozen base linear in `dtype`: dequantized when it is a bitsandbytes 4-bit layer."""
    w = base.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w if w.dtype == dtype else w.to(dtype)
    if getattr(base, "_qlora_nb_triton_dequant", False):
        dense = nf4_kernel.dequantize_nf4(w)  # one kernel instead of bitsandbytes' two, same bits
    else:
        import bitsandbytes.functional as bnbf

        dense = bnbf.dequantize_4bit(w.data, state)  # in the dtype the model was loaded in
    return dense if dense.dtype == dtype else dense.to(dtype)


@torch.library.custom_op("qlora_nb::zeros_after", mutates_args=())
def _zeros_after(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) zeros that depend on x as far as torch.compile can tell (an opaque op: it cannot fold them away).

    Why: a recompute result that depends on nothing lets the compile partitioner move the whole MLP
    into the backward graph, which raised the peak by 0.44 GiB at 2048x4 on an H200 (measured).
    """
    return x.new_zeros(*x.shape[:-1], 1)


@_zeros_after.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], 1)


class _LoRALinear(torch.autograd.Function):
    """y = x W^T (+ bias) + scale * (x A^T) B^T, with W frozen (maybe 4-bit) and A (r, in), B (out, r) trained."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scale, keep_weight, output_unused=False):
        xa = F.linear(x, lora_a.to(x.dtype))                     # (B, T, r)
        ctx.base, ctx.scale = base, scale
        if output_unused:  # a recompute whose y nobody reads (lean recompute): backward needs x and xa only
            ctx.save_for_backward(x, xa, lora_a, lora_b, None)
            return _zeros_after(xa).expand(*x.shape[:-1], lora_b.shape[0])  # (B, T, out), no memory behind it
        w = dense_weight(base, x.dtype)
        y = F.linear(x, w, None if base.bias is None else base.bias.to(x.dtype))
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_b.to(x.dtype).t(), alpha=scale)
        ctx.save_for_backward(x, xa, lora_a, lora_b, w if keep_weight else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, lora_a, lora_b, w = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])                  # (N, out)
        gb = g @ lora_b.to(g.dtype)                               # (N, r): gradient at x A^T, before the scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ xa.reshape(-1, xa.shape[-1])).mul_(ctx.scale).to(lora_b.dtype)  # (out, r)
        if ctx.needs_input_grad[1]:
            grad_a = (gb.t() @ x.reshape(-1, x.shape[-1])).mul_(ctx.scale).to(lora_a.dtype)   # (r, in)
        if ctx.needs_input_grad[0]:
            w = w if w is not None else dense_weight(ctx.base, g.dtype)  # dequantized again: 2 bytes/weight freed at once
            grad_x = (g @ w).addmm_(gb, lora_a.to(g.dtype), alpha=ctx.scale).view(x.shape)
        return grad_x, grad_a, grad_b, None, None, None, None


def lora_linear(x, lora_a, lora_b, base, scale: float, keep_weight: bool = False, output_unused: bool = False):
    """x (..., in) -> (..., out): base(x) + scale * x A^T B^T in one autograd node (x's dtype for the matmuls).

    `keep_weight` saves the dequantized weight for backward instead of dequantizing again
    (one dense layer's worth of memory per checkpointed layer in exchange for a dequant).
    `output_unused`: the caller will only backpropagate through the result, never read it; the
    base matmul is skipped and a zero tensor returned (gradients stay exact).
    """
    return _LoRALinear.apply(x, lora_a, lora_b, base, float(scale), keep_weight, output_unused)


_RECOMPUTING = {"on": False}  # True while _OffloadedCheckpoint reruns a layer to backpropagate through it


def _fast_lora_forward(self, x, *args, **kwargs):
    """Forward of a patched peft LoRA linear: the fused op when one plain adapter is active, else peft's own."""
    active = self.active_adapters
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
            or active[0] not in self.lora_A):
        return self._qlora_nb_plain_forward(x, *args, **kwargs)
    name = active[0]
    base = self.get_base_layer()
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    unused = self._qlora_nb_output_only and _RECOMPUTING["on"]  # the layer's last projection, in its recompute
    y = lora_linear(x.to(dtype), self.lora_A[name].weight, self.lora_B[name].weight, base, self.scaling[name],
                    self._qlora_nb_keep_weight, unused)
    return y.to(x.dtype)


# ---------------------------------------------------------------- RMSNorm and SwiGLU that save less
def _fused(fn):
    """fn compiled by torch.compile on CUDA (its elementwise ops become one kernel, no fp32 temporaries in memory);
    eager where compiling is not possible (CPU, or the compiler fails, which is then reported once)."""
    state = {"compiled": None, "failed": False}

    def call(*args):
        if torch.compiler.is_compiling():  # inside a compiled decoder layer (compile_layers): the outer graph fuses it
            return fn(*args)
        if args[0].is_cuda and not state["failed"]:
            try:
                if state["compiled"] is None:
                    state["compiled"] = torch.compile(fn, dynamic=True)
                return state["compiled"](*args)
            except Exception as e:  # noqa: BLE001  (the eager version computes the same)
                state["failed"] = True
                print(f"[qlora_nb.fast] torch.compile of {fn.__name__} failed, running it eagerly: "
                      f"{str(e).splitlines()[0][:200]}")
        return fn(*args)

    call.state = state
    return call


def _rms_norm_fwd(x, weight, eps: float):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)      # (..., 1) fp32
    return weight * (x32 * rstd).to(x.dtype), rstd


def _rms_norm_bwd(x, weight, rstd, grad_y):
    xhat = x.float() * rstd
    g = (grad_y * weight).float()
    grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_y * xhat.to(x.dtype)


def _swiglu_fwd(gate, up):
    return F.silu(gate) * up


def _swiglu_bwd(gate, up, grad_h):
    g32 = gate.float()
    sig = torch.sigmoid(g32)
    silu = g32 * sig
    gh = grad_h.float()
    grad_up = gh * silu
    grad_gate = gh * up.float() * (sig + silu * (1 - sig))         # d silu / d gate = sig (1 + gate (1 - sig))
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


_rms_norm_fwd_f, _rms_norm_bwd_f = _fused(_rms_norm_fwd), _fused(_rms_norm_bwd)
_swiglu_fwd_f, _swiglu_bwd_f = _fused(_swiglu_fwd), _fused(_swiglu_bwd)


def _by_rows(fn, *tensors, budget: int = 1 << 26):
    """fn over row chunks of (..., D) tensors so eager fp32 temporaries stay near `budget` bytes; outputs concatenated."""
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    rows = max(1, budget // (4 * flat[0].shape[-1]))
    if flat[0].is_cuda and not fn.state["failed"] or flat[0].shape[0] <= rows:
        outs = fn(*flat)
    else:
        parts = [fn(*(t[s:s + rows] for t in flat)) for s in range(0, flat[0].shape[0], rows)]
        outs = tuple(torch.cat(p) for p in zip(*parts))
    return tuple(o.view(tensors[0].shape) for o in outs)


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)) as transformers' Llama/Mistral RMSNorm computes it; saves x (16-bit) and 1/rms only.

    Autograd through the library's version keeps fp32 copies of x and of x / rms(x)
    (4 + 4 bytes per element, twice per layer); here backward recomputes them.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_fwd_f(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w_rows = _rms_norm_bwd_f(x, weight, rstd, grad_y)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_w_rows.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x, weight, eps: float):
    """RMSNorm of x (..., H) with weight (H,), transformers' forward exactly; a backward that saves 2 bytes/element."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, recomputes silu in backward (the library saves silu(gate) too)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_f(gate, up)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        return _by_rows(_swiglu_bwd_f, gate, up, grad_h)


def swiglu(gate, up):
    """silu(gate) * up, (..., I) each, with a backward that keeps two tensors instead of three."""
    return _SwiGLU.apply(gate, up)


def _fast_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fast_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _patch(module, forward) -> None:
    if "forward" not in module.__dict__:
        module._qlora_nb_plain_forward = module.forward
    module.forward = types.MethodType(forward, module)


def _is_rms_norm(m) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and m.weight.dim() == 1


def _is_swiglu_mlp(m) -> bool:
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


# ---------------------------------------------------------------- sliding-window attention without a dense mask
ATTENTION_NAME = "qlora_nb_fast"  # registered with transformers' attention and mask interfaces


def sliding_window_block_mask(seq: int, window: int, device):
    """FlexAttention BlockMask for causal attention over the last `window` keys of each query (seq x seq).

    transformers' rule: query q sees key k when q - window < k <= q. Blocks (128 x 128) that
    lie wholly outside the band are skipped, so the work is about seq * window instead of seq^2.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q, k):
        return (k <= q) & (k > q - window)

    return create_block_mask(band, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=device)


_block_masks: dict = {}


def _fast_attention_mask(**kw):
    """Mask for the fast path's attention: a cached BlockMask where only a sliding window over an unpadded batch
    without a cache needs one (sdpa would get a dense (T, T) mask and lose its flash kernel), else sdpa's own."""
    from transformers.masking_utils import sdpa_mask

    window, q_len, kv_len = kw.get("local_size"), kw["q_length"], kw["kv_length"]
    padding = kw.get("attention_mask")
    offset = kw.get("q_offset", 0)
    if (window is not None and kv_len > window and q_len == kv_len and isinstance(offset, int) and offset == 0
            and (padding is None or bool(padding.all()))):
        key = (q_len, window, str(kw.get("device", "cpu")))
        if key not in _block_masks:
            _block_masks[key] = sliding_window_block_mask(q_len, window, kw.get("device", "cpu"))
        return _block_masks[key]
    if window is not None and kv_len <= window:
        kw["local_size"] = None  # every key is inside the window: plain causal, so sdpa may keep is_causal (flash)
    return sdpa_mask(**kw)


_flex = {"fn": None}


def _fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: FlexAttention for a BlockMask (compiled on CUDA), sdpa for everything else.

    query (B, H, T, D), key / value (B, H_kv, T, D) -> ((B, T, H, D), None), as sdpa_attention_forward.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("attention dropout with the sliding-window kernel: set the config's attention_dropout=0")
    fn = flex_attention
    if query.is_cuda:
        if _flex["fn"] is None:
            _flex["fn"] = torch.compile(flex_attention, dynamic=False)
        fn = _flex["fn"]
    out = fn(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_window_attention(lm) -> bool:
    """Switch `lm` to the fast path's attention (sdpa, or FlexAttention where a sliding window needs a mask).
    Returns False, changing nothing, for a model without a sliding window or outside transformers' interfaces."""
    if not getattr(lm.config, "sliding_window", None) or not hasattr(lm, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _fast_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _fast_attention_mask)
    lm._qlora_nb_plain_attention = lm.config._attn_implementation
    lm.set_attn_implementation(ATTENTION_NAME)
    return True


# ---------------------------------------------------------------- offloaded checkpoints
class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `run(hidden, *args)` without saving activations; keep `hidden` (on the CPU when offloading); recompute in backward."""

    @staticmethod
    def forward(ctx, run, offloader, hidden, *args):
        ctx.run, ctx.args, ctx.offloader = run, args, offloader
        ctx.hidden_requires_grad = hidden.requires_grad
        if offloader is not None and hidden.is_cuda:
            offloader.offload(ctx, hidden)
        else:
            ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.offloader is not None and getattr(ctx, "cpu_copy", None) is not None:
            hidden = ctx.offloader.fetch(ctx)
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.hidden_requires_grad)
        _RECOMPUTING["on"] = True  # the layer's output is only backpropagated through (lean recompute)
        try:
            with torch.enable_grad():
                out = ctx.run(hidden, *ctx.args)
        finally:
            _RECOMPUTING["on"] = False
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        n_args, ctx.run, ctx.args = len(ctx.args), None, None
        return (None, None, hidden.grad if ctx.hidden_requires_grad else None, *([None] * n_args))


class CpuOffloader:
    """Copies checkpointed layer inputs to pinned CPU memory on a side stream and back, one layer ahead.

    Forward: layer k's input goes D2H on `stream` while layer k computes. Backward runs the
    layers in reverse, so when layer k is recomputed we start fetching layer k-1's input
    on the same side stream; it is ready when layer k-1's backward begins.
    """

    def __init__(self):
        self.stream = None
        self.last = None   # ctx of the latest offloaded layer of the running forward pass

    def offload(self, ctx, hidden):
        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        self.stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(self.stream):
            cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            cpu.copy_(hidden, non_blocking=True)
            ctx.copied = self.stream.record_event()
        hidden.record_stream(self.stream)  # the allocator must not reuse it before the copy is done
        ctx.cpu_copy, ctx.device, ctx.gpu_copy = cpu, hidden.device, None
        ctx.prev = self.last if (self.last is not None and getattr(self.last, "cpu_copy", None) is not None) else None
        self.last = ctx

    def _start_fetch(self, ctx):
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ctx.copied)
            ctx.gpu_copy = ctx.cpu_copy.to(ctx.device, non_blocking=True)
            ctx.fetched = self.stream.record_event()

    def fetch(self, ctx):
        if ctx.gpu_copy is None:
            self._start_fetch(ctx)
        prev, ctx.prev = ctx.prev, None
        if prev is not None and getattr(prev, "cpu_copy", None) is not None and prev.gpu_copy is None:
            self._start_fetch(prev)  # one layer ahead
        current = torch.cuda.current_stream(ctx.device)
        current.wait_event(ctx.fetched)
        hidden = ctx.gpu_copy
        hidden.record_stream(current)
        ctx.gpu_copy = ctx.cpu_copy = None
        if self.last is ctx:
            self.last = None
        return hidden


def _run_layer(run, hidden, *args):
    return run(hidden, *args)


def checkpoint_function(offload: bool, compile_layers: bool = False):
    """A `_gradient_checkpointing_func` for transformers' layers: f(run, hidden, *args) -> run's output.

    compile_layers: run each layer through one torch.compile'd function (regional compilation):
    layers of one class share its graphs, one without grad for the forward pass and one for the
    recompute; the checkpoint and the offloading stay outside, in eager code.
    """
    offloader = CpuOffloader() if offload else None
    compiled = torch.compile(_run_layer, dynamic=True) if compile_layers else None

    def checkpoint(run, hidden, *args):
        if compiled is not None:
            run = functools.partial(compiled, run)
        if not torch.is_grad_enabled():  # nothing to recompute for, nothing to offload
            return run(hidden, *args)
        return _OffloadedCheckpoint.apply(run, offloader, hidden, *args)

    checkpoint.offloader = offloader
    return checkpoint


# decoder layers whose forward ends in `residual + mlp.down_proj(...)`, nothing after it (transformers 5):
# there the recompute need not form down_proj's output. Layers with a norm after the MLP (Gemma's) are not here.
LEAN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def output_only_projections(lm) -> list:
    """The peft LoRA layers of `lm` whose output only feeds its decoder layer's output (down_proj of LEAN_LAYERS)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for layer in lm.modules():
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if type(layer).__name__ in LEAN_LAYERS and isinstance(down, LoraLayer):
            found.append(down)
    return found


# ---------------------------------------------------------------- chunked lm_head + cross-entropy
class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(h W^T, labels) / denom, formed chunk by chunk; grad w.r.t. h computed in forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_rows, denom):
        grad_h = torch.empty_like(h) if h.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, lc = h[s:s + chunk_rows], labels[s:s + chunk_rows]
            logits = F.linear(hc, weight).float()                  # (c, V) fp32, one chunk only
            valid = lc != IGNORE_INDEX
            target = lc.clamp_min(0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            if grad_h is not None:
                probs = logits.sub_(lse[:, None]).exp_()           # softmax, in place of the logits
                probs[torch.arange(len(lc), device=h.device), target] -= 1
                probs.mul_((valid / denom)[:, None])
                grad_h[s:s + chunk_rows] = probs.to(h.dtype) @ weight.to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total / denom

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so one chunk's fp32 logits take about 256 MiB (2048 rows for a 32768 vocabulary)."""
    return max(64, (1 << 26) // vocab_size)


def linear_cross_entropy(h, weight, labels, chunk_rows: int | None = None, num_items: int | None = None):
    """Mean cross-entropy (nats) of logits h W^T against labels, never building all logits.

    h: (N, H) hidden states; weight: (V, H) frozen lm_head; labels: (N,) class ids, -100 ignored.
    Divides by `num_items` when given (the Trainer's count across gradient-accumulation
    steps), else by the number of labelled rows (at least 1). Equals F.cross_entropy to fp32 rounding.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy keeps lm_head frozen; an adapter on lm_head needs the plain path")
    denom = num_items if num_items is not None else (labels != IGNORE_INDEX).sum().clamp_min(1)
    denom = torch.as_tensor(denom, device=h.device, dtype=torch.float32)
    return _LinearCrossEntropy.apply(h, weight, labels, chunk_rows or default_chunk_rows(weight.shape[0]), denom)


def causal_lm(model):
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def causal_lm_loss(model, input_ids, labels, attention_mask=None, num_items_in_batch=None, chunk_rows=None):
    """Next-token loss of a causal LM (nats per labelled token), as `model(input_ids, labels=labels).loss`, chunked.

    input_ids, labels: (B, T); labels -100 where no loss is wanted. The decoder runs once;
    the logits are formed chunk by chunk inside `linear_cross_entropy`.
    """
    lm = causal_lm(model)
    if getattr(lm.config, "final_logit_softcapping", None):
        raise ValueError("this model soft-caps its logits; the fast loss does not: use model(...).loss")
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])               # (B*(T-1), H): position t predicts t+1
    return linear_cross_entropy(h, lm.get_output_embeddings().weight, labels[:, 1:].reshape(-1),
                                chunk_rows, num_items_in_batch)


# ---------------------------------------------------------------- the one call
def cast_frozen_fp32(model, dtype=torch.bfloat16) -> int:
    """Cast every frozen fp32 tensor of `model` to `dtype` in place (undoes prepare_model_for_kbit_training's upcast
    of norms and embeddings); trainable LoRA weights stay fp32. Returns how many tensors it cast."""
    n = 0
    for p in causal_lm(model).parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            n += 1
    return n


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def check_fast_path(model) -> list:
    """The peft LoRA layers of `model` the fast path will fuse; raises ValueError naming what it cannot do."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("no peft LoRA layers in this model: call peft.get_peft_model(model, LoraConfig(...)) first")
    for name, m in layers:
        if not hasattr(m, "get_base_layer") or not hasattr(m.get_base_layer(), "weight"):
            raise ValueError(f"{name}: the fast path fuses linear layers only; use the plain path for this model")
        if len(m.active_adapters) != 1:
            raise ValueError(f"{name}: {len(m.active_adapters)} active adapters; the fast path trains one at a time")
        a = m.active_adapters[0]
        drop = m.lora_dropout[a]
        if not isinstance(drop, torch.nn.Identity) and getattr(drop, "p", 0) > 0:
            raise ValueError(f"{name}: lora_dropout={drop.p}; the fast path has no dropout. Set "
                             "LoraConfig(lora_dropout=0.0) or use the plain path")
        if getattr(m, "lora_variant", {}).get(a) is not None or getattr(m, "use_dora", {}).get(a):
            raise ValueError(f"{name}: DoRA / LoRA variants are not fused; use the plain path")
        if getattr(m.lora_B[a], "bias", None) is not None:
            raise ValueError(f"{name}: LoRA bias is not fused; use LoraConfig(lora_bias=False) or the plain path")
        if "lm_head" in name:
            raise ValueError("an adapter on lm_head is not supported by the fast path (its loss keeps lm_head frozen)")
    return layers


def enable_fast_path(model, *, checkpointing: bool | None = None, offload: bool | None = None,
                     keep_weight: bool = False, dtype=torch.bfloat16, compile_layers: bool | None = None,
                     window_attention: bool | None = None, triton_dequant: bool | None = None,
                     lean_recompute: bool = True):
    """Switch a peft (Q)LoRA model to the fast path in place; returns it. Undo with `disable_fast_path`.

    checkpointing: recompute each decoder layer in backward (default: on when on CUDA, where
    memory is the limit; off on the CPU, where time is).
    offload: keep checkpointed layer inputs in CPU memory (default: on when on CUDA).
    keep_weight: keep each layer's dequantized weights from recompute to backward (faster, more memory).
    dtype: the compute dtype frozen fp32 tensors (norms, embeddings) are cast back to.
    compile_layers: torch.compile each checkpointed decoder layer (regional compilation: one graph
    per layer, the 4-bit dequantization inside as a custom op), so its small ops (RoPE, residual
    adds, casts) fuse and launch fewer kernels (default: on when on CUDA; the first step compiles).
    triton_dequant: dequantize NF4 weights with `nf4_kernel` (one Triton kernel, bit-identical to
    bitsandbytes' two; default: on when on CUDA and Triton imports).
    window_attention: for a model with a sliding window (Mistral's config), attend through
    FlexAttention with a block mask wherever the window cuts in (sequences longer than it), instead
    of sdpa with a dense (T, T) mask that rules out its flash kernel (default: on when on CUDA).
    lean_recompute: with checkpointing, the recompute skips down_proj's base matmul, whose output
    backward never reads (Llama, Mistral, Qwen2/3 layers: LEAN_LAYERS; others recompute in full).

    With checkpointing, gradient checkpointing is switched on (our offloading kind); do not also pass
    `gradient_checkpointing=True` to a Trainer, which would replace it with torch's.
    """
    from . import models

    layers = check_fast_path(model)
    models.plain_4bit_kernels(model)
    lm = causal_lm(model)
    cast_frozen_fp32(model, dtype)
    cuda = next(model.parameters()).is_cuda
    n_triton = 0
    for _, m in layers:
        m._qlora_nb_keep_weight, m._qlora_nb_output_only = keep_weight, False
        base = m.get_base_layer()
        base._qlora_nb_triton_dequant = bool(
            (cuda if triton_dequant is None else triton_dequant) and nf4_kernel.supports(base.weight))
        n_triton += base._qlora_nb_triton_dequant
        _patch(m, _fast_lora_forward)
    norms = [m for m in lm.modules() if _is_rms_norm(m)]
    mlps = [m for m in lm.modules() if _is_swiglu_mlp(m)]
    for m in norms:
        _patch(m, _fast_norm_forward)
    for m in mlps:
        _patch(m, _fast_mlp_forward)
    if window_attention and not cuda:
        raise ValueError("window_attention=True needs a CUDA model: torch has no FlexAttention backward on the CPU "
                         "(leave it None there, which keeps sdpa)")
    window = use_window_attention(lm) if (cuda if window_attention is None else window_attention) else False
    checkpointing = cuda if checkpointing is None else checkpointing
    offload = checkpointing and (cuda if offload is None else offload)
    n = n_lean = 0
    if checkpointing and lean_recompute:
        for m in output_only_projections(lm):
            m._qlora_nb_output_only = True
            n_lean += 1
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.enable_input_require_grads()  # our checkpoint is reentrant-style: layer 0's input must require grad
        from transformers.modeling_layers import GradientCheckpointingLayer

        compile_layers = cuda if compile_layers is None else compile_layers
        func = checkpoint_function(offload, compile_layers)
        for module in lm.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module._gradient_checkpointing_func = func
                n += 1
    lm.config.use_cache = False
    model._qlora_nb_fast = {"lora_layers": len(layers), "checkpointed_layers": n, "rms_norms": len(norms),
                            "swiglu_mlps": len(mlps), "offload": offload, "keep_weight": keep_weight,
                            "compiled_layers": n if compile_layers else 0, "window_attention": window,
                            "triton_dequant_layers": n_triton, "lean_recompute_layers": n_lean}
    return model


def levers(model) -> dict | None:
    """Which levers of the fast path are on in `model` (what a benchmark record should say), or None without it."""
    info = getattr(model, "_qlora_nb_fast", None)
    if not info:
        return None
    return {"compile_layers": info["compiled_layers"] > 0, "window_attention": info["window_attention"],
            "triton_dequant": info["triton_dequant_layers"] > 0, "keep_weight": info["keep_weight"],
            "offload": info["offload"], "lean_recompute": info["lean_recompute_layers"] > 0}


def disable_fast_path(model):
    """Give every patched layer back its library forward (before merging, for example); returns the model."""
    for m in model.modules():
        if "forward" in m.__dict__ and hasattr(m, "_qlora_nb_plain_forward"):
            del m.forward
    lm = causal_lm(model)
    plain_attention = lm.__dict__.pop("_qlora_nb_plain_attention", None)
    if plain_attention is not None:
        lm.set_attn_implementation(plain_attention)
    if (getattr(model, "_qlora_nb_fast", None) or {}).get("checkpointed_layers"):
        # our offloading checkpoint goes; torch's takes its place (a model without checkpointing stays without)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model._qlora_nb_fast = None
    return model
