"""Measure activation memory: the bytes autograd keeps for backward, with and without gradient checkpointing.

Leaves out: allocator-level numbers (the CPU allocator keeps no statistics; on a GPU,
torch.cuda.max_memory_allocated says more, including temporaries) and the weights themselves.

How it counts: every tensor autograd saves for backward passes through a
`torch.autograd.graph.saved_tensors_hooks` pack hook. We note its storage (once per
storage, however many views are saved), skip storages that belong to parameters or
buffers, and watch with a weakref when autograd lets go of it. The running total of live
saved storages is the activation memory; we report its value when the forward pass ends
and its peak over forward + backward.

Gradient checkpointing is measured in its reentrant form (`use_reentrant=True`): there the
checkpoint saves each layer's input with `save_for_backward`, which our hook sees. The
non-reentrant form (transformers' default) keeps the same inputs, but in a closure that no
hook can see, so it would be under-counted.
"""
from __future__ import annotations

import warnings
import weakref

import torch


class _Saved:
    """What the graph holds instead of the tensor, so a weakref can tell when autograd drops it."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Context manager that tracks bytes of distinct non-parameter storages saved for backward."""

    def __init__(self, model: torch.nn.Module):
        self.excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, number of saved tensors using it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return _Saved(t)
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.live[key][1] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda holder: holder.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def saved_activation_bytes(model, input_ids: torch.Tensor, checkpointing: bool = False) -> dict[str, int]:
    """{'after_forward', 'peak'}: bytes of activations kept for backward in one training step on `input_ids` (B, T).

    Turns gradient checkpointing on or off for the call (reentrant form, see the module docstring)
    and leaves it off afterwards. Gradients are computed (and left in .grad) so the peak
    includes the recomputation during backward.
    """
    # gradient_checkpointing_* is renamed activation_checkpointing_* in transformers 5.2x; the old
    # names work on every 5.x we support, so we keep them and hide the rename warning.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    else:
        model.gradient_checkpointing_disable()
    model.train()
    try:
        with SavedTensorMeter(model) as meter:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            after_forward = meter.current
            loss.backward()
            del loss
        return {"after_forward": after_forward, "peak": meter.peak}
    finally:
        model.gradient_checkpointing_disable()
        if checkpointing:
            model.disable_input_require_grads()
        model.zero_grad(set_to_none=True)
