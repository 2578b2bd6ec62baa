"""What this machine offers the workbook: library versions, the accelerator, bitsandbytes' 4-bit backend.

Leaves out: installing anything (the README and the notebooks' setup cell do that).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

STACK = ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate",
         "papermill", "ipywidgets", "matplotlib")


def versions(packages=STACK) -> dict[str, str]:
    """{package: installed version or 'missing'} for the workbook's stack, plus Python."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def device_summary() -> dict[str, str]:
    """The accelerator the notebooks will use: a CUDA GPU with its memory, else the CPU with cores and RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": props.name, "memory": f"{props.total_memory / 2**30:.1f} GiB",
                "count": str(torch.cuda.device_count())}
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"device": "cpu", "name": platform.processor() or platform.machine(),
            "memory": f"{mem / 2**30:.1f} GiB", "count": str(os.cpu_count())}


def nf4_roundtrip_error(device: str | None = None) -> tuple[str, float]:
    """(device, max abs error) of a bitsandbytes NF4 quantize/dequantize round trip on a 64x64 tensor.

    Proves the 4-bit backend runs here; the error is nonzero (4 bits) but bounded by the block absmax.
    """
    import torch
    import bitsandbytes.functional as F

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    back = F.dequantize_4bit(packed, state)
    return device, float((back.float() - w.float()).abs().max())
